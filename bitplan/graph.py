"""LayerGraph: the quantizable layers of a model and the data flow between them.

Quantizable layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2
style, weight stored transposed as (in, out)). Each is seen as a 2-D weight (N out, K in):
conv weights flatten to (out_channels, in_channels/groups * kernel).

One calibration batch runs with forward hooks to record input/output shapes and MACs per sample.
The data-flow graph comes from ``torch.fx`` when the model traces (edges = nearest quantizable
ancestors through non-quantizable nodes), otherwise from hook order (a chain in execution order in
which layers that read the same input tensor become parallel branches of the same predecessor).
Tie groups ``tie="shared_input"``: layers that read the very same input tensor (q/k/v projections).

Example:
    >>> g = LayerGraph.build(model, example_batch)
    >>> [l.name for l in g.layers][:3], g.tie_groups("shared_input")
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from .batches import batch_size, run_model

__all__ = ["LayerInfo", "LayerGraph", "find_layers", "layer_weight_2d", "fingerprint", "TIE_MODES"]

TIE_MODES = (None, "shared_input")


def _conv1d_hf():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:          # transformers missing or broken: no HF Conv1D layers to find
        return None


def layer_kind(module: nn.Module) -> str | None:
    """'linear' | 'conv1d' | 'conv2d' | 'hf_conv1d' for quantizable modules, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    hf = _conv1d_hf()
    if hf is not None and isinstance(module, hf):
        return "hf_conv1d"
    return None


def layer_weight_2d(module: nn.Module, kind: str | None = None) -> torch.Tensor:
    """The layer's weight as (N out, K in) — a view for conv/linear, a transpose for HF Conv1D."""
    kind = kind or layer_kind(module)
    w = module.weight
    if kind == "hf_conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


@dataclass
class LayerInfo:
    name: str                          # fully qualified module name
    kind: str                          # linear | conv1d | conv2d | hf_conv1d
    weight_shape: tuple[int, ...]      # as stored in the module
    out_features: int                  # N of the 2-D view
    in_features: int                   # K of the 2-D view
    n_params: int                      # weight elements (bias excluded)
    has_bias: bool
    dtype: str                         # weight dtype, e.g. "torch.float32"
    macs_per_sample: int = 0           # multiply-accumulates per sample of the calibration batch
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    calls: int = 0                     # times the layer ran in the recorded forward

    @property
    def tokens_per_sample(self) -> int:
        """Rows of the (M, K) matmul per sample: positions (tokens, pixels) the weight is applied to."""
        return self.macs_per_sample // max(1, self.n_params)


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every quantizable layer, in ``named_modules`` order (static: no forward pass)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = []
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is None or getattr(m, "weight", None) is None:
            continue
        w2 = layer_weight_2d(m, kind)
        out.append(LayerInfo(name, kind, tuple(m.weight.shape), int(w2.shape[0]), int(w2.shape[1]),
                             int(m.weight.numel()), getattr(m, "bias", None) is not None,
                             str(m.weight.dtype)))
    return out


def fingerprint(layers) -> str:
    """sha256 over layer names and weight shapes: identifies the architecture a plan was made for."""
    h = hashlib.sha256()
    for l in layers:
        h.update(f"{l.name}:{'x'.join(map(str, l.weight_shape))};".encode())
    return h.hexdigest()[:16]


