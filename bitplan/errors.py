"""Errors users can catch by name."""
from __future__ import annotations

__all__ = ["InfeasibleBudgetError", "PlanMismatchError"]


class InfeasibleBudgetError(ValueError):
    """No choice of options meets the budgets. ``smallest`` maps each budget name to the smallest
    value of that budget that is feasible on its own (the other budgets ignored)."""

    def __init__(self, message: str, smallest: dict[str, float] | None = None):
        super().__init__(message)
        self.smallest = dict(smallest or {})


class PlanMismatchError(ValueError):
    """A plan does not fit a model. ``missing`` are plan layers absent from the model, ``extra``
    quantizable model layers absent from the plan, ``shape`` layers whose weight shapes differ."""

    def __init__(self, message: str, missing=(), extra=(), shape=()):
        super().__init__(message)
        self.missing, self.extra, self.shape = list(missing), list(extra), list(shape)
