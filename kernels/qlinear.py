"""Packed Linear modules on PyTorch's real low-bit kernels (registered in ``KERNELS``).

=============== ============================================ ============================================
kernel          CPU op (verified on torch 2.13 CPU)          CUDA op (written to the documented layout)
=============== ============================================ ============================================
int8_wo         torch._weight_int8pack_mm (bf16 x)           torch._weight_int8pack_mm (bf16 x)
int4_wo         torch._weight_int4pack_mm_for_cpu (bf16 x)   torch._weight_int4pack_mm (tinygemm, bf16 x)
w8a8            onednn.qlinear_pointwise, uint8 x, prepacked torch._int_mm (int8 x int8 -> int32)
                (8-bit codes with VNNI/AMX, else 7-bit)
lowbit_unpack   vectorised unpack -> dequant -> dense op     same
dequant         reference: quantizer.unpack -> dequantize    same
fp16            fp16 weight cast to the activation dtype     same
=============== ============================================ ============================================

Shape constraints of the ops, found by sweeping M, K, N in crash-isolated processes
(``benchmarks/kernel_constraints.py``; results in ``benchmarks/results/kernel_constraints.json``) and
encoded in each kernel's ``supports()`` so other shapes take the reference path:
- ``_weight_int8pack_mm`` (CPU): K % 16 == 0 where torch dispatches its AVX512 kernel, K % 8 == 0 on
  AVX2 (``capability.int8pack_k_multiple``: aligned row loads) — otherwise a segfault for M > 1 and
  wrong numbers for M = 1; any N, any M (0 included); the input must be contiguous and 64-byte
  aligned (forward copies a misaligned view).
- ``_weight_int4pack_mm_for_cpu`` + ``_convert_weight_to_int4pack_for_cpu``: N % 16 == 0, group in
  {32, 64, 128, 256}, K % group == 0 (each a clean RuntimeError otherwise); input contiguous.
- ``onednn.qlinear_prepack`` / ``qlinear_pointwise``: no shape constraint found (M 0..33, K and N
  1..384 incl. primes); exactness depends on the CPU (``kernels/capability.py``).
- ``_int_mm`` (CPU): none found, bit-exact, but a scalar loop without VNNI (not used on CPU).
  CUDA ``_int_mm`` (M > 16, K % 8, N % 8) and the CUDA int4 layout are not swept here (no GPU).

Storage (parameters + buffers, bias excluded), ``nbytes`` of each class, checked against the real
module in tests/kernels/test_qlinear.py:
- int8_wo: int8 (N, K) = code − 128, fp16 scales (N, 1) [+ fp16 zeros (N, 1)] = the generic format.
- int4_wo: kernel-packed int4 (N·K/2 bytes) + bf16 ``scales_and_zeros`` (K/G, N, 2). The kernel needs
  zeros even for symmetric specs, so symmetric int4 costs 2 bytes more per group than the generic
  format; asymmetric int4 costs the same. Per-channel specs run with G = the largest of
  256/128/64/32 dividing K, the row's scale and zero repeated per group (4 bytes per group). Scales and zeros are the shared quantizer's fp16 values
  rounded to bf16 (relative error ≤ 2^-9), the codes are the quantizer's codes unchanged.
- w8a8: int8 (N, K) (CPU: held only as oneDNN's prepacked copy; ``state_dict`` writes plain int8)
  + fp16 scales (N, 1) = the generic 8-bit per-channel format.
- lowbit_unpack / dequant: the generic packed format of ``formats.weight_nbytes``.

Every module takes and returns the caller's dtype; the cast to bf16 (weight-only kernels) or the
per-token int8 quantization (W8A8) happens inside ``forward`` and is part of what calibration times.
Modules are built for the device of the weight they replace; moving them afterwards is unsupported.

Example:
    >>> lin = nn.Linear(384, 1536)
    >>> m = get_kernel("int4_wo").from_module(lin, "linear", lin.weight, QuantSpec(4, 32))
    >>> m(torch.randn(8, 384)).shape
    torch.Size([8, 1536])
"""
from __future__ import annotations

import torch
from torch import nn

from .capability import int8pack_k_multiple
from .formats import FP16_BITS, QuantSpec, weight_nbytes
from .lowbit import unpack_fast
from .packed import FP16Layer, PackedLayer, layer_geometry
from .quantizer import n_groups, quantize
from .registry import has_op, register

__all__ = ["Int8WeightOnly", "Int4WeightOnly", "LowbitUnpack", "INT4_GROUPS"]      # W8A8: kernels/w8a8.py

INT4_GROUPS = (32, 64, 128, 256)          # group sizes the int4 kernels accept (CPU and CUDA)
_LINEAR_KINDS = ("linear", "hf_conv1d")   # kernels below are matmuls; convs take the reference path

