"""Export a plan as torchao ``FqnToConfig`` JSON and as an HF ``quantization_config`` (TorchAoConfig).

torchao (``--to torchao``): one ``IntxWeightOnlyConfig`` per layer (weight dtype ``torch.int{bits}``,
``PerGroup(group_size)`` or ``PerAxis(0)`` per output channel, SYMMETRIC / ASYMMETRIC mapping), or
``Int8DynamicActivationIntxWeightConfig`` for W8A8 layers (``act_bits=8``: per-token int8
activations; torchao 0.18 implements only ASYMMETRIC ones — it asserts so — where bitplan's kernels
use symmetric: the same 8 bits plus a zero point, never less accurate). Keys are weight parameter FQNs
(``"model.layers.0.self_attn.q_proj.weight"``), or module FQNs when the installed torchao is older
than 0.17 (``key_style``). The file is what torchao's ``config_to_dict(FqnToConfig(...))`` writes, so
``quantize_(model, config_from_dict(json.load(f)), filter_fn=None)`` applies the same bits. When
torchao is importable its own classes build the config; otherwise the same layout is written by
hand (tested equal to torchao 0.18.0's output).

HF (``--to hf``): ``{"quant_method": "torchao", "quant_type": {"default": <FqnToConfig dict>}, ...}``,
what ``transformers.TorchAoConfig.to_dict()`` produces. Quantize an fp checkpoint while loading it:
``AutoModelForCausalLM.from_pretrained(folder, quantization_config=TorchAoConfig.from_dict(d))``.
Do not paste it into an fp checkpoint's ``config.json`` (transformers then takes the checkpoint for
an already-quantized one). fp16 layers go to ``modules_to_not_convert``; a planned embedding or
``lm_head`` sets ``include_input_output_embeddings``; a tied pair keeps its tie (both names listed,
one quantized tensor shared, tested with transformers 5.24).

What torchao 0.18 can load exactly as planned (the rest stays fp, named in ONE warning):
    Linear, Embedding, lm_head     yes (groups along the row, as bitplan)
    Conv2d 1x1                     yes (torchao groups input channels = bitplan's row)
    Conv2d k x k (k > 1)           no: torchao groups input channels at each kernel position,
                                   bitplan the flattened C_in*kh*kw row (other scales, other bytes)
    nn.Conv1d                      no: torchao's Intx configs take 2-D and 4-D weights only
    HF Conv1D (GPT-2)              no: the weight is stored (in, out), so torchao would group along
                                   the output axis, and Conv1D's forward (addmm) has no torchao kernel
Tied weights (lm_head = embedding): both modules get the config. transformers' loader keeps one
shared quantized tensor; a bare ``quantize_`` quantizes each module's copy (two tensors at the
planned bits: bytes above the plan's).

Example:
    >>> d = to_torchao_dict(Plan.load("plan.json")); json.dump(d, open("torchao.json", "w"))
    >>> quantize_(model, config_from_dict(d), filter_fn=None)      # torchao applies the same bits
"""
from __future__ import annotations

import json
import logging

from ..plan import Plan
from .layers import ExportLayer, export_layers, few, warn_unknown_kinds

__all__ = ["to_torchao_dict", "torchao_config", "to_hf_quantization_config", "exportable_layers",
           "torchao_version", "default_key_style", "torchao_skip_reason", "KEY_STYLES"]

log = logging.getLogger("bitplan")

KEY_STYLES = ("param", "module")


def torchao_version() -> str | None:
    """The importable torchao's version, or None when torchao is missing or does not import."""
    try:
        import torchao
        from torchao.core.config import config_to_dict  # noqa: F401
        from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig  # noqa: F401
        return getattr(torchao, "__version__", "unknown")
    except Exception:             # missing, or built for another torch: fall back to the hand layout
        return None


def default_key_style() -> str:
    """"param" (``fc1.weight``), or "module" (``fc1``) when the installed torchao is older than 0.17
    (its IntxWeightOnlyConfig cannot quantize by parameter name)."""
    ver = torchao_version()
    try:
        old = ver is not None and tuple(int(x) for x in ver.split(".")[:2]) < (0, 17)
    except ValueError:
        old = False
    return "module" if old else "param"


