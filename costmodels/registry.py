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


def cost_table(name: str, layers, specs, **opts) -> np.ndarray:
    """The (L, B) table of cost model ``name`` for layers (LayerInfo list) x specs (QuantSpec list).

    Example: ``cost_table("size", graph.layers, [QuantSpec(4), QuantSpec(8)])``
    """
    if name not in COST_MODELS:
        raise ValueError(f"unknown cost model {name!r}; known: {sorted(COST_MODELS)}")
    return COST_MODELS[name](layers, specs, **opts)
