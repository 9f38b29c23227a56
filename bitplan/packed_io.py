"""Save a packed model to a folder and load it back with one call — safely.

Folder layout (what ``bitplan apply`` writes)::

    model_dir/
      model.safetensors     every parameter and buffer of the packed model (codes uint8, scales fp16,
                            biases, norms, ...), tied tensors stored once — or, when the model was
                            packed one decoder block at a time (``packed_stream``), instead:
      model-00001-of-000NN.safetensors ...   one shard per decoder block + one for the rest
      model.safetensors.index.json           {"metadata": {"total_size"}, "weight_map": {tensor: shard}}
      plan.json             the plan, with the kernel each module ran (``Plan.kernels``)
      bitplan_packed.json   manifest: format version, byte count, how to rebuild the fp skeleton
      skeleton/             Hugging Face models only: config.json, generation config and tokenizer
                            files copied from the source folder (no weights, no code)

Loading never imports or calls anything named by the folder's own files, and never reads outside
the folder: the skeleton comes from the CALLER's factory / model / spec, or from the manifest's
built-in model name (only names bitplan ships), or from ``skeleton/config.json`` through
transformers' ``from_config`` (``trust_remote_code`` is never set; a config that needs remote code
is refused). File names are fixed, not read from the manifest; shard names in the index must match
``SHARD_PATTERN`` (never a path, never a link), and every tensor of the rebuilt model must be in
exactly one shard. Saving writes a new folder beside the target and swaps it in, so a failure leaves
the previous folder loadable; a non-empty folder that is not a bitplan packed folder is never
overwritten.

Example:
    >>> save_packed(model, plan, "out/tiny_w4")            # packs a copy unless already packed
    >>> model = load_packed("out/tiny_w4", my_factory)     # callable, nn.Module or spec string
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile

from torch import nn

from .core.jsonio import (Fields, atomic_write_json, dict_of, integer, one_of, read_json, string, version)
from .plan import Plan

__all__ = ["save_packed", "load_packed", "read_manifest", "FORMAT", "FORMAT_VERSION", "READ_VERSIONS",
           "WEIGHTS_FILE", "INDEX_FILE", "SHARD_PATTERN", "shard_name", "PLAN_FILE", "MANIFEST_FILE",
           "SKELETON_DIR"]

FORMAT = "bitplan-packed"
FORMAT_VERSION = 3                        # 3: "weights" says single file or shards; 2: single file only
READ_VERSIONS = frozenset({2, 3})
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")     # Hugging Face's shard names
MAX_INDEX_BYTES = 64 << 20                # ~10^5 tensor names of a few hundred characters each
PLAN_FILE = "plan.json"
MANIFEST_FILE = "bitplan_packed.json"
SKELETON_DIR = "skeleton"
BUILTIN = ("minilm",)                     # skeletons bitplan can rebuild by name
_SKELETON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


def shard_name(i: int, n: int) -> str:
    """The fixed file name of shard ``i`` (1-based) of ``n``: ``model-00001-of-00003.safetensors``."""
    if not 1 <= i <= n <= 99999:
        raise ValueError(f"shard {i} of {n}: need 1 <= i <= n <= 99999")
    return f"model-{i:05d}-of-{n:05d}.safetensors"


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


def check_target(folder) -> str:
    """``folder`` as an absolute path, after checking it may be written: new, empty, or a bitplan
    packed folder (``ValueError`` otherwise: user files are never overwritten).

    Example: ``folder = check_target("out/llama_packed")``
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or (
            os.listdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST_FILE)))):
        raise ValueError(f"{folder} exists and is not a bitplan packed folder; refusing to overwrite it "
                         "(give a new or empty folder)")
    return folder


