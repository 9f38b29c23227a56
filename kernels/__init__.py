"""The shared quantizer, storage formats, packed layers on real kernels, ``quantize_modules_`` and
latency calibration. Imports only ``bitplan.core`` of the rest of bitplan.

Example:
    >>> from bitplan.kernels import quantize, dequantize
    >>> w_r = dequantize(quantize(w, 4, group_size=128))
    >>> from bitplan.kernels import calibrate, LatencyProfile
    >>> calibrate(model, tokens=(1, 16, 128)).save("prof.json")
"""
if __name__ == "bitplan.kernels":
    from .formats import ALLOWED_BITS, FP16_BITS, QuantSpec, weight_nbytes
    from .quantizer import QTensor, dequantize, fake_quantize, pack, quantize, unpack

    __all__ = ["quantize", "dequantize", "fake_quantize", "pack", "unpack", "QTensor", "QuantSpec",
               "weight_nbytes", "ALLOWED_BITS", "FP16_BITS", "quantize_modules_", "option_reason", "option_mask",
               "fake_weight", "calibrate", "LatencyProfile", "measure_fixed_cost", "calibrate_model", "KERNELS",
               "get_kernel", "select_kernel", "kernel_for", "kernel_nbytes"]

    _LAZY = {"quantize_modules_": "modules", "option_reason": "modules", "option_mask": "modules",
             "fake_weight": "modules", "kernel_nbytes": "registry", "calibrate": "calibrate", "measure_fixed_cost": "calibrate", "calibrate_model": "calibrate",
             "LatencyProfile": "profile", "KERNELS": "registry", "get_kernel": "registry",
             "select_kernel": "registry", "kernel_for": "registry"}


    def __getattr__(name):          # lazy: importing bitplan.kernels stays light
        if name in _LAZY:
            import importlib
            return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        raise AttributeError(f"module 'bitplan.kernels' has no attribute {name!r}")
else:   # this source folder imported as a top-level 'kernels' (the repository root is on sys.path): stay
    __all__ = []   # empty, so it never shadows another distribution of that name (e.g. HF's 'kernels')
