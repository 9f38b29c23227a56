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
  (``is_grads_batched``).
- ``"output"``: for the built-in label-free losses (KL / MSE to the fp outputs) the residual is zero
  at the fp weights, so the weight Hessian IS the Gauss-Newton matrix ``H = Jᵀ S Sᵀ J`` exactly
  (``S`` from :meth:`LabelFreeLoss.hessian_sqrt`). With a Rademacher probe u in output space,
  ``g = Jᵀ S u`` is ONE ordinary backward and ``‖g_l‖²`` is an unbiased estimate of ``Tr(H_l)``
  for every layer at once — no double backward, never negative, no cross-layer noise terms.

One probe = one sample of every layer's trace, one HVP (or backward) per calibration batch, with an
INDEPENDENT Rademacher vector on each batch: ``mean_b v_b·(H_b v_b)`` is unbiased for the trace of
``H = mean_b H_b`` at the same cost as one shared vector, and its variance is up to ``nb`` times
smaller (the batches' Hutchinson noise averages out); the standard error is over probes, as before.

``probe="auto"`` (default) takes ``"output"`` when the loss is the built-in label-free one and
``"weight"`` otherwise (a user ``loss_fn`` need not be at a minimum, so only the true HVP is exact).
Stopping (:func:`settled`): once every layer's standard error is ≤ ``tol`` × |trace| — or the layer's
share of the total predicted loss is negligible (upper estimate below ``negligible``, default 1 %, of
the total; listed in ``meta["negligible_layers"]``) — after ``min_probes``, or at ``max_probes``.
``max_probes=None`` (default) caps the cost relative to measuring (:func:`auto_max_probes`): at most
~4× the forward passes of ``measured`` (L×B×batches), never above 64 — a double backward costs
8-10 forwards, so on a small conv net with a task loss 64 probes cost 15-20× measuring (issue 16 item
11). ``meta["converged"]`` says whether the tolerance was met; ``meta["trace_stderr"]`` is honest
either way. Layers whose weight gets no gradient (unused, e.g. MiniLM's pooler under a sentence
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

__all__ = ["hutchinson_traces", "pyhessian_traces", "auto_max_probes", "settled", "PROBES", "BACKENDS"]

PROBES = ("auto", "weight", "output")
BACKENDS = ("bitplan", "pyhessian")
AUTO_MAX_PROBES = 64            # the automatic probe cap never exceeds this
MEASURE_MULTIPLE = 4.0          # automatic cap: at most ~this many times the forwards of `measured`
# forward-pass equivalents of one probe on one batch (measured on CPU, issue 16 item 11 benchmark):
# "weight": gradient graph (amortised over probe_batch probes) + double backward through the model + overhead,
# 8-10 forwards in situ for a small conv net on 1 thread; "output": one ordinary backward, ~2-3 forwards
PROBE_FORWARDS = {"weight": 10.0, "output": 3.0}


def _rademacher(shape, gen) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)


def _probe_gens(seed: int, start: int, k: int, batch: int) -> list[torch.Generator]:
    """One generator per (probe index, calibration batch): every batch gets its own independent
    probe, and results do not depend on how probes are batched."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, j, batch]).generate_state(1)[0]))
            for j in range(start, start + k)]


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


def _row_sums(t: torch.Tensor, what: str) -> np.ndarray:
    """(k,) float64 sums of each row of ``t`` (k, ...), refusing a non-finite ``t``. The finiteness
    check runs on the k sums (a NaN/inf anywhere makes its row's sum non-finite), not on every
    element — on a word-embedding gradient that check alone cost ~20 % of a probe; only a sum that
    overflowed float32 sends the rows to float64."""
    s = t.flatten(1).sum(1)
    if not torch.isfinite(s).all():
        _check(t, what)
        s = t.flatten(1).double().sum(1)
    return s.double().numpy()


def _probe_chunk_weight(ctx, params, start, k, nb):
    """(k, L) per-probe layer estimates mean_b v_b,l·(H_b v_b)_l: one batched HVP per batch."""
    est = np.zeros((k, len(params)))
    seen = np.zeros(len(params), dtype=bool)
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
        gens = _probe_gens(ctx.seed, start, k, bi)
        vs = {i: _stacked(params[i].shape, gens) for i in live}
        hv = _grad([grads[i] for i in live], [params[i] for i in live], [vs[i] for i in live], k,
                   allow_unused=True)
        for i, h in zip(live, hv):
            if h is not None:
                est[:, i] += _row_sums(vs[i] * h, f"Hessian-vector product of {ctx.names[i]}") / nb
    return est, seen


def _probe_chunk_output(ctx, params, start, k, nb):
    """(k, L) per-probe estimates mean_b ‖(J_bᵀ S_b u_b)_l‖²: one batched backward per batch."""
    est = np.zeros((k, len(params)))
    seen = np.zeros(len(params), dtype=bool)
    for bi, batch in enumerate(ctx.batches):
        t = ctx.loss_fn.output(ctx.model, batch)      # (the loss itself is 0 here: fp point)
        _check(t, f"model output on batch {bi}")
        w = ctx.loss_fn.hessian_sqrt(batch, _stacked(t.shape, _probe_gens(ctx.seed, start, k, bi))).to(t.dtype)
        gs = _grad([t], params, [w], k, allow_unused=True)
        for i, g in enumerate(gs):
            if g is not None:
                seen[i] = True
                est[:, i] += _row_sums(g.pow(2), f"gradient of {ctx.names[i]}") / nb    # fp32 sums: 4x faster
    return est, seen


def auto_max_probes(mode: str, cells: int, min_probes: int = 8) -> int:
    """Probe cap when ``max_probes=None``: spend at most ``MEASURE_MULTIPLE`` × the forwards that
    ``measured`` would take ((allowed cells + 1) per batch), at ``PROBE_FORWARDS[mode]`` forward
    equivalents per probe and batch; within [min_probes, AUTO_MAX_PROBES].

    Example: ``auto_max_probes("weight", 28)`` -> 11 (7 layers x 4 options of a small CNN)
    """
    cap = int(MEASURE_MULTIPLE * (cells + 1) / PROBE_FORWARDS[mode])
    return max(min_probes, min(AUTO_MAX_PROBES, cap))


def settled(a: np.ndarray, seen: np.ndarray, tol: float, impact=None, negligible: float = 0.0) -> np.ndarray:
    """(L,) bool: layers whose trace needs no more probes, from the per-probe estimates a (P, L).

    A layer is settled when its standard error is ≤ ``tol`` × |trace| (or 0, or it gets no gradient)
    — or, given ``impact`` (L,) (the table's loss per unit trace, e.g. max_b ‖ΔW_l,b‖² / n_l), when
    even its upper estimate (|trace| + 2 se) · impact is below ``negligible`` × the total predicted
    impact Σ |trace| · impact: a layer whose share of the loss is negligible cannot move the plan,
    and its near-zero trace would otherwise need thousands of probes for a relative tolerance.

    Example: ``settled(rows, seen, 0.05, impact=w, negligible=0.01).all()``
    """
    mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
    ok = (se <= tol * np.abs(mean)) | (se == 0) | ~seen
    if impact is not None and negligible > 0:
        total = float((np.abs(mean) * impact).sum())
        ok |= (np.abs(mean) + 2 * se) * impact < negligible * total
    return ok


def hutchinson_traces(ctx: ScoreContext, tol: float = 0.05, min_probes: int = 8, max_probes: int | None = None,
                      probe_batch: int = 4, probe: str = "auto", impact=None, negligible: float = 0.01):
    """Per-layer traces (L,), standard errors (L,), probe count, and a dict of details.

    ``max_probes=None``: :func:`auto_max_probes` (a cost cap relative to measuring). ``impact`` (L,)
    enables the negligible-share rule of :func:`settled`.

    Example: ``tr, se, n, info = hutchinson_traces(ctx, tol=0.05)``
    """
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r} is not supported; allowed: {list(PROBES)}")
    if not (isinstance(min_probes, int) and min_probes >= 2 and (max_probes is None or (
            isinstance(max_probes, int) and max_probes >= 2))):
        raise ValueError(f"min_probes={min_probes!r} and max_probes={max_probes!r} must be integers >= 2 "
                         "(a standard error needs two probes; max_probes=None: automatic cap)")
    if not (isinstance(probe_batch, int) and probe_batch >= 1):
        raise ValueError(f"probe_batch={probe_batch!r} must be a positive int")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be > 0 (relative standard error of each trace)")
    if not (isinstance(negligible, (int, float)) and 0 <= negligible < 1):
        raise ValueError(f"negligible={negligible!r} must be a number in [0, 1) (share of the total impact)")
    label_free = isinstance(ctx.loss_fn, LabelFreeLoss)
    if probe == "output" and not label_free:
        raise ValueError("probe='output' needs the built-in label-free loss (loss_fn=None, 'kl' or 'mse'), "
                         "where the Hessian equals the Gauss-Newton matrix; use probe='weight'")
    mode = "output" if probe == "output" or (probe == "auto" and label_free) else "weight"
    cap_rule = "given"
    if max_probes is None:
        max_probes, cap_rule = auto_max_probes(mode, int(np.asarray(ctx.allowed).sum()), min_probes), "auto"
    min_probes = min(min_probes, max_probes)
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
            mine = chunk(ctx, params, *chunks[rank], nb) if rank < len(chunks) else None
            parts = ctx.ranks.gather(mine, f"hessian probes {len(rows)}..{n}") if world > 1 else [mine]
            for est, s in parts[:len(chunks)]:        # in probe order, one process's stopping rule
                rows.extend(est)
                seen |= s
                if len(rows) >= min_probes and settled(np.array(rows), seen, tol, impact, negligible).all():
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
    ok = settled(a, seen, tol)
    tot = a.sum(1)                                                   # (probes,) Σ_l: whole-model trace
    info = {"probe_mode": mode, "converged": converged, "total_trace": float(tot.mean()),
            "total_trace_stderr": float(tot.std(ddof=1) / np.sqrt(len(tot))),
            "no_grad_layers": [n for n, s in zip(ctx.names, seen) if not s],
            "max_probes": int(max_probes), "max_probes_rule": cap_rule, "negligible": float(negligible),
            "negligible_layers": [n for n, o, s in zip(ctx.names, ok, settled(a, seen, tol, impact, negligible))
                                  if s and not o],
            "hvps": int(len(a) * nb)}
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
def hessian(ctx: ScoreContext, tol: float = 0.05, min_probes: int = 8, max_probes: int | None = None,
            probe_batch: int = 4, probe: str = "auto", backend: str = "bitplan", negligible: float = 0.01):
    """HAWQ-V3 loss table (L, B) = ½ · max(Tr H_l, 0) / n_l · ‖Q_b(W_l) − W_l‖².

    Example: ``score(model, batches, method="hessian", tol=0.05, max_probes=64)``
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {list(BACKENDS)}")
    n = np.array([l.n_params for l in ctx.graph.layers], dtype=np.float64)     # (L,)
    d = ctx.delta_sq()                                                           # (L, B)
    if backend == "pyhessian":
        tr, se, probes, info = pyhessian_traces(ctx, AUTO_MAX_PROBES if max_probes is None else max_probes)
    else:
        impact = 0.5 * d.max(1) / n                    # (L,) table loss per unit trace, at the worst option
        tr, se, probes, info = hutchinson_traces(ctx, tol, min_probes, max_probes, probe_batch, probe,
                                                 impact, negligible)
    loss = 0.5 * (np.maximum(tr, 0.0) / n)[:, None] * d                          # (L, B)
    return loss, {"trace": tr, "trace_stderr": se, "probes": int(probes), "tol": tol,
                  "backend": backend, **info}