def write_folder(folder: str, fill, model_spec=None, source_dir=None, model_class=None,
                 weights: str = "single") -> dict:
    """Write a packed folder atomically; returns the manifest. ``fill(tmp) -> (size_bytes, plan)``
    writes the weights into the temp folder ``tmp`` and returns the packed model's bytes and the plan
    (with the kernels that ran); the plan, the skeleton files and the manifest follow, then the temp
    folder beside ``folder`` is swapped in, so a failure leaves the previous folder as it was.

    Example: ``write_folder("out/m", lambda tmp: (write_weights(tmp), plan), weights="sharded")``
    """
    from .core.version import __version__
    folder = check_target(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.tmp-")
    try:
        size_bytes, saved_plan = fill(tmp)
        saved_plan.save(os.path.join(tmp, PLAN_FILE))
        skel = _skeleton_record(model_spec, source_dir)
        if skel["kind"] == "hf_config":
            os.makedirs(os.path.join(tmp, SKELETON_DIR))
            for f in _SKELETON_FILES:
                src = os.path.join(source_dir, f)
                if os.path.isfile(src) and not os.path.islink(src):
                    shutil.copyfile(src, os.path.join(tmp, SKELETON_DIR, f))
            skel["model_class"] = model_class or "encoder"
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "size_bytes": int(size_bytes),
                    "bitplan_version": __version__, "skeleton": skel, "weights": weights,
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


def save_packed(model: nn.Module, plan: Plan, folder, model_spec: str | None = None,
                source_dir: str | None = None, model_class: str | None = None, calib_data=None) -> dict:
    """Write ``model`` packed by ``plan`` to ``folder`` (one ``model.safetensors``); returns the manifest.

    ``model`` may be the fp model (a packed copy is made; the argument is not modified) or a model
    already packed by ``apply_plan_(model, plan, mode="packed")``. ``model_spec`` is recorded for
    information (a built-in name like ``"minilm"`` also rebuilds the skeleton); ``source_dir`` (the
    model's Hugging Face folder) has its config and tokenizer files copied in so the folder rebuilds
    by itself; ``model_class`` ("causal_lm" | "encoder") says how to rebuild it; ``calib_data`` feeds
    calibrated methods (AWQ, GPTQ) when the model still has to be packed. A causal LM too large to
    hold whole: ``packed_stream.save_packed_streamed`` (one decoder block at a time, sharded).

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
    folder = check_target(folder)
    packed = model if _is_packed(model) else apply_plan_(copy.deepcopy(model), plan, mode="packed",
                                                         calib_data=calib_data)

    def fill(tmp):
        save_model(packed, os.path.join(tmp, WEIGHTS_FILE), metadata={
            "format": "pt", "bitplan_format": FORMAT, "bitplan_version": __version__}, force_contiguous=True)
        return model_nbytes(packed), getattr(packed, "bitplan_plan", None) or plan
    return write_folder(folder, fill, model_spec, source_dir, model_class, "single")


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
    Version-2 manifests (single ``model.safetensors``) read as ``"weights": "single"``.

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
    v = version(READ_VERSIONS)(d.get("format_version"), f"{path}: format_version")
    out = dict(Fields(d, path, {"format": string(64), "format_version": integer(), "size_bytes": integer(0),
                                "bitplan_version": string(64), "skeleton": _skeleton_check,
                                "model_spec": string(4096)},
                      {"notes": dict_of(string(4096)), "weights": one_of("single", "sharded")}))
    if v == 3 and "weights" not in out:
        raise ValueError(f"{path}: a format_version 3 manifest needs 'weights' ('single' or 'sharded')")
    if v == 2 and "weights" in out:
        raise ValueError(f"{path}: 'weights' is a format_version 3 field (version 2 folders hold one "
                         f"{WEIGHTS_FILE})")
    out.setdefault("weights", "single")
    return out


def unique_state(sd: dict) -> dict:
    """``sd`` with every tensor stored once: of the names sharing one storage (a tied embedding and
    head) the first, sorted, of those covering the whole storage is kept — the name
    ``safetensors.torch.save_model`` keeps, so single-file and sharded folders name tensors alike.

    Example: ``unique_state(model.state_dict())`` -> without ``model.embed_tokens.codes`` when tied
    """
    by_storage: dict = {}
    for name, t in sd.items():
        if t.device.type != "meta" and not t.is_mkldnn and t.untyped_storage().nbytes():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    drop = set()
    for names in by_storage.values():
        if len(names) < 2:
            continue
        whole = sorted(n for n in names if sd[n].data_ptr() == sd[n].untyped_storage().data_ptr()
                       and sd[n].numel() * sd[n].element_size() == sd[n].untyped_storage().nbytes())
        if not whole:
            raise ValueError(f"tensors {sorted(names)[:4]} share storage but none covers all of it; "
                             "cannot store them once")
        drop |= set(names) - {whole[0]}
    return {k: v for k, v in sd.items() if k not in drop}


def _regular_file(path: str, what: str) -> None:
    if os.path.islink(path) or not os.path.isfile(path):
        raise ValueError(f"{path}: the {what} is missing or not a regular file (a link is never followed)")


def read_index(folder: str) -> tuple[dict[str, str], int]:
    """The weight map of a sharded folder, checked: tensor name -> shard file name (``SHARD_PATTERN``,
    every shard of one count ``NN``, each a regular file of ``folder``), and the total bytes it records.

    Example: ``read_index("model_dir")[0]["lm_head.codes"]`` -> ``'model-00001-of-00003.safetensors'``
    """
    path = os.path.join(folder, INDEX_FILE)
    _regular_file(path, "safetensors index")
    d = read_json(path, "safetensors index", max_bytes=MAX_INDEX_BYTES)
    f = Fields(d, path, {"metadata": lambda v, w: Fields(v, w, {"total_size": integer(0)}),
                         "weight_map": dict_of(string(4096), key=string(4096, nonempty=True), min_len=1)})
    wmap = f["weight_map"]
    counts = set()
    for name, shard in wmap.items():
        m = SHARD_PATTERN.fullmatch(shard)
        if m is None or not 1 <= int(m[1]) <= int(m[2]):
            raise ValueError(f"{path}: weight_map[{name[:100]!r}] = {shard[:100]!r} is not a shard file name; "
                             f"allowed: model-IIIII-of-NNNNN.safetensors with 1 <= IIIII <= NNNNN (never a path)")
        counts.add(m[2])
    if len(counts) != 1:
        raise ValueError(f"{path}: shards name different counts {sorted(counts)[:4]}; one folder has one NNNNN")
    for shard in sorted(set(wmap.values())):
        _regular_file(os.path.join(folder, shard), f"shard {shard} named by {INDEX_FILE}")
    return wmap, f["metadata"]["total_size"]


def _load_sharded(model: nn.Module, folder: str, index: tuple[dict[str, str], int]) -> None:
    """Load the shards of ``folder`` (``index``: what :func:`read_index` read) into ``model``: every
    tensor of the model exactly once (one name of a tied group), none unexpected, each shard holding
    exactly the tensors the index gives it."""
    from safetensors import SafetensorError, safe_open
    wmap, want = index
    sd = model.state_dict()
    keep = unique_state(sd)
    alias = {n: n for n in keep}                 # every model name -> the name its storage is kept under
    for n, t in sd.items():
        if n not in keep:
            alias[n] = next(k for k in keep if keep[k].untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
    index = os.path.join(folder, INDEX_FILE)
    unexpected = sorted(n for n in wmap if n not in alias)
    seen: dict[str, str] = {}
    dup = []
    for n in wmap:
        if n in alias:
            if alias[n] in seen:
                dup.append((seen[alias[n]], n))
            seen[alias[n]] = n
    missing = sorted(k for k in keep if k not in seen)
    if missing or unexpected or dup:
        raise ValueError(f"{index}: the saved tensors do not match the rebuilt model; missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, stored twice (tied names) {dup[:5]}")
    by_shard: dict[str, list[str]] = {}
    for n, shard in wmap.items():
        by_shard.setdefault(shard, []).append(n)
    total = 0
    for shard, names in sorted(by_shard.items()):
        path = os.path.join(folder, shard)
        try:
            with safe_open(path, "pt") as f:
                have = set(f.keys())
                if have != set(names):
                    raise ValueError(f"{path}: holds tensors {sorted(have - set(names))[:5]} the index does not "
                                     f"give it, lacks {sorted(set(names) - have)[:5]}")
                part = {n: f.get_tensor(n) for n in names}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors shard ({e})") from None
        total += sum(t.numel() * t.element_size() for t in part.values())
        try:
            _, bad = model.load_state_dict({alias[n]: t for n, t in part.items()}, strict=False)
        except (RuntimeError, TypeError, ValueError) as e:          # shape / dtype mismatch
            raise ValueError(f"{path}: does not load into the rebuilt model ({str(e)[:300]})") from None
        if bad:
            raise ValueError(f"{path}: tensors {bad[:5]} do not load into the rebuilt model")
    if total != want:
        raise ValueError(f"{index}: metadata.total_size = {want} but the shards hold {total} bytes")


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


def _pack_skeleton(model: nn.Module, plan: Plan) -> dict:
    """Give the skeleton the packed modules of ``plan`` (which kernels ran: returned). Every value is
    then replaced by the saved tensors, so calibrated methods (AWQ, GPTQ: same storage as
    round-to-nearest) are packed round-to-nearest here, without calibration data, and wrapped with
    the input scales they store (ones until loaded)."""
    import dataclasses

    import torch

    from .core.graph import find_layers
    from .kernels.modules import METHODS, InputScaled, needs_stats, quantize_modules_
    calibrated = {n: s for n, s in plan.layers.items() if needs_stats(s)}
    specs = {n: dataclasses.replace(s, method="rtn") if n in calibrated else s for n, s in plan.layers.items()}
    k = {l.name: l.in_features for l in find_layers(model)} if calibrated else {}         # before packing
    ran = quantize_modules_(model, specs, "packed", prefer=plan.kernels)
    for n, s in calibrated.items():
        if METHODS[s.method].stores_in_scale:
            parent, _, child = n.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, InputScaled(getattr(owner, child), torch.ones(k[n])))
    return ran


def load_packed(folder, model_factory_or_spec=None) -> nn.Module:
    """Rebuild the packed model saved in ``folder``; returns it in eval mode.

    ``model_factory_or_spec``: a callable returning the fp model (or ``(model, calib_data)``), a model
    spec string (``"minilm"``, ``"pkg.module:function"``, an HF folder), an ``nn.Module`` skeleton (not
    modified), or None to rebuild from the folder itself (built-in name or copied HF config). Only
    the architecture matters: every tensor is replaced by the saved one, read from ``model.safetensors``
    or, in a sharded folder, from the shards ``model.safetensors.index.json`` names (:func:`read_index`).

    Example: ``model = load_packed("model_dir", "tests.fixtures_models:tiny")``
    """
    from safetensors.torch import load_model

    from .apply import check_plan

    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    index = read_index(folder) if manifest["weights"] == "sharded" else None     # cheap checks first
    plan = Plan.load(os.path.join(folder, PLAN_FILE))
    model = _skeleton(model_factory_or_spec, manifest, folder)
    check_plan(model, plan)
    ran = _pack_skeleton(model, plan)
    moved = {m: (plan.kernels[m], k) for m, k in ran.items() if m in plan.kernels and plan.kernels[m] != k}
    if moved:
        m, (was, now) = next(iter(moved.items()))
        raise ValueError(f"{folder}: {len(moved)} module(s) were saved with a kernel that cannot run here, "
                         f"e.g. {m}: saved as {was!r}, this machine runs {now!r}; re-apply the plan to the "
                         "fp model here (`bitplan apply`) instead of loading this folder")
    model.bitplan_plan = plan.with_kernels(ran)
    if index is not None:
        _load_sharded(model, folder, index)
        return model.eval()
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
