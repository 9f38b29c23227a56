"""Packed layers: modules that hold a quantized weight in its storage format and run it.

``PackedLayer`` (kernel ``"dequant"``) is the reference path for every bit-width: it unpacks the codes,
dequantizes with the shared quantizer and runs the dense op in the activation dtype. Faster modules
built on real low-bit kernels subclass it and override ``forward``. ``FP16Layer`` keeps a weight in
fp16 (the ``bits=16`` option). Their parameters + buffers are exactly the bytes that
``costmodels.size`` predicts (``QuantSpec.nbytes`` + the untouched bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .actquant import fake_quantize_act
from .formats import FP16_BITS, QuantSpec, weight_nbytes
from .quantizer import QTensor, dequantize, pack, quantize, unpack

__all__ = ["PackedLayer", "FP16Layer", "dense_forward", "layer_geometry"]


def layer_geometry(module: nn.Module, kind: str) -> dict:
    """What the dense op needs besides the weight (conv stride/padding/..., weight shape)."""
    geo = {"kind": kind, "weight_shape": tuple(module.weight.shape)}
    if kind in ("conv1d", "conv2d"):
        geo.update(stride=module.stride, padding=module.padding, dilation=module.dilation,
                   groups=module.groups, padding_mode=module.padding_mode)
        if module.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode={module.padding_mode!r} is not supported by packed "
                             "layers; allowed: 'zeros'")
    return geo


def dense_forward(x: torch.Tensor, w2d: torch.Tensor, bias, geo: dict) -> torch.Tensor:
    """Run the layer's op with a (N, K) weight ``w2d`` (already in x's dtype)."""
    kind = geo["kind"]
    if kind in ("linear", "hf_conv1d"):
        return F.linear(x, w2d, bias)
    w = w2d.reshape(geo["weight_shape"])
    conv = F.conv2d if kind == "conv2d" else F.conv1d
    return conv(x, w, bias, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])


class PackedLayer(nn.Module):
    """A quantized layer stored packed (codes uint8, scales/zeros fp16); forward = dequant + dense.

    With ``act_bits=8`` the input is fake-quantized per token first (the reference for W8A8).
    """
    kernel = "dequant"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, geo: dict, act_bits: int | None = None):
        super().__init__()
        self.bits, self.group_size, self.shape2d = qt.bits, qt.group_size, qt.shape
        self.geo = geo
        self.act_bits = act_bits
        self.register_buffer("codes", pack(qt.codes, qt.bits))          # (N, ceil(K*b/8)) uint8
        self.register_buffer("scales", qt.scales)                       # (N, G) fp16
        self.register_buffer("zeros", qt.zeros)                         # (N, G) fp16 or None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.dtype = qt.dtype

    @classmethod
    def from_module(cls, module: nn.Module, kind: str, w2d: torch.Tensor, spec: QuantSpec, qt=None):
        """``qt``: the layer already quantized by its method (default: round to nearest here)."""
        qt = qt if qt is not None else quantize(w2d, spec.bits, spec.group_size, spec.symmetric)
        return cls(qt, getattr(module, "bias", None), layer_geometry(module, kind), spec.act_bits)

    @classmethod
    def supports(cls, spec: QuantSpec, n: int, k: int, device: str, kind: str) -> str | None:
        """The reference path runs every integer spec, on every device and layer kind."""
        return "needs bits in 2..8" if spec.bits == FP16_BITS else None

    @classmethod
    def nbytes(cls, spec: QuantSpec, n: int, k: int) -> int:
        """Generic packed format: codes + fp16 scales (+ fp16 zeros when asymmetric)."""
        return weight_nbytes(n, k, spec.bits, spec.group_size, spec.symmetric)

    def qtensor(self) -> QTensor:
        return QTensor(unpack(self.codes, self.bits, self.shape2d[1]), self.scales, self.zeros,
                       self.bits, self.group_size, self.shape2d, self.dtype)

    def weight_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (N, K) weight (identical to fake quantization)."""
        return dequantize(self.qtensor(), dtype)

    def forward(self, x):
        x = fake_quantize_act(x, self.act_bits)
        return dense_forward(x, self.weight_2d(x.dtype), self.bias, self.geo)

    def extra_repr(self):
        return (f"{self.geo['kind']}, shape={self.shape2d}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}, kernel={self.kernel}")


class FP16Layer(nn.Module):
    """The ``bits=16`` option: the weight kept in fp16, computed in the activation dtype."""
    kernel = "fp16"

    def __init__(self, module: nn.Module, kind: str, w2d: torch.Tensor):
        super().__init__()
        self.geo = layer_geometry(module, kind)
        self.register_buffer("weight16", w2d.detach().to(torch.float16).contiguous())   # (N, K)
        b = getattr(module, "bias", None)
        self.bias = nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None
        self.bits = FP16_BITS

    @classmethod
    def from_module(cls, module: nn.Module, kind: str, w2d: torch.Tensor, spec: QuantSpec, qt=None):
        return cls(module, kind, w2d)

    @classmethod
    def supports(cls, spec: QuantSpec, n: int, k: int, device: str, kind: str) -> str | None:
        return None if spec.bits == FP16_BITS else f"needs bits=16 (got {spec.bits})"

    @classmethod
    def nbytes(cls, spec: QuantSpec, n: int, k: int) -> int:
        return n * k * 2                                   # fp16 weight

    def forward(self, x):
        return dense_forward(x, self.weight16.to(x.dtype), self.bias, self.geo)
