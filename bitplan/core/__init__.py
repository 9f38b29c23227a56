"""The ground floor every stage may use and that uses none of them: the quantization option
(:class:`QuantSpec`, torch-free), strict JSON read / atomic write, errors, calibration batches and
the layer graph. Imports nothing else of bitplan.

Importing ``bitplan.core`` stays torch-free; ``graph`` and ``batches`` (which need torch) are
imported on first use.

Example:
    >>> from bitplan.core import QuantSpec, option_grid, read_json
    >>> from bitplan.core.graph import LayerGraph
"""
from .errors import PlanMismatchError
from .jsonio import atomic_write_json, atomic_write_text, read_json
from .spec import FP16_BITS, QuantSpec, option_grid

__all__ = ["QuantSpec", "option_grid", "FP16_BITS", "PlanMismatchError", "read_json",
           "atomic_write_text", "atomic_write_json"]
