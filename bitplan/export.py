"""Export a plan to other toolkits: torchao ``FqnToConfig`` JSON and an HF ``quantization_config``.

torchao (``--to torchao``): one ``IntxWeightOnlyConfig`` per layer (weight dtype ``torch.int{bits}``,
``PerGroup(group_size)`` or ``PerAxis(0)`` per output channel, SYMMETRIC / ASYMMETRIC mapping), or
``Int8DynamicActivationIntxWeightConfig`` for W8A8 layers (``act_bits=8``: symmetric per-token
int8 activations, as bitplan's kernels do). Layers kept at 16 bits are left out (not quantized).
Keys are weight parameter FQNs (``"encoder.layer.0.attention.self.query.weight"``), or module FQNs
when the installed torchao is older than 0.17 (``key_style``).
The file is what torchao's ``config_to_dict(FqnToConfig(...))`` writes, so
``quantize_(model, config_from_dict(json.load(f)), filter_fn=None)`` applies the same bits.
When torchao is importable its own classes build and serialise the config; otherwise the same
layout is written by hand (tested equal to torchao 0.18.0's output).

HF (``--to hf``): ``{"quant_method": "torchao", "quant_type": {"default": <FqnToConfig dict>}, ...}``,
the dict ``transformers.TorchAoConfig.to_dict()`` produces. Quantize an fp checkpoint while loading
it with ``AutoModel.from_pretrained(folder, quantization_config=TorchAoConfig.from_dict(d))``
(tested: every Linear gets its planned bits). Do not paste it into an fp checkpoint's
``config.json``: transformers then takes the checkpoint for an already-quantized one and fails.
Per-module overrides are the FqnToConfig entries; fp16 layers go to ``modules_to_not_convert``.

Only 2-D weights (Linear) are exported: torchao's Intx configs group conv weights differently from
bitplan (per input channel at each kernel position), so conv layers are skipped with a warning.

Example:
    >>> d = to_torchao_dict(Plan.load("plan.json")); json.dump(d, open("torchao.json", "w"))
    >>> quantize_(model, config_from_dict(d), filter_fn=None)      # torchao applies the same bits
"""
from __future__ import annotations

import json
import logging

from .plan import Plan

__all__ = ["to_torchao_dict", "torchao_config", "to_hf_quantization_config", "exportable_layers",
           "torchao_version", "default_key_style", "TARGETS", "KEY_STYLES"]

log = logging.getLogger("bitplan")

TARGETS = ("torchao", "hf")
_TESTED_TORCHAO = "0.18.0"        # the version whose config_to_dict layout the hand-built dict matches


def torchao_version() -> str | None:
    """The importable torchao's version, or None when torchao is missing or does not import."""
    try:
        import torchao
        from torchao.core.config import config_to_dict  # noqa: F401
        from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig  # noqa: F401
        return getattr(torchao, "__version__", "unknown")
    except Exception:             # missing, or built for another torch: fall back to the hand layout
        return None


KEY_STYLES = ("param", "module")


def default_key_style() -> str:
    """"param" (``fc1.weight``), or "module" (``fc1``) when the installed torchao is older than 0.17
    (its IntxWeightOnlyConfig cannot quantize by parameter name)."""
    ver = torchao_version()
    try:
        old = ver is not None and tuple(int(x) for x in ver.split(".")[:2]) < (0, 17)
    except ValueError:
        old = False
    return "module" if old else "param"


