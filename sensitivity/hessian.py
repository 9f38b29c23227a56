"""HAWQ-V3 sensitivity with per-layer Hutchinson traces.

Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization" (NeurIPS 2020) and Yao et al.,
"HAWQ-V3: Dyadic Neural Network Quantization" (ICML 2021):

    Ω_l(b) = Tr(H_l) / n_l · ‖Q_b(W_l) − W_l‖²,     table: loss[l, b] = ½ Ω_l(b)

(the ½ of the second-order Taylor term makes the table a predicted loss increase in loss units; a
constant factor never changes the allocator's choice). H_l is the Hessian block of layer l's weight (n_l elements) of the calibration loss (mean over
batches). Hutchinson (1990): Tr(A) = E[vᵀ A v] for Rademacher v. Two probe spaces (``probe=``):

- ``"weight"``: v over all quantizable weights at once; ONE Hessian-vector product per probe gives
  every layer's estimate ``v_l · (Hv)_l`` (the HVP is restricted to the quantizable weights — no
  embeddings, norms or biases). Works for any twice-differentiable loss. Per batch the gradient
  graph is built once and ``probe_batch`` probes go through one batched double backward
  (``is_grads_batched``). The same probes are used on every batch, so the whole-model sum of one
  probe is exactly PyHessian's ``vᵀ H v``.
- ``"output"``: for the built-in label-free losses (KL / MSE to the fp outputs) the residual is zero
  at the fp weights, so the weight Hessian IS the Gauss-Newton matrix ``H = Jᵀ S Sᵀ J`` exactly
  (``S`` from :meth:`LabelFreeLoss.hessian_sqrt`). With a Rademacher probe u in output space,
  ``g = Jᵀ S u`` is ONE ordinary backward and ``‖g_l‖²`` is an unbiased estimate of ``Tr(H_l)``
  for every layer at once — no double backward, never negative, no cross-layer noise terms.

``probe="auto"`` (default) takes ``"output"`` when the loss is the built-in label-free one and
``"weight"`` otherwise (a user ``loss_fn`` need not be at a minimum, so only the true HVP is exact).
Probing stops once every layer's standard error is ≤ ``tol`` × |trace| (after ``min_probes``) or at
``max_probes``. Layers whose weight gets no gradient (unused, e.g. MiniLM's pooler under a sentence
embedding) have trace 0 and are listed in ``meta["no_grad_layers"]``. Negative estimates are clamped
to 0 in the table; raw traces stay in ``meta["trace"]``.

``backend="pyhessian"`` cross-checks with PyHessian 0.1 (Yao et al., "PyHessian", 2020):
``hessian(...).trace()`` run once per layer with only that layer's weight requiring grad (PyHessian
gives one whole-parameter-set trace per probe), in its full-batch mode (gradient graph of all
calibration batches reused across probes), exactly ``max_probes`` probes per layer.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ._common import checked_loss, math_sdpa, weights_require_grad
from .losses import LabelFreeLoss
from .registry import ScoreContext, register

__all__ = ["hutchinson_traces", "pyhessian_traces", "PROBES", "BACKENDS"]

PROBES = ("auto", "weight", "output")
BACKENDS = ("bitplan", "pyhessian")


def _rademacher(shape, gen) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)


def _probe_gens(seed: int, start: int, k: int) -> list[torch.Generator]:
    """One generator per probe index, so results do not depend on how probes are batched."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(start, start + k)]


def _stacked(shape, gens) -> torch.Tensor:
    """(k, *shape) Rademacher probes, row j drawn from ``gens[j]``."""
    return torch.stack([_rademacher(tuple(shape), g) for g in gens])


def _grad(outputs, inputs, grad_outputs, k: int, **kw):
    """autograd.grad for k stacked probes: one batched backward, or a loop where vmap cannot go."""
    if k > 1:
        try:
            return torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True,
                                       retain_graph=True, **kw)
        except (RuntimeError, NotImplementedError):      # an op without a batching rule
            pass
    outs = [torch.autograd.grad(outputs, inputs, [g[j] for g in grad_outputs] if isinstance(
        grad_outputs, list) else grad_outputs[j], retain_graph=True, **kw) for j in range(k)]
    return [None if outs[0][i] is None else torch.stack([o[i] for o in outs]) for i in range(len(inputs))]


def _check(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} is not finite (NaN/inf); check the model and calibration data")


