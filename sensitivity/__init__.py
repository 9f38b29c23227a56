"""Sensitivity estimators: ``score(model, data, method) -> Sensitivity`` (L x B loss table).

Example:
    >>> from bitplan.sensitivity import score, load
    >>> t = score(model, batches, method="hessian", bits=(2, 3, 4, 8)); t.save("sens.json")
"""
from .registry import ESTIMATORS, ScoreContext, register, score
from .table import Sensitivity, load
from . import hessian  # noqa: F401  (fill the registry)

__all__ = ["score", "load", "Sensitivity", "register", "ESTIMATORS", "ScoreContext"]
