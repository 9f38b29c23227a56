"""apply_plan_: quantize a model in place according to a Plan.

``mode="fake"``   each planned weight is replaced by its dequantized value (same modules, same dtype);
                  what sensitivity and evaluation see.
``mode="packed"`` each planned layer is swapped for a module holding packed codes + scales that runs
                  a real low-bit kernel where one exists on the weight's device
                  (``kernels.registry.select_kernel``: int8_wo, int4_wo, w8a8, lowbit_unpack,
                  fp16), else the reference ``dequant`` path with a warning naming the layers and
                  why. The model's parameters + buffers equal the bytes ``costmodels.size``
                  predicts for that device. ``model.bitplan_plan`` records each layer's kernel.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import PlanMismatchError
from ..graph import find_layers, fingerprint, layer_weight_2d
from .quantizer import fake_quantize
from .registry import get_kernel, select_kernel

__all__ = ["apply_plan_", "check_plan", "MODES"]

MODES = ("fake", "packed")


def check_plan(model: nn.Module, plan) -> dict:
    """Raise :class:`PlanMismatchError` naming layers that differ; returns name -> LayerInfo."""
    layers = {l.name: l for l in find_layers(model)}
    missing = [n for n in plan.layers if n not in layers]
    shapes = plan.meta.get("layer_shapes", {}) if isinstance(plan.meta, dict) else {}
    bad_shape = [n for n in plan.layers if n in layers and n in shapes
                 and tuple(shapes[n]) != layers[n].weight_shape]
    same_arch = fingerprint(sorted(layers.values(), key=lambda l: l.name)) == plan.model_fingerprint
    extra = [] if same_arch else [n for n in layers if n not in plan.layers]
    if missing or bad_shape or not same_arch:
        parts = []
        if missing:
            parts.append(f"plan layers not in the model: {missing}")
        if bad_shape:
            parts.append("weight shapes differ: " + ", ".join(
                f"{n} plan {tuple(shapes[n])} vs model {layers[n].weight_shape}" for n in bad_shape))
        if extra:
            parts.append(f"model layers not in the plan: {extra}")
        if not parts:
            parts.append("model fingerprint differs from the plan's (weight shapes changed)")
        raise PlanMismatchError(f"plan does not match {type(model).__name__}: " + "; ".join(parts),
                                missing, extra, bad_shape)
    return layers


def fake_weight(module: nn.Module, kind: str, spec) -> torch.Tensor:
    """``Q_spec(W)`` of a layer in the module's own weight layout (conv and HF Conv1D aware): what
    fake apply writes and what the sensitivity estimators perturb a layer with."""
    wq = fake_quantize(layer_weight_2d(module, kind).detach(), spec.bits, spec.group_size,
                       spec.symmetric)                                                   # (N, K)
    return wq.t().contiguous() if kind == "hf_conv1d" else wq.reshape(module.weight.shape)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_plan_(model: nn.Module, plan, mode: str = "fake") -> nn.Module:
    """Quantize ``model`` in place as ``plan`` says; returns the model.

    Packed mode runs real kernels: outputs match fake quantization within each kernel's SQNR floor
    (bf16 activations for weight-only kernels), not bit for bit; ``lowbit_unpack``, ``dequant`` and
    ``w8a8``'s integer accumulation are exact up to fp32 summation order.

    Example: ``bitplan.apply_plan_(model, bitplan.Plan.load("plan.json"), mode="packed")``
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {list(MODES)}")
    layers = check_plan(model, plan)
    chosen, fallbacks = {}, []
    for name, spec in plan.layers.items():
        mod = model.get_submodule(name)
        kind = layers[name].kind
        w2d = layer_weight_2d(mod, kind)
        if mode == "fake":
            with torch.no_grad():
                mod.weight.copy_(fake_weight(mod, kind, spec))
            chosen[name] = "fake"
            continue
        n, k = w2d.shape
        kname, why = select_kernel(spec, n, k, w2d.device, kind)
        if why is not None:
            fallbacks.append((why, f"{name} ({spec.label}, N={n}, K={k})"))
        with torch.no_grad():
            new = get_kernel(kname).from_module(mod, kind, w2d, spec)
        new.train(mod.training)
        _set_module(model, name, new)
        chosen[name] = new.kernel
    if fallbacks:
        by_why: dict[str, list[str]] = {}
        for why, layer in fallbacks:
            by_why.setdefault(why, []).append(layer)
        parts = [f"{why}: {len(ls)} layer(s), e.g. {', '.join(ls[:3])}" for why, ls in by_why.items()]
        warnings.warn(f"{len(fallbacks)} layer(s) run the reference 'dequant' path (no real kernel "
                      "fits) — " + "; ".join(parts), RuntimeWarning, stacklevel=2)
    model.bitplan_plan = plan.with_kernels(chosen)      # which kernel each layer actually runs
    return model