def exportable_layers(plan: Plan, strip_prefix: str = "", key_style: str = "param") -> tuple[dict, list[str]]:
    """({weight parameter fqn: LayerPlan} for quantized 2-D layers, [skipped layers with the reason]).

    ``key_style="param"``: parameter FQNs (``"fc1.weight"``): torchao >= 0.17's ``quantize_`` accepts
    them and transformers' ``from_pretrained(..., quantization_config=TorchAoConfig)`` needs them (with
    module FQNs it also tries to quantize the bias and fails, transformers 5.23 + torchao 0.18).
    ``"module"``: module FQNs (``"fc1"``), for torchao 0.15 / 0.16 ``quantize_``."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style={key_style!r}; allowed: {list(KEY_STYLES)}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan, got {type(plan).__name__}")
    shapes = plan.meta.get("layer_shapes", {})
    out, skipped = {}, []
    for fqn, spec in plan.layers.items():
        name = fqn[len(strip_prefix):] if strip_prefix and fqn.startswith(strip_prefix) else fqn
        shape = shapes.get(fqn)
        if shape is not None and len(shape) != 2:
            skipped.append(f"{fqn} (weight shape {tuple(shape)}: torchao Intx configs group conv weights "
                           "differently)")
            continue
        if spec.bits == 16:
            skipped.append(f"{fqn} (kept in fp16: not quantized)")
            continue
        out[name + ".weight" if key_style == "param" else name] = spec
    return out, skipped


def torchao_config(plan: Plan, strip_prefix: str = "", key_style: str | None = None):
    """A torchao ``FqnToConfig`` for ``plan`` (needs torchao; see the module doc for the mapping)."""
    import torch
    from torchao.quantization import FqnToConfig, Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    layers, _ = exportable_layers(plan, strip_prefix, key_style or default_key_style())
    cfgs = {}
    for name, s in layers.items():
        gran = PerAxis(0) if s.group_size is None else PerGroup(s.group_size)
        mapping = MappingType.SYMMETRIC if s.symmetric else MappingType.ASYMMETRIC
        dtype = getattr(torch, f"int{s.bits}")
        if s.act_bits == 8:
            cfgs[name] = Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=gran, weight_mapping_type=mapping,
                act_mapping_type=MappingType.SYMMETRIC)
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
            "weight_scale_dtype": None, "act_mapping_type": {"_type": "MappingType", "_data": "SYMMETRIC"},
            **common}}
    return {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {
        "weight_dtype": dtype, "granularity": gran, "mapping_type": mapping, "scale_dtype": None, **common}}


def to_torchao_dict(plan: Plan, strip_prefix: str = "", use_torchao: bool | None = None,
                    key_style: str | None = None) -> dict:
    """The torchao ``FqnToConfig`` of ``plan`` as a JSON-ready dict (``{"_type", "_version", "_data"}``).

    ``use_torchao``: True = build with torchao (error if missing), False = the hand-built layout,
    None = torchao when it imports. ``strip_prefix`` removes a wrapper prefix from layer names (e.g.
    ``"encoder."`` for the built-in MiniLM, whose plan names start at the SentenceEncoder wrapper).
    ``key_style``: "param" (``fc1.weight``) or "module" (``fc1``); None = :func:`default_key_style`.

    Example: ``json.dump(to_torchao_dict(plan), open("torchao.json", "w"))``
    """
    key_style = key_style or default_key_style()
    layers, skipped = exportable_layers(plan, strip_prefix, key_style)
    for s in skipped:
        log.warning("torchao export: skipped %s", s)
    if not layers:
        raise ValueError("nothing to export: the plan has no quantized 2-D (Linear) layers")
    if use_torchao is None:
        use_torchao = torchao_version() is not None
    if use_torchao:
        from torchao.core.config import config_to_dict
        return config_to_dict(torchao_config(plan, strip_prefix, key_style))
    fqn = {name: _hand_layer(s) for name, s in layers.items()}
    # torchao 0.18 writes the map twice: fqn_to_config and its deprecated alias module_fqn_to_config
    return {"_type": "FqnToConfig", "_version": 1,
            "_data": {"fqn_to_config": fqn, "module_fqn_to_config": json.loads(json.dumps(fqn))}}


def to_hf_quantization_config(plan: Plan, strip_prefix: str = "", use_torchao: bool | None = None) -> dict:
    """An HF ``quantization_config`` (transformers ``TorchAoConfig`` layout) with per-layer overrides
    (parameter FQN keys: what transformers' loader matches; needs torchao >= 0.17 to load)."""
    fp16 = [n[len(strip_prefix):] if strip_prefix and n.startswith(strip_prefix) else n
            for n, s in plan.layers.items() if s.bits == 16]
    return {"quant_method": "torchao",
            "quant_type": {"default": to_torchao_dict(plan, strip_prefix, use_torchao, "param")},
            "modules_to_not_convert": fp16 or None,
            "include_input_output_embeddings": False, "untie_embedding_weights": False}