register("dequant")(PackedLayer)
register("fp16")(FP16Layer)


def _bias(module: nn.Module):
    b = getattr(module, "bias", None)
    return nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None


def _finish(y: torch.Tensor, bias, x: torch.Tensor, n: int) -> torch.Tensor:
    """(M, N) kernel output -> caller's dtype and leading dims, + bias."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _common_checks(spec: QuantSpec, kind: str, bits: int) -> str | None:
    if kind not in _LINEAR_KINDS:
        return f"runs linear layers only (layer kind {kind!r})"
    if spec.bits != bits:
        return f"needs bits={bits} (got {spec.bits})"
    return None


class _KernelLinear(nn.Module):
    """Shared bits of the matmul kernels: geometry, bias, repr."""
    kernel = "?"

    def _setup(self, module: nn.Module, kind: str, w2d: torch.Tensor, spec: QuantSpec):
        self.geo = layer_geometry(module, kind)
        self.shape2d = tuple(w2d.shape)                        # (N, K)
        self.bits, self.group_size, self.act_bits = spec.bits, spec.group_size, spec.act_bits
        self.symmetric = spec.symmetric
        self.device_type = w2d.device.type                     # 'cpu' | 'cuda': which op forward calls
        self.impl = self.device_type                           # the op / path; kernels name it below
        self.bias = _bias(module)

    def extra_repr(self):
        return (f"{self.geo['kind']}, shape={self.shape2d}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, act_bits={self.act_bits}, kernel={self.kernel}/{self.impl}")


@register("int8_wo")
class Int8WeightOnly(_KernelLinear):
    """8-bit per-channel weights, bf16 activations: ``torch._weight_int8pack_mm``.
    Asymmetric weights add the rank-1 zero term ``rowsum(x) ⊗ zero`` in fp32."""

    @classmethod
    def supports(cls, spec, n, k, device, kind):
        why = _common_checks(spec, kind, 8)
        if why:
            return why
        if spec.act_bits == 8:
            return "activations must not be quantized (act_bits=8 is W8A8)"
        if n_groups(k, spec.group_size) != 1:
            return f"needs one scale per output channel (group_size={spec.group_size}, K={k})"
        mult = int8pack_k_multiple() if device == "cpu" else 8
        if k % mult:   # segfault for M > 1, wrong numbers for M = 1 (benchmarks/kernel_constraints.py)
            return f"torch._weight_int8pack_mm needs K % {mult} == 0 on this CPU (K={k})"
        if not has_op("_weight_int8pack_mm", device):
            return f"torch._weight_int8pack_mm has no {device} kernel in this torch build"
        return None

    @classmethod
    def nbytes(cls, spec, n, k):
        return n * k + n * 2 * (1 if spec.symmetric else 2)          # int8 + fp16 scale (+ zero)

    @classmethod
    def from_module(cls, module, kind, w2d, spec, qt=None):
        m = cls()
        m._setup(module, kind, w2d, spec)
        m.impl = "_weight_int8pack_mm"
        qt = qt if qt is not None else quantize(w2d, 8, spec.group_size, spec.symmetric)
        m.register_buffer("weight_int8", (qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous())  # (N, K)
        m.register_buffer("scales", qt.scales.reshape(-1, 1).contiguous())                # (N, 1) fp16
        m.register_buffer("zeros", None if qt.zeros is None else qt.zeros.reshape(-1, 1).contiguous())
        return m

    def forward(self, x):
        n, k = self.shape2d
        x2 = x.reshape(-1, k)                                                     # (M, K)
        xb = x2.to(torch.bfloat16).contiguous()
        if xb.data_ptr() % 64:             # the kernel's aligned loads need an aligned row start
            xb = xb.clone()
        y = torch._weight_int8pack_mm(xb, self.weight_int8,
                                      self.scales.reshape(-1).to(torch.bfloat16))  # (M, N) bf16
        y = y.float()
        if self.zeros is not None:
            y = y + x2.float().sum(-1, keepdim=True) * self.zeros.reshape(1, -1).float()
        return _finish(y, self.bias, x, n)


def _int4_group(spec: QuantSpec, k: int) -> int | None:
    """Kernel group size: the spec's, or for per-channel specs the largest of 256/128/64/32 dividing
    K (the one scale and zero of a row are repeated in every group: same dequant, 4 B per group)."""
    if spec.group_size is not None:
        return spec.group_size
    return next((g for g in sorted(INT4_GROUPS, reverse=True) if k % g == 0), None)


def _inner_k_tiles(k: int) -> int | None:
    """tinygemm (CUDA) wants K % (inner_k_tiles * 16) == 0 with inner_k_tiles in {2, 4, 8}."""
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    return None


@register("int4_wo")
class Int4WeightOnly(_KernelLinear):
    """4-bit grouped weights, bf16 activations: the int4 CPU kernel / CUDA tinygemm.
    Dequant of both kernels: ``w = (q − 8) · scale + zero`` = the shared quantizer's layout."""

    @classmethod
    def supports(cls, spec, n, k, device, kind):
        why = _common_checks(spec, kind, 4)
        if why:
            return why
        if spec.act_bits == 8:
            return "no int4 x int8 kernel (act_bits=8)"
        g = _int4_group(spec, k)
        if g is None:
            return f"per-channel int4 needs K % 32 == 0 (K={k})"
        if g not in INT4_GROUPS:
            return f"needs group_size in {list(INT4_GROUPS)} (group {g})"
        if k % g:
            return f"needs K % group_size == 0 (K={k}, group_size={g})"
        if device == "cpu":
            if n % 16:
                return f"needs N % 16 == 0 (N={n})"
            if not has_op("_weight_int4pack_mm_for_cpu", "cpu"):
                return "torch._weight_int4pack_mm_for_cpu is missing in this torch build"
        else:
            if n % 8:
                return f"needs N % 8 == 0 (N={n})"
            if _inner_k_tiles(k) is None:
                return f"needs K % 32 == 0 (K={k})"
            if not has_op("_weight_int4pack_mm", "cuda"):
                return "torch._weight_int4pack_mm has no CUDA kernel in this torch build"
        return None

    @classmethod
    def nbytes(cls, spec, n, k):
        g = _int4_group(spec, k)
        return n * k // 2 + (k // g) * n * 2 * 2                   # int4 + bf16 (scale, zero) pairs

    @classmethod
    def from_module(cls, module, kind, w2d, spec, qt=None):
        m = cls()
        m._setup(module, kind, w2d, spec)
        n, k = m.shape2d
        m.group = _int4_group(spec, k)
        qt = qt if qt is not None else quantize(w2d, 4, spec.group_size, spec.symmetric)
        zeros = qt.zeros if qt.zeros is not None else torch.zeros_like(qt.scales)
        sz = torch.stack([qt.scales, zeros], -1)                   # (N, G, 2)
        if spec.group_size is None:                                # per channel: repeat per kernel group
            sz = sz.expand(n, k // m.group, 2)
        sz = sz.transpose(0, 1)                                    # (G, N, 2)
        m.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())
        m.impl = "_weight_int4pack_mm_for_cpu" if m.device_type == "cpu" else "_weight_int4pack_mm"
        if m.device_type == "cpu":
            wp = torch._convert_weight_to_int4pack_for_cpu(qt.codes.to(torch.int32), 1)   # (N, K/2) u8
        else:
            c = qt.codes.to(torch.uint8)
            u8 = ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()       # even column in the high nibble
            wp = torch._convert_weight_to_int4pack(u8, _inner_k_tiles(k))   # int32, N*K/2 bytes
        m.register_buffer("weight_int4", wp)
        return m

    def forward(self, x):
        n, k = self.shape2d
        xb = x.reshape(-1, k).to(torch.bfloat16).contiguous()                     # (M, K)
        if self.device_type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(xb, self.weight_int4, self.group, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm(xb, self.weight_int4, self.group, self.scales_and_zeros)
        return _finish(y, self.bias, x, n)


@register("lowbit_unpack")
class LowbitUnpack(PackedLayer):
    """Any bits 2..8 in the generic packed format; forward = vectorised unpack + dequant + dense op.
    PyTorch has no 2/3-bit kernels: this is what really runs, and what calibration times."""

    @classmethod
    def supports(cls, spec, n, k, device, kind):
        return "needs bits in 2..8" if spec.bits == FP16_BITS else None

    @classmethod
    def nbytes(cls, spec, n, k):
        return weight_nbytes(n, k, spec.bits, spec.group_size, spec.symmetric)

    def weight_2d(self, dtype=None):
        n, k = self.shape2d
        dtype = dtype or self.dtype
        c = unpack_fast(self.codes, self.bits, k).to(dtype) - 2 ** (self.bits - 1)     # (N, K)
        g = self.group_size
        if g is None or g >= k:
            w = c * self.scales.to(dtype)
            return w + self.zeros.to(dtype) if self.zeros is not None else w
        if k % g:                                                 # partial last group: reference
            return super().weight_2d(dtype)
        w = c.reshape(n, k // g, g) * self.scales.to(dtype).unsqueeze(-1)
        if self.zeros is not None:
            w = w + self.zeros.to(dtype).unsqueeze(-1)
        return w.reshape(n, k)

