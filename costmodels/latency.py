"""Latency cost model: per-layer per-option milliseconds read from a measured ``LatencyProfile``.

latency(plan) = Σ_l t(option_l, N_l, K_l, M) + fixed
    t      per-call time of the kernel packed apply would run for layer l under its option on the
           profile's device (``kernels.registry.select_kernel``), measured by
           ``bitplan.kernels.calibrate.calibrate`` — interpolated in M and N·K when that exact
           shape was not measured (method and its error: ``kernels/profile.py``); never invented;
    fixed  the ops no option changes (embeddings, attention matmuls, norms), measured once per
           model by ``kernels.calibrate.measure_fixed_cost`` and stored in ``profile.fixed``.
M is the number of rows each layer's matmul sees per call: ``tokens`` if given, else the layer's
recorded ``tokens_per_sample`` (one sample per call).

Example:
    >>> prof = LatencyProfile.load("prof.json")
    >>> t = latency_table(graph.layers, [QuantSpec(8, act_bits=8), QuantSpec(4, 32)], prof, tokens=128)
    >>> t.shape          # (L, B) ms
"""
from __future__ import annotations

import os

import numpy as np

from ..kernels.formats import QuantSpec
from ..kernels.profile import LatencyProfile, option_key
from ..kernels.registry import select_kernel
from .registry import register

__all__ = ["latency_table", "predict_latency_ms", "latency_range", "load_profile"]


