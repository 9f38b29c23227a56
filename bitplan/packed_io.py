"""Save a packed model to a folder and load it back with one call.

Folder layout (what ``bitplan apply`` writes)::

    model_dir/
      model.safetensors     every parameter and buffer of the packed model (codes uint8, scales fp16,
                            biases, embeddings, ...), tied tensors stored once
      plan.json             the plan, with the kernel each layer runs (``Plan.with_kernels``)
      bitplan_packed.json   manifest: format version, model spec (how to rebuild the fp skeleton),
                            byte count

Loading rebuilds the module structure (fp skeleton -> ``apply_plan_(..., mode="packed")``) and then
overwrites every tensor from the safetensors file (strict: a missing or unexpected tensor is an
error), so the loaded model computes exactly what the saved one did.

Example:
    >>> save_packed(model, plan, "out/tiny_w4")            # packs a copy unless already packed
    >>> model = load_packed("out/tiny_w4", my_factory)     # callable, spec string or nn.Module
"""
from __future__ import annotations

import copy
import json
import os

from torch import nn

from .plan import Plan, atomic_write_text

__all__ = ["save_packed", "load_packed", "read_manifest", "FORMAT", "FORMAT_VERSION",
           "WEIGHTS_FILE", "PLAN_FILE", "MANIFEST_FILE"]

FORMAT = "bitplan-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "bitplan_packed.json"


def _is_packed(model: nn.Module) -> bool:
    """True after ``apply_plan_(model, plan, mode="packed")`` (fake mode records kernel "fake")."""
    applied = getattr(model, "bitplan_plan", None)
    return applied is not None and all(s.kernel not in (None, "fake") for s in applied.layers.values())


def save_packed(model: nn.Module, plan: Plan, folder, model_spec: str | None = None) -> dict:
    """Write ``model`` packed by ``plan`` to ``folder``; returns the manifest.

    ``model`` may be the fp model (a packed copy is made; the argument is not modified) or a model
    already packed by ``apply_plan_(model, plan, mode="packed")``. ``model_spec`` (e.g.
    ``"pkg.module:function"`` or ``"minilm"``) is recorded so ``load_packed(folder)`` can rebuild
    the skeleton by itself.

    Example: ``save_packed(model, Plan.load("plan.json"), "model_dir", model_spec="minilm")``
    """
    from safetensors.torch import save_model

    from . import __version__
    from .costmodels import model_nbytes
    from .kernels.apply import apply_plan_

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan, got {type(plan).__name__}")
    packed = model if _is_packed(model) else apply_plan_(copy.deepcopy(model), plan, mode="packed")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp_{WEIGHTS_FILE}")
    save_model(packed, tmp, metadata={"format": "pt", "bitplan_format": FORMAT,
                                      "bitplan_version": __version__}, force_contiguous=True)
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    saved_plan = getattr(packed, "bitplan_plan", None) or plan
    saved_plan.save(os.path.join(folder, PLAN_FILE))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_spec": model_spec,
                "weights": WEIGHTS_FILE, "plan": PLAN_FILE, "size_bytes": int(model_nbytes(packed)),
                "bitplan_version": __version__}
    atomic_write_text(os.path.join(folder, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder) -> dict:
    """The manifest of a packed folder; ``ValueError`` naming the folder when it is not one."""
    path = os.path.join(os.fspath(folder), MANIFEST_FILE)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"{folder} is not a bitplan packed model folder (no {MANIFEST_FILE}); "
                         "write one with `bitplan apply` or bitplan.packed_io.save_packed") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {m.get('format') if isinstance(m, dict) else m!r} version "
                         f"{m.get('format_version') if isinstance(m, dict) else None!r} is not supported; "
                         f"this bitplan reads {FORMAT} version {FORMAT_VERSION}")
    return m


def _skeleton(model_factory_or_spec, manifest: dict) -> nn.Module:
    src = model_factory_or_spec if model_factory_or_spec is not None else manifest.get("model_spec")
    if src is None:
        raise ValueError("load_packed needs a model factory, spec or nn.Module: the folder's manifest "
                         "records no model_spec")
    if isinstance(src, nn.Module):
        return copy.deepcopy(src)
    if isinstance(src, str):
        from .models import load_model
        return load_model(src).model
    if callable(src):
        out = src()
        model = out[0] if isinstance(out, tuple) else out
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise TypeError(f"model_factory_or_spec must be a callable, a spec string or an nn.Module, "
                    f"got {type(src).__name__}")


def load_packed(folder, model_factory_or_spec=None) -> nn.Module:
    """Rebuild the packed model saved in ``folder``; returns it in eval mode.

    ``model_factory_or_spec``: a callable returning the fp model (or ``(model, calib_data)``), a model
    spec string (``"minilm"``, ``"pkg.module:function"``, an HF folder), an ``nn.Module`` skeleton (not
    modified), or None to use the spec recorded at save time. Only the architecture matters: every
    tensor is replaced by the saved one.

    Example: ``model = load_packed("model_dir", "tests.fixtures_models:tiny")``
    """
    from safetensors.torch import load_model

    from .kernels.apply import apply_plan_

    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    plan = Plan.load(os.path.join(folder, manifest.get("plan", PLAN_FILE)))
    model = _skeleton(model_factory_or_spec, manifest)
    apply_plan_(model, plan, mode="packed")        # same module structure as the saved model
    missing, unexpected = load_model(model, os.path.join(folder, manifest.get("weights", WEIGHTS_FILE)),
                                     strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: saved tensors do not match the rebuilt model; missing "
                         f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
    return model.eval()