@dataclass
class LayerGraph:
    """Quantizable layers (``layers``, execution order when recorded) + data-flow DiGraph."""
    layers: list[LayerInfo]
    graph: nx.DiGraph
    shared_input: list[list[str]] = field(default_factory=list)   # groups reading one input tensor
    source: str = "static"                                        # "fx" | "hooks" | "static"

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def fingerprint(self) -> str:
        return fingerprint(sorted(self.layers, key=lambda l: l.name))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def tie_groups(self, tie: str | None = None) -> list[list[int]]:
        """Row-index groups that must share an option: ``None`` -> none, ``"shared_input"``."""
        if tie not in TIE_MODES:
            raise ValueError(f"tie={tie!r} is not supported; allowed: {list(TIE_MODES)}")
        if tie is None:
            return []
        pos = {n: i for i, n in enumerate(self.names)}
        return [[pos[n] for n in g] for g in self.shared_input if len(g) > 1]

    @classmethod
    def build(cls, model: nn.Module, batch=None, forward=None, use_fx: bool = True) -> "LayerGraph":
        """Find layers; with a batch, run one forward (``forward(model, batch)`` if given) under
        hooks to record shapes, MACs and the data flow. The model is not modified."""
        layers = find_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no quantizable layers (nn.Linear, nn.Conv1d, "
                             "nn.Conv2d or transformers Conv1D)")
        g = nx.DiGraph()
        g.add_nodes_from(l.name for l in layers)
        if batch is None:
            return cls(layers, g, [], "static")
        by_name = {l.name: l for l in layers}
        order: list[str] = []
        input_ids: dict[str, int] = {}
        keep_alive = []          # hold input tensors so their ids stay unique during the pass
        n = batch_size(batch)

        def hook(name):
            def fn(mod, inp, out):
                info = by_name[name]
                x = inp[0] if inp else None
                if info.calls == 0:
                    order.append(name)
                    if isinstance(x, torch.Tensor):
                        info.input_shape = tuple(x.shape)
                        input_ids[name] = id(x)
                        keep_alive.append(x)
                    if isinstance(out, torch.Tensor):
                        info.output_shape = tuple(out.shape)
                info.calls += 1
                if isinstance(out, torch.Tensor):
                    per_out = info.in_features          # MACs per output element = K
                    info.macs_per_sample += out.numel() * per_out // max(1, n)
            return fn
        mods = dict(model.named_modules())
        handles = [mods[l.name].register_forward_hook(hook(l.name)) for l in layers]
        try:
            with torch.no_grad():
                (forward or run_model)(model, batch)
        except Exception as e:
            raise ValueError(f"calibration batch does not run through {type(model).__name__}: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            for h in handles:
                h.remove()
        groups: dict[int, list[str]] = {}
        for name in order:
            if name in input_ids:
                groups.setdefault(input_ids[name], []).append(name)
        shared = [grp for grp in groups.values() if len(grp) > 1]
        ran = [by_name[nm] for nm in order] + [l for l in layers if l.calls == 0]
        source = "hooks"
        if use_fx and _fx_edges(model, g, set(by_name)):
            source = "fx"
        else:
            _hook_edges(g, order, input_ids)
        return cls(ran, g, shared, source)


def _hook_edges(g: nx.DiGraph, order: list[str], input_ids: dict[str, int]) -> None:
    """Chain in execution order; consecutive readers of one input share the previous predecessor."""
    prev_group: list[str] = []
    i = 0
    while i < len(order):
        grp = [order[i]]
        while i + len(grp) < len(order) and input_ids.get(order[i + len(grp)]) is not None \
                and input_ids.get(order[i + len(grp)]) == input_ids.get(order[i]):
            grp.append(order[i + len(grp)])
        for a in prev_group:
            for b in grp:
                g.add_edge(a, b)
        prev_group, i = grp, i + len(grp)


def _fx_edges(model: nn.Module, g: nx.DiGraph, names: set[str]) -> bool:
    """Edges from torch.fx: each layer <- its nearest quantizable ancestors. False if untraceable."""
    try:
        import torch.fx as fx
        gm = fx.symbolic_trace(model)
    except Exception:
        return False
    nearest: dict = {}
    for node in gm.graph.nodes:
        ups = set()
        for a in node.all_input_nodes:
            if a.op == "call_module" and a.target in names:
                ups.add(a.target)
            else:
                ups |= nearest.get(a, set())
        nearest[node] = ups
        if node.op == "call_module" and node.target in names:
            for u in ups:
                g.add_edge(u, node.target)
    return True
