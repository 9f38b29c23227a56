"""bitplan: choose every layer's bit-width under size / latency / BOPs budgets, then apply the plan.

    >>> import bitplan
    >>> plan = bitplan.allocate(model, budget_mb=5.0, calib_data=batches)
    >>> bitplan.apply_plan_(model, plan, mode="packed")

Submodules users call directly are attributes too (imported on first use): ``bitplan.budgets``,
``bitplan.scoring``, ``bitplan.frontier``, ``bitplan.packed_io``, ``bitplan.plots``,
``bitplan.export``, ``bitplan.joint``, ``bitplan.report``, ``bitplan.models``, ``bitplan.evaluate``.
"""
import importlib

from .core.errors import PlanMismatchError
from .core.spec import QuantSpec
from .core.version import __version__

__all__ = ["allocate", "refine", "apply_plan_", "Plan", "QuantSpec", "LayerGraph", "save_packed",
           "save_packed_streamed", "load_packed", "InfeasibleBudgetError", "PlanMismatchError", "__version__"]

_LAZY = {"allocate": ("api", "allocate"), "refine": ("joint", "refine"), "Plan": ("plan", "Plan"),
         "LayerGraph": ("core.graph", "LayerGraph"), "save_packed": ("packed_io", "save_packed"),
         "save_packed_streamed": ("packed_stream", "save_packed_streamed"),
         "load_packed": ("packed_io", "load_packed"), "apply_plan_": ("apply", "apply_plan_"),
         "InfeasibleBudgetError": ("allocator.errors", "InfeasibleBudgetError")}
_SUBMODULES = ("budgets", "scoring", "frontier", "joint", "packed_io", "packed_stream", "plots", "export", "report",
               "models", "evaluate", "api", "plan", "apply", "core", "allocator", "sensitivity", "costmodels", "kernels")


def __getattr__(name):          # lazy: `import bitplan` stays light (no torch, pulp, cvxpy, transformers)
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bitplan' has no attribute {name!r}")
