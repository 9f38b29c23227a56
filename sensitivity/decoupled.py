"""Metric-decoupled sensitivity (MixDQ).

Zhao et al., "MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion Models with Metric-Decoupled
Mixed Precision Quantization" (ECCV 2024). One scalar metric mixes effects that matter differently
(in MixDQ: image quality vs. text-image content alignment), so each layer's one-at-a-time degradation
is measured under SEVERAL metrics, each metric's table is normalised on its own, every layer is
assigned to the metric it moves most, and bits are allocated per group under separate budgets
(``bitplan.allocate(..., group_budgets="proportional")`` / ``bitplan plan --group-budgets``) or on
the combined table.

Metrics (``metrics=``, default ``("loss", "gram")``): ``"loss"`` — the calibration loss increase
(task loss, or label-free KL/MSE to the fp outputs: output fidelity, MixDQ's "quality");
``"gram"`` — distortion of the cosine-similarity matrix between the output rows of a batch
(relational structure, what retrieval / STS / nearest neighbours read: MixDQ's "content");
``"sqnr"`` — output noise-to-signal ratio ‖f_q − f‖²/‖f‖²; ``"cos"`` — mean 1 − cos(f_q, f) per row.
All come from the same perturbed forward (one per layer × option × batch, like ``measured``).

Not every pair of metrics is distinct: on an L2-normalised output (MiniLM's sentence embedding)
with the label-free MSE, ``sqnr`` = 384 × ``loss`` and ``cos`` = 192 × ``loss`` exactly, so their
tables are proportional and a "group" split between them is float noise. Such metrics are detected
(normalised tables equal within ``PROPORTIONAL_RTOL``), merged into the first metric they equal, and
listed in ``meta["proportional"]``; ``meta["distinct_metrics"]`` is what really decouples. ``gram``
is not proportional to the MSE there (its ratio to the loss spans 36x across MiniLM's layers:
``benchmarks/results/decoupled_metrics.json``).

Normalisation: each metric's (L, B) table is divided by Σ_b median_l (robust to one outlier layer).
Group of layer l = argmax over distinct metrics of its row sum in the normalised tables. Combined
table: each row is its group's normalised row; with ``"loss"`` among the metrics, each group's rows
are scaled so the group's total equals its total measured loss increase (the table is then in loss
units, and within a group the shape over layers and options comes from that group's metric).
``meta["group"]`` (L,) names each layer's metric; ``meta["groups"]`` maps metric -> layer names
(what per-group budgets read); ``meta["per_metric"]`` keeps the raw tables.
"""
from __future__ import annotations

import numpy as np

from .measured import OUTPUT_METRICS, one_at_a_time
from .registry import ScoreContext, register

__all__ = ["decoupled", "METRICS", "proportional_to"]

METRICS = ("loss",) + tuple(OUTPUT_METRICS)
PROPORTIONAL_RTOL = 1e-3       # normalised tables this close everywhere = the same metric


def proportional_to(norm: dict, rtol: float = PROPORTIONAL_RTOL) -> dict:
    """{metric: earlier metric it is proportional to} for normalised (L, B) tables (in order)."""
    names, out = list(norm), {}
    for k, m in enumerate(names):
        for first in names[:k]:
            if first in out:
                continue
            a, b = norm[m], norm[first]
            if np.allclose(a, b, rtol=rtol, atol=rtol * max(float(np.abs(b).max()), 1e-300)):
                out[m] = first
                break
    return out


@register("decoupled")
def decoupled(ctx: ScoreContext, metrics=("loss", "gram")):
    """MixDQ metric-decoupled table (L, B) plus the layer -> metric group assignment in meta.

    Example: ``t = score(model, batches, method="decoupled", metrics=("loss", "gram"))``
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
    same = proportional_to(norm)
    distinct = [m for m in metrics if m not in same]
    share = np.stack([norm[m].sum(1) for m in distinct], 1)                # (L, M')
    gi = share.argmax(1)                                                    # (L,) ties -> first metric
    loss = np.stack([norm[distinct[g]][l] for l, g in enumerate(gi)])      # (L, B) normalised units
    scale = np.ones(len(distinct))
    if "loss" in metrics:          # each group's rows back to loss units (group total = its raw loss)
        for g in range(len(distinct)):
            rows = gi == g
            den = loss[rows].sum()
            scale[g] = raw["loss"][rows].sum() / den if den > 0 else 0.0
        loss = loss * scale[gi][:, None]
    group = [distinct[g] for g in gi]
    return loss, {"metrics": list(metrics), "distinct_metrics": distinct, "proportional": same,
                  "group": group,
                  "groups": {m: [n for n, g in zip(ctx.names, group) if g == m] for m in distinct},
                  "per_metric": raw, "normaliser": sums, "base_loss": base,
                  "group_scale": dict(zip(distinct, scale.tolist()))}
