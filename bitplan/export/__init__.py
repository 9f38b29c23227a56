"""Exports of a plan to the runtimes users load models with.

    torchao / hf          torchao FqnToConfig JSON; transformers TorchAoConfig quantization_config
                          (torchao_config.py)
    gguf                  llama.cpp: per-tensor types for ``llama-quantize --tensor-type-file`` and,
                          with the fp weights, a real ``.gguf`` file (gguf_export.py)
    compressed-tensors    the ``quantization_config`` vLLM and llm-compressor read (compressed.py)

Every export names layers as the model it is loaded into does: ``strip_prefix`` / ``add_prefix``
rename, and a skeleton of that model (``layers.load_skeleton(DIR)``: config only, meta device)
checks that every name resolves, refusing with the unmatched ones (layers.py).

Example:
    >>> from bitplan.export import export_plan
    >>> export_plan(Plan.load("plan.json"), "compressed-tensors", "qc.json", check="qwen2-folder")
"""
from __future__ import annotations

from .layers import ExportLayer, export_layers, load_skeleton, rename, suggest_prefix
from .torchao_config import (KEY_STYLES, default_key_style, exportable_layers, to_hf_quantization_config,
                             to_torchao_dict, torchao_config, torchao_skip_reason, torchao_version)

__all__ = ["TARGETS", "export_plan", "ExportLayer", "export_layers", "load_skeleton", "rename",
           "suggest_prefix", "to_torchao_dict", "torchao_config", "to_hf_quantization_config",
           "exportable_layers", "torchao_version", "default_key_style", "torchao_skip_reason", "KEY_STYLES"]

TARGETS = ("torchao", "hf", "gguf", "compressed-tensors")


def export_plan(plan, to: str, out, *, strip_prefix: str = "", add_prefix: str = "", check=None,
                key_style: str | None = None) -> str:
    """Write ``plan`` exported ``to`` a target at ``out``; returns a one-line summary of what was written.

    ``check``: a local HF model folder the export will be loaded into; its skeleton (config only)
    resolves every exported name (``ValueError`` with the unmatched ones). ``gguf`` needs it (the
    GGUF names depend on the architecture) and reads the fp weights from it when ``out`` ends in
    ``.gguf``. ``key_style``: torchao only ("param" | "module").

    Example: ``export_plan(plan, "torchao", "torchao.json", strip_prefix="encoder.")``
    """
    import json

    from ..core.jsonio import atomic_write_text
    if to not in TARGETS:
        raise ValueError(f"to={to!r}; allowed: {list(TARGETS)}")
    if key_style is not None and to != "torchao":
        raise ValueError("key_style is only for the torchao target")
    calibrated = sorted(n for n, sp in plan.layers.items() if sp.bits != 16 and sp.method != "rtn")
    if calibrated:
        import logging
        import warnings
        methods = sorted({plan.layers[n].method for n in calibrated})
        warnings.warn(f"{len(calibrated)} layer(s) were planned with calibrated rounding ({', '.join(methods)}, "
                      f"e.g. {calibrated[0]}); the {to} target re-quantizes from the fp weights with its own "
                      "rounding, so it gets the planned bits and groups but not the method: the exported "
                      "model is an RTN-quality version of the plan (bitplan's packed folder keeps the method)",
                      UserWarning, stacklevel=2)
        logging.getLogger("bitplan").debug("calibrated layers not carried by %s: %s", to, calibrated)
    skeleton = load_skeleton(check) if check is not None else None
    names = dict(strip_prefix=strip_prefix, add_prefix=add_prefix, skeleton=skeleton)
    if to == "gguf":
        from .gguf_export import export_gguf
        if check is None:
            raise ValueError("the gguf export needs the model folder (check=DIR / --check DIR): GGUF tensor "
                             "names depend on its architecture")
        return export_gguf(plan, out, check, **names)
    if to == "compressed-tensors":
        from .compressed import to_compressed_tensors_config
        d = to_compressed_tensors_config(plan, **names)
        what = f"compressed-tensors quantization_config, {len(d['config_groups'])} config group(s)"
    elif to == "torchao":
        d = to_torchao_dict(plan, key_style=key_style, **names)
        n = len(d["_data"]["fqn_to_config"])
        ver = torchao_version()
        what = f"torchao FqnToConfig, {n} tensor(s); " + (f"built with torchao {ver}" if ver else
                                                           "torchao not importable: torchao 0.18 layout written by hand")
    else:
        d = to_hf_quantization_config(plan, **names)
        what = f"transformers TorchAoConfig, {len(d['quant_type']['default']['_data']['fqn_to_config'])} tensor(s)"
    atomic_write_text(out, json.dumps(d, indent=2, sort_keys=True) + "\n")
    return f"wrote {out} ({what}" + ("; every name resolved in " + type(skeleton).__name__ if skeleton is not None
                                     else "") + ")"
