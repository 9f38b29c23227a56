"""Bit operations (HAWQ-V3, Yao et al. 2021, "HAWQ-V3: Dyadic Neural Network Quantization"):
BOPs_l = MACs_l × b_w × b_a per sample. Activations that are not quantized count as 16 bits
(``UNQUANTIZED_ACT_BITS``), weights kept in fp16 as 16.
"""
from __future__ import annotations

import numpy as np

from ..kernels.formats import QuantSpec
from .registry import register

__all__ = ["bops_table", "UNQUANTIZED_ACT_BITS"]

UNQUANTIZED_ACT_BITS = 16


@register("bops")
def bops_table(layers, specs) -> np.ndarray:
    """(L, B) BOPs per sample; needs MACs recorded by ``LayerGraph.build`` with a batch.

    Example: ``bops_table(graph.layers, [QuantSpec(4, act_bits=8), QuantSpec(8, act_bits=8)])``
    """
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    missing = [l.name for l in layers if l.macs_per_sample <= 0 and any(k != "embedding" for k in l.kinds)]
    if missing:
        raise ValueError(f"BOPs need MACs per sample; layers {missing[:5]} never ran in the recorded "
                         "forward (build the LayerGraph with a calibration batch)")
    macs = np.array([l.macs_per_sample for l in layers], dtype=np.float64)            # (L,)
    bb = np.array([s.bits * (s.act_bits or UNQUANTIZED_ACT_BITS) for s in specs], np.float64)  # (B,)
    return macs[:, None] * bb[None, :]                                                 # (L, B)
