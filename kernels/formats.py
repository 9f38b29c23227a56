"""Quantization options of one layer and the exact byte counts of their storage.

The size cost model and the packed modules both read :func:`weight_nbytes`, so the predicted size
and the real byte count of a packed model cannot drift apart (a test checks they are equal).

Generic packed format of a (N, K) weight at ``bits`` in 2..8:
    codes  uint8 (N, ceil(K*bits/8))     packed LSB-first per row
    scales fp16  (N, G)                  G = ceil(K / group_size), or 1 per-channel
    zeros  fp16  (N, G)                  only when asymmetric
``bits=16`` keeps the weight as an fp16 tensor (N, K).

Real kernels may store differently (the int4 CPU kernel keeps bf16 scale *and* zero per group even
for symmetric specs). Which kernel a layer runs is a deterministic function of (spec, N, K, device,
layer kind) (``kernels.registry.select_kernel``); ``kernels.registry.kernel_nbytes`` and
``weight_nbytes(..., kernel=name)`` give that kernel's exact bytes. ``QuantSpec`` itself lives in the
torch-free ``bitplan.core.spec``.
"""
from __future__ import annotations

from ..core.spec import (ACT_BITS, ALLOWED_BITS, FP16_BITS, QuantSpec, check_bits,  # noqa: F401
                         check_group_size, generic_nbytes)

__all__ = ["FP16_BITS", "ALLOWED_BITS", "ACT_BITS", "QuantSpec", "weight_nbytes", "check_bits"]

def weight_nbytes(n: int, k: int, bits: int, group_size: int | None = None,
                  symmetric: bool = True) -> int:
    """Exact bytes of one (n, k) weight stored at ``bits`` in the generic packed format above
    (codes + fp16 scales/zeros); the arithmetic lives torch-free in ``core.spec.generic_nbytes``. A
    kernel's own storage: ``kernels.registry.kernel_nbytes``.

    Example: ``weight_nbytes(1536, 384, 4, 128)`` == 1536*192 + 1536*3*2 == 304128
    """
    return generic_nbytes(n, k, bits, group_size, symmetric)
