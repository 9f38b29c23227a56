"""The option space of a run and its defaults — one place for ``allocate``, the CLI, ``frontier``
and ``demo``.

Options are the product ``bits x group_size x act_bits x quant_method`` (``core.spec.option_grid``),
masked per layer by the quantizer's rules (``kernels.option_reason``: a group size must divide the
layer's input dimension, embeddings take weight-only round-to-nearest options, ...).

Defaults (``DEFAULTS``) were chosen from ``benchmarks/quality.py`` (README "Quality results"):
per layer among bits {2, 3, 4, 5, 6, 8} x {per channel, group 128}, weight-only, round-to-nearest.

Example:
    >>> opts = resolve_options(graph, bits=(2, 4, 8), group_size=(None, 128))
    >>> opts.specs, opts.allowed.shape, opts.reasons[(0, 1)]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .core.spec import QuantSpec, option_grid

__all__ = ["DEFAULTS", "Options", "resolve_options", "describe"]

DEFAULTS = {"bits": (2, 3, 4, 5, 6, 8),     # 5 bits: uniform-5 beat every {2,3,4,6,8} plan on the char LM
            "group_size": (None, 128),      # per layer: most of the benchmark margin came from this choice
            "act_bits": None,               # weight-only unless asked: W8A8 changes numerics and kernels
            "quant_method": "rtn",
            "symmetric": True}


@dataclass(frozen=True)
class Options:
    """The columns of a run's tables and which of them each layer can take."""
    specs: tuple[QuantSpec, ...]                      # (B,)
    allowed: np.ndarray                               # (L, B) bool
    reasons: dict = field(default_factory=dict)       # (l, b) -> why layer l cannot take option b

    def summary(self, names) -> list[str]:
        """One line per distinct reason an option is missing: 'w4g128 (3 layers, e.g. x): why'."""
        by: dict[tuple[str, str], list[str]] = {}
        for (i, j), why in self.reasons.items():
            by.setdefault((self.specs[j].label, why), []).append(names[i])
        return [f"{lab}: {len(ns)} layer(s), e.g. {', '.join(ns[:2])} — {why}" for (lab, why), ns in by.items()]


def resolve_options(graph, bits=DEFAULTS["bits"], group_size=DEFAULTS["group_size"],
                    act_bits=DEFAULTS["act_bits"], quant_method=DEFAULTS["quant_method"],
                    symmetric=DEFAULTS["symmetric"], options=None) -> Options:
    """The option grid for ``graph``'s layers, each argument a value or a tuple (``group_size=None``
    is per channel, ``act_bits=None`` floating-point activations).

    ``options`` (a sequence of QuantSpec) replaces the product. Raises ``ValueError`` when some layer
    can take none of the options, naming it and why.

    Example: ``resolve_options(graph, bits=(2, 4, 8), group_size=(None, 128), act_bits=(None, 8))``
    """
    from .kernels.modules import option_mask
    if options is not None:
        specs = tuple(options)
        if not specs or not all(isinstance(s, QuantSpec) for s in specs) or len(set(specs)) != len(specs):
            raise ValueError(f"options={options!r} must be a non-empty sequence of distinct QuantSpec")
    else:
        specs = option_grid(bits, group_size, act_bits, quant_method, symmetric)
    allowed, reasons = option_mask(graph.layers, specs)
    allowed = np.asarray(allowed, dtype=bool).reshape(len(graph.layers), len(specs))
    none = np.flatnonzero(~allowed.any(1))
    if len(none):
        i = int(none[0])
        why = sorted({reasons[(i, j)] for j in range(len(specs))})
        raise ValueError(f"{len(none)} layer(s) can take none of the options {[s.label for s in specs]}, "
                         f"e.g. {graph.names[i]} (K={graph.layers[i].in_features}): {'; '.join(why[:3])}")
    return Options(specs, allowed, reasons)


def describe(specs) -> str:
    """'bits 2,3,4 x group channel,128 x act none x rtn' for a product grid; labels otherwise."""
    b = sorted({s.bits for s in specs})
    g = sorted({s.group_size for s in specs if s.bits != 16}, key=lambda x: -1 if x is None else x)
    a = sorted({s.act_bits for s in specs if s.bits != 16}, key=lambda x: -1 if x is None else x)
    m = sorted({s.method for s in specs})
    return (f"bits {','.join(map(str, b))} x group {','.join('channel' if x is None else str(x) for x in g)}"
            f" x act {','.join('none' if x is None else str(x) for x in a)} x {','.join(m)}")
