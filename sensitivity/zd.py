"""ZD (Z-score Distribution) importance, data-free, turned into a loss table.

Dumitru et al., "Layer-Wise Quantization: A Pragmatic and Effective Method for Quantizing LLMs Beyond
Integer Bit-Levels" (2024, arXiv:2406.17415):

    ZD = fraction of weights w with |z| > 1,   z = (w − mean(W)) / std(W)

DIRECTION: higher ZD = MORE important (a layer with relatively few weights far from its mean is
ranked less important and goes to fewer bits). For Gaussian weights ZD ≈ 0.317; heavy tails with a
few big outliers inflate std and LOWER ZD.

``level="layer"`` (default) scores each quantizable weight on its own; ``level="block"`` pools all
quantizable weights of a block (the paper's unit, blocks as in :mod:`.lim`; layers outside blocks keep
their own score). Table: ``loss[l, b] = ZD_l · ‖Q_b(W_l) − W_l‖² / ‖W_l‖²`` (a relative ranking, not
loss units). Needs no calibration data.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import rel_delta_sq
from .lim import block_of, find_blocks
from .registry import ScoreContext, register

__all__ = ["zd", "zd_score"]


def zd_score(w: torch.Tensor) -> float:
    """Fraction of the entries of ``w`` whose z-score exceeds 1 in magnitude."""
    w = w.detach().double().flatten()
    sd = w.std()
    if not torch.isfinite(sd):
        raise ValueError("weight has non-finite values")
    if sd == 0:
        return 0.0
    return float(((w - w.mean()).abs() > sd).double().mean())


@register("zd", data_free=True)
def zd(ctx: ScoreContext, level: str = "layer"):
    """ZD table (L, B) = ZD · relative ‖ΔW‖² of each layer.

    Example: ``score(model, None, method="zd")``
    """
    if level not in ("layer", "block"):
        raise ValueError(f"level={level!r} is not supported; allowed: ['layer', 'block']")
    for n in ctx.names:
        if not torch.isfinite(ctx.weight_2d(n)).all():
            raise ValueError(f"zd: weight of {n} has NaN/inf values")
    s = np.array([zd_score(ctx.weight_2d(n)) for n in ctx.names])         # (L,)
    blocks = []
    if level == "block":
        blocks = find_blocks(ctx.model, ctx.names)
        idx = block_of(ctx.names, blocks)
        for i in range(len(blocks)):
            members = [l for l, k in enumerate(idx) if k == i]
            s_blk = zd_score(torch.cat([ctx.weight_2d(ctx.names[l]).flatten() for l in members]))
            s[members] = s_blk
    return s[:, None] * rel_delta_sq(ctx), {"zd": s, "level": level, "blocks": blocks,
                                            "direction": "higher = more important"}
