"""HAWQ-V3 sensitivity with per-layer Hutchinson traces.

Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization" (NeurIPS 2020) and Yao et al.,
"HAWQ-V3: Dyadic Neural Network Quantization" (ICML 2021):

    Ω_l(b) = Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²

H_l is the Hessian block of layer l's weight (n_l elements). Hutchinson: Tr(H_l) = E[v_lᵀ H_l v_l]
for Rademacher v. ONE Hessian-vector product per probe (v over all layers at once) gives every
layer's estimate v_l · (Hv)_l. Probes cycle through the calibration batches (Tr H = mean over batches
of Tr H_batch, so the estimate stays unbiased). Probing stops once every layer's standard error is
below ``tol`` × |trace| (after ``min_probes``) or at ``max_probes``.

Negative trace estimates (noise, or a non-convex task loss) are clamped to 0 in the loss table; the
raw traces are kept in ``meta["trace"]``.
"""
from __future__ import annotations

import numpy as np
import torch

from .registry import ScoreContext, register

__all__ = ["hutchinson_traces"]


def _math_sdpa():
    """Double backward through CPU flash attention is not implemented: force the math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:                  # older torch: no SDPA context manager
        import contextlib
        return contextlib.nullcontext()


def hutchinson_traces(ctx: ScoreContext, min_probes: int = 8, max_probes: int = 64, tol: float = 0.05):
    """Per-layer trace estimates (L,), their standard errors (L,), and the probe count."""
    params = [ctx.module(n).weight for n in ctx.names]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(ctx.seed)
    samples = []
    try:
        with _math_sdpa():
            for k in range(max_probes):
                batch = ctx.batches[k % len(ctx.batches)]
                loss = ctx.loss_fn(ctx.model, batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"calibration loss is {loss.item()} on batch {k % len(ctx.batches)}")
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                vs = [torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype) * 2 - 1
                      for p in params]
                est = np.zeros(len(params))
                if live:
                    hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                             grad_outputs=[vs[i] for i in live], allow_unused=True)
                    for i, h in zip(live, hv):
                        if h is not None:
                            if not torch.isfinite(h).all():
                                raise ValueError(f"Hessian-vector product of {ctx.names[i]} is not finite")
                            est[i] = float((vs[i] * h).sum())
                samples.append(est)
                if k + 1 >= min_probes:
                    s = np.array(samples)
                    se = s.std(0, ddof=1) / np.sqrt(len(s))
                    if np.all(se <= tol * np.maximum(np.abs(s.mean(0)), 1e-30)):
                        break
    finally:
        for p in params:
            p.requires_grad_(False)
    s = np.array(samples)                                         # (probes, L)
    se = s.std(0, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.full(s.shape[1], np.inf)
    return s.mean(0), se, len(s)


@register("hessian")
def hessian(ctx: ScoreContext, min_probes: int = 8, max_probes: int = 64, tol: float = 0.05):
    """HAWQ-V3 loss table (L, B) = max(Tr H_l, 0) / n_l · ‖Q_b(W_l) − W_l‖².

    Example: ``score(model, batches, method="hessian", max_probes=32)``
    """
    tr, se, probes = hutchinson_traces(ctx, min_probes, max_probes, tol)
    n = np.array([l.n_params for l in ctx.graph.layers], dtype=np.float64)     # (L,)
    loss = (np.maximum(tr, 0.0) / n)[:, None] * ctx.delta_sq()                   # (L, B)
    return loss, {"trace": tr, "trace_stderr": se, "probes": probes, "tol": tol}