def _probe_chunk_weight(ctx, params, gens, nb):
    """(k, L) per-probe layer estimates v_l·(H v)_l from one batched HVP per batch."""
    k = len(gens)
    est = np.zeros((k, len(params)))
    seen = np.zeros(len(params), dtype=bool)
    vs = [_stacked(p.shape, gens) for p in params]
    for bi, batch in enumerate(ctx.batches):
        loss = checked_loss(ctx, batch, bi)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                _check(g, f"gradient of {ctx.names[i]}")
                seen[i] = True
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            continue
        hv = _grad([grads[i] for i in live], [params[i] for i in live], [vs[i] for i in live], k,
                   allow_unused=True)
        for i, h in zip(live, hv):
            if h is not None:
                _check(h, f"Hessian-vector product of {ctx.names[i]}")
                est[:, i] += (vs[i] * h).flatten(1).sum(1).double().numpy() / nb
    return est, seen


def _probe_chunk_output(ctx, params, gens, nb):
    """(k, L) per-probe estimates ‖(Jᵀ S u)_l‖² from one batched backward per batch."""
    k = len(gens)
    est = np.zeros((k, len(params)))
    seen = np.zeros(len(params), dtype=bool)
    for bi, batch in enumerate(ctx.batches):
        t = ctx.loss_fn.output(ctx.model, batch)      # (the loss itself is 0 here: fp point)
        _check(t, f"model output on batch {bi}")
        w = ctx.loss_fn.hessian_sqrt(batch, _stacked(t.shape, gens)).to(t.dtype)
        gs = _grad([t], params, [w], k, allow_unused=True)
        for i, g in enumerate(gs):
            if g is not None:
                _check(g, f"gradient of {ctx.names[i]}")
                seen[i] = True
                est[:, i] += g.pow(2).flatten(1).sum(1).double().numpy() / nb    # fp32 sums: 4x faster
    return est, seen


def hutchinson_traces(ctx: ScoreContext, tol: float = 0.05, min_probes: int = 8, max_probes: int = 64,
                      probe_batch: int = 4, probe: str = "auto"):
    """Per-layer traces (L,), standard errors (L,), probe count, and a dict of details.

    Example: ``tr, se, n, info = hutchinson_traces(ctx, tol=0.05)``
    """
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r} is not supported; allowed: {list(PROBES)}")
    if not (isinstance(min_probes, int) and isinstance(max_probes, int) and min_probes >= 2 and max_probes >= 2):
        raise ValueError(f"min_probes={min_probes!r} and max_probes={max_probes!r} must be integers >= 2 "
                         "(a standard error needs two probes)")
    min_probes = min(min_probes, max_probes)
    if not (isinstance(probe_batch, int) and probe_batch >= 1):
        raise ValueError(f"probe_batch={probe_batch!r} must be a positive int")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be > 0 (relative standard error of each trace)")
    label_free = isinstance(ctx.loss_fn, LabelFreeLoss)
    if probe == "output" and not label_free:
        raise ValueError("probe='output' needs the built-in label-free loss (loss_fn=None, 'kl' or 'mse'), "
                         "where the Hessian equals the Gauss-Newton matrix; use probe='weight'")
    mode = "output" if probe == "output" or (probe == "auto" and label_free) else "weight"
    chunk = _probe_chunk_output if mode == "output" else _probe_chunk_weight
    nb = len(ctx.batches)
    rows, seen = [], np.zeros(len(ctx.names), dtype=bool)
    converged = False
    ck = ctx.checkpoint
    if ck is not None and "hessian" in ck.state:          # resume: probe rows done before
        st = ck.state["hessian"]
        rows, seen, converged = [np.array(r, dtype=np.float64) for r in st["rows"]], np.array(st["seen"], bool), \
            bool(st["converged"])
        ck.resumed += len(rows)
    world, rank = (ctx.ranks.world, ctx.ranks.rank) if ctx.ranks is not None else (1, 0)
    with math_sdpa(), weights_require_grad(ctx) as params:
        while not converged and len(rows) < max_probes:
            # the next `world` probe chunks, sized as one process sizes them; rank r draws chunk r
            # (one generator per probe: a probe's estimate does not depend on who computes it)
            chunks, n = [], len(rows)
            while len(chunks) < world and n < max_probes:
                k = min(probe_batch, max_probes - n)
                chunks.append((n, k))
                n += k
            mine = chunk(ctx, params, _probe_gens(ctx.seed, *chunks[rank]), nb) if rank < len(chunks) else None
            parts = ctx.ranks.gather(mine, f"hessian probes {len(rows)}..{n}") if world > 1 else [mine]
            for est, s in parts[:len(chunks)]:        # in probe order, one process's stopping rule
                rows.extend(est)
                seen |= s
                if len(rows) >= min_probes:
                    a = np.array(rows)
                    mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
                    if np.all((se <= tol * np.abs(mean)) | (se == 0) | ~seen):
                        converged = True
                        break
            if ck is not None:
                ck.put("hessian", {"rows": [r.tolist() for r in rows], "seen": seen.tolist(),
                                   "converged": converged})
    a = np.array(rows)                                               # (probes, L)
    tr, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
    if not seen.any():
        raise ValueError("no quantizable layer's weight gets a gradient from the loss; "
                         "the loss does not depend on any quantizable layer")
    tot = a.sum(1)                                                   # (probes,) Σ_l, = vᵀHv in "weight" mode
    info = {"probe_mode": mode, "converged": converged, "total_trace": float(tot.mean()),
            "total_trace_stderr": float(tot.std(ddof=1) / np.sqrt(len(tot))),
            "no_grad_layers": [n for n, s in zip(ctx.names, seen) if not s]}
    return tr, se, len(a), info


