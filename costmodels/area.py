"""Area and energy cost models: a documented literature model, not a measurement.

Constants are 45 nm, 0.9 V numbers from M. Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014, Fig. 1.1.9 (energy) and 1.1.10 (area):
    8-bit integer multiply 0.2 pJ, 282 µm²;  32-bit integer multiply 3.1 pJ, 3495 µm²;
    32-bit integer add 0.1 pJ, 137 µm²;  DRAM read 1.3–2.6 nJ per 64 bits;
    SRAM (cache) read 10 pJ (8 KB) – 100 pJ (1 MB) per 64 bits.
Scaling rules (as in HAQ, Wang et al. CVPR 2019, and Bit Fusion, Sharma et al. ISCA 2018): an
array multiplier's area and energy grow with the product of its operand widths, b_w·b_a; the 8x8
anchor predicts 32x32 within 3 % (0.2·16 = 3.2 pJ vs 3.1 pJ; 282·16 = 4512 µm² vs 3495 µm², the
larger 32-bit multiplier using a Booth/Wallace tree). Memory energy grows with the bits moved.
Unquantized activations count as 16 bits, fp16 weights as 16 bits (an integer-multiplier stand-in
for an fp16 FMA: 0.8 pJ vs Horowitz' 1.1 pJ fp16 multiply; the model is for ranking options).

area   (µm²)  per layer: multipliers + 32-bit accumulators of a datapath that finishes one sample in
              ``cycles_per_sample`` cycles, i.e. MACs/cycles parallel units of b_w×b_a multipliers.
energy (pJ)   per sample: MACs · (E_mul(b_w, b_a) + E_add32)
              + weight bits read from DRAM once per sample (exact stored bytes, incl. scales)
              + activation bits read (b_a) and written (16) through SRAM.

Example:
    >>> cost_table("energy", graph.layers, [QuantSpec(4, 32), QuantSpec(8, act_bits=8)])  # (L, B) pJ
"""
from __future__ import annotations

import numpy as np

from ..kernels.formats import QuantSpec
from .bops import UNQUANTIZED_ACT_BITS
from ..kernels.registry import kernel_nbytes
from .registry import register
from .size import storage_kind

__all__ = ["area_table", "energy_table", "MUL8_AREA_UM2", "ADD32_AREA_UM2", "MUL8_PJ", "ADD32_PJ",
           "DRAM_PJ_PER_BIT", "SRAM_PJ_PER_BIT"]

MUL8_AREA_UM2 = 282.0          # 8x8-bit integer multiplier, 45 nm (Horowitz 2014)
ADD32_AREA_UM2 = 137.0         # 32-bit adder (the accumulator)
MUL8_PJ = 0.2                  # 8x8-bit integer multiply
ADD32_PJ = 0.1                 # 32-bit add
DRAM_PJ_PER_BIT = 1300.0 / 64  # 1.3 nJ per 64-bit DRAM read (the low end of Horowitz' range)
SRAM_PJ_PER_BIT = 100.0 / 64   # 1 MB SRAM, 100 pJ per 64 bits


def _bits(spec: QuantSpec) -> tuple[int, int]:
    return spec.bits, spec.act_bits or UNQUANTIZED_ACT_BITS


def _macs(layers) -> np.ndarray:
    missing = [l.name for l in layers if l.macs_per_sample <= 0 and any(k != "embedding" for k in l.kinds)]
    if missing:
        raise ValueError(f"area/energy need MACs per sample; layers {missing[:5]} never ran in the recorded "
                         "forward (build the LayerGraph with a calibration batch)")
    return np.array([l.macs_per_sample for l in layers], dtype=np.float64)          # (L,)


@register("area")
def area_table(layers, specs, cycles_per_sample: float = 1e6) -> np.ndarray:
    """(L, B) µm² of multipliers + accumulators that run each layer at one sample per
    ``cycles_per_sample`` cycles: MACs/cycles units × (282·b_w·b_a/64 + 137).

    Example: ``area_table(graph.layers, [QuantSpec(4), QuantSpec(8, act_bits=8)])``
    """
    if not cycles_per_sample > 0:
        raise ValueError(f"cycles_per_sample={cycles_per_sample!r} must be > 0")
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    units = _macs(layers) / cycles_per_sample                                         # (L,)
    per_unit = np.array([MUL8_AREA_UM2 * bw * ba / 64 + ADD32_AREA_UM2
                         for bw, ba in map(_bits, specs)], dtype=np.float64)        # (B,)
    return units[:, None] * per_unit[None, :]                                         # (L, B) µm²


@register("energy")
def energy_table(layers, specs, device="cpu") -> np.ndarray:
    """(L, B) pJ per sample: compute (∝ b_w·b_a per MAC) + DRAM weight reads (∝ stored bits) +
    SRAM activation traffic (∝ b_a in, 16 bits out).

    Example: ``energy_table(graph.layers, [QuantSpec(4, 32), QuantSpec(8)])``
    """
    specs = [s if isinstance(s, QuantSpec) else QuantSpec(s) for s in specs]
    macs = _macs(layers)                                                              # (L,)
    out = np.empty((len(layers), len(specs)), dtype=np.float64)
    for i, l in enumerate(layers):
        m = max(1, l.tokens_per_sample)
        for j, s in enumerate(specs):
            bw, ba = _bits(s)
            compute = macs[i] * (MUL8_PJ * bw * ba / 64 + ADD32_PJ)
            weights = 8 * kernel_nbytes(s, l.out_features, l.in_features, device, storage_kind(l)) \
                * DRAM_PJ_PER_BIT
            acts = m * (l.in_features * ba + l.out_features * 16) * SRAM_PJ_PER_BIT
            out[i, j] = compute + weights + acts
    return out                                                                        # (L, B) pJ
