"""Quantize a model's modules in place: ``quantize_modules_(model, {fqn: QuantSpec}, mode)``.

``mode="fake"``   each weight is replaced by its dequantized value (same modules, same dtype), and
                  layers with ``act_bits`` get a forward pre-hook quantizing their input per token:
                  what sensitivity and evaluation see.
``mode="packed"`` each layer is swapped for a module holding packed codes + scales that runs a real
                  low-bit kernel where one exists on the weight's device (``registry.select_kernel``),
                  else the reference ``dequant`` path — never silently: one ``RuntimeWarning`` names
                  the layers and why. The model's parameters + buffers then equal the bytes
                  ``costmodels.size`` predicts.
A weight shared by several modules (an embedding tied to an LM head) is one entry, keyed by its
layer name (``LayerInfo.name``); it is quantized once and its packed tensors are stored once.

Which options a layer can take at all is :func:`option_reason` (the quantizer's rules, not speed):
a group size smaller than the layer's input dimension must divide it; embeddings take no
activation quantization and only round-to-nearest (they have no input activations).

Example:
    >>> ran = quantize_modules_(model, {"fc1": QuantSpec(4, 32), "fc2": QuantSpec(8)}, mode="packed")
    >>> ran                                   # {"fc1": "int4_wo", "fc2": "int8_wo"}
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ..core.graph import find_layers, layer_weight_2d
from .embedding import EmbeddingLookup, TiedHead
from .formats import FP16_BITS, QuantSpec
from .quantizer import METHODS, dequantize, quantize
from .registry import get_kernel, select_kernel

__all__ = ["quantize_modules_", "fake_weight", "option_reason", "option_mask", "MODES", "METHODS",
           "needs_stats", "InputScaled", "quantize_layer"]

MODES = ("fake", "packed")
_CONVS = ("conv1d", "conv2d")


def needs_stats(spec: QuantSpec) -> bool:
    """Does ``spec``'s rounding method need the layer's calibration statistics (AWQ, GPTQ)?"""
    return spec.bits != FP16_BITS and METHODS[spec.method].needs_stats

def option_reason(spec: QuantSpec, layer) -> str | None:
    """Why ``layer`` (a ``LayerInfo``) cannot take ``spec``, or None when it can.

    Example: ``option_reason(QuantSpec(4, 32), layer_with_K_100)`` -> 'K=100 is not a multiple of ...'
    """
    kinds = getattr(layer, "kinds", (layer.kind,))
    k = layer.in_features
    if spec.method not in METHODS:
        return f"method {spec.method!r} is not a quantizer method; known: {sorted(METHODS)}"
    if spec.bits == FP16_BITS:
        return None
    m = METHODS[spec.method]
    if m.stores_in_scale and spec.act_bits is not None:
        return (f"method {spec.method!r} divides the input by per-channel scales, which would change "
                "what the activation quantizer sees")
    if m.stores_in_scale and any(kd in _CONVS for kd in kinds):
        return f"method {spec.method!r} scales input channels of a matmul; a conv's K mixes kernel positions"
    g = spec.group_size
    if g is not None and g < k and k % g:
        return f"K={k} is not a multiple of group_size {g}"
    if "embedding" in kinds:
        if spec.act_bits is not None:
            return "an embedding lookup has no input activations to quantize"
        if m.needs_stats:
            return f"method {spec.method!r} needs input activations; an embedding has none"
    return None


def option_mask(layers, specs) -> tuple[list[list[bool]], dict[tuple[int, int], str]]:
    """(L, B) allowed flags and {(l, b): reason} for every option a layer cannot take.

    A group as large as the layer's input dim is one group per row: when the same option per
    channel is also among ``specs`` it is a duplicate and masked, otherwise it stands for it."""
    allowed, why = [], {}
    present = set(specs)
    for i, l in enumerate(layers):
        row = []
        for j, s in enumerate(specs):
            r = option_reason(s, l)
            if r is None and s.group_size is not None and s.group_size >= l.in_features \
                    and dataclasses.replace(s, group_size=None) in present:
                r = (f"group_size {s.group_size} >= K={l.in_features}: one group per row, the same as the "
                     "per-channel option")
            row.append(r is None)
            if r is not None:
                why[(i, j)] = r
        allowed.append(row)
    return allowed, why


def quantize_layer(module: nn.Module, kind: str, spec: QuantSpec, stats=None):
    """The layer's QTensor under ``spec`` (its method, with the layer's calibration ``stats`` when the
    method needs them); None for the fp16 option."""
    if spec.bits == FP16_BITS:
        return None
    return quantize(layer_weight_2d(module, kind).detach(), spec.bits, spec.group_size, spec.symmetric,
                    spec.method, stats)


def fake_weight(module: nn.Module, kind: str, spec: QuantSpec, stats=None) -> torch.Tensor:
    """``Q_spec(W)`` of a layer in the module's own weight layout (conv and HF Conv1D aware): what
    fake apply writes and what the sensitivity estimators perturb a layer with. For AWQ-style
    methods it is the effective weight ``Q(W·diag(s))·diag(s)⁻¹``."""
    w = module.weight
    if spec.bits == FP16_BITS:
        return w.detach().to(torch.float16).to(w.dtype)
    wq = dequantize(quantize_layer(module, kind, spec, stats), w.dtype)                 # (N, K)
    return wq.t().contiguous() if kind == "hf_conv1d" else wq.reshape(w.shape)


class InputScaled(nn.Module):
    """A packed layer whose method stored per-input-channel scales (AWQ): runs ``inner(x / s)``;
    ``inner`` holds the grid ``Q(W·diag(s))``. ``s`` is a buffer (K fp16 values, counted in the size)."""

    def __init__(self, inner: nn.Module, in_scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.kernel = inner.kernel
        self.register_buffer("in_scale", in_scale.detach().to(torch.float16).contiguous())    # (K,)

    def forward(self, x):
        return self.inner(x / self.in_scale.to(x.dtype))


class ActFakeQuant:
    """Forward pre-hook of fake mode for ``act_bits`` options: the layer's input is quantized per token
    as the W8A8 kernels quantize it (``actquant.fake_quantize_act``)."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, module, args):
        from .actquant import fake_quantize_act
        return (fake_quantize_act(args[0], self.bits),) + tuple(args[1:])


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_modules_(model: nn.Module, specs: dict, mode: str = "fake",
                      prefer: dict[str, str] | None = None, stats: dict | None = None) -> dict[str, str]:
    """Quantize the layers named in ``specs`` (layer name -> QuantSpec) in place.

    Returns module fqn -> kernel that runs it (``"fake"`` in fake mode; tied modules listed under
    each of their names). ``prefer`` (module fqn -> kernel name) asks for specific kernels, e.g. the
    ones a packed folder was saved with; they still fall back when they cannot run here. ``stats``
    (layer name -> ``calibstats.LayerStats``) feeds the methods that need calibration statistics.
    Packed outputs match fake quantization within each kernel's SQNR floor, not bit for bit.

    Example: ``quantize_modules_(model, {"fc1": QuantSpec(4, 32)}, mode="packed")``
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {list(MODES)}")
    layers = {l.name: l for l in find_layers(model)}
    unknown = [n for n in specs if n not in layers]
    if unknown:
        raise ValueError(f"{len(unknown)} name(s) are not quantizable layers of {type(model).__name__}: "
                         f"{unknown[:5]}")
    for name, spec in specs.items():
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"specs[{name!r}] must be a QuantSpec, got {type(spec).__name__}")
        why = option_reason(spec, layers[name])
        if why is not None:
            raise ValueError(f"{name}: option {spec.label} is not possible: {why}")
    lacking = [n for n, s in specs.items() if needs_stats(s) and (stats is None or n not in stats)]
    if lacking:
        raise ValueError(f"{len(lacking)} layer(s) use a method that needs calibration statistics but got "
                         f"none, e.g. {lacking[:3]}: pass calibration data (apply_plan_(..., calib_data=...))")
    stats = stats or {}
    ran: dict[str, str] = {}
    fallbacks: list[tuple[str, str]] = []
    for name, spec in specs.items():
        info = layers[name]
        mod = model.get_submodule(name)
        if mode == "fake":
            with torch.no_grad():
                mod.weight.copy_(fake_weight(mod, info.kind, spec, stats.get(name)))   # shared: once
            if spec.act_bits is not None:
                for m in info.modules:
                    model.get_submodule(m).register_forward_pre_hook(ActFakeQuant(spec.act_bits))
            ran.update({m: "fake" for m in info.modules})
            continue
        if "embedding" in info.kinds:
            _pack_table(model, info, spec, ran)
            continue
        w2d = layer_weight_2d(mod, info.kind)
        n, k = w2d.shape
        kname, why = select_kernel(spec, n, k, w2d.device, info.kind, (prefer or {}).get(name))
        if why is not None:
            fallbacks.append((why, f"{name} ({spec.label}, N={n}, K={k})"))
        with torch.no_grad():
            qt = quantize_layer(mod, info.kind, spec, stats.get(name))
            new = get_kernel(kname).from_module(mod, info.kind, w2d, spec, qt=qt)
            if qt is not None and qt.in_scale is not None:
                new = InputScaled(new, qt.in_scale)
        new.train(mod.training)
        _set_module(model, name, new)
        ran[name] = new.kernel
    if fallbacks:
        by_why: dict[str, list[str]] = {}
        for why, layer in fallbacks:
            by_why.setdefault(why, []).append(layer)
        parts = [f"{why}: {len(ls)} layer(s), e.g. {', '.join(ls[:3])}" for why, ls in by_why.items()]
        warnings.warn(f"{len(fallbacks)} layer(s) run the reference 'dequant' path (no real kernel "
                      "fits) — " + "; ".join(parts), RuntimeWarning, stacklevel=2)
    return ran


def _pack_table(model: nn.Module, info, spec: QuantSpec, ran: dict) -> None:
    """An embedding table (and every head tied to it): quantized once, tensors shared."""
    names = [m for m, k in zip(info.modules, info.kinds) if k == "embedding"]
    first = model.get_submodule(names[0])
    w2d = layer_weight_2d(first, "embedding")
    with torch.no_grad():
        qt = None if spec.bits == FP16_BITS else quantize(w2d.detach(), spec.bits, spec.group_size,
                                                          spec.symmetric)
        table = EmbeddingLookup.from_module(first, "embedding", w2d, spec, qt)
    for m, kind in zip(info.modules, info.kinds):
        old = model.get_submodule(m)
        if kind == "embedding":
            new = table if m == names[0] else _share(table)
        else:
            new = TiedHead(table, old, kind)
        new.train(old.training)
        _set_module(model, m, new)
        ran[m] = "embedding" if kind == "embedding" else "tied"


def _share(table: EmbeddingLookup) -> EmbeddingLookup:
    """A second lookup module over the same tensors (two embeddings sharing one table)."""
    new = EmbeddingLookup(table.num_embeddings, table.embedding_dim, table.bits, table.group_size,
                          table.padding_idx, table.dtype)
    for k in ("codes", "scales", "zeros"):
        new.register_buffer(k, getattr(table, k))
    return new
