"""Exact model size in bytes.

size(plan) = Σ_l weight_nbytes(layer l at its option)          (packed codes + fp16 scales/zeros)
           + every other parameter and buffer at its own dtype  (biases, embeddings, norms, ...)
Tensors shared between modules (tied embeddings) count once, as ``model.parameters()`` does; a
quantized tied weight is one layer whose packed tensors are also stored once. The result equals the
byte count of the model after ``apply_plan_(model, plan, mode="packed")``.
1 MB = 10**6 bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels.formats import QuantSpec
from ..kernels.registry import kernel_nbytes
from .registry import register

__all__ = ["size_table", "model_nbytes", "base_nbytes", "MB", "storage_kind"]

MB = 10 ** 6


def _key(t: torch.Tensor):
    """Identity of a tensor's bytes; opaque tensors (oneDNN prepacked weights) have no storage."""
    if t.device.type == "meta" or t.is_mkldnn:
        return id(t)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _unique_tensors(model: torch.nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = _key(t)
        if key not in seen:
            seen.add(key)
            yield t


def model_nbytes(model: torch.nn.Module) -> int:
    """Real bytes of every distinct parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def base_nbytes(model: torch.nn.Module, layer_names) -> int:
    """Bytes of everything that is not the weight of one of ``layer_names`` (kept as it is)."""
    mods = dict(model.named_modules())
    skip = set()
    for n in layer_names:
        if n not in mods or getattr(mods[n], "weight", None) is None:
            raise ValueError(f"layer {n!r} is not a module with a weight in {type(model).__name__}")
        skip.add(_key(mods[n].weight))
    total = 0
    for t in _unique_tensors(model):
        if _key(t) not in skip:
            total += t.numel() * t.element_size()
    return total


@register("size")
def size_table(layers, specs, device="cpu") -> np.ndarray:
    """(L, B) exact bytes of each layer's weight under each spec, stored as the kernel that packed
    apply picks on ``device`` stores it (``kernels.registry.select_kernel``; e.g. the int4 CPU
    kernel keeps a bf16 zero per group even for symmetric specs).

    Example: ``size_table(graph.layers, [QuantSpec(4, 128), QuantSpec(8)])``
    """
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    return np.array([[kernel_nbytes(s, l.out_features, l.in_features, device, storage_kind(l))
                      for s in specs] for l in layers], dtype=np.float64)           # (L, B) bytes


def storage_kind(layer) -> str:
    """The kind whose storage a layer's weight takes: an embedding table (and every head tied to
    one) is stored in the lookup's format."""
    kinds = getattr(layer, "kinds", (getattr(layer, "kind", "linear"),))
    return "embedding" if "embedding" in kinds else kinds[0]