def pyhessian_traces(ctx: ScoreContext, max_probes: int = 64):
    """Per-layer traces via PyHessian's ``trace()``, one run per layer (its only per-layer route).

    Example: ``tr, se, n, info = pyhessian_traces(ctx, max_probes=16)``
    """
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as e:
        raise ValueError("backend='pyhessian' needs the PyPI package pyhessian (pip install pyhessian)") from e

    class _LossAsModel(torch.nn.Module):          # PyHessian wants model(inputs) and criterion(out, y)
        def __init__(self):
            super().__init__()
            self.inner = ctx.model

        def forward(self, idx):                   # idx: (nb,) calibration batch indices
            return torch.stack([checked_loss(ctx, ctx.batches[int(i)], int(i)) for i in idx]).mean()

    wrapper = _LossAsModel()
    data = (torch.arange(len(ctx.batches)), torch.zeros(len(ctx.batches)))
    tr, se, seen = np.zeros(len(ctx.names)), np.zeros(len(ctx.names)), np.zeros(len(ctx.names), bool)
    with math_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore")           # PyHessian's backward(create_graph=True) warns
        for i, name in enumerate(ctx.names):
            w = ctx.module(name).weight
            w.requires_grad_(True)
            try:
                try:
                    h = PyHessian(wrapper, lambda out, y: out, data=data, cuda=False)
                except RuntimeError as e:
                    if "does not require grad" in str(e):
                        continue                  # the loss does not depend on this layer
                    raise
                if not isinstance(h.gradsH[0], torch.Tensor) or not h.gradsH[0].requires_grad:
                    continue                      # unused layer (no gradient) or a linear loss in it
                seen[i] = True
                vals = np.array(h.trace(maxIter=max_probes, tol=float("-inf")))   # fixed probe count
            finally:
                w.grad = None
                w.requires_grad_(False)
            tr[i], se[i] = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))
    return tr, se, max_probes, {"probe_mode": "pyhessian-per-layer", "converged": False,
                                "no_grad_layers": [n for n, s in zip(ctx.names, seen) if not s]}


@register("hessian")
def hessian(ctx: ScoreContext, tol: float = 0.05, min_probes: int = 8, max_probes: int = 64,
            probe_batch: int = 4, probe: str = "auto", backend: str = "bitplan"):
    """HAWQ-V3 loss table (L, B) = ½ · max(Tr H_l, 0) / n_l · ‖Q_b(W_l) − W_l‖².

    Example: ``score(model, batches, method="hessian", tol=0.05, max_probes=64)``
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {list(BACKENDS)}")
    if backend == "pyhessian":
        tr, se, probes, info = pyhessian_traces(ctx, max_probes)
    else:
        tr, se, probes, info = hutchinson_traces(ctx, tol, min_probes, max_probes, probe_batch, probe)
    n = np.array([l.n_params for l in ctx.graph.layers], dtype=np.float64)     # (L,)
    loss = 0.5 * (np.maximum(tr, 0.0) / n)[:, None] * ctx.delta_sq()             # (L, B)
    return loss, {"trace": tr, "trace_stderr": se, "probes": int(probes), "tol": tol,
                  "backend": backend, **info}
