"""The one shared quantizer: quantize / dequantize / pack / unpack.

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

Example:
    >>> w = torch.randn(64, 128)
    >>> q = quantize(w, 4, group_size=32)
    >>> w_r = dequantize(q)                      # (64, 128) float32
    >>> torch.equal(unpack(pack(q.codes, 4), 4, 128), q.codes)
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QTensor", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "n_groups",
           "packed_row_bytes", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_STORE_DTYPE = torch.float16     # dtype of scales / zeros on disk and in packed modules
_FP16_TINY = 2.0 ** -14          # smallest normal fp16: keeps scales invertible


@dataclass(frozen=True)
class QTensor:
    """A quantized 2-D weight: unpacked codes plus per-group scales (and zeros)."""
    codes: torch.Tensor            # (N, K) uint8, values in 0 .. 2**bits - 1
    scales: torch.Tensor           # (N, G) fp16
    zeros: torch.Tensor | None     # (N, G) fp16, None when symmetric
    bits: int
    group_size: int | None         # None = one group per row
    shape: tuple[int, int]         # (N, K)
    dtype: torch.dtype             # dtype of the original weight (dequantize returns it)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {list(SUPPORTED_BITS)}")


def n_groups(k: int, group_size: int | None) -> int:
    """Groups per row for a row of ``k`` weights."""
    return 1 if group_size is None else -(-k // group_size)


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes one row of ``k`` codes occupies when packed LSB-first (``ceil(k*bits/8)``)."""
    return -(-k * bits // 8)


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


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
             symmetric: bool = True) -> QTensor:
    """Quantize a 2-D weight ``w`` (N, K) to ``bits`` with round-to-nearest.

    Example: ``q = quantize(linear.weight, 4, group_size=128, symmetric=False)``
    """
    _check_bits(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight tensor (N, K), got "
                         f"{type(w).__name__} with shape {tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise TypeError(f"quantize expects a floating-point weight, got dtype {w.dtype}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be None (per-channel) or a positive int")
    n, k = w.shape
    wf = w.detach().float()
    wg = _grouped(wf, group_size)                                   # (N, G, g)
    half = 2 ** (bits - 1)
    if symmetric:
        qmax = half - 1
        scale = wg.abs().amax(-1) / qmax                            # (N, G)
        scale = scale.clamp(min=_FP16_TINY).to(_STORE_DTYPE)
        s = scale.float().unsqueeze(-1)
        codes = (torch.round(wg / s) + half).clamp(0, 2 * half - 1)
        zero = None
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)                           # (N, G)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=_FP16_TINY).to(_STORE_DTYPE)
        s = scale.float()
        zero = (lo + half * s).to(_STORE_DTYPE)                     # (N, G)
        codes = (torch.round((wg - zero.float().unsqueeze(-1)) / s.unsqueeze(-1)) + half)
        codes = codes.clamp(0, 2 ** bits - 1)
        s = s.unsqueeze(-1)
    codes = codes.reshape(n, -1)[:, :k].to(torch.uint8)             # (N, K)
    return QTensor(codes=codes, scales=scale, zeros=zero, bits=bits, group_size=group_size,
                   shape=(n, k), dtype=w.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct the weight ``W_r`` (N, K) from codes, scales and zeros."""
    n, k = q.shape
    half = 2 ** (q.bits - 1)
    c = _grouped(q.codes.float() - half, q.group_size)              # (N, G, g)
    w = c * q.scales.float().unsqueeze(-1)
    if q.zeros is not None:
        w = w + q.zeros.float().unsqueeze(-1)
    return w.reshape(n, -1)[:, :k].to(dtype or q.dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = True) -> torch.Tensor:
    """``dequantize(quantize(w, ...))`` in ``w``'s dtype; ``bits=16`` rounds through fp16."""
    if bits == 16:
        return w.detach().to(torch.float16).to(w.dtype)
    return dequantize(quantize(w, bits, group_size, symmetric))


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
