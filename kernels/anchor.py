"""Anchor a per-layer latency profile to whole-model forwards (the default of ``bitplan calibrate``).

Why. A plan's predicted latency is Σ_l t(option_l) + fixed, with t measured per layer. Neither way of
measuring t adds up to a real forward on every machine:
- isolated timing (``calibrate.calibrate``) runs each layer alone in a loop; it misses what the
  surrounding ops do to caches, prefetchers and clock frequency, and the fixed cost comes from a
  second, different run (the model with its linears stubbed out, ``measure_fixed_cost``);
- in-model timing (``calibrate.calibrate_model``) reads a clock around every layer inside the forward;
  the hooks and clock reads, and the ops they split, are charged to the layers or to
  ``fixed = forward − Σ layers`` depending on where the time lands.
Both errors are mostly common to every option of one model: a fixed offset (ms that are charged to
the wrong side) and a common factor (per-layer times off by the same ratio). Their sizes depend on
the cache hierarchy, the frequency governor and the thread pool, so the two profiles swap which one
is better between machines (``benchmarks/latency_model.py``: MiniLM-L6, 20 random plans, median
|error| 6.7 % in-model / 13.6 % isolated on one machine, 28.0 % / 1.3 % on another).

Procedure (``anchor_profile``): pack one copy of the model per uniform plan (every layer takes one
option; the profile's options, plus the fp32 model) and a few random mixed plans (every layer a
random option, seeded), time whole forwards of all copies interleaved (``timing.time_interleaved``),
predict each from the profile, P_a = Σ_l t(option_a, N_l, K_l, M_l), and fit measured_a ≈ F + s · P_a
(least squares on relative residuals, F >= 0, s > 0, uniform and mixed anchors weighing the same in
total; ``fit_anchor``). Every entry is multiplied by s and F becomes the model's fixed cost, so a
plan's predicted latency matches the measured forwards it was fitted on, while the per-layer profile
still says how options and shapes differ. Why mixed anchors: a plan that switches kernels from layer
to layer ran 5–10 % slower on MiniLM-L6 than the sum its layers show in uniform plans (each kernel
family finds its buffers and code cold after another one ran), and the allocator's plans are mixed.
The anchors, their residuals and s are in ``meta["anchor"]``.

Example:
    >>> prof = calibrate(model, tokens=(1, 16, 128))
    >>> anchor_profile(prof, model, sample, fixed_name="minilm")   # in place; returns prof
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch
from torch import nn

from .formats import QuantSpec
from .profile import LatencyProfile, option_key
from .timing import clock_fn, time_interleaved

__all__ = ["anchor_profile", "measure_anchors", "fit_anchor", "uniform_plans", "mixed_plans"]


def fit_anchor(predicted, measured, weights=None) -> tuple[float, float]:
    """(F, s) minimising Σ_a w_a ((F + s·P_a) / T_a − 1)² with F >= 0, s > 0 (w_a = 1 by default).

    ``predicted`` P_a (ms, the raw profile's Σ of layer times of anchor a), ``measured`` T_a (ms, the
    anchor's measured whole forward). The objective is a convex quadratic: its unconstrained minimum
    when that has F >= 0 and s > 0, else the best of the boundary F = 0 and of s = 1 with its best
    F >= 0 (so the fit is never worse on its anchors than the raw profile with any fixed cost).
    With fewer than two distinct P_a the factor is not identifiable: s = 1, F = max(0, median(T − P)).

    Example: ``fit_anchor([10, 20, 30], [12, 22, 32])`` -> (2.0, 1.0)
    """
    P = [float(p) for p in predicted]
    T = [float(t) for t in measured]
    if len(P) != len(T) or not P:
        raise ValueError(f"fit_anchor needs as many predictions as measurements (got {len(P)} and {len(T)})")
    if any(not (math.isfinite(v) and v > 0) for v in P + T):
        raise ValueError(f"fit_anchor needs positive finite times, got predicted={P} measured={T}")
    W = [1.0] * len(P) if weights is None else [float(w) for w in weights]
    if len(W) != len(P) or any(not (math.isfinite(w) and w > 0) for w in W):
        raise ValueError(f"fit_anchor weights must be one positive finite number per anchor, got {weights!r}")
    if len(set(P)) < 2:
        diffs = sorted(t - p for p, t in zip(P, T))
        return max(0.0, diffs[len(diffs) // 2]), 1.0
    # rows √w_a (1/T_a, P_a/T_a) · (F, s) ≈ √w_a: normal equations of the 2-parameter least squares
    r = [math.sqrt(w) for w in W]
    a = [q / t for q, t in zip(r, T)]
    b = [q * p / t for q, p, t in zip(r, P, T)]
    saa, sab, sbb = sum(x * x for x in a), sum(x * y for x, y in zip(a, b)), sum(y * y for y in b)
    sa1, sb1 = sum(x * q for x, q in zip(a, r)), sum(y * q for y, q in zip(b, r))
    det = saa * sbb - sab * sab
    if det > 1e-12 * saa * sbb:
        F = (sa1 * sbb - sb1 * sab) / det
        s = (saa * sb1 - sab * sa1) / det
        if F >= 0 and s > 0:
            return F, s
    cands = [(max(0.0, (sa1 - sab) / saa), 1.0)]            # s = 1, its best F >= 0
    if sb1 / sbb > 0:
        cands.append((0.0, sb1 / sbb))                      # F = 0, s through the origin
    return min(cands, key=lambda c: sum((x * c[0] + y * c[1] - q) ** 2 for x, y, q in zip(a, b, r)))


def uniform_plans(layers, specs=()) -> dict[str, dict[str, QuantSpec | str]]:
    """{anchor name: {layer name: QuantSpec or "fp32@dense"}}: the fp32 model and, per spec, every
    layer that can take it under it (layers that cannot keep fp32 and are counted as such)."""
    from .modules import option_reason
    plans = {"fp32": {l.name: "fp32@dense" for l in layers}}
    for s in specs:
        if not isinstance(s, QuantSpec):
            raise TypeError(f"specs must be QuantSpecs, got {s!r}")
        plans[s.label] = {l.name: (s if option_reason(s, l) is None else "fp32@dense") for l in layers}
    return plans


def mixed_plans(layers, specs, n: int, seed: int = 0) -> dict[str, dict[str, QuantSpec | str]]:
    """{"mix0": {layer: spec}, ...}: ``n`` plans where every layer takes one of the ``specs`` it can
    take, uniformly at random (seeded); a layer that can take none stays fp32."""
    import random

    from .modules import option_reason
    rnd = random.Random(seed)
    out = {}
    for i in range(n):
        plan = {}
        for l in layers:
            ok = [s for s in specs if option_reason(s, l) is None]
            plan[l.name] = rnd.choice(ok) if ok else "fp32@dense"
        out[f"mix{i}"] = plan
    return out


def _packed_copy(model: nn.Module, plan: dict) -> tuple[nn.Module, dict[str, str]]:
    """(copy of ``model`` packed as ``plan`` says, {layer: option key of what really runs})."""
    from .modules import needs_stats, quantize_modules_
    q = {n: s for n, s in plan.items() if isinstance(s, QuantSpec)}
    if not q:
        return model, {n: "fp32@dense" for n in plan}
    m = copy.deepcopy(model)
    # calibrated rounding (AWQ, GPTQ) changes the codes, not the kernel: time it with plain rounding
    runs = {n: (dataclasses.replace(s, method="rtn") if needs_stats(s) else s) for n, s in q.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # fallbacks show in the option keys
        ran = quantize_modules_(m, runs, mode="packed")
    keys = {n: (option_key(q[n], ran[n]) if n in q else "fp32@dense") for n in plan}
    return m, keys


def measure_anchors(model: nn.Module, batch, specs=None, forward=None, clock: str = "wall",
                    reps: int = 31, max_seconds: float = 1.0, graph=None, mixed: int = 4,
                    seed: int = 12345, pairwise: bool | None = None) -> dict:
    """Time whole forwards of ``model`` on ``batch`` under its uniform plans (fp32 + one per spec)
    and ``mixed`` random mixed plans (``mixed_plans``, seeded by ``seed``).

    ``specs`` None = ``calibrate.DEFAULT_SPECS``. Returns {"layers": [(name, N, K, M)],
    "plans": {anchor: {layer: option key that runs}}, "kinds": {anchor: "uniform" | "mixed"},
    "timings": {anchor: Timing dict}}; the copies are timed interleaved
    (``timing.time_interleaved``), M = each layer's tokens per sample. Memory: all copies at once,
    unless they would take over half the available memory (or ``pairwise=True``): then one copy at
    a time, each interleaved with the fp32 model (whose timing is the median over those pairs).

    Example: ``a = measure_anchors(model, sample); a["timings"]["fp32"]["median_ms"]``
    """
    from ..core.batches import run_model
    from ..core.graph import LayerGraph
    from .calibrate import DEFAULT_SPECS
    run = forward or run_model
    g = graph if graph is not None else LayerGraph.build(model, batch, forward=forward)
    layers = [l for l in g.layers if l.kind in ("linear", "hf_conv1d")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers to anchor a latency profile to")
    specs = list(DEFAULT_SPECS if specs is None else specs)
    plans = uniform_plans(layers, specs)
    kinds = {name: "uniform" for name in plans}
    if mixed and len(specs) > 1:
        extra = mixed_plans(layers, specs, mixed, seed)
        plans.update(extra)
        kinds.update({name: "mixed" for name in extra})
    on_cuda = any(p.is_cuda for p in model.parameters())
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)

    def timed(models: dict) -> dict:
        with torch.inference_mode():
            return time_interleaved({n: (lambda m=m: run(m, batch)) for n, m in models.items()}, reps=reps,
                                    target_ms=1.0, max_seconds=max_seconds, clock=clock_fn(clock), sync=sync)
    keys, meas = {}, {}
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    room = None if on_cuda else _available_bytes()
    pairwise = pairwise if pairwise is not None else (room is not None and nbytes * len(plans) > room / 2)
    if not pairwise:                                  # every copy at once, all interleaved
        models = {}
        for name, plan in plans.items():
            models[name], keys[name] = _packed_copy(model, plan)
        meas = timed(models)
        del models
    else:                                             # one copy at a time, interleaved with fp32
        base = []
        for name, plan in plans.items():
            m, keys[name] = _packed_copy(model, plan)
            if m is model:
                continue
            t = timed({"fp32": model, name: m})
            meas[name] = t[name]
            base.append(t["fp32"])
            del m
        meas["fp32"] = sorted(base, key=lambda t: t.median_ms)[len(base) // 2] if base else \
            timed({"fp32": model})["fp32"]
    return {"layers": [(l.name, l.out_features, l.in_features, l.tokens_per_sample) for l in layers],
            "plans": keys, "kinds": kinds, "timings": {n: meas[n].to_dict() for n in keys}, "clock": clock,
            "pairwise": bool(pairwise)}


def _available_bytes() -> int | None:
    """Memory available to new allocations (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def anchor_profile(profile: LatencyProfile, model: nn.Module | None = None, batch=None, specs=None,
                   forward=None, fixed_name: str = "model", clock: str = "wall", reps: int = 31,
                   max_seconds: float = 1.0, anchors: dict | None = None, graph=None) -> LatencyProfile:
    """Fit ``profile`` to measured whole forwards of ``model`` on ``batch`` (one sample); in place.

    ``anchors``: a ``measure_anchors`` result to reuse (then ``model``/``batch`` are not needed);
    otherwise the uniform plans of ``specs`` (None = ``DEFAULT_SPECS``) are timed now. Anchors the
    profile cannot predict (an option or shape it lacks) are left out. Sets
    ``profile.fixed[fixed_name]`` to F, multiplies every entry by s and records the fit in
    ``profile.meta["anchor"]``. ``graph``: the model's LayerGraph when the caller has built it
    already. Returns ``profile``.

    Example:
        >>> anchor_profile(prof, model, sample, fixed_name="minilm:1x128")
    """
    if anchors is None:
        if model is None or batch is None:
            raise ValueError("anchor_profile needs model and batch, or anchors from measure_anchors")
        anchors = measure_anchors(model, batch, specs, forward, clock, reps, max_seconds, graph=graph)
    preds, left_out = {}, []
    for name, keys in anchors["plans"].items():
        try:
            preds[name] = sum(profile.time_ms(keys[l], n, k, m) for l, n, k, m in anchors["layers"])
        except ValueError as e:
            left_out.append(f"{name}: {e}")
    if not preds:
        raise ValueError("no anchor plan can be predicted from this profile: " + "; ".join(left_out[:2]))
    names = list(preds)
    meas = {n: anchors["timings"][n] for n in names}
    kinds = anchors.get("kinds") or {n: "uniform" for n in names}
    count = {k: sum(kinds.get(n, "uniform") == k for n in names) for k in ("uniform", "mixed")}
    weights = [1 / count[kinds.get(n, "uniform")] for n in names]       # each kind weighs the same
    F, s = fit_anchor([preds[n] for n in names], [meas[n]["median_ms"] for n in names], weights)
    for e in profile.entries.values():
        for key in ("median_ms", "p25_ms", "p75_ms"):
            e[key] *= s
    rows = [{"plan": n, "kind": kinds.get(n, "uniform"), "measured_ms": meas[n]["median_ms"],
             "spread": meas[n]["spread"], "raw_predicted_ms": preds[n], "predicted_ms": F + s * preds[n],
             "rel_error": (F + s * preds[n]) / meas[n]["median_ms"] - 1} for n in names]
    spread = sorted(r["spread"] for r in rows)[len(rows) // 2]
    profile.fixed[fixed_name] = {"median_ms": F, "spread": spread, "clock": anchors["clock"],
                                 "method": "anchored"}
    profile.meta["anchor"] = {"fixed_name": fixed_name, "fixed_ms": F, "scale": s, "clock": anchors["clock"],
                              "anchors": rows, "left_out": left_out,
                              "method": "measured ≈ F + scale · Σ layer times over uniform and mixed plans, least "
                                        "squares on relative residuals (kernels/anchor.py)"}
    return profile
