"""The layers an export writes, named as in the model the export will be loaded into.

A plan names layers as the model it was made on did (``encoder.layers.0.q`` when the CLI wrapped an
HF model). An export is loaded into another object (``AutoModelForCausalLM``, a vLLM model, a GGUF
file), so every exported name must resolve there. :func:`export_layers` renames
(``strip_prefix`` then ``add_prefix``) and, given the target's skeleton (:func:`load_skeleton`: an
HF folder's config only, the model built on the meta device — no weights read, no download, never
``trust_remote_code``), resolves each name to a module with a weight of the planned shape and
refuses with the unmatched names (counts + the first few, and a prefix fix when one exists).

Example:
    >>> sk = load_skeleton("qwen2-folder")                         # config.json only
    >>> layers = export_layers(plan, strip_prefix="encoder.", add_prefix="model.", skeleton=sk)
    >>> [(l.name, l.kind, l.nk, l.tied) for l in layers][:1]
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..core.spec import QuantSpec
from ..plan import Plan
from ..report import layer_kinds, layer_nk

__all__ = ["ExportLayer", "export_layers", "load_skeleton", "rename", "few", "suggest_prefix", "warn_unknown_kinds"]

log = logging.getLogger("bitplan")


@dataclass(frozen=True)
class ExportLayer:
    """One planned layer as an exporter sees it."""
    plan_name: str                      # the name in the plan
    name: str                           # module FQN in the target model (prefixes applied)
    spec: QuantSpec
    kind: str | None                    # linear | hf_conv1d | conv2d | conv1d | embedding | None (unknown)
    shape: tuple[int, ...] | None       # weight as stored by the module
    tied: tuple[str, ...] = ()          # other modules of the target sharing this weight (tied lm_head)

    @property
    def nk(self) -> tuple[int, int] | None:
        """(N out, K in) of the quantized matrix (Conv1D transposed, conv flattened)."""
        return layer_nk(self.shape, self.kind) if self.shape else None


def rename(name: str, strip_prefix: str = "", add_prefix: str = "") -> str:
    """``add_prefix + name`` with ``strip_prefix`` removed from its start when present."""
    if strip_prefix and name.startswith(strip_prefix):
        name = name[len(strip_prefix):]
    return add_prefix + name


def few(names, k: int = 5) -> str:
    """'3 names: a, b, c' / '120 names: a, b, c, d, e, ...' — counts and the first few, never all."""
    names = list(names)
    shown = ", ".join(names[:k]) + (", ..." if len(names) > k else "")
    return f"{len(names)} name{'s' if len(names) != 1 else ''}: {shown}"


def warn_unknown_kinds(plan: Plan, skeleton) -> None:
    """One warning when neither the plan nor a skeleton says which layers are GPT-2 Conv1D."""
    if skeleton is None and not isinstance(plan.meta.get("layer_kinds"), dict):
        log.warning("this plan does not record layer kinds: 2-D weights are taken as nn.Linear (a GPT-2 "
                    "Conv1D plan would be exported wrongly); pass the model folder (--check DIR) to read them")


def _module_kind(module) -> str | None:
    import torch
    from ..core.graph import layer_kind
    kind = layer_kind(module)
    if kind is None and isinstance(module, torch.nn.Embedding):
        return "embedding"
    return kind


def load_skeleton(folder):
    """The model class an HF folder names, built from its ``config.json`` on the meta device.

    The class is ``config.architectures[0]`` when transformers has it (``LlamaForCausalLM``, ...), else
    ``AutoModelForCausalLM`` for causal-LM configs, else ``AutoModel``. Nothing is downloaded, no weight
    is read, no code from the folder runs (``trust_remote_code=False``).

    Example: ``sk = load_skeleton("tinyllama"); sk.lm_head.weight.device`` -> ``device(type='meta')``
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a directory (a local Hugging Face model folder is needed)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder!r} has no config.json (not a Hugging Face model folder)")
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config).eval()
        try:
            return AutoModelForCausalLM.from_config(config).eval()
        except ValueError:
            return AutoModel.from_config(config).eval()


