"""The one shared quantizer: quantize / dequantize / pack / unpack, with pluggable rounding methods.

Used by sensitivity (to get ΔW = Q_b(W) − W), by fake apply and by packed apply, so every stage sees
the same numbers. Pure functions on tensors: no device moves, no printing, no global state.

Conventions (all bits 2..8):
- weights are 2-D ``[N, K]`` (out_features, in_features); conv weights are flattened to
  ``[out_channels, in_channels/groups * kh * kw]`` by the caller.
- groups run along K: ``group_size=None`` means one group per output row (per-channel);
  ``group_size=g`` means ``ceil(K/g)`` groups per row, the last one possibly partial.
- codes are unsigned ``0 .. 2**bits - 1``; dequantization is
  ``W_r = (code − 2**(bits−1)) · scale + zero`` per group. Symmetric: ``zero = 0`` (not stored),
  ``scale = absmax / (2**(bits−1) − 1)``. Asymmetric: ``scale = (max − min) / (2**bits − 1)``,
  ``zero = min + 2**(bits−1) · scale`` (the layout of PyTorch's int4 CPU kernel).
- scales and zeros are stored in fp16 and the codes are computed from the *stored* (rounded) values,
  so ``dequantize`` of the stored tensors reproduces fake quantization bit for bit.

Methods (``method=``; a plain dict registry, ``METHODS``, filled by ``@register``). Every method
returns the same :class:`QTensor` format, so every kernel runs every method unchanged:

=========  ===========  ==========================================================================
name       needs stats  what it does
=========  ===========  ==========================================================================
``rtn``    no           round to nearest on the full min/max (or absmax) range of each group
``clip``   no           per-group clip-ratio grid search minimising ‖Q(W) − W‖² (``kernels/clip.py``)
``awq``    yes          activation-aware per-input-channel scaling + output-error clip search;
                        stores ``in_scale`` (K,) fp16 (``kernels/awq.py``)
``gptq``   yes          error-compensating rounding with the inverse Hessian of the layer input,
                        act-order with static groups + clip search (``kernels/gptq.py``)
``awq_     yes          AWQ's scale s, then GPTQ on W·diag(s); stores ``in_scale`` (``kernels/awq.py``)
gptq``
=========  ===========  ==========================================================================

Which to use (MiniLM, benchmarks/quantizer_methods.py): output error on held-out tokens falls
rtn > clip > awq > gptq ≳ awq_gptq; time per layer rises rtn ≪ clip < gptq < awq < awq_gptq.

"Stats" are the layer's calibration statistics (:class:`bitplan.kernels.calibstats.LayerStats`:
Σ x xᵀ, Σ |x|, token count), gathered once per layer and shared by every method.

``in_scale`` (AWQ only): the effective weight is ``Q(W·diag(s))·diag(s)⁻¹``. ``dequantize`` returns
that effective weight; a packed module stores ``s`` (K fp16 values, :func:`method_extra_nbytes`) and
runs its kernel on ``x / s`` with ``dequantize(q, apply_in_scale=False)`` — the same product.

Example:
    >>> w = torch.randn(64, 128)
    >>> q = quantize(w, 4, group_size=32)
    >>> w_r = dequantize(q)                      # (64, 128) float32
    >>> torch.equal(unpack(pack(q.codes, 4), 4, 128), q.codes)
    True
    >>> stats = LayerStats.zeros(128).update(torch.randn(1000, 128))
    >>> q = quantize(w, 3, group_size=32, method="gptq", stats=stats)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..core.spec import n_groups, packed_row_bytes  # noqa: F401  (re-exported: the quantizer's layout)

__all__ = ["QTensor", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "n_groups",
           "packed_row_bytes", "SUPPORTED_BITS", "METHODS", "register", "get_method",
           "method_extra_nbytes", "in_scale_nbytes", "group_params", "encode", "decode"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_STORE_DTYPE = torch.float16     # dtype of scales / zeros / in_scale on disk and in packed modules
_FP16_TINY = 2.0 ** -14          # smallest normal fp16: keeps scales invertible


@dataclass(frozen=True)
class QTensor:
    """A quantized 2-D weight: unpacked codes plus per-group scales (and zeros, and AWQ's in_scale)."""
    codes: torch.Tensor            # (N, K) uint8, values in 0 .. 2**bits - 1
    scales: torch.Tensor           # (N, G) fp16
    zeros: torch.Tensor | None     # (N, G) fp16, None when symmetric
    bits: int
    group_size: int | None         # None = one group per row
    shape: tuple[int, int]         # (N, K)
    dtype: torch.dtype             # dtype of the original weight (dequantize returns it)
    in_scale: torch.Tensor | None = None   # (K,) fp16 per-input-channel scale s (AWQ), else None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {list(SUPPORTED_BITS)}")


def in_scale_nbytes(k: int) -> int:
    """Bytes of a stored per-input-channel scale vector: K fp16 values."""
    return 2 * k


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(N, K) -> (N, G, g); a partial last group is padded by repeating its last value
    (padding never changes a group's min / max / absmax)."""
    n, k = w.shape
    if group_size is None or group_size >= k:      # one group per row: never pad beyond K
        return w.unsqueeze(1)
    g = n_groups(k, group_size)
    pad = g * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, g, group_size)


# ---- the three primitives every method shares (so every method's codes decode bit for bit) ------

def group_params(wg: torch.Tensor, bits: int, symmetric: bool, ratio=None):
    """Stored fp16 ``(scale, zero)`` of groups ``wg`` (..., g) from their range shrunk by ``ratio``.

    ``ratio`` (None = 1, or a tensor broadcastable to ``wg.shape[:-1]``) multiplies the range ends
    (absmax when symmetric, min and max otherwise): the clip ratio of :mod:`bitplan.kernels.clip`.
    Returns ``scale`` (...) fp16 and ``zero`` (...) fp16, or None when symmetric.
    """
    half = 2 ** (bits - 1)
    if symmetric:
        amax = wg.abs().amax(-1)
        if ratio is not None:
            amax = amax * ratio
        return (amax / (half - 1)).clamp(min=_FP16_TINY).to(_STORE_DTYPE), None
    lo, hi = wg.amin(-1), wg.amax(-1)
    if ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=_FP16_TINY).to(_STORE_DTYPE)
    return scale, (lo + half * scale.float()).to(_STORE_DTYPE)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes (float, integral values in 0 .. 2**bits-1) of ``w`` with stored ``scale``/``zero``
    already broadcast to ``w``'s shape (fp16 or fp32)."""
    half = 2 ** (bits - 1)
    x = w if zero is None else w - zero.float()
    return (torch.round(x / scale.float()) + half).clamp(0, 2 ** bits - 1)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``(code − 2**(bits−1)) · scale + zero`` in fp32, ``scale``/``zero`` broadcast to ``codes``."""
    w = (codes.float() - 2 ** (bits - 1)) * scale.float()
    return w if zero is None else w + zero.float()


def _rtn_grouped(wg: torch.Tensor, bits: int, symmetric: bool, ratio=None):
    """Round-to-nearest of groups (N, G, g): ``(codes (N, G, g) float, scale (N, G), zero)``."""
    scale, zero = group_params(wg, bits, symmetric, ratio)
    codes = encode(wg, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits)
    return codes, scale, zero


def _finish(codes_g: torch.Tensor, scale, zero, bits, group_size, shape, in_scale=None) -> QTensor:
    """QTensor from grouped float codes (N, G, g) (padding dropped)."""
    n, k = shape
    codes = codes_g.reshape(n, -1)[:, :k].to(torch.uint8)                    # (N, K)
    return QTensor(codes=codes, scales=scale, zeros=zero, bits=bits, group_size=group_size,
                   shape=(n, k), dtype=torch.float32, in_scale=in_scale)


# ---- method registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One rounding method: ``fn(w (N, K) fp32, bits, group_size, symmetric, stats, **opts) -> QTensor``."""
    name: str
    fn: Callable
    needs_stats: bool         # needs the layer's calibration statistics (LayerStats)
    stores_in_scale: bool     # its QTensor carries in_scale (K,) fp16: counted by method_extra_nbytes
    options: tuple            # keyword-only option names fn accepts (with defaults)


