"""Activation-aware per-input-channel scaling (AWQ).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024 (arXiv:2306.00978), §3.2: input channels that carry large activations matter most;
scaling their weight columns up by s before quantization (and the input down by s) shrinks their
relative rounding error. With s = s_X^α (s_X = mean |x| per input channel), α is searched on a grid
to minimise the layer's output error on calibration tokens:

    α* = argmin_α  E‖(Q(W·diag(s_α))·diag(s_α)⁻¹ − W) x‖²        (α = 0: s = 1, plain RTN)

The output error is computed exactly from the layer's statistics (``tr(ΔW·Σxxᵀ·ΔWᵀ)/n``), no
activations kept. s is normalised by the geometric mean of its extremes (√(max·min), as AWQ does)
and rounded to fp16 *before* it scales W, so the stored s reproduces the searched weight exactly.
With ``clip=True`` (the default, AWQ §3.3's clip search) each group's clip ratio is then searched
on the output error of the scaled weight (input second moment diag(s)⁻¹·Σxxᵀ·diag(s)⁻¹); it is kept
only if the whole layer's calibration output error does not grow.

Storage (bitplan's choice): AWQ folds s into the previous op (LayerNorm / previous Linear); bitplan
quantizes each layer on its own, so s is STORED: ``QTensor.in_scale`` (K,) fp16, K·2 bytes per layer
(``method_extra_nbytes``), always present for this method (even when α* = 0 leaves s = 1), so the
byte count is known before the search. Each layer gets its own s (no sharing across q/k/v): never
worse on calibration data than a shared s. A packed module computes ``kernel(x / s)`` with
``dequantize(q, apply_in_scale=False)``; ``dequantize(q)`` is the effective weight W_q·diag(s)⁻¹.

``awq_gptq`` (below) keeps AWQ's s and rounds W·diag(s) with GPTQ instead of RTN.

Guarantee (``awq``): α = 0 is in the grid and evaluates exactly to RTN (s = 1 exactly), and the
search keeps the first minimum, so on calibration statistics the output error is never above RTN's.

Example:
    >>> q = quantize(w, 4, 128, method="awq", stats=stats)
    >>> q.in_scale.shape, q.in_scale.dtype
    (torch.Size([384]), torch.float16)
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .clip import clip_ratios, search_clip
from .gptq import check_gptq_options, gptq_quantize
from .quantizer import _finish, _grouped, _rtn_grouped, decode, register

__all__ = ["awq_scales", "ALPHAS"]          # methods: "awq", "awq_gptq"

ALPHAS = tuple(i / 20 for i in range(20))     # AWQ's grid: 0, 0.05, ..., 0.95
_FP16_TINY = 2.0 ** -14
_MAG_FLOOR = 1e-4                              # channel magnitudes below 1e-4 · max are floored


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) fp16 scales s = m^α / √(max·min) for activation magnitudes ``mean_abs`` (K,).

    Dead channels (magnitude 0) are floored at 1e-4 of the largest, so s stays finite and fp16-normal.
    """
    m = mean_abs.float()
    top = float(m.max())
    if top <= 0 or alpha == 0:
        return torch.ones_like(m, dtype=torch.float16)
    s = m.clamp(min=top * _MAG_FLOOR).pow(alpha)
    s = s / torch.sqrt(s.max() * s.min())
    return s.clamp(min=_FP16_TINY, max=6.0e4).to(torch.float16)


def _check_alphas(alphas) -> list:
    alphas = list(alphas)
    if not alphas or any(not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 1
                         for a in alphas):
        raise ValueError(f"alphas={alphas!r} must be a non-empty list of numbers in [0, 1]")
    return alphas


def _dequant(codes, scale, zero, bits, k):
    """(N, G, g) codes -> (N, K) fp32 weight of the grid (no in_scale)."""
    w = decode(codes, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits)
    return w.reshape(w.shape[0], -1)[:, :k]


def _out_err(dw: torch.Tensor, h: torch.Tensor) -> float:
    return float(((dw @ h) * dw).sum())


def _search_alpha(w, bits, group_size, symmetric, h, mean_abs, alphas):
    """(error, s fp16 (K,), codes, scale, zero) of the α whose RTN of W·diag(s) has the least
    output error ``tr(ΔW·h·ΔWᵀ)``; the first minimum wins (α = 0 first: ties keep RTN)."""
    k = w.shape[1]
    best = None
    for a in alphas:
        s = awq_scales(mean_abs, float(a))                                # (K,) fp16
        sf = s.float()
        codes, scale, zero = _rtn_grouped(_grouped(w * sf, group_size), bits, symmetric)
        err = _out_err(_dequant(codes, scale, zero, bits, k) / sf - w, h)
        if best is None or err < best[0]:
            best = (err, s, codes, scale, zero)
    return best


@register("awq", needs_stats=True, stores_in_scale=True)
def awq(w: torch.Tensor, bits: int, group_size, symmetric: bool, stats, *,
        alphas=ALPHAS, clip: bool = True):
    """AWQ scale search (+ output-error clip search when ``clip``); stores ``in_scale``."""
    alphas = _check_alphas(alphas)
    if not isinstance(clip, bool):
        raise TypeError(f"clip={clip!r} must be a bool")
    n, k = w.shape
    h = stats.xtx / stats.n_tokens                                        # (K, K) E[x xᵀ]
    err, s, codes, scale, zero = _search_alpha(w, bits, group_size, symmetric, h, stats.mean_abs, alphas)
    if clip:
        sf = s.float()
        hs = h / (sf.unsqueeze(1) * sf.unsqueeze(0))                      # second moment of x / s
        c2, sc2, z2 = search_clip(w * sf, bits, group_size, symmetric, hs, clip_ratios())
        if _out_err(_dequant(c2, sc2, z2, bits, k) / sf - w, h) <= err:
            codes, scale, zero = c2, sc2, z2
    return _finish(codes, scale, zero, bits, group_size, (n, k), in_scale=s)


@register("awq_gptq", needs_stats=True, stores_in_scale=True)
def awq_gptq(w: torch.Tensor, bits: int, group_size, symmetric: bool, stats, *, alphas=ALPHAS,
             damp: float = 0.01, act_order: bool = True, clip: bool = True):
    """AWQ's s (α searched with RTN), then GPTQ (``kernels/gptq.py``) on W·diag(s) with the Hessian
    of the scaled input x / s, i.e. diag(s)⁻¹·H·diag(s)⁻¹. Stores ``in_scale`` like ``awq``.

    AWQ §5 reports the two as orthogonal (AWQ + GPTQ better than either); here it is the best of the
    methods on MiniLM's held-out sentences (benchmarks/quantizer_methods.py), by a small margin over
    ``gptq``. No RTN guarantee: GPTQ's greedy
    rounding is not checked against RTN.
    """
    _check_alphas(alphas)
    check_gptq_options(damp, 128, act_order, clip)
    h = stats.xtx / stats.n_tokens
    _, s, *_ = _search_alpha(w, bits, group_size, symmetric, h, stats.mean_abs, list(alphas))
    sf = s.float()
    hs = stats.hessian / (sf.unsqueeze(1) * sf.unsqueeze(0))              # (K, K) Hessian of x / s
    q = gptq_quantize(w * sf, hs, bits, group_size, symmetric, float(damp), 128, act_order, clip)
    return replace(q, in_scale=s)
