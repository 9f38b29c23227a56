"""bitplan: choose every layer's bit-width under size / latency / BOPs budgets, then apply the plan.

    >>> import bitplan
    >>> plan = bitplan.allocate(model, budget_mb=5.0, calib_data=batches)
    >>> bitplan.apply_plan_(model, plan, mode="packed")
"""
from .errors import InfeasibleBudgetError, PlanMismatchError

__version__ = "0.1.0"
__all__ = ["allocate", "apply_plan_", "Plan", "LayerGraph", "save_packed", "load_packed",
           "InfeasibleBudgetError", "PlanMismatchError", "__version__"]


def __getattr__(name):          # lazy: `import bitplan` stays light (no pulp / cvxpy / transformers)
    if name == "allocate":
        from .api import allocate
        return allocate
    if name == "Plan":
        from .plan import Plan
        return Plan
    if name == "LayerGraph":
        from .graph import LayerGraph
        return LayerGraph
    if name in ("save_packed", "load_packed"):
        from . import packed_io
        return getattr(packed_io, name)
    if name == "apply_plan_":
        from .kernels.apply import apply_plan_
        return apply_plan_
    raise AttributeError(f"module 'bitplan' has no attribute {name!r}")