METHODS: dict[str, Method] = {}


def register(name: str, *, needs_stats: bool = False, stores_in_scale: bool = False):
    """Decorator adding a rounding method to :data:`METHODS` under ``name``.

    Example::

        @register("rtn")
        def rtn(w, bits, group_size, symmetric, stats): ...
    """
    def deco(fn):
        if name in METHODS:
            raise ValueError(f"quantizer method {name!r} is already registered")
        opts = tuple(p.name for p in inspect.signature(fn).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY)
        METHODS[name] = Method(name, fn, needs_stats, stores_in_scale, opts)
        return fn
    return deco


def get_method(method: str) -> Method:
    """The registered :class:`Method` called ``method``; ``ValueError`` listing the known ones."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"quant method={method!r} is not known; allowed: {sorted(METHODS)}")
    return METHODS[method]


def method_extra_nbytes(method: str, n: int, k: int) -> int:
    """Bytes a method stores beyond codes + scales + zeros for an (n, k) weight: AWQ's ``in_scale``
    (K fp16 values, whatever scale the search picked — the format never depends on the data); 0
    for the others. ``weight_nbytes(n, k, ...) + method_extra_nbytes(method, n, k)`` is the exact
    generic packed size.

    Example: ``method_extra_nbytes("awq", 1536, 384)`` == 768
    """
    return in_scale_nbytes(k) if get_method(method).stores_in_scale else 0


@register("rtn")
def _rtn(w: torch.Tensor, bits: int, group_size, symmetric: bool, stats) -> QTensor:
    """Round to nearest on each group's full range (stats are not used)."""
    codes, scale, zero = _rtn_grouped(_grouped(w, group_size), bits, symmetric)
    return _finish(codes, scale, zero, bits, group_size, tuple(w.shape))


