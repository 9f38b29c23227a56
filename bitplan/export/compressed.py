"""Export a plan as the compressed-tensors ``quantization_config`` that vLLM and llm-compressor read.

Layout (``compressed_tensors.QuantizationConfig``, validated by that package's pydantic models in
the tests)::

    {"quant_method": "compressed-tensors", "format": "pack-quantized" | "int-quantized" | "mixed-precision",
     "config_groups": {"group_0": {"targets": ["model.layers.0.self_attn.q_proj", ...],   # exact module names
                                   "weights": {"num_bits": 4, "type": "int", "symmetric": true,
                                               "strategy": "group", "group_size": 128, "dynamic": false},
                                   "input_activations": null,          # or 8-bit per-token dynamic (W8A8)
                                   "format": "pack-quantized"}, ...},
     "ignore": ["lm_head", ...], "quantization_status": "initialized", ...}

One config group per distinct option (bits, group size, symmetry, activation bits); its targets are
the exact module names (what vLLM and llm-compressor match before any ``re:`` pattern). Weight-only
groups use the ``pack-quantized`` format (int codes packed into int32), W8A8 groups (``act_bits=8``:
symmetric per-token dynamic int8 activations, as bitplan's kernels) ``int-quantized``; several
formats make the top-level format ``mixed-precision``. Per output channel = ``strategy: channel``.

Targeted: nn.Linear layers (the (out, in) weights compressed-tensors quantizes). Ignored, with one
warning naming them: fp16 layers; embeddings and ``lm_head`` (vLLM's compressed-tensors path
quantizes Linear layers only — a compressed embedding cannot be loaded there); GPT-2's Conv1D and
convs (not (out, in) Linear weights). vLLM also fuses q/k/v and gate/up into one layer and refuses
shards with different schemes: such groups are named in a warning (plan with tie groups to avoid it).
With the target model's skeleton every other nn.Linear (unplanned ones, ``lm_head``) is listed in
``ignore`` too: vLLM expects each Linear layer to be targeted or ignored.

To produce the checkpoint: pass ``config_groups`` and ``ignore`` to llm-compressor's
``QuantizationModifier`` (``oneshot``), save compressed; vLLM then serves the folder.

Example:
    >>> d = to_compressed_tensors_config(plan, skeleton=load_skeleton("qwen2-folder"))
    >>> QuantizationConfig.model_validate(d)            # compressed_tensors' own model accepts it
"""
from __future__ import annotations

import logging

from ..plan import Plan
from .layers import export_layers, few, warn_unknown_kinds

__all__ = ["to_compressed_tensors_config", "ct_skip_reason", "VLLM_FUSED"]

log = logging.getLogger("bitplan")

# shards vLLM fuses into one layer (its packed_modules_mapping for Llama / Qwen2 / Mistral-style models)
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def ct_skip_reason(layer) -> str | None:
    """Why ``layer`` is put on the ignore list instead of a config group, or None when targeted."""
    if layer.spec.bits == 16:
        return "kept in fp16"
    if layer.kind == "embedding" or layer.tied or layer.name.rsplit(".", 1)[-1] == "lm_head":
        return "embedding / lm_head (vLLM's compressed-tensors path quantizes Linear layers only)"
    if layer.kind not in (None, "linear"):
        return f"{layer.kind} is not an (out, in) nn.Linear weight"
    return None


def _weights_args(s) -> dict:
    return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
            "strategy": "channel" if s.group_size is None else "group", "group_size": s.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax"}


_ACT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
         "dynamic": True, "actorder": None, "observer": None}


def _fused_mismatches(targeted: dict) -> list[str]:
    """'model.layers.0.self_attn.{q_proj,k_proj,v_proj}' for each vLLM-fused set with unequal options."""
    out = []
    for shards in VLLM_FUSED.values():
        parents = {n.rsplit(".", 1)[0] for n in targeted if n.rsplit(".", 1)[-1] == shards[0]}
        for p in sorted(parents):
            specs = {targeted.get(f"{p}.{s}") for s in shards}
            if len(specs) > 1:
                out.append(f"{p}.{{{','.join(shards)}}}")
    return out


def to_compressed_tensors_config(plan: Plan, strip_prefix: str = "", add_prefix: str = "", skeleton=None) -> dict:
    """The compressed-tensors ``quantization_config`` dict of ``plan`` (see the module doc).

    Example: ``json.dump(to_compressed_tensors_config(plan), open("qc.json", "w"))``
    """
    warn_unknown_kinds(plan, skeleton)
    layers = export_layers(plan, strip_prefix, add_prefix, skeleton)
    targeted, ignored = {}, []
    for l in layers:
        why = ct_skip_reason(l)
        if why is None:
            targeted[l.name] = l.spec
        else:
            ignored.append((l.name, why))
            ignored += [(t, why) for t in l.tied]
    if not targeted:
        raise ValueError(f"nothing to export: no planned Linear layer is quantized ({few(n for n, _ in ignored)})")
    loud = [(n, w) for n, w in ignored if w != "kept in fp16"]
    if loud:
        by: dict[str, list[str]] = {}
        for n, w in loud:
            by.setdefault(w, []).append(n)
        log.warning("compressed-tensors export: %d planned layer(s) ignored (left in floating point) — %s",
                    len(loud), "; ".join(f"{w}: {few(ns)}" for w, ns in by.items()))
    bad = _fused_mismatches(targeted)
    if bad:
        log.warning("compressed-tensors export: vLLM fuses these shards into one layer and refuses different "
                    "schemes inside it (llm-compressor / transformers load them): %s", few(bad, 3))
    groups: dict[tuple, list[str]] = {}
    for name, s in targeted.items():
        groups.setdefault((s.bits, s.group_size, s.symmetric, s.act_bits == 8), []).append(name)
    config_groups, formats = {}, set()
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2:]))):
        s = targeted[names[0]]
        fmt = "int-quantized" if key[3] else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{i}"] = {"targets": names, "weights": _weights_args(s),
                                       "input_activations": dict(_ACT8) if key[3] else None,
                                       "output_activations": None, "format": fmt}
    ignore = {n for n, _ in ignored}
    if skeleton is not None:     # vLLM wants every Linear either targeted or ignored
        import torch
        ignore |= {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n not in targeted}
    ignore = sorted(ignore)
    return {"quant_method": "compressed-tensors", "config_groups": config_groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "ignore": ignore, "quantization_status": "initialized", "kv_cache_scheme": None,
            "global_compression_ratio": None}