def load_profile(profile) -> LatencyProfile:
    """A LatencyProfile from a profile or a path; anything else is a TypeError."""
    if isinstance(profile, LatencyProfile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return LatencyProfile.load(profile)
    raise TypeError(f"profile must be a LatencyProfile or a path to one, got {type(profile).__name__}")


def _tokens(layer, tokens) -> int:
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise ValueError(f"tokens={tokens!r} must be a positive int (rows M of each matmul)")
        return int(tokens)
    m = getattr(layer, "tokens_per_sample", 0)
    if m < 1:
        raise ValueError(f"layer {getattr(layer, 'name', layer)!r} has no recorded tokens per sample; "
                         "pass tokens=M or build the LayerGraph with a batch")
    return m


@register("latency")
def latency_table(layers, specs, profile, tokens: int | None = None, warn_device: bool = True) -> np.ndarray:
    """(L, B) ms per call of each layer under each spec, from a measured profile.

    Example: ``latency_table(graph.layers, [QuantSpec(8), QuantSpec(4, 32)], "prof.json", tokens=16)``
    """
    prof = load_profile(profile)
    if warn_device:
        prof.check_device()
    dev = prof.device.get("type", "cpu")
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    out = np.empty((len(layers), len(specs)), dtype=np.float64)                     # (L, B) ms
    for i, l in enumerate(layers):
        kinds = getattr(l, "kinds", (getattr(l, "kind", "linear"),))
        mm = [k for k in kinds if k in ("linear", "hf_conv1d")]
        if kinds == ("embedding",):          # a lookup: its time is part of the profile's fixed cost
            out[i] = 0.0
            continue
        if not mm:
            raise ValueError(f"layer {l.name!r} is a {kinds[0]}: latency profiles cover matmul layers only")
        kind = mm[0]
        n, k, m = l.out_features, l.in_features, _tokens(l, tokens)
        for j, s in enumerate(specs):
            # a head tied to an embedding runs unpack + dense on the shared table (lowbit_unpack's work)
            kname = "lowbit_unpack" if "embedding" in kinds and s.bits != 16 else \
                select_kernel(s, n, k, dev, kind)[0]
            try:
                out[i, j] = prof.time_ms(option_key(s, kname), n, k, m)
            except ValueError as e:
                raise ValueError(f"layer {getattr(l, 'name', '?')!r} (N={n}, K={k}, M={m}), option "
                                 f"{s.label}: {e}") from None
    return out


def predict_latency_ms(layers, specs, profile, tokens: int | None = None, fixed: str | None = None,
                       warn_device: bool = True) -> float:
    """Predicted ms of one forward: Σ_l t(layer l under specs[l]) + ``profile.fixed[fixed]``.

    ``specs`` has one QuantSpec per layer (a plan's choices, in ``layers`` order).

    Example: ``predict_latency_ms(g.layers, [plan.layers[n] for n in g.names], prof, 128, "minilm")``
    """
    prof = load_profile(profile)
    if len(specs) != len(layers):
        raise ValueError(f"{len(specs)} specs for {len(layers)} layers: give one spec per layer")
    total = 0.0
    for i, (l, s) in enumerate(zip(layers, specs)):
        total += float(latency_table([l], [s], prof, tokens, warn_device and i == 0)[0, 0])
    if fixed is not None:
        if fixed not in prof.fixed:
            raise ValueError(f"profile has no fixed cost {fixed!r}; known: {sorted(prof.fixed)}")
        total += float(prof.fixed[fixed]["median_ms"])
    return total


def latency_range(profile, layers, specs, tokens: int | None = None, fixed: str | None = None,
                  allowed=None, warn_device: bool = True) -> dict:
    """The feasible latency range of a model: predicted ms of its fastest and slowest plans.

    ``layers``: a LayerGraph or its LayerInfo list; ``specs``: the options a plan may take (a
    QuantSpec list, or an object with ``.specs`` and ``.allowed`` such as ``bitplan.options.Options``);
    ``allowed`` (L, B) bool: options each layer can take (default: all, or ``specs.allowed``). The fastest plan gives
    every layer its fastest allowed option, the slowest its slowest; both add the profile's fixed
    cost ``fixed`` (a name in ``profile.fixed``; None = its only one, or 0 when it has none).
    A ``--max-latency-ms`` below ``min_ms`` is infeasible whatever the size budget.

    Returns {"min_ms", "max_ms", "fixed_ms", "fastest": [QuantSpec per layer], "slowest": [...]}.

    Example:
        >>> r = latency_range("prof.json", graph, [QuantSpec(4, 32), QuantSpec(8)])
        >>> print(f"{r['min_ms']:.2f}-{r['max_ms']:.2f} ms")
    """
    prof = load_profile(profile)
    layers = list(getattr(layers, "layers", layers))
    if hasattr(specs, "specs"):
        allowed = getattr(specs, "allowed", None) if allowed is None else allowed
        specs = specs.specs
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    if not layers or not specs:
        raise ValueError(f"latency_range needs layers and options (got {len(layers)} layers, {len(specs)} options)")
    if allowed is None:
        allowed = np.ones((len(layers), len(specs)), dtype=bool)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (len(layers), len(specs)):
        raise ValueError(f"allowed has shape {allowed.shape}; expected {(len(layers), len(specs))}")
    empty = [l.name for l, row in zip(layers, allowed) if not row.any()]
    if empty:
        raise ValueError(f"{len(empty)} layer(s) have no allowed option, e.g. {empty[:3]}")
    from .registry import cost_table
    t = cost_table("latency", layers, specs, allowed=allowed, profile=prof, tokens=tokens,
                   warn_device=warn_device)                                            # (L, B) ms
    lo = np.where(allowed, t, np.inf).argmin(axis=1)                                  # (L,)
    hi = np.where(allowed, t, -np.inf).argmax(axis=1)
    rows = np.arange(len(layers))
    if fixed is None:
        if len(prof.fixed) > 1:
            raise ValueError(f"the latency profile has fixed costs for {sorted(prof.fixed)}; say which one "
                             "with fixed=")
        fixed = next(iter(prof.fixed), None)
    if fixed is not None and fixed not in prof.fixed:
        raise ValueError(f"profile has no fixed cost {fixed!r}; known: {sorted(prof.fixed)}")
    f_ms = float(prof.fixed[fixed]["median_ms"]) if fixed is not None else 0.0
    return {"min_ms": float(t[rows, lo].sum()) + f_ms, "max_ms": float(t[rows, hi].sum()) + f_ms,
            "fixed_ms": f_ms, "fastest": [specs[j] for j in lo], "slowest": [specs[j] for j in hi]}
