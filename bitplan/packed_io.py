"""Save a packed model to a folder and load it back with one call — safely.

Folder layout (what ``bitplan apply`` writes)::

    model_dir/
      model.safetensors     every parameter and buffer of the packed model (codes uint8, scales fp16,
                            biases, norms, ...), tied tensors stored once
      plan.json             the plan, with the kernel each module ran (``Plan.kernels``)
      bitplan_packed.json   manifest: format version, byte count, how to rebuild the fp skeleton
      skeleton/             Hugging Face models only: config.json, generation config and tokenizer
                            files copied from the source folder (no weights, no code)

Loading never imports or calls anything named by the folder's own files, and never reads outside
the folder: the skeleton comes from the CALLER's factory / model / spec, or from the manifest's
built-in model name (only names bitplan ships), or from ``skeleton/config.json`` through
transformers' ``from_config`` (``trust_remote_code`` is never set; a config that needs remote code
is refused). File names are fixed, not read from the manifest. Saving writes a new folder beside the
target and swaps it in, so a failure leaves the previous folder loadable; a non-empty folder that
is not a bitplan packed folder is never overwritten.

Example:
    >>> save_packed(model, plan, "out/tiny_w4")            # packs a copy unless already packed
    >>> model = load_packed("out/tiny_w4", my_factory)     # callable, nn.Module or spec string
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile

from torch import nn

from .core.jsonio import (Fields, atomic_write_json, dict_of, integer, one_of, read_json, string, version)
from .plan import Plan

__all__ = ["save_packed", "load_packed", "read_manifest", "FORMAT", "FORMAT_VERSION",
           "WEIGHTS_FILE", "PLAN_FILE", "MANIFEST_FILE", "SKELETON_DIR"]

FORMAT = "bitplan-packed"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "bitplan_packed.json"
SKELETON_DIR = "skeleton"
BUILTIN = ("minilm",)                     # skeletons bitplan can rebuild by name
_SKELETON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


def _is_packed(model: nn.Module) -> bool:
    """True after ``apply_plan_(model, plan, mode="packed")`` (fake mode records kernel "fake")."""
    applied = getattr(model, "bitplan_plan", None)
    return applied is not None and bool(applied.kernels) and "fake" not in applied.kernels.values()


def _skeleton_record(model_spec, source_dir) -> dict:
    """What rebuilds the fp skeleton: a built-in name, an HF config copied into the folder, or nothing."""
    if isinstance(model_spec, str) and model_spec in BUILTIN:
        return {"kind": "builtin", "name": model_spec}
    if source_dir is not None and os.path.isfile(os.path.join(source_dir, "config.json")):
        return {"kind": "hf_config", "dir": SKELETON_DIR}
    return {"kind": "none"}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_packed(model: nn.Module, plan: Plan, folder, model_spec: str | None = None,
                source_dir: str | None = None, model_class: str | None = None, calib_data=None) -> dict:
    """Write ``model`` packed by ``plan`` to ``folder``; returns the manifest.

    ``model`` may be the fp model (a packed copy is made; the argument is not modified) or a model
    already packed by ``apply_plan_(model, plan, mode="packed")``. ``model_spec`` is recorded for
    information (a built-in name like ``"minilm"`` also rebuilds the skeleton); ``source_dir`` (the
    model's Hugging Face folder) has its config and tokenizer files copied in so the folder rebuilds
    by itself; ``model_class`` ("causal_lm" | "encoder") says how to rebuild it; ``calib_data`` feeds
    calibrated methods (AWQ, GPTQ) when the model still has to be packed.

    Example: ``save_packed(model, Plan.load("plan.json"), "model_dir", model_spec="minilm")``
    """
    from safetensors.torch import save_model

    from .apply import apply_plan_
    from .core.version import __version__
    from .costmodels import model_nbytes

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan, got {type(plan).__name__}")
    if model_class not in (None, "causal_lm", "encoder"):
        raise ValueError(f"model_class={model_class!r}; allowed: None, 'causal_lm', 'encoder'")
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or (
            os.listdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST_FILE)))):
        raise ValueError(f"{folder} exists and is not a bitplan packed folder; refusing to overwrite it "
                         "(give a new or empty folder)")
    packed = model if _is_packed(model) else apply_plan_(copy.deepcopy(model), plan, mode="packed",
                                                         calib_data=calib_data)
    saved_plan = getattr(packed, "bitplan_plan", None) or plan
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.tmp-")
    try:
        save_model(packed, os.path.join(tmp, WEIGHTS_FILE), metadata={
            "format": "pt", "bitplan_format": FORMAT, "bitplan_version": __version__}, force_contiguous=True)
        saved_plan.save(os.path.join(tmp, PLAN_FILE))
        skel = _skeleton_record(model_spec, source_dir)
        if skel["kind"] == "hf_config":
            os.makedirs(os.path.join(tmp, SKELETON_DIR))
            for f in _SKELETON_FILES:
                src = os.path.join(source_dir, f)
                if os.path.isfile(src) and not os.path.islink(src):
                    shutil.copyfile(src, os.path.join(tmp, SKELETON_DIR, f))
            skel["model_class"] = model_class or "encoder"
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "size_bytes": int(model_nbytes(packed)),
                    "bitplan_version": __version__, "skeleton": skel,
                    "model_spec": str(model_spec) if model_spec is not None else ""}
        atomic_write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.old-")
            os.rmdir(old)
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _skeleton_check(v, where):
    f = Fields(v, where, {"kind": one_of("builtin", "hf_config", "none")},
               {"name": one_of(*BUILTIN), "dir": one_of(SKELETON_DIR), "model_class": one_of("causal_lm", "encoder")})
    if f["kind"] == "builtin" and "name" not in f:
        raise ValueError(f"{where}: a builtin skeleton needs a name among {list(BUILTIN)}")
    return dict(f)


def read_manifest(folder) -> dict:
    """The manifest of a packed folder, read strictly; ``ValueError`` naming the folder when it is not one.

    Example: ``read_manifest("model_dir")["size_bytes"]``
    """
    path = os.path.join(os.fspath(folder), MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a bitplan packed model folder (no {MANIFEST_FILE}); "
                         "write one with `bitplan apply` or bitplan.save_packed")
    d = read_json(path, "bitplan packed-folder manifest", max_bytes=1 << 20)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a manifest must be a JSON object")
    if d.get("format") != FORMAT:
        raise ValueError(f"{path}: format {d.get('format')!r} is not {FORMAT!r}")
    version({FORMAT_VERSION})(d.get("format_version"), f"{path}: format_version")
    return dict(Fields(d, path, {"format": string(64), "format_version": integer(), "size_bytes": integer(0),
                                 "bitplan_version": string(64), "skeleton": _skeleton_check,
                                 "model_spec": string(4096)}, {"notes": dict_of(string(4096))}))


def _from_hf_config(skel_dir: str, model_class: str) -> nn.Module:
    from .models import skeleton_from_config
    return skeleton_from_config(skel_dir, model_class)


def _skeleton(src, manifest: dict, folder: str) -> nn.Module:
    if src is None:
        skel = manifest["skeleton"]
        if skel["kind"] == "builtin":
            from .models import load_model
            return load_model(skel["name"]).model
        if skel["kind"] == "hf_config":
            return _from_hf_config(os.path.join(folder, SKELETON_DIR), skel.get("model_class", "encoder"))
        raise ValueError(f"{folder}: the folder records no skeleton it can rebuild by itself (it was saved "
                         "from a 'pkg.module:function' model, whose code a folder never names); pass the "
                         "model factory: load_packed(folder, factory)")
    if isinstance(src, nn.Module):
        return copy.deepcopy(src)
    if isinstance(src, str):                # the CALLER's spec, never the folder's
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
    modified), or None to rebuild from the folder itself (built-in name or copied HF config). Only
    the architecture matters: every tensor is replaced by the saved one.

    Example: ``model = load_packed("model_dir", "tests.fixtures_models:tiny")``
    """
    from safetensors.torch import load_model

    from .apply import check_plan
    from .kernels.modules import quantize_modules_

    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    plan = Plan.load(os.path.join(folder, PLAN_FILE))
    model = _skeleton(model_factory_or_spec, manifest, folder)
    check_plan(model, plan)
    ran = quantize_modules_(model, dict(plan.layers), "packed", prefer=plan.kernels)
    moved = {m: (plan.kernels[m], k) for m, k in ran.items() if m in plan.kernels and plan.kernels[m] != k}
    if moved:
        m, (was, now) = next(iter(moved.items()))
        raise ValueError(f"{folder}: {len(moved)} module(s) were saved with a kernel that cannot run here, "
                         f"e.g. {m}: saved as {was!r}, this machine runs {now!r}; re-apply the plan to the "
                         "fp model here (`bitplan apply`) instead of loading this folder")
    model.bitplan_plan = plan.with_kernels(ran)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights) or os.path.islink(weights):
        raise ValueError(f"{folder}: {WEIGHTS_FILE} is missing (or a link)")
    try:
        missing, unexpected = load_model(model, weights, strict=False)
    except Exception as e:          # safetensors raises its own errors on corrupt headers / shapes
        raise ValueError(f"{weights}: does not load into the rebuilt model ({type(e).__name__}: "
                         f"{str(e)[:300]})") from None
    if missing or unexpected:
        raise ValueError(f"{folder}: saved tensors do not match the rebuilt model; missing "
                         f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
    return model.eval()
