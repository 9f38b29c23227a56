"""Pack a Hugging Face causal LM one decoder block at a time and write it as sharded safetensors.

The model is never whole in memory, neither in floating point nor packed: it is built on the meta
device (``sensitivity.hf_stream.StreamedLM``), the modules outside the decoder blocks (embeddings,
final norm, lm_head) are read from the folder's safetensors, then each decoder block in turn is read
tensor by tensor, packed as the plan says (``kernels.modules.quantize_modules_``, mode "packed"),
written to its own shard file and sent back to the meta device. The outer modules are packed last
and written to shard 1. Peak memory ≈ the outer modules + one block (fp and packed) — plus, when the
plan has calibrated methods (AWQ, GPTQ), the calibration hidden states, carried block to block in
floating point as GPTQ-style tools do (Frantar et al., "GPTQ", ICLR 2023, §4): every layer's input
statistics (``kernels.calibstats.StatsCollector``) then come from the fp model, exactly what
``apply_plan_`` gathers on the whole model (``gather_stats``), so the packed tensors are the same.

Folder: ``model-00001-of-000NN.safetensors`` (outer modules) and one shard per decoder block, plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``) as Hugging Face
writes them; ``plan.json``, ``skeleton/`` and the manifest (``"weights": "sharded"``) as
``packed_io.save_packed`` writes them. ``packed_io.load_packed`` loads it back. Weights are read as
float32, as ``bitplan apply`` loads a causal LM.

Example:
    >>> save_packed_streamed("path/to/llama", Plan.load("plan.json"), "llama_packed", calib_data=batches)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch

from .core.batches import as_batches
from .packed_io import FORMAT, INDEX_FILE, WEIGHTS_FILE, check_target, shard_name, unique_state, write_folder
from .plan import Plan

__all__ = ["save_packed_streamed", "streamable"]


def streamable(path) -> str | None:
    """None when ``path`` is a folder ``save_packed_streamed`` can stream (a causal LM with safetensors
    weights), else the reason it is not one.

    Example: ``streamable("path/to/llama")`` -> None; ``streamable("minilm")`` -> 'not a folder'
    """
    from .models import is_causal_lm_config, read_hf_config
    path = os.fspath(path)
    if not os.path.isdir(path):
        return "not a folder"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json (not a Hugging Face model folder)"
    try:
        cfg = read_hf_config(path)
    except ValueError as e:
        return str(e)
    if not is_causal_lm_config(cfg):
        return f"its config names no causal-LM architecture ({cfg.get('architectures')!r})"
    if not any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS_FILE, INDEX_FILE)):
        return f"no {WEIGHTS_FILE} or {INDEX_FILE} (weights in another format)"
    return None


def _mask(batch):
    """The (B, T) token mask of a dict batch (padding is left out of the statistics, as gather_stats does)."""
    am = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return am if isinstance(am, torch.Tensor) and am.dim() == 2 else None


def _set_module(root, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _collect(mods: dict, runs) -> dict:
    """Input statistics of ``mods`` (name -> module) over ``runs``: (token mask, thunk) pairs."""
    from .kernels.calibstats import StatsCollector
    with StatsCollector(mods) as col:
        for mask, thunk in runs:
            col.token_mask = mask
            thunk()
    never = [n for n in mods if n not in col.stats]
    if never:
        raise ValueError(f"layers never ran on the calibration batches: {never[:5]}")
    return col.stats


class _Warnings:
    """The warnings of every block's packing, re-issued once at the end: a fallback to the reference
    path would otherwise be reported again for each of the model's blocks."""

    def __init__(self):
        self.first: dict[tuple, str] = {}          # (category, message without its layer list) -> first message
        self.blocks = 0                            # decoder blocks that warned

    def add(self, caught, block: bool = True) -> None:
        self.blocks += block and bool(caught)
        for w in caught:
            key = (w.category, str(w.message).split(":")[0].lstrip("0123456789 "))
            self.first.setdefault(key, str(w.message))

    def emit(self) -> None:
        more = f" (as in the first of {self.blocks} decoder blocks that warned)" if self.blocks > 1 else ""
        for (cat, _), msg in self.first.items():
            warnings.warn(msg + more, cat, stacklevel=3)


