"""``apply_plan_``: quantize a model in place as a Plan says (the face over ``kernels``).

The plan must fit the model exactly — the same quantizable layers, the same weight shapes — or
:class:`PlanMismatchError` says what differs (counts and the first few names). The kernels that
ran are recorded in a copy of the plan kept on the model (``model.bitplan_plan.kernels``); that
record never forces a kernel on a later apply.

Example:
    >>> bitplan.apply_plan_(model, bitplan.Plan.load("plan.json"), mode="packed")
"""
from __future__ import annotations

from torch import nn

from .core.errors import PlanMismatchError
from .core.graph import find_layers, fingerprint
from .kernels.modules import MODES, quantize_modules_
from .plan import Plan

__all__ = ["apply_plan_", "check_plan", "MODES"]


def _few(names, n: int = 3) -> str:
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_plan(model: nn.Module, plan: Plan) -> dict:
    """Raise :class:`PlanMismatchError` naming layers that differ; returns name -> LayerInfo.

    Example: ``check_plan(model, Plan.load("plan.json"))``
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan (e.g. bitplan.Plan.load(path)), got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {l.name: l for l in find_layers(model)}
    missing = [n for n in plan.layers if n not in layers]
    extra = [n for n in layers if n not in plan.layers]
    shapes = plan.meta.get("layer_shapes", {})
    bad_shape = [n for n in plan.layers if n in layers and n in shapes
                 and tuple(shapes[n]) != layers[n].weight_shape]
    fp = fingerprint(sorted(layers.values(), key=lambda l: l.name))
    if missing or extra or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} plan layer(s) not in the model: {_few(missing)}")
        if extra:
            parts.append(f"{len(extra)} quantizable model layer(s) not in the plan: {_few(extra)}")
        if bad_shape:
            parts.append(f"{len(bad_shape)} weight shape(s) differ: " + ", ".join(
                f"{n} plan {tuple(shapes[n])} vs model {layers[n].weight_shape}" for n in bad_shape[:3]))
        if any(n.split(".", 1)[-1] in layers for n in missing[:20]) or any(
                any(m.endswith("." + n) or n.endswith("." + m) for m in layers) for n in missing[:20]):
            parts.append("the names differ by a prefix: was the plan made on a wrapped model? "
                         "(`bitplan export --strip-prefix/--add-prefix` maps names)")
        raise PlanMismatchError(f"plan does not match {type(model).__name__} ({len(plan.layers)} plan "
                                f"layers, {len(layers)} model layers): " + "; ".join(parts),
                                missing, extra, bad_shape)
    if fp != plan.model_fingerprint and not shapes:
        raise PlanMismatchError(f"plan does not match {type(model).__name__}: its model fingerprint "
                                f"{plan.model_fingerprint} differs from the model's {fp} (weight shapes changed)")
    return layers


def apply_plan_(model: nn.Module, plan: Plan, mode: str = "fake", calib_data=None, loss_fn=None) -> nn.Module:
    """Quantize ``model`` in place as ``plan`` says; returns the model.

    ``mode="fake"`` writes dequantized weights into the same modules; ``mode="packed"`` swaps in
    packed modules on real kernels (outputs match fake quantization within each kernel's SQNR
    floor; ``lowbit_unpack``, ``dequant`` and exact integer W8A8 paths match up to fp32 summation
    order). The model's bytes after packed apply equal ``plan.predicted["size_bytes"]``. Plans with
    calibrated methods (AWQ, GPTQ) need ``calib_data`` (the batches the plan was made with give the
    same result; ``loss_fn`` runs a batch when the batches are not plain model inputs).

    Example: ``bitplan.apply_plan_(model, bitplan.Plan.load("plan.json"), mode="packed")``
    """
    from .kernels.modules import needs_stats
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed: {list(MODES)}")
    check_plan(model, plan)
    want = [n for n, s in plan.layers.items() if needs_stats(s)]
    stats = None
    if want:
        if calib_data is None:
            raise ValueError(f"{len(want)} layer(s) of the plan use calibrated methods "
                             f"({sorted({plan.layers[n].method for n in want})}, e.g. {want[0]}): pass "
                             "calib_data= (the plan's calibration batches)")
        from .kernels.calibstats import gather_stats
        stats = gather_stats(model, calib_data, names=want, forward=loss_fn if callable(loss_fn) else None)
    ran = quantize_modules_(model, dict(plan.layers), mode, stats=stats)
    model.bitplan_plan = plan.with_kernels(ran)        # which kernel each module actually runs
    return model
