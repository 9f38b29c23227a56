"""Error-compensating rounding (GPTQ / OBQ).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), building on Optimal Brain Quantization
(Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022). For each row w of W the layer's
output error on calibration tokens is ½ δᵀHδ with H = 2·E[x xᵀ] (the same H for every row). Columns
are quantized one at a time, left to right; the rounding error of column j is spread over the
columns not yet quantized through the inverse Hessian restricted to them:

    e = (w_j − q_j) / U_jj,     w_{j:} −= e · U_{j, j:}

where U is the upper Cholesky factor of H⁻¹ (its rows are the successive restricted inverses,
GPTQ §4 "Cholesky reformulation"). Steps taken from the paper:

- damping: H += λ·I, λ = ``damp`` · mean(diag H) (1 % by default); λ grows ×10 (up to 5 times) if
  the Cholesky factorisation still fails; dead inputs (H_jj = 0) get H_jj = 1 (their column is then
  plain RTN; the weight is kept — unlike GPTQ's reference, which zeroes it).
- lazy batch updates: columns are processed in blocks of ``block_size``; inside a block updates are
  rank-1, the rest of W is updated once per block with one matmul (§4 "Lazy batch-updates").
- groups: a group's scale/zero are computed from the *current, error-updated* weights when its first
  column is reached (§4 / App. "grouping"); blocks are aligned to whole groups so that moment's
  weights are exact. Per-channel: one scale/zero per row from the original weight, as GPTQ.
- ``act_order=True`` (GPTQ's reference "desc_act"): columns are processed in order of decreasing
  H_jj. It keeps bitplan's storage format (contiguous groups, no per-column group index) only with
  *static* groups: all group scales/zeros are computed from the original weight before any update
  (then each column uses its own group's). Per-channel it is format-neutral.
- ``clip=True``: each group's range is the weight-MSE-optimal clip ratio of its weights at the moment
  its range is fixed (``kernels/clip.py``), like the reference's ``mse`` grid.
- Defaults ``act_order=True, clip=True``: on MiniLM's 36 layers (128 calibration sentences, held-out
  output error, benchmarks/quantizer_methods.py) both help at 3 and 4 bits, per channel and g128.

Output: the shared quantizer's :class:`QTensor` (codes, fp16 scales, fp16 zeros); each code is
computed with the stored fp16 scale/zero, so ``dequantize`` reproduces the propagated values exactly.

Example:
    >>> q = quantize(w, 3, 128, method="gptq", stats=stats)        # stats: LayerStats of the inputs
    >>> stats.output_error(dequantize(q) - w) < stats.output_error(fake_quantize(w, 3, 128) - w)
"""
from __future__ import annotations

import torch

from .clip import clip_ratios, search_clip
from .quantizer import _grouped, decode, encode, group_params, n_groups, register, QTensor

__all__ = ["gptq_quantize", "inverse_hessian_factor", "check_gptq_options"]


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01, max_tries: int = 5) -> torch.Tensor:
    """Upper Cholesky factor U (K, K) fp32 of (H + λI)⁻¹, with dead channels fixed (see above).

    Computed in float64 (K ≤ a few thousand: milliseconds to a second), returned in fp32.
    """
    hd = h.to(torch.float64, copy=True)                                   # (K, K), never the caller's
    diag = torch.diagonal(hd)                                             # a view: edits hd
    diag[diag == 0] = 1.0
    lam = damp * float(diag.mean())
    added = 0.0
    for _ in range(max_tries + 1):
        diag += lam - added                                               # H + lam·I, in place
        added = lam
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            del hd
            hinv = torch.cholesky_inverse(chol)                           # (H + lam·I)⁻¹
            del chol
            return torch.linalg.cholesky(hinv, upper=True).float()
        lam = max(lam * 10.0, 1e-8)
    raise ValueError(f"GPTQ: the input Hessian is not positive definite even with damping {lam:.3g} "
                     "(are the statistics finite?)")


