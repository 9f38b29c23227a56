"""Metric-decoupled sensitivity (MixDQ).

Zhao et al., "MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion Models with Metric-Decoupled
Mixed Precision Quantization" (ECCV 2024). One scalar metric mixes effects that matter differently
(in MixDQ: image quality vs. text-image content alignment), so each layer's one-at-a-time degradation
is measured under SEVERAL metrics, each metric's table is normalised on its own, and every layer is
assigned to the metric it moves most; bits can then be allocated per group (separate budgets) or on
the combined table.

Metrics here (``metrics=``): ``"loss"`` — the calibration loss increase (task loss, or label-free
KL/MSE to the fp outputs); ``"sqnr"`` — output noise-to-signal ratio ‖f_q − f‖²/‖f‖² (SQNR =
−10·log10 of it, a fidelity metric); ``"cos"`` — mean 1 − cos(f_q, f) per row (direction change). All
come from the same perturbed forward (one per layer × option × batch, like ``measured``).

Normalisation: each metric's (L, B) table is divided by Σ_b median_l (robust to one outlier layer).
Group of layer l = argmax over metrics of its row sum in the normalised tables. Combined table: each
row is its group's normalised row; with ``"loss"`` among the metrics, each group's rows are scaled
so the group's total equals its total measured loss increase (the table is then in loss units, and
within a group the shape over layers and options comes from that group's metric).
``meta["group"]`` (L,) names each layer's metric; ``meta["groups"]`` maps metric -> layer names;
``meta["per_metric"]`` keeps the raw tables. NOTE: when the loss is the label-free MSE to a single
output tensor, ``loss`` and ``sqnr`` are proportional per batch, so their groups carry little extra
information; the split pays off with a task loss or a KL on logits.
"""
from __future__ import annotations

import numpy as np

from .measured import OUTPUT_METRICS, one_at_a_time
from .registry import ScoreContext, register

__all__ = ["decoupled", "METRICS"]

METRICS = ("loss",) + tuple(OUTPUT_METRICS)


@register("decoupled")
def decoupled(ctx: ScoreContext, metrics=("loss", "sqnr")):
    """MixDQ metric-decoupled table (L, B) plus the layer -> metric group assignment in meta.

    Example: ``t = score(model, batches, method="decoupled", metrics=("loss", "sqnr", "cos"))``
    """
    metrics = tuple(metrics)
    if not metrics or len(set(metrics)) != len(metrics) or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics={metrics!r} must be distinct names from {list(METRICS)}")
    dloss, mets, base = one_at_a_time(ctx, [m for m in metrics if m != "loss"])
    raw = {"loss": np.maximum(dloss, 0.0), **mets} if "loss" in metrics else mets
    raw = {m: raw[m] for m in metrics}                                      # metric -> (L, B)
    # robust per-metric normaliser: Σ over options of the median over layers (one outlier layer,
    # e.g. an embedding-side projection at 2 bits, must not push every other layer into one group)
    sums = {m: float(np.median(raw[m], 0).sum()) or float(raw[m].sum()) for m in metrics}
    norm = {m: raw[m] / sums[m] if sums[m] > 0 else np.zeros_like(raw[m]) for m in metrics}
    share = np.stack([norm[m].sum(1) for m in metrics], 1)                 # (L, M)
    gi = share.argmax(1)                                                    # (L,)
    loss = np.stack([norm[metrics[g]][l] for l, g in enumerate(gi)])       # (L, B) normalised units
    scale = np.ones(len(metrics))
    if "loss" in metrics:          # each group's rows back to loss units (group total = its raw loss)
        for g in range(len(metrics)):
            rows = gi == g
            den = loss[rows].sum()
            scale[g] = raw["loss"][rows].sum() / den if den > 0 else 0.0
        loss = loss * scale[gi][:, None]
    group = [metrics[g] for g in gi]
    return loss, {"metrics": list(metrics), "group": group,
                  "groups": {m: [n for n, g in zip(ctx.names, group) if g == m] for m in metrics},
                  "per_metric": raw, "normaliser": sums, "base_loss": base,
                  "group_scale": dict(zip(metrics, scale.tolist()))}
