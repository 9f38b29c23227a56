"""LayerGraph: the quantizable layers of a model and the data flow between them.

Quantizable layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, transformers' ``Conv1D`` (GPT-2
style, weight stored transposed as (in, out)) and ``nn.Embedding`` (token tables; weight-only,
grouped along the embedding dimension). Each is seen as a 2-D weight (N out, K in): conv weights
flatten to (out_channels, in_channels/groups * kernel); an embedding table (V, D) is N = V rows of
K = D. A weight tensor shared by several modules (an embedding tied to the LM head) is ONE layer —
one decision, quantized once, counted once — named after its first module, the others listed in
``LayerInfo.aliases``.

Left out, with the reason in ``LayerGraph.skipped``: layers whose parent reads their ``.weight``
directly instead of calling them, so a packed replacement cannot run there (``out_proj`` of
``nn.MultiheadAttention``, ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer``'s fused fast path),
and embeddings with ``max_norm`` (they rewrite their own weight in forward).

One calibration batch runs with forward hooks (on the meta device when the model's parameters are
meta, as for a lazily loaded causal LM: shapes and MACs without memory) to record input/output shapes and MACs per sample.
The data-flow graph comes from ``torch.fx`` when the model traces (edges = nearest quantizable
ancestors through non-quantizable nodes), otherwise from hook order (a chain in execution order in
which layers that read the same input tensor become parallel branches of the same predecessor).
Tie groups ``tie="shared_input"``: layers that read the very same input tensor (q/k/v projections).

Example:
    >>> g = LayerGraph.build(model, example_batch)
    >>> [l.name for l in g.layers][:3], g.tie_groups("shared_input"), g.skipped
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from .batches import batch_size, run_model

__all__ = ["LayerInfo", "LayerGraph", "find_layers", "layer_weight_2d", "fingerprint", "TIE_MODES",
           "layer_kind", "KINDS", "skipped_layers"]

TIE_MODES = (None, "shared_input")
KINDS = ("linear", "conv1d", "conv2d", "hf_conv1d", "embedding")


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, without importing transformers: an instance can only exist once the
    module defining it has been imported."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(module, cls)


def layer_kind(module: nn.Module) -> str | None:
    """'linear' | 'conv1d' | 'conv2d' | 'hf_conv1d' | 'embedding' for quantizable modules, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    return None


def layer_weight_2d(module: nn.Module, kind: str | None = None) -> torch.Tensor:
    """The layer's weight as (N out, K in) — a view for conv/linear/embedding, a transpose for HF Conv1D."""
    kind = kind or layer_kind(module)
    w = module.weight
    if kind == "hf_conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta" or t.is_mkldnn:
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass
class LayerInfo:
    name: str                          # fully qualified module name
    kind: str                          # linear | conv1d | conv2d | hf_conv1d | embedding
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
    aliases: tuple[str, ...] = ()      # other modules sharing this very weight tensor (tied)
    alias_kinds: tuple[str, ...] = ()  # their kinds, in the same order

    @property
    def kinds(self) -> tuple[str, ...]:
        """Kinds of every module using this weight (the layer's options must suit them all)."""
        return (self.kind,) + self.alias_kinds

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module name using this weight: the layer's own name first."""
        return (self.name,) + self.aliases

    @property
    def tokens_per_sample(self) -> int:
        """Rows of the (M, K) matmul per sample: positions (tokens, pixels) the weight is applied to."""
        return self.macs_per_sample // max(1, self.n_params)


