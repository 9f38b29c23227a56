"""Kernel registry: which packed module runs a layer, and how many bytes its storage takes.

One plain dict ``KERNELS`` (name -> kernel class) filled by ``@register("name")``. A kernel class is a
``nn.Module`` with three class-level hooks:

    supports(spec, n, k, device, kind) -> None | str   # None = runs here; else the reason it cannot
    nbytes(spec, n, k) -> int                          # exact bytes of its parameters + buffers
                                                       # (weight storage only; bias not included)
    from_module(module, kind, w2d, spec) -> nn.Module  # the packed module replacing ``module``

The kernel a layer gets is a deterministic function of ``(QuantSpec, N, K, device, kind)`` and of
the torch build (:func:`select_kernel`), so ``costmodels.size`` can predict the exact byte count of
a packed model before it exists: ``kernel_nbytes(spec, n, k, device, kind)``.

Example:
    >>> select_kernel(QuantSpec(4, group_size=32), 1536, 384, device="cpu")
    ('int4_wo', None)
    >>> select_kernel(QuantSpec(4, group_size=32), 24, 384, device="cpu")[1]
    'int4_wo: needs N % 16 == 0 (N=24)'
"""
from __future__ import annotations

import torch

from .formats import FP16_BITS, QuantSpec

__all__ = ["KERNELS", "register", "get_kernel", "select_kernel", "kernel_for", "kernel_nbytes",
           "FALLBACK", "device_type", "has_op"]

KERNELS: dict[str, type] = {}
FALLBACK = "dequant"                 # reference path: unpack + dequantize + dense op


def register(name: str):
    """Decorator: ``@register("int4_wo") class Int4WeightOnly(PackedLayer): ...``."""
    def deco(cls):
        if name in KERNELS:
            raise ValueError(f"kernel {name!r} is registered twice")
        cls.kernel = name
        KERNELS[name] = cls
        return cls
    return deco


def _fill() -> None:
    from . import embedding, qlinear, w8a8  # noqa: F401  (importing fills KERNELS)


def get_kernel(name: str) -> type:
    """The kernel class registered as ``name``; unknown names raise ``ValueError`` listing the known.

    Example: ``get_kernel("int4_wo").nbytes(QuantSpec(4, 32), 1536, 384)``
    """
    _fill()
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {sorted(KERNELS)}")
    return KERNELS[name]


def device_type(device) -> str:
    """'cpu' | 'cuda' from a str / torch.device; anything else is a ValueError."""
    try:
        t = torch.device(device).type if isinstance(device, (str, torch.device)) else None
    except RuntimeError:            # not a device string torch knows
        t = None
    if t not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; allowed: 'cpu', 'cuda'")
    return t


def has_op(op: str, device: str) -> bool:
    """Does this torch build have a kernel for ``aten::op`` on ``device`` ('cpu' | 'cuda')?"""
    key = "CPU" if device == "cpu" else "CUDA"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key))
    except Exception:       # op unknown to this build
        return False


def _preferred(spec: QuantSpec, kind: str = "linear") -> str:
    """The fast kernel a spec asks for, before checking shapes and the device."""
    if kind == "embedding":
        return "embedding"
    if spec.bits == FP16_BITS:
        return "fp16"
    if spec.act_bits == 8:
        return "w8a8"
    if spec.bits == 8:
        return "int8_wo"
    if spec.bits == 4:
        return "int4_wo"
    return "lowbit_unpack"


def select_kernel(spec: QuantSpec, n: int, k: int, device="cpu", kind: str = "linear",
                  prefer: str | None = None) -> tuple[str, str | None]:
    """(kernel name, reason it fell back or None): the fastest kernel that runs ``spec`` for an
    (n, k) layer of ``kind`` on ``device``. ``prefer`` asks for one kernel by name instead (e.g. the
    one a packed folder was saved with); it still falls back when that kernel cannot run here.

    Example: ``select_kernel(QuantSpec(8, act_bits=8), 384, 384)`` -> ``('w8a8', None)``
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    dev = device_type(device)
    _fill()
    want = prefer if prefer is not None else _preferred(spec, kind)
    cls = get_kernel(want)
    why = cls.supports(spec, n, k, dev, kind)
    if why is None:
        return want, None
    if kind == "embedding":           # the lookup table has one implementation
        raise ValueError(f"no kernel runs {spec.label} on an embedding ({why})")
    return FALLBACK, f"{want}: {why}"


def kernel_for(spec: QuantSpec, n: int, k: int, device="cpu", kind: str = "linear") -> str:
    """Name of the kernel packed apply uses for an (n, k) layer under ``spec`` on ``device``."""
    return select_kernel(spec, n, k, device, kind)[0]


def kernel_nbytes(spec: QuantSpec, n: int, k: int, device="cpu", kind: str = "linear") -> int:
    """Exact bytes of the layer's weight storage under the kernel it will run (bias excluded).

    Example: ``kernel_nbytes(QuantSpec(4, 32), 1536, 384)`` == 1536*192 + 1536*12*4  (bf16 scale+zero)
    """
    from .quantizer import method_extra_nbytes
    extra = 0 if spec.bits == FP16_BITS else method_extra_nbytes(spec.method, n, k)   # AWQ's input scales
    return get_kernel(kernel_for(spec, n, k, device, kind)).nbytes(spec, n, k) + extra


_fill()          # the kernel classes live in qlinear.py; importing it registers them