def _check_stats(stats, k: int, device, name: str) -> None:
    for attr in ("xtx", "abs_sum", "n_tokens"):
        if not hasattr(stats, attr):
            raise TypeError(f"stats for method {name!r} must be a LayerStats "
                            f"(bitplan.kernels.calibstats), got {type(stats).__name__}")
    if tuple(stats.xtx.shape) != (k, k) or tuple(stats.abs_sum.shape) != (k,):
        raise ValueError(f"stats are for K={stats.abs_sum.shape[0]} input channels, but the weight "
                         f"has K={k}")
    if not (bool(torch.isfinite(stats.xtx).all()) and bool(torch.isfinite(stats.abs_sum).all())):
        raise ValueError(f"stats for method {name!r} hold non-finite values (inf/nan inputs during "
                         "calibration?)")
    if stats.n_tokens < 1:
        raise ValueError(f"stats hold n_tokens={stats.n_tokens}; method {name!r} needs calibration "
                         "tokens (run calibration batches through gather_stats first)")
    if stats.xtx.device != device:
        raise ValueError(f"stats are on {stats.xtx.device} but the weight is on {device}; "
                         "move one of them (the quantizer never moves tensors)")


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
             method: str = "rtn", stats=None, **opts) -> QTensor:
    """Quantize a 2-D weight ``w`` (N, K) to ``bits`` with rounding ``method``.

    ``stats`` (a ``LayerStats`` of this layer's inputs) is required by ``awq`` and ``gptq`` and
    ignored by ``rtn`` and ``clip``; ``opts`` are the method's keyword options (``METHODS[m].options``).

    Example: ``q = quantize(linear.weight, 4, group_size=128, symmetric=False)``
             ``q = quantize(w, 4, 128, method="gptq", stats=stats, act_order=True)``
    """
    _check_bits(bits)
    m = get_method(method)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight tensor (N, K), got "
                         f"{type(w).__name__} with shape {tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise TypeError(f"quantize expects a floating-point weight, got dtype {w.dtype}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be None (per-channel) or a positive int")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric={symmetric!r} must be a bool")
    bad = sorted(set(opts) - set(m.options))
    if bad:
        raise TypeError(f"method {method!r} has no option(s) {bad}; allowed: {list(m.options)}")
    if m.needs_stats:
        if stats is None:
            raise ValueError(f"method {method!r} needs calibration statistics: pass stats=LayerStats "
                             "of this layer's inputs (bitplan.kernels.calibstats.gather_stats)")
        _check_stats(stats, w.shape[1], w.device, method)
    q = m.fn(w.detach().float(), bits, group_size, symmetric, stats if m.needs_stats else None, **opts)
    assert (q.in_scale is not None) == m.stores_in_scale, method
    return replace(q, dtype=w.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None, apply_in_scale: bool = True) -> torch.Tensor:
    """Reconstruct the weight ``W_r`` (N, K) from codes, scales and zeros (and ``in_scale``).

    ``apply_in_scale=False`` returns the stored grid ``Q(W·diag(s))`` that a packed kernel multiplies
    with ``x / s``; the default returns the effective weight ``Q(W·diag(s))·diag(s)⁻¹``.
    """
    n, k = q.shape
    c = _grouped(q.codes, q.group_size)                                     # (N, G, g)
    w = decode(c, q.scales.unsqueeze(-1), None if q.zeros is None else q.zeros.unsqueeze(-1), q.bits)
    w = w.reshape(n, -1)[:, :k]
    if apply_in_scale and q.in_scale is not None:
        w = w / q.in_scale.float()
    return w.to(dtype or q.dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = True, method: str = "rtn", stats=None, **opts) -> torch.Tensor:
    """``dequantize(quantize(w, ...))`` in ``w``'s dtype; ``bits=16`` rounds through fp16 (any method)."""
    if bits == 16:
        get_method(method)
        return w.detach().to(torch.float16).to(w.dtype)
    return dequantize(quantize(w, bits, group_size, symmetric, method, stats, **opts))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (N, K) codes of ``bits`` bits into (N, ceil(K*bits/8)) uint8, LSB first within a row.

    Rows are padded to whole bytes independently, so a row can be unpacked on its own.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects 2-D codes (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    nbytes = packed_row_bytes(k, bits)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    bitplane = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1          # (N, K, bits)
    flat = bitplane.reshape(n, k * bits)
    pad = nbytes * 8 - k * bits
    if pad:
        flat = torch.cat([flat, flat.new_zeros(n, pad)], dim=1)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    return (flat.reshape(n, nbytes, 8) * weights).sum(-1).to(torch.uint8)   # (N, nbytes)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (N, ceil(k*bits/8)) uint8 -> (N, k) uint8 codes."""
    _check_bits(bits)
    n, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows have {nbytes} bytes but {k} codes of {bits} bits need "
                         f"{packed_row_bytes(k, bits)}")
    if bits == 8:
        return packed.to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    flat = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(n, nbytes * 8)
    planes = flat[:, : k * bits].reshape(n, k, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (planes * weights).sum(-1).to(torch.uint8)                       # (N, k)


# the methods register themselves on import (they import the primitives above)
from . import clip as _clip, gptq as _gptq, awq as _awq   # noqa: E402,F401  (must stay last)
