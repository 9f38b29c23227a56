"""Cost models: each ``cost(layers, specs) -> (L, B)`` table in its own unit (bytes, BOPs, ms, ...).

Registered: size (bytes), bops, latency (ms, needs ``profile=``), area (µm²), energy (pJ).

Example:
    >>> from bitplan.costmodels import cost_table
    >>> size = cost_table("size", graph.layers, specs)      # (L, B) bytes
"""
if __name__ == "bitplan.costmodels":
    from .registry import COST_MODELS, cost_table, register
    from .size import MB, base_nbytes, model_nbytes, size_table
    from . import area, bops, latency  # noqa: F401  (fill the registry)
    from .area import area_table, energy_table
    from .latency import latency_range, latency_table, predict_latency_ms

    __all__ = ["cost_table", "register", "COST_MODELS", "size_table", "model_nbytes", "base_nbytes", "MB",
               "latency_table", "predict_latency_ms", "latency_range", "area_table", "energy_table"]
else:   # this source folder imported as a top-level 'costmodels' (the repository root is on sys.path): stay
    __all__ = []   # empty, so it never shadows another distribution of that name (e.g. HF's 'kernels')
