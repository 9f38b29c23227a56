"""Errors of the ground floor that users catch by name (``bitplan.PlanMismatchError``)."""
from __future__ import annotations

__all__ = ["PlanMismatchError"]


class PlanMismatchError(ValueError):
    """A plan does not fit a model. ``missing`` are plan layers absent from the model, ``extra``
    quantizable model layers absent from the plan, ``shape`` layers whose weight shapes differ."""

    def __init__(self, message: str, missing=(), extra=(), shape=()):
        super().__init__(message)
        self.missing, self.extra, self.shape = list(missing), list(extra), list(shape)
