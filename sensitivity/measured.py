"""Measured sensitivity: quantize ONLY layer l to option b, measure the loss increase.

The exact additive model behind AdaQuant / CalibTIP (Hubara et al., "Accurate Post Training
Quantization With Small Calibration Sets", ICML 2021: per-layer Δloss fed to an integer program) and
ExLlamaV2's measurement pass (turboderp, exllamav2 ``measure``: error of each layer at each option):

    loss[l, b] = mean_batches L(model with W_l ← Q_b(W_l)) − mean_batches L(model)

L×B×(batches) forward passes, no gradients. With the default label-free loss this is the KL (or MSE)
of the perturbed output to the fp output (``loss_fn="kl"`` forces KL on logits). Negative measured
changes (possible for a task loss) are clamped to 0 in the table; ``meta["delta_loss"]`` keeps them.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.batches import first_tensor

from ._common import checked_loss
from .registry import ScoreContext, register

__all__ = ["measured", "one_at_a_time"]


def _nsr(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Noise-to-signal ratio ‖t − ref‖² / ‖ref‖² (SQNR = −10·log10 of it)."""
    return float((t.float() - ref.float()).pow(2).sum() / ref.float().pow(2).sum().clamp(min=1e-30))


def _one_minus_cos(t: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows (samples / positions) of 1 − cos(t_i, ref_i) along the last dim."""
    return float(1 - torch.nn.functional.cosine_similarity(t.float(), ref.float(), dim=-1).mean())


def _gram(t: torch.Tensor, ref: torch.Tensor, max_rows: int = 512) -> float:
    """Relational ("content") distortion: ‖S_q − S‖²_F / ‖S‖²_F of the cosine-similarity matrix S
    between the output rows (samples / positions along the last dim; the first ``max_rows``).

    What retrieval / STS / nearest-neighbour use reads; unlike MSE or NSR it ignores a perturbation that
    moves every row alike (a common rotation or shift of all embeddings) and is not proportional to
    them on L2-normalised outputs."""
    a = torch.nn.functional.normalize(t.float().reshape(-1, t.shape[-1])[:max_rows], dim=-1)
    b = torch.nn.functional.normalize(ref.float().reshape(-1, ref.shape[-1])[:max_rows], dim=-1)
    s_q, s = a @ a.t(), b @ b.t()
    return float((s_q - s).pow(2).sum() / s.pow(2).sum().clamp(min=1e-30))


OUTPUT_METRICS = {"sqnr": _nsr, "cos": _one_minus_cos, "gram": _gram}


@torch.no_grad()
def one_at_a_time(ctx: ScoreContext, output_metrics=()) -> tuple[np.ndarray, dict, float]:
    """Δloss (L, B), {metric: (L, B)} output degradations, and the fp loss; one layer at a time.

    Output metrics compare the model's (first) output tensor with the fp one, captured by a hook on
    the root module, so one forward per (layer, option, batch) serves the loss and every metric.
    """
    for m in output_metrics:
        if m not in OUTPUT_METRICS:
            raise ValueError(f"output metric {m!r} is not supported; allowed: {sorted(OUTPUT_METRICS)}")
    captured = []
    handle = ctx.model.register_forward_hook(lambda mod, inp, out: captured.append(first_tensor(out)))
    try:
        def run(bi, batch):
            captured.clear()
            loss = float(checked_loss(ctx, batch, bi))
            return loss, (captured[-1] if captured else None)

        base = [run(bi, b) for bi, b in enumerate(ctx.batches)]
        base_loss = float(np.mean([l for l, _ in base]))
        if output_metrics and any(t is None for _, t in base):
            raise ValueError("output metrics need loss_fn to call the model itself (no output was seen)")
        L, B, nb = len(ctx.names), len(ctx.specs), len(ctx.batches)

        def cell(c):                       # [Δloss, metric...] of one (layer, option) cell
            i, j = c
            v = [0.0] * (1 + len(output_metrics))
            with ctx.perturbed(i, j):
                for bi, batch in enumerate(ctx.batches):
                    loss, t = run(bi, batch)
                    v[0] += (loss - base[bi][0]) / nb
                    for k, m in enumerate(output_metrics):
                        v[1 + k] += OUTPUT_METRICS[m](t, base[bi][1]) / nb
            return v

        # cells spread over the ranks of a process group and checkpointed (ScoreContext.run_cells);
        # each is computed exactly as in one process, so the table is identical bit for bit
        cells = [(i, j) for i in range(L) for j in range(B) if ctx.allowed[i, j]]
        vals = ctx.run_cells(cells, cell)
        dloss = np.zeros((L, B))
        mets = {m: np.zeros((L, B)) for m in output_metrics}
        for (i, j), v in vals.items():
            dloss[i, j] = v[0]
            for k, m in enumerate(output_metrics):
                mets[m][i, j] = v[1 + k]
    finally:
        handle.remove()
    return dloss, mets, base_loss


@register("measured")
def measured(ctx: ScoreContext):
    """Measured table (L, B): loss increase with only layer l quantized to option b.

    Example: ``score(model, batches, method="measured", loss_fn="kl")``
    """
    dloss, _, base = one_at_a_time(ctx)
    return dloss, {"delta_loss": dloss, "base_loss": base,
                   "forwards": len(ctx.names) * len(ctx.specs) * len(ctx.batches)}