def _params(wcols: torch.Tensor, bits: int, symmetric: bool, clip: bool):
    """fp16 (scale, zero|None) of each row's group of columns ``wcols`` (N, m)."""
    if not clip:
        scale, zero = group_params(wcols.unsqueeze(1), bits, symmetric)
    else:
        _, scale, zero = search_clip(wcols, bits, None, symmetric, None, clip_ratios())
    return scale[:, 0], None if zero is None else zero[:, 0]            # (N,)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  clip: bool = False) -> QTensor:
    """GPTQ of ``w`` (N, K) fp32 with input Hessian ``h`` (K, K) (any positive multiple of Σ x xᵀ)."""
    n, k = w.shape
    half, qmax = 2 ** (bits - 1), 2 ** bits - 1
    diag_h = torch.diagonal(h)
    perm = torch.argsort(diag_h, descending=True, stable=True) if act_order else None
    hp = h if perm is None else h[perm][:, perm]
    u = inverse_hessian_factor(hp, damp)                                  # (K, K) upper
    wk = (w if perm is None else w[:, perm]).clone()                       # (N, K) worked on in place
    gcount = n_groups(k, group_size)
    scales = torch.empty(n, gcount, dtype=torch.float16, device=w.device)
    zeros = None if symmetric else torch.empty_like(scales)
    static = group_size is None or act_order
    if static:                                                             # params from the original W
        if clip:
            _, sc, zr = search_clip(w, bits, group_size, symmetric, None, clip_ratios())
        else:
            sc, zr = group_params(_grouped(w, group_size), bits, symmetric)
        scales.copy_(sc)
        if zeros is not None:
            zeros.copy_(zr)
    gidx = torch.zeros(k, dtype=torch.long, device=w.device) if group_size is None else \
        torch.arange(k, device=w.device) // group_size                    # group of each original column
    if perm is not None:
        gidx = gidx[perm]
    if group_size is not None and not static:                             # whole groups per block
        block_size = max(group_size, (block_size // group_size) * group_size)
    codes = torch.empty(n, k, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wk[:, i1:i2].clone()                                          # (N, B)
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if not static and col % group_size == 0:                       # group starts: fix its range
                sc, zr = _params(w1[:, j:j + group_size], bits, symmetric, clip)
                scales[:, col // group_size] = sc
                if zeros is not None:
                    zeros[:, col // group_size] = zr
            g = int(gidx[col])
            s = scales[:, g]
            z = None if zeros is None else zeros[:, g]
            wc = w1[:, j]
            c = encode(wc, s, z, bits)                                     # (N,)
            codes[:, col] = c
            e = (wc - decode(c, s, z, bits)) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = e
        if i2 < k:
            wk[:, i2:] -= err1 @ u[i1:i2, i2:]                             # lazy batch update
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    assert float(codes.min()) >= 0 and float(codes.max()) <= qmax and half > 0
    return QTensor(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, bits=bits,
                   group_size=group_size, shape=(n, k), dtype=torch.float32)


def check_gptq_options(damp, block_size, act_order, clip) -> None:
    """ValueError/TypeError naming a bad GPTQ option."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise ValueError(f"damp={damp!r} must be a number in (0, 1) (fraction of mean diag H)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    for name, v in (("act_order", act_order), ("clip", clip)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}={v!r} must be a bool")


@register("gptq", needs_stats=True)
def gptq(w: torch.Tensor, bits: int, group_size, symmetric: bool, stats, *, damp: float = 0.01,
         block_size: int = 128, act_order: bool = True, clip: bool = True):
    """GPTQ with the layer's H = 2·Σxxᵀ/n; options as in :func:`gptq_quantize` (defaults measured best
    on MiniLM: act_order and clip on)."""
    check_gptq_options(damp, block_size, act_order, clip)
    return gptq_quantize(w, stats.hessian, bits, group_size, symmetric, float(damp), block_size,
                         act_order, clip)