def torchao_skip_reason(layer: ExportLayer) -> str | None:
    """Why torchao cannot load ``layer`` as planned, or None when it can (see the module doc)."""
    if layer.spec.bits == 16:
        return "kept in fp16 (not quantized)"
    if layer.kind == "hf_conv1d":
        return ("transformers Conv1D (weight stored in x out): torchao would group along the output axis "
                "and has no kernel for its addmm")
    shape = layer.shape
    if layer.kind == "conv1d" or (shape is not None and len(shape) not in (2, 4)):
        return "torchao Intx configs take 2-D and 4-D weights only"
    if shape is not None and len(shape) == 4 and tuple(shape[2:]) != (1, 1):
        return "k x k conv: torchao groups input channels per kernel position, bitplan the whole row"
    if layer.kind == "embedding" and layer.spec.act_bits == 8:
        return "int8 activations on an embedding (an index lookup has no activations)"
    return None


def exportable_layers(plan: Plan, strip_prefix: str = "", key_style: str = "param", add_prefix: str = "",
                      skeleton=None) -> tuple[dict, list[tuple[str, str]]]:
    """({torchao key: LayerPlan}, [(layer, reason it is not exported)]).

    ``key_style="param"``: parameter FQNs (``"fc1.weight"``): torchao >= 0.17's ``quantize_`` accepts
    them and transformers' loader needs them. ``"module"``: module FQNs (``"fc1"``), torchao 0.15/0.16.
    Tied modules (from ``skeleton``) get the same entry."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style={key_style!r}; allowed: {list(KEY_STYLES)}")
    out, skipped = {}, []
    for layer in export_layers(plan, strip_prefix, add_prefix, skeleton):
        why = torchao_skip_reason(layer)
        if why is not None:
            skipped.append((layer.name, why))
            continue
        for name in (layer.name,) + layer.tied:
            out[name + ".weight" if key_style == "param" else name] = layer.spec
    return out, skipped


def _warn_skipped(skipped, what: str) -> None:
    """ONE warning naming the layers left out, grouped by reason (counts + the first few)."""
    quantizable = [(n, w) for n, w in skipped if not w.startswith("kept in fp16")]
    if not quantizable:
        return
    by: dict[str, list[str]] = {}
    for n, w in quantizable:
        by.setdefault(w, []).append(n)
    log.warning("%s export: %d planned layer(s) left in floating point — %s", what, len(quantizable),
                "; ".join(f"{w}: {few(ns)}" for w, ns in by.items()))


def torchao_config(plan: Plan, strip_prefix: str = "", key_style: str | None = None, add_prefix: str = "",
                   skeleton=None):
    """A torchao ``FqnToConfig`` for ``plan`` (needs torchao; see the module doc for the mapping)."""
    import torch
    from torchao.quantization import FqnToConfig, Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    layers, _ = exportable_layers(plan, strip_prefix, key_style or default_key_style(), add_prefix, skeleton)
    cfgs = {}
    for name, s in layers.items():
        gran = PerAxis(0) if s.group_size is None else PerGroup(s.group_size)
        mapping = MappingType.SYMMETRIC if s.symmetric else MappingType.ASYMMETRIC
        dtype = getattr(torch, f"int{s.bits}")
        if s.act_bits == 8:
            cfgs[name] = Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=gran, weight_mapping_type=mapping,
                act_mapping_type=MappingType.ASYMMETRIC)
        else:
            cfgs[name] = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, mapping_type=mapping)
    return FqnToConfig(cfgs)


def _hand_layer(s) -> dict:
    """torchao 0.18.0's config_to_dict layout of one layer's config, without importing torchao."""
    gran = ({"_type": "PerAxis", "_version": 1, "_data": {"axis": 0}} if s.group_size is None else
            {"_type": "PerGroup", "_version": 1, "_data": {"group_size": s.group_size}})
    mapping = {"_type": "MappingType", "_data": "SYMMETRIC" if s.symmetric else "ASYMMETRIC"}
    dtype = {"_type": "torch.dtype", "_data": f"int{s.bits}"}
    common = {"intx_packing_format": {"_type": "IntxPackingFormat", "_data": "UNPACKED_TO_INT8"},
              "intx_choose_qparams_algorithm": {"_type": "IntxChooseQParamsAlgorithm", "_data": "AFFINE"}}
    if s.act_bits == 8:
        return {"_type": "Int8DynamicActivationIntxWeightConfig", "_version": 2, "_data": {
            "weight_dtype": dtype, "weight_granularity": gran, "weight_mapping_type": mapping,
            "weight_scale_dtype": None, "act_mapping_type": {"_type": "MappingType", "_data": "ASYMMETRIC"},
            **common}}
    return {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {
        "weight_dtype": dtype, "granularity": gran, "mapping_type": mapping, "scale_dtype": None, **common}}


def to_torchao_dict(plan: Plan, strip_prefix: str = "", use_torchao: bool | None = None,
                    key_style: str | None = None, add_prefix: str = "", skeleton=None) -> dict:
    """The torchao ``FqnToConfig`` of ``plan`` as a JSON-ready dict (``{"_type", "_version", "_data"}``).

    ``use_torchao``: True = build with torchao (error if missing), False = the hand-built layout,
    None = torchao when it imports. ``strip_prefix`` / ``add_prefix`` rename layers for the model the
    config is applied to (``"encoder."`` -> ``"model."``); ``skeleton`` (``layers.load_skeleton``)
    checks every name resolves and supplies layer kinds and ties. Layers torchao cannot load as
    planned are left out with one warning. ``key_style``: "param" (``fc1.weight``) or "module".

    Example: ``json.dump(to_torchao_dict(plan), open("torchao.json", "w"))``
    """
    key_style = key_style or default_key_style()
    warn_unknown_kinds(plan, skeleton)
    layers, skipped = exportable_layers(plan, strip_prefix, key_style, add_prefix, skeleton)
    _warn_skipped(skipped, "torchao")
    if not layers:
        raise ValueError(f"nothing to export: no planned layer is quantized and loadable by torchao "
                         f"({few(n for n, _ in skipped)})")
    if use_torchao is None:
        use_torchao = torchao_version() is not None
    if use_torchao:
        from torchao.core.config import config_to_dict
        return config_to_dict(torchao_config(plan, strip_prefix, key_style, add_prefix, skeleton))
    fqn = {name: _hand_layer(s) for name, s in layers.items()}
    # torchao 0.18 writes the map twice: fqn_to_config and its deprecated alias module_fqn_to_config
    return {"_type": "FqnToConfig", "_version": 1,
            "_data": {"fqn_to_config": fqn, "module_fqn_to_config": json.loads(json.dumps(fqn))}}


def to_hf_quantization_config(plan: Plan, strip_prefix: str = "", use_torchao: bool | None = None,
                              add_prefix: str = "", skeleton=None) -> dict:
    """An HF ``quantization_config`` (transformers ``TorchAoConfig`` layout) with per-layer overrides
    (parameter FQN keys: what transformers' loader matches; needs torchao >= 0.17 to load)."""
    layers = export_layers(plan, strip_prefix, add_prefix, skeleton)
    fp16 = [l.name for l in layers if l.spec.bits == 16]
    quant = [l for l in layers if torchao_skip_reason(l) is None]
    emb = any(l.kind == "embedding" or l.tied or l.name.rsplit(".", 1)[-1] == "lm_head" for l in quant)
    return {"quant_method": "torchao",
            "quant_type": {"default": to_torchao_dict(plan, strip_prefix, use_torchao, "param", add_prefix,
                                                      skeleton)},
            "modules_to_not_convert": fp16 or None,
            # tied: both names listed and kept tied -> transformers quantizes the shared tensor once (5.24 +
            # torchao 0.18; untie_embedding_weights=True fails in its tie check: torchao has no aten.equal)
            "include_input_output_embeddings": emb, "untie_embedding_weights": False}