def save_packed_streamed(folder_in, plan: Plan, folder_out, calib_data=None, model_spec: str | None = None) -> dict:
    """Pack the causal LM in ``folder_in`` by ``plan`` one decoder block at a time; write the sharded
    packed folder ``folder_out`` (atomically, as ``save_packed``); returns the manifest as written,
    plus ``"streamed"`` (not written): blocks, shards, bytes_read, peak_block_params (decoder-block
    parameters that were real at once) and block_params (the largest block's).

    ``calib_data``: the plan's calibration batches, needed when it has calibrated methods (AWQ, GPTQ);
    the result equals ``save_packed(fp_model, plan, ..., calib_data=calib_data)``'s tensors.
    ``model_spec`` is recorded for information. The folder rebuilds by itself:
    ``load_packed(folder_out)``.

    Example: ``save_packed_streamed("llama_dir", Plan.load("plan.json"), "llama_packed", calib_data=batches)``
    """
    from .apply import check_plan
    from .core.graph import find_layers
    from .kernels.modules import needs_stats

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan, got {type(plan).__name__}")
    why = streamable(folder_in)
    if why is not None:
        raise ValueError(f"{os.fspath(folder_in)!r} cannot be packed one block at a time: {why}; allowed: a Hugging "
                         "Face causal-LM folder with safetensors weights (else use save_packed on the loaded model)")
    folder_in = os.path.abspath(os.fspath(folder_in))
    folder_out = check_target(folder_out)
    want = sorted(n for n, s in plan.layers.items() if needs_stats(s))
    if want and calib_data is None:
        raise ValueError(f"{len(want)} layer(s) of the plan use calibrated methods "
                         f"({sorted({plan.layers[n].method for n in want})}, e.g. {want[0]}): pass "
                         "calib_data= (the plan's calibration batches)")
    batches = as_batches(calib_data) if want else []
    from .sensitivity.hf_stream import StreamedLM, return_freed_memory, run_uncached
    try:
        lm = StreamedLM(folder_in)
    except ValueError as e:       # an architecture block streaming does not support
        raise ValueError(f"{e}; pack the whole model instead (bitplan apply --no-stream, or save_packed "
                         "on the loaded model)") from None
    check_plan(lm.model, plan)

    def fill(tmp):
        from safetensors.torch import save_file

        from .core.jsonio import atomic_write_json
        from .core.version import __version__
        from .costmodels import model_nbytes
        from .kernels.modules import quantize_modules_
        meta = {"format": "pt", "bitplan_format": FORMAT, "bitplan_version": __version__}
        n_shards = len(lm.block_names) + 1
        ran, wmap, total, block_bytes, warned = {}, {}, 0, 0, _Warnings()

        def write(i: int, sd: dict) -> None:
            nonlocal total
            lost = [n for n, t in sd.items() if t.device.type == "meta"]
            if lost:
                raise ValueError(f"{folder_in}: tensors {lost[:3]} are neither in the safetensors files nor "
                                 "computed by the model; this architecture cannot be packed block by block "
                                 "(use save_packed on the loaded model)")
            name = shard_name(i, n_shards)
            save_file({k: t.contiguous() for k, t in sd.items()}, os.path.join(tmp, name), metadata=meta)
            wmap.update(dict.fromkeys(sd, name))
            total += sum(t.numel() * t.element_size() for t in sd.values())

        with torch.no_grad():
            lm.load_outer()
            h, kws = lm.block_inputs(batches, run_uncached) if want else ([], [])
            for k, bname in enumerate(lm.block_names):
                with lm.materialised(bname) as blk:
                    specs = {n[len(bname) + 1:]: s for n, s in plan.layers.items() if n.startswith(bname + ".")}
                    stats = {}
                    if want:        # fp inputs of every layer of this block; the fp output goes on
                        y = []
                        need = {n: blk.get_submodule(n) for n, s in specs.items() if needs_stats(s)}
                        stats = _collect(need, [(_mask(b), lambda x=x, kw=kw: y.append(lm.run_block(k, x, kw)))
                                                for x, kw, b in zip(h, kws, batches)])
                        h = y
                    fp = {m: blk.get_submodule(m) for l in find_layers(blk) if l.name in specs for m in l.modules}
                    try:
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            done = quantize_modules_(blk, specs, "packed", stats=stats)
                        warned.add(caught)
                        ran.update({f"{bname}.{m}": kern for m, kern in done.items()})
                        block_bytes += model_nbytes(blk)
                        write(k + 2, unique_state({f"{bname}.{n}": t for n, t in blk.state_dict().items()}))
                    finally:    # the fp modules back (`materialised` sends them to meta); the packed ones go
                        for m, mod in fp.items():
                            _set_module(blk, m, mod)
                del fp, blk
                return_freed_memory()          # the packed block too, now that it is written
            outer = {n: s for n, s in plan.layers.items() if not n.startswith(lm.blocks_fqn + ".")}
            need = {n: lm.model.get_submodule(n) for n, s in outer.items() if needs_stats(s)}
            stats = {}
            if need:                # lm_head & co: the model's own head on the final fp hidden states
                with lm.head_only() as set_final:
                    stats = _collect(need, [(_mask(b), lambda x=x, b=b: (set_final(x), run_uncached(lm.model, b)))
                                            for x, b in zip(h, batches)])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ran.update(quantize_modules_(lm.model, outer, "packed", stats=stats))
            warned.add(caught, block=False)
            prefix = lm.blocks_fqn + "."
            write(1, unique_state({n: t for n, t in lm.model.state_dict().items() if not n.startswith(prefix)}))
            # outer bytes: the whole model's minus its (meta, fp) blocks'; blocks share nothing with it
            size = block_bytes + model_nbytes(lm.model) - sum(model_nbytes(b) for b in lm.blocks)
        atomic_write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": wmap})
        warned.emit()
        return size, plan.with_kernels(ran)

    manifest = write_folder(folder_out, fill, model_spec, folder_in, "causal_lm", "sharded")
    return {**manifest, "streamed": {          # what this run did (not written to the folder)
        "blocks": len(lm.block_names), "shards": len(lm.block_names) + 1, "bytes_read": lm.shards.bytes_read,
        "peak_block_params": lm.peak_block_params,     # decoder-block parameters real at once
        "block_params": max(sum(p.numel() for p in b.parameters()) for b in lm.blocks)}}
