"""Storage formats of quantized weights and their exact byte counts.

The size cost model and the packed modules both read these functions, so the predicted size and the
real byte count of a packed model cannot drift apart (a test checks they are equal).

Generic packed format of a (N, K) weight at ``bits`` in 2..8:
    codes  uint8 (N, ceil(K*bits/8))     packed LSB-first per row
    scales fp16  (N, G)                  G = ceil(K / group_size), or 1 per-channel
    zeros  fp16  (N, G)                  only when asymmetric
``bits=16`` keeps the weight as an fp16 tensor (N, K).
"""
from __future__ import annotations

from .quantizer import SUPPORTED_BITS, n_groups, packed_row_bytes

__all__ = ["FP16_BITS", "ALLOWED_BITS", "weight_nbytes", "check_bits"]

FP16_BITS = 16                                     # the "leave it in fp16" option
ALLOWED_BITS = tuple(SUPPORTED_BITS) + (FP16_BITS,)
_SCALE_BYTES = 2                                   # fp16 scale / zero


def check_bits(bits) -> int:
    """Validate one weight bit-width option; returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not a weight option; allowed: {list(ALLOWED_BITS)} "
                         f"(16 = keep the weight in fp16)")
    return bits


def weight_nbytes(n: int, k: int, bits: int, group_size: int | None = None,
                  symmetric: bool = True) -> int:
    """Exact bytes of one (n, k) weight stored at ``bits`` (codes + fp16 scales/zeros).

    Example: ``weight_nbytes(1536, 384, 4, 128)`` == 1536*192 + 1536*3*2 == 304128
    """
    check_bits(bits)
    if bits == FP16_BITS:
        return n * k * 2
    per_group = _SCALE_BYTES * (1 if symmetric else 2)
    return n * packed_row_bytes(k, bits) + n * n_groups(k, group_size) * per_group
