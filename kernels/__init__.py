"""The shared quantizer, storage formats, packed layers and ``apply_plan_``.

Example:
    >>> from bitplan.kernels import quantize, dequantize
    >>> w_r = dequantize(quantize(w, 4, group_size=128))
"""
from .formats import ALLOWED_BITS, FP16_BITS, QuantSpec, weight_nbytes
from .quantizer import QTensor, dequantize, fake_quantize, pack, quantize, unpack

__all__ = ["quantize", "dequantize", "fake_quantize", "pack", "unpack", "QTensor", "QuantSpec",
           "weight_nbytes", "ALLOWED_BITS", "FP16_BITS", "apply_plan_"]


def __getattr__(name):
    if name == "apply_plan_":
        from .apply import apply_plan_
        return apply_plan_
    raise AttributeError(f"module 'bitplan.kernels' has no attribute {name!r}")
