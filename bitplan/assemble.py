"""The one builder of Plans: ``make_plan`` (an allocation, a uniform baseline, a refined plan).

Every plan records the same meta — network order, weight shapes and kinds, tied modules, modules
left out and why, each layer's exact packed bytes (``layer_bytes``, so ``bitplan show`` adds up
without torch), the non-quantized bytes — and its predicted size is the exact byte count of the
packed model on ``device``.

Example:
    >>> plan = make_plan(graph, {n: QuantSpec(4, 128) for n in graph.names}, base_bytes)
    >>> plan.predicted["size_bytes"]
"""
from __future__ import annotations

import platform
import time

from .core.spec import QuantSpec
from .core.version import __version__
from .plan import Plan

__all__ = ["make_plan", "uniform_plan", "layer_bytes"]


def layer_bytes(graph, specs: dict[str, QuantSpec], device="cpu") -> dict[str, int]:
    """Exact packed bytes of each layer's weight under its spec (bias excluded)."""
    from .costmodels.size import storage_kind
    from .kernels.registry import kernel_nbytes
    return {l.name: int(kernel_nbytes(specs[l.name], l.out_features, l.in_features, device, storage_kind(l)))
            for l in graph.layers}


def make_plan(graph, specs: dict[str, QuantSpec], base_bytes: int, *, budgets: dict | None = None,
              predicted: dict | None = None, estimator: dict | None = None, solver: dict | None = None,
              meta: dict | None = None, device="cpu") -> Plan:
    """A Plan giving each layer of ``graph`` its spec; ``predicted["size_bytes"]`` is computed here.

    Example: ``make_plan(graph, {n: QuantSpec(8) for n in graph.names}, base, solver={"name": "uniform"})``
    """
    import torch
    missing = [n for n in graph.names if n not in specs]
    if missing:
        raise ValueError(f"no spec for {len(missing)} layer(s), e.g. {missing[:3]}")
    per = layer_bytes(graph, specs, device)
    pred = {**(predicted or {}), "size_bytes": float(base_bytes + sum(per.values()))}
    m = {"bitplan_version": __version__, "torch_version": torch.__version__,
         "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "base_bytes": int(base_bytes), "layer_shapes": {l.name: list(l.weight_shape) for l in graph.layers},
         "layer_kinds": {l.name: l.kind for l in graph.layers}, "layer_bytes": per,
         "aliases": {l.name: list(l.aliases) for l in graph.layers if l.aliases},
         "skipped": dict(getattr(graph, "skipped", {}) or {}), **(meta or {})}
    return Plan(graph.fingerprint, {n: specs[n] for n in graph.names}, pred, dict(budgets or {}),
                dict(estimator or {}), dict(solver or {}), m)


def uniform_plan(graph, spec: QuantSpec, base_bytes: int, device="cpu") -> Plan:
    """Every layer at ``spec`` where the layer can take it, else at the nearest option it can take
    with the same bits (per channel instead of a group that does not divide K) — a baseline.

    Example: ``uniform_plan(graph, QuantSpec(4, 128), base)``
    """
    from .kernels.modules import option_reason
    specs = {}
    for l in graph.layers:
        s = spec
        if option_reason(s, l) is not None:
            s = QuantSpec(spec.bits, None, spec.symmetric, None if "embedding" in l.kinds else spec.act_bits)
            if option_reason(s, l) is not None:
                raise ValueError(f"uniform {spec.label}: {l.name} cannot take it ({option_reason(spec, l)})")
        specs[l.name] = s
    return make_plan(graph, specs, base_bytes, estimator={"name": "uniform"},
                     solver={"name": "uniform", "status": "uniform"}, device=device)
