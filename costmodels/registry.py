"""Cost-model registry: name -> ``cost(layers, specs, **opts) -> (L, B) array``."""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["COST_MODELS", "register", "cost_table"]

COST_MODELS: dict[str, Callable[..., np.ndarray]] = {}


def register(name: str):
    """Decorator: ``@register("size") def size_table(layers, specs) -> (L, B)``."""
    def deco(fn):
        if name in COST_MODELS:
            raise ValueError(f"cost model {name!r} is registered twice")
        COST_MODELS[name] = fn
        return fn
    return deco


def cost_table(name: str, layers, specs, allowed=None, **opts) -> np.ndarray:
    """The (L, B) table of cost model ``name`` for layers (LayerInfo list) x specs (QuantSpec list).

    ``allowed`` (L, B) bool: options a layer cannot take are not costed (their entries are 0; the
    allocator's mask keeps them out of every plan).

    Example: ``cost_table("size", graph.layers, [QuantSpec(4), QuantSpec(8)])``
    """
    if name not in COST_MODELS:
        raise ValueError(f"unknown cost model {name!r}; known: {sorted(COST_MODELS)}")
    fn = COST_MODELS[name]
    if allowed is None:
        return fn(layers, specs, **opts)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (len(layers), len(specs)):
        raise ValueError(f"allowed has shape {allowed.shape}; expected {(len(layers), len(specs))}")
    out = np.zeros(allowed.shape, dtype=np.float64)
    rows_by_mask: dict[bytes, list[int]] = {}
    for i, row in enumerate(allowed):                    # one call per distinct mask, not per layer
        rows_by_mask.setdefault(row.tobytes(), []).append(i)
    for rows in rows_by_mask.values():
        cols = np.flatnonzero(allowed[rows[0]])
        if len(cols):
            out[np.ix_(rows, cols)] = fn([layers[i] for i in rows], [specs[j] for j in cols], **opts)
    return out