def _weights(skeleton) -> dict[str, tuple]:
    """{module fqn: (module, weight)} for every module with a ``weight`` tensor."""
    import torch
    out = {}
    for n, m in skeleton.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[n] = (m, w)
    return out


def suggest_prefix(plan_names, module_names) -> tuple[str, str] | None:
    """(strip_prefix, add_prefix) mapping every plan name onto a module name, or None.

    Example: ``suggest_prefix(["encoder.layers.0.q"], ["model.layers.0.q"])`` == ("encoder.", "model.")
    """
    plan_names, mods = list(plan_names), set(module_names)
    if not plan_names:
        return None
    first = plan_names[0]
    parts = first.split(".")
    strips = [""] + [".".join(parts[:i]) + "." for i in range(1, len(parts))]
    for s in strips:
        if not all(p.startswith(s) for p in plan_names):
            break
        n0 = first[len(s):]
        adds = sorted({m[:len(m) - len(n0)] for m in mods
                       if m.endswith(n0) and (len(m) == len(n0) or m[len(m) - len(n0) - 1] == ".")}, key=len)
        for a in adds:
            if all(rename(p, s, a) in mods for p in plan_names):
                return s, a
    return None


def export_layers(plan: Plan, strip_prefix: str = "", add_prefix: str = "", skeleton=None) -> list[ExportLayer]:
    """Every layer of ``plan`` (fp16 ones too) renamed for the target; with ``skeleton`` (a module,
    e.g. from :func:`load_skeleton`) each name must be a module with a weight of the planned shape —
    otherwise ``ValueError`` with the unmatched names. Kinds and ties come from the skeleton, else from
    the plan (``meta["layer_kinds"]``, ``meta["aliases"]``: tied modules sharing a layer's weight)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan, got {type(plan).__name__}")
    for what, p in (("strip_prefix", strip_prefix), ("add_prefix", add_prefix)):
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a str, got {type(p).__name__}")
    shapes, kinds = plan.meta.get("layer_shapes", {}), layer_kinds(plan) or {}
    aliases = plan.meta.get("aliases") if isinstance(plan.meta.get("aliases"), dict) else {}   # tied modules
    out = [ExportLayer(n, rename(n, strip_prefix, add_prefix), s, kinds.get(n),
                       tuple(shapes[n]) if n in shapes else None,
                       tuple(rename(a, strip_prefix, add_prefix) for a in aliases.get(n, ())))
           for n, s in plan.layers.items()]
    if skeleton is None:
        return out
    mods = _weights(skeleton)
    missing = [l.name for l in out if l.name not in mods]
    if missing:
        fix = suggest_prefix(list(plan.layers), mods)
        hint = (f"; --strip-prefix {fix[0]!r} --add-prefix {fix[1]!r} maps every layer" if fix else
                f"; the model's layers look like: {few(sorted(mods), 3).split(': ', 1)[1]}")
        raise ValueError(f"{len(missing)} of {len(out)} exported layer names are not modules with a weight in "
                         f"{type(skeleton).__name__} ({few(missing)}){hint}")
    by_weight: dict[int, list[str]] = {}
    for n, (_, w) in mods.items():
        by_weight.setdefault(id(w), []).append(n)
    resolved, wrong = [], []
    for l in out:
        m, w = mods[l.name]
        if l.shape is not None and tuple(w.shape) != l.shape:
            wrong.append(f"{l.name} (plan {list(l.shape)}, model {list(w.shape)})")
        tied = tuple(n for n in by_weight[id(w)] if n != l.name)
        resolved.append(ExportLayer(l.plan_name, l.name, l.spec, _module_kind(m), tuple(w.shape), tied))
    if wrong:
        raise ValueError(f"{len(wrong)} layers have another weight shape in {type(skeleton).__name__}: "
                         f"{few(wrong, 3)} (the plan was made for another model size)")
    return resolved
