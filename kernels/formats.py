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
layer kind) (``kernels.registry.select_kernel``); ``QuantSpec.nbytes`` and
``weight_nbytes(..., kernel=name)`` give that kernel's exact bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .quantizer import SUPPORTED_BITS, n_groups, packed_row_bytes

__all__ = ["FP16_BITS", "ALLOWED_BITS", "ACT_BITS", "QuantSpec", "weight_nbytes", "check_bits"]

FP16_BITS = 16                                     # the "leave it in fp16" option
ALLOWED_BITS = tuple(SUPPORTED_BITS) + (FP16_BITS,)
ACT_BITS = (8, 16)                                 # activation options (None = not quantized)
_SCALE_BYTES = 2                                   # fp16 scale / zero


def check_bits(bits) -> int:
    """Validate one weight bit-width option; returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not a weight option; allowed: {list(ALLOWED_BITS)} "
                         f"(16 = keep the weight in fp16)")
    return bits


def check_group_size(group_size) -> int | None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be None (per output channel) or a positive int")
    return group_size


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized (a column of the cost/loss tables, an entry of a plan)."""
    bits: int                       # weight bits: 2..8, or 16 = keep fp16
    group_size: int | None = None   # None = per output channel
    symmetric: bool = True
    act_bits: int | None = None     # input activation bits (None = not quantized)
    kernel: str | None = None       # kernel the layer runs after packed apply (recorded by apply)

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} must be a bool")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; allowed: None, {list(ACT_BITS)}")

    @property
    def label(self) -> str:
        """Short name: w4g128, w8a8, w16."""
        s = f"w{self.bits}"
        if self.bits != FP16_BITS and self.group_size is not None:
            s += f"g{self.group_size}"
        if self.bits != FP16_BITS and not self.symmetric:
            s += "z"                          # asymmetric: zero points stored
        if self.act_bits is not None:
            s += f"a{self.act_bits}"
        return s

    def nbytes(self, n: int, k: int, device="cpu", kind: str = "linear") -> int:
        """Exact bytes of an (n, k) weight after packed apply on ``device`` (the kernel's storage).

        Example: ``QuantSpec(4, 32).nbytes(1536, 384)`` == 368640 (int4 CPU kernel: bf16 scale+zero)
        """
        from .registry import kernel_nbytes
        return kernel_nbytes(self, n, k, device, kind)

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        if self.act_bits is not None:
            d["act_bits"] = self.act_bits
        if self.kernel is not None:
            d["kernel"] = self.kernel
        return d


def weight_nbytes(n: int, k: int, bits: int, group_size: int | None = None,
                  symmetric: bool = True, kernel: str | None = None) -> int:
    """Exact bytes of one (n, k) weight stored at ``bits`` (codes + fp16 scales/zeros).

    ``kernel=None`` is the generic packed format above; a kernel name gives that kernel's storage.

    Example: ``weight_nbytes(1536, 384, 4, 128)`` == 1536*192 + 1536*3*2 == 304128
    """
    check_bits(bits)
    if kernel is not None:
        from .registry import get_kernel
        return get_kernel(kernel).nbytes(QuantSpec(bits, group_size, symmetric), n, k)
    if bits == FP16_BITS:
        return n * k * 2
    per_group = _SCALE_BYTES * (1 if symmetric else 2)
    return n * packed_row_bytes(k, bits) + n * n_groups(k, group_size) * per_group
