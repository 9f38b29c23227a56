"""MSE-optimal clipping: per (row, group), the shrink ratio of the quantization range that minimises
the group's error, searched on a grid.

Round-to-nearest spends its grid on the extremes of each group; shrinking the range by a ratio r < 1
clips a few outliers and rounds everything else more finely. The best r per group is found by trying
a grid (1.0 first, so ties keep round-to-nearest and the result is never worse than RTN on the
objective). Objectives:

- ``"weight"``: ‖Q(w_g) − w_g‖² (no data; the ``clip`` method — as in HQQ's / llama.cpp's
  error-minimising range search, here a 1-D grid over the ratio);
- ``"output"``: δ_gᵀ H_gg δ_g with δ_g = Q(w_g) − w_g and H_gg the group's diagonal block of the
  input second moment — the output error of the group alone on calibration tokens, AWQ's clip
  search (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration", MLSys 2024, §3.3 / auto-clip) computed from statistics instead of stored activations.

The output is the shared quantizer's format (codes, fp16 scales, fp16 zeros); only the range differs.

Example:
    >>> q = quantize(w, 3, group_size=32, method="clip")
    >>> ((dequantize(q) - w) ** 2).sum() <= ((fake_quantize(w, 3, 32) - w) ** 2).sum()
    tensor(True)
"""
from __future__ import annotations

import torch

from .quantizer import _finish, _grouped, decode, encode, group_params, n_groups, register

__all__ = ["clip_ratios", "search_clip"]

_N_GRID = 20          # ratios tried: 1.0, 0.975, ..., 0.525 (AWQ's grid: 20 steps down to 0.5)
_MIN_RATIO = 0.5


def clip_ratios(n_grid: int = _N_GRID, min_ratio: float = _MIN_RATIO) -> list[float]:
    """The ratio grid, 1.0 first: ``1 − i·(1 − min_ratio)/n_grid`` for i in 0..n_grid−1."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid={n_grid!r} must be a positive int")
    if not (isinstance(min_ratio, (int, float)) and 0.0 < min_ratio < 1.0):
        raise ValueError(f"min_ratio={min_ratio!r} must be in (0, 1)")
    return [1.0 - i * (1.0 - min_ratio) / n_grid for i in range(n_grid)]


def _group_blocks(h: torch.Tensor, group_size: int | None, g_count: int, g: int) -> torch.Tensor:
    """(K, K) -> (G, g, g) diagonal blocks, zero rows/cols at the padding of a partial last group."""
    k = h.shape[0]
    if group_size is None:
        return h.unsqueeze(0)
    pad = g_count * g - k
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad)) if pad else h
    idx = torch.arange(g_count * g, device=h.device).reshape(g_count, g)
    return hp[idx.unsqueeze(-1), idx.unsqueeze(-2)]                       # (G, g, g)


def search_clip(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                h: torch.Tensor | None = None, ratios=None):
    """Best-ratio ``(codes (N, G, g) float, scale (N, G) fp16, zero (N, G) fp16 | None)`` per group.

    ``w`` (N, K) fp32; ``h`` (K, K) input second moment for the output objective, None for the
    weight objective. Padding of a partial last group never counts in the error.
    """
    n, k = w.shape
    ratios = clip_ratios() if ratios is None else list(ratios)
    if not ratios or any(not (0.0 < float(r) <= 1.0) for r in ratios):
        raise ValueError(f"clip ratios {ratios!r} must be a non-empty list of numbers in (0, 1]")
    wg = _grouped(w, group_size)                                          # (N, G, g)
    g_count, g = wg.shape[1], wg.shape[2]
    valid = (torch.arange(g_count * g, device=w.device) < k).reshape(1, g_count, g).float()
    hb = None if h is None else _group_blocks(h.float(), group_size, g_count, g)   # (G, g, g)
    best = None
    for r in ratios:
        scale, zero = group_params(wg, bits, symmetric, float(r))
        s3, z3 = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        codes = encode(wg, s3, z3, bits)                                  # (N, G, g)
        d = (decode(codes, s3, z3, bits) - wg) * valid                    # (N, G, g)
        if hb is None:
            err = (d * d).sum(-1)                                         # (N, G)
        else:
            err = (torch.einsum("ngi,gij->ngj", d, hb) * d).sum(-1)      # (N, G)
        if best is None:
            best = [err, codes, scale, zero]
            continue
        better = err < best[0]                                            # strict: ties keep the earlier
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better.unsqueeze(-1), codes, best[1])
        best[2] = torch.where(better, scale, best[2])
        if zero is not None:
            best[3] = torch.where(better, zero, best[3])
    assert best[2].shape == (n, n_groups(k, group_size))
    return best[1], best[2], best[3]


@register("clip")
def clip(w: torch.Tensor, bits: int, group_size, symmetric: bool, stats, *,
         n_grid: int = _N_GRID, min_ratio: float = _MIN_RATIO):
    """Weight-MSE-optimal clip ratio per (row, group); never a larger ‖Q(W) − W‖² than RTN."""
    codes, scale, zero = search_clip(w, bits, group_size, symmetric, None, clip_ratios(n_grid, min_ratio))
    return _finish(codes, scale, zero, bits, group_size, tuple(w.shape))
