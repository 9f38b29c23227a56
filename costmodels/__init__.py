"""Cost models: each ``cost(layers, specs) -> (L, B)`` table in its own unit (bytes, BOPs, ms, ...).

Example:
    >>> from bitplan.costmodels import cost_table
    >>> size = cost_table("size", graph.layers, specs)      # (L, B) bytes
"""
from .registry import COST_MODELS, cost_table, register
from .size import MB, base_nbytes, model_nbytes, size_table
from . import bops  # noqa: F401  (fill the registry)

__all__ = ["cost_table", "register", "COST_MODELS", "size_table", "model_nbytes", "base_nbytes", "MB"]