def skipped_layers(model: nn.Module) -> dict[str, str]:
    """Modules of a quantizable type that are left out, fqn -> reason."""
    out = {}
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear):
            out[pre + "out_proj"] = ("nn.MultiheadAttention reads out_proj.weight directly instead of calling "
                                     "the module, so a packed replacement cannot run there")
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            for child in ("linear1", "linear2"):
                if isinstance(getattr(m, child, None), nn.Linear):
                    out[pre + child] = (f"{type(m).__name__} reads {child}.weight directly (its fused fast "
                                        "path), so a packed replacement cannot run there")
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            out[name] = "nn.Embedding with max_norm renormalises its own weight in forward"
    return out


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every quantizable layer, in ``named_modules`` order (static: no forward pass). Modules sharing
    one weight tensor are one layer (named after the first, the others in ``aliases``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    skip = skipped_layers(model)
    out: list[LayerInfo] = []
    by_key: dict = {}
    for name, m in model.named_modules():
        kind = layer_kind(m)
        w = getattr(m, "weight", None)
        if kind is None or name in skip or not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        key = _storage_key(w)
        if key in by_key:                  # tied: the same tensor behind another module
            info = by_key[key]
            info.aliases += (name,)
            info.alias_kinds += (kind,)
            continue
        w2 = layer_weight_2d(m, kind)
        info = LayerInfo(name, kind, tuple(w.shape), int(w2.shape[0]), int(w2.shape[1]), int(w.numel()),
                         getattr(m, "bias", None) is not None, str(w.dtype))
        by_key[key] = info
        out.append(info)
    return out


def fingerprint(layers) -> str:
    """sha256 over layer names and weight shapes: identifies the architecture a plan was made for."""
    h = hashlib.sha256()
    for l in layers:
        tied = "=" + "=".join(getattr(l, "aliases", ())) if getattr(l, "aliases", ()) else ""
        h.update(f"{l.name}{tied}:{'x'.join(map(str, l.weight_shape))};".encode())
    return h.hexdigest()[:16]


@dataclass
class LayerGraph:
    """Quantizable layers (``layers``, execution order when recorded) + data-flow DiGraph."""
    layers: list[LayerInfo]
    graph: nx.DiGraph
    shared_input: list[list[str]] = field(default_factory=list)   # groups reading one input tensor
    source: str = "static"                                        # "fx" | "hooks" | "static"
    skipped: dict[str, str] = field(default_factory=dict)         # left-out modules -> reason

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
        hooks to record shapes, MACs and the data flow. The model is not modified: the pass runs in
        eval mode (train flags restored after) and under a forked RNG."""
        layers = find_layers(model)
        skipped = skipped_layers(model)
        if not layers:
            why = f" (left out: {skipped})" if skipped else ""
            raise ValueError(f"{type(model).__name__} has no quantizable layers (nn.Linear, nn.Conv1d, "
                             f"nn.Conv2d, nn.Embedding or transformers Conv1D){why}")
        g = nx.DiGraph()
        g.add_nodes_from(l.name for l in layers)
        if batch is None:
            return cls(layers, g, [], "static", skipped)
        if any(p.is_meta for p in model.parameters()):     # a lazily loaded model: shapes only
            from .batches import to_device
            batch = to_device(batch, "meta")
        by_name = {l.name: l for l in layers}
        owner = {a: l.name for l in layers for a in l.modules}          # module fqn -> layer name
        order: list[str] = []
        input_ids: dict[str, int] = {}
        keep_alive = []          # hold input tensors so their ids stay unique during the pass
        n = batch_size(batch)

        def hook(name):
            def fn(mod, inp, out):
                lname = owner[name]
                info = by_name[lname]
                x = inp[0] if inp else None
                if info.calls == 0:
                    order.append(lname)
                    if isinstance(x, torch.Tensor):
                        info.input_shape = tuple(x.shape)
                        input_ids[lname] = id(x)
                        keep_alive.append(x)
                    if isinstance(out, torch.Tensor):
                        info.output_shape = tuple(out.shape)
                info.calls += 1
                if isinstance(out, torch.Tensor) and layer_kind(mod) != "embedding":
                    per_out = info.in_features          # MACs per output element = K (lookups: 0)
                    info.macs_per_sample += out.numel() * per_out // max(1, n)
            return fn
        mods = dict(model.named_modules())
        handles = [mods[a].register_forward_hook(hook(a)) for a in owner]
        modes = {m: m.training for m in model.modules()}
        model.eval()                   # never touch the user's BatchNorm statistics or dropout RNG
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                (forward or run_model)(model, batch)
        except Exception as e:
            raise ValueError(f"calibration batch does not run through {type(model).__name__}: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            for h in handles:
                h.remove()
            for m, t in modes.items():
                m.training = t
        groups: dict[int, list[str]] = {}
        for name in order:
            if name in input_ids and by_name[name].kind != "embedding":
                groups.setdefault(input_ids[name], []).append(name)
        shared = [grp for grp in groups.values() if len(grp) > 1]
        ran = [by_name[nm] for nm in order] + [l for l in layers if l.calls == 0]
        source = "hooks"
        if use_fx and _fx_edges(model, g, owner):
            source = "fx"
        else:
            _hook_edges(g, order, input_ids)
        return cls(ran, g, shared, source, skipped)


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


def _fx_edges(model: nn.Module, g: nx.DiGraph, owner: dict[str, str]) -> bool:
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
            if a.op == "call_module" and a.target in owner:
                ups.add(owner[a.target])
            else:
                ups |= nearest.get(a, set())
        nearest[node] = ups
        if node.op == "call_module" and node.target in owner:
            for u in ups - {owner[node.target]}:
                g.add_edge(u, owner[node.target])
    return True
