"""The allocator's error type (the face re-exports it as ``bitplan.InfeasibleBudgetError``)."""
from __future__ import annotations

__all__ = ["InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """No choice of options meets the budgets. ``smallest`` maps each budget name to the smallest
    value of that budget that is feasible on its own (the other budgets ignored)."""

    def __init__(self, message: str, smallest: dict[str, float] | None = None):
        super().__init__(message)
        self.smallest = dict(smallest or {})
