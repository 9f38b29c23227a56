"""The joint search past the additive model: ``refine(model, plan, calib_data, seconds=S)`` measures
whole plans (budget-keeping level swaps, staged measurement, a corrected exact re-solve) and keeps the
best; never worse than the start, never over any budget.

Files: ``refine.py`` (the entry point and its record), ``space.py`` (moves that keep every budget),
``search.py`` (the search loop), ``meter.py`` (measuring a plan's real loss on one private copy).

Example:
    >>> plan = bitplan.refine(model, plan, calib_batches, seconds=60)
"""
from .refine import refine

__all__ = ["refine"]
