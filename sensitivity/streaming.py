"""Block-streaming sensitivity for Hugging Face decoder LMs: memory that does not grow with depth.

The model is never whole in memory. Only the modules outside the decoder blocks (embeddings, final
norm, lm_head) and ONE decoder block at a time are materialised, read tensor by tensor from the
folder's safetensors shards (``hf_stream.StreamedLM``); the calibration hidden states (fp path) are
carried from block to block, as GPTQ-style tools do (Frantar et al., "GPTQ", ICLR 2023, §4).

The score is a block-local signal in loss units, built on the linearity result of HIGGS
(Malinovskii et al., "Pushing the Limits of Large Language Model Quantization via the Linearity
Theorem", NAACL 2025): in the medium-bit regime the perplexity / KL increase of a quantized model
is ≈ Σ_l α_l · (error of layer l), each layer's error entering additively. Here

    loss[l, b] = A · D_l(b),      D_l(b) = mean over calibration tokens of ‖Y_k(W_l ← Q_b(W_l)) − Y_k‖²

- ``D_l(b)``: how far quantizing only layer l (in block k) moves block k's output ``Y_k`` (the
  residual stream after the block), on the carried fp inputs. It sees everything inside the block
  that a layer-output error misses: the softmax of attention, the SwiGLU gate, the norms.
  Measuring it for every option costs one block forward per (layer, option) (``measure="all"``).
  The default ``measure="anchor"`` measures two options per layer (bits nearest 4, and the fewest
  bits, where linearity is worst) and carries them to the others through the layer's exact output
  error ``e_l(b) = E‖ΔW_b x‖²`` (from the block's input statistics): ``D_l(b) ≈ γ_l · e_l(b)``,
  ``γ_l = D_l(anchor) / e_l(anchor)``, linear in bits between the two anchors — HIGGS' linearity
  inside the block, corrected for where it bends. Only ratios of ``e`` matter, so for rounding errors independent
  across input channels (rtn, clip) the diagonal ``E[x_k²]`` is enough and only it is collected;
  methods that shape ΔW against the inputs (gptq, awq) get the exact ``tr(ΔW Σ ΔWᵀ)`` from the full
  ``Σ x xᵀ``, collected only for blocks where such an option is allowed. Options with activation
  quantization are always measured.
- ``A``: the loss (KL of the next-token distribution to the fp one) per unit of squared
  perturbation of the final residual stream, measured at the end by adding isotropic noise to the
  final hidden states and running the model's own head.
- ``G_k``: how much of a perturbation of block k's output reaches the final stream. In a pre-norm
  decoder the skip connections carry it forward additively (to first order G = 1), but later blocks
  amplify or damp it: noise added to the output of ``probes`` evenly spaced blocks (on
  ``probe_batches`` batches) is carried with the fp states to the last block, and
  ``G_k = ‖Δ final‖² / ‖noise‖²`` (log-linear between probed blocks, 1 at the last). So
  ``loss[l, b] = A · G_k · D_l(b)``. What remains neglected — perturbations that are not isotropic,
  non-additive interactions — is what ``benchmarks/sensitivity_validity.py`` measures (Spearman ρ
  against whole-model Δloss, with and without the probes).
- Embeddings: ``D`` is the move of block 0's OUTPUT with the table quantized (its input, the
  embedding output, is a small stream that trained models' first block normalises and amplifies:
  measured at the input, the embedding of the trained 4-block Llama of sensitivity_validity.py
  scored ~1/100 of its measured Δloss and ρ was 0.90; at block 0's output ρ is 0.968). Its ``e``
  is exact and free: ``Σ_v count(v) ‖ΔE_v‖²`` over the calibration tokens' rows.
- lm_head: its KL is measured on the final fp hidden states — at the anchor option, carried to the
  others by its output error as above (``measure="all"``: every option). A tied embedding/lm_head
  (one decision) gets both terms.

Cost: one pass over the blocks; per block one fp forward over the calibration tokens plus one
forward over ``anchor_batches`` batches per layer and measured option, and one per live probe on
``probe_batches``; then the head: references,
``noise_draws`` noisy passes and one pass per measured lm_head option. Peak memory = outer modules
+ one block + calibration activations.

In an initialised ``torch.distributed`` process group (call it on every rank) the calibration
batches are sharded over the ranks (batch ``i`` on rank ``i % world``); each rank carries its own
hidden states plus the few anchor / probe batches (replicated), the anchor cells (layer, anchored
option) and the probes are dealt round-robin over the ranks, and every sum the table is made of
(block errors and their token counts, input statistics, KL sums, embedding token counts, probe
gains) is all-reduced, so every rank gets the same table — the one a single process computes, up
to floating-point summation order.

Example:
    >>> t = score("path/to/llama", batches, method="block", bits=(2, 3, 4, 8))
    >>> t.meta["peak_block_params"], t.meta["alpha"]
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..core.batches import as_batches
from ..core.graph import LayerGraph, layer_weight_2d
from ..kernels.calibstats import StatsCollector, layer_input_2d
from ..kernels.modules import ActFakeQuant, fake_weight, needs_stats, option_mask
from .hf_stream import StreamedLM, run_uncached, source_dir
from .losses import kl_to_reference
from .registry import register
from .stream_checkpoint import BlockCheckpoint
from .table import Sensitivity

__all__ = ["block", "MEASURE"]

MEASURE = ("anchor", "all")


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).sum())


def _ntok(x: torch.Tensor) -> int:
    return x[..., 0].numel()


def _anchors(specs, allowed_row, n: int) -> list[int]:
    """Up to ``n`` measured weight-only options: the one with bits nearest 4 (ties: the first), where
    linearity is best, then the one with the fewest bits, where it is worst."""
    cand = [j for j, s in enumerate(specs) if allowed_row[j] and s.act_bits is None]
    if not cand:
        return []
    out = [min(cand, key=lambda j: abs(specs[j].bits - 4))]
    low = min(cand, key=lambda j: specs[j].bits)
    if n > 1 and specs[low].bits < specs[out[0]].bits:
        out.append(low)
    return out


def _measured(specs, allowed_row, measure: str, n_anchors: int) -> tuple[list[int], list[int]]:
    """(anchors, options whose error is measured) of one layer: every allowed one for "all"; else the
    anchors and the options with activation quantization (which no weight error predicts)."""
    a = _anchors(specs, allowed_row, n_anchors)
    ok = np.nonzero(allowed_row)[0]
    return a, [int(j) for j in ok if measure == "all" or j in a or specs[j].act_bits is not None]


@contextlib.contextmanager
def _perturbed(mod, w, act_bits):
    """``mod`` with weight ``w`` (and its input fake-quantized to ``act_bits``) inside the context."""
    saved = mod.weight.detach().clone()
    hook = None
    with torch.no_grad():
        mod.weight.copy_(w)
    if act_bits is not None:
        hook = mod.register_forward_pre_hook(ActFakeQuant(act_bits))
    try:
        yield mod
    finally:
        if hook is not None:
            hook.remove()
        with torch.no_grad():
            mod.weight.copy_(saved)


class _Diag:
    """Forward pre-hooks summing ``x_k²`` per input channel (and counting tokens) of named layers:
    what the output-error ratios of independent rounding errors need, at a fraction of ``Σ x xᵀ``."""

    def __init__(self, modules: dict, kinds: dict):
        self.sq = {}
        self.n = {}
        self._h = [m.register_forward_pre_hook(self._hook(n, m, kinds[n])) for n, m in modules.items()]

    def _hook(self, name, mod, kind):
        def fn(module, args):
            x2 = layer_input_2d(mod, kind, args[0]).detach().float()
            self.sq[name] = self.sq.get(name, 0) + x2.pow(2).sum(0)
            self.n[name] = self.n.get(name, 0) + int(x2.shape[0])
        return fn

    def close(self):
        for h in self._h:
            h.remove()


def _error(w2, wq2, st, diag, n, spec) -> float:
    """Output error of ΔW = wq2 − w2 (both (N, K)): exact tr(ΔW Σ ΔWᵀ) when the method shapes ΔW
    against the inputs and full stats are there, else Σ_k ‖ΔW_:k‖² E[x_k²]."""
    dw = wq2.float() - w2
    if needs_stats(spec) and st is not None:
        return st.output_error(dw)
    return float((dw.pow(2) * (diag / max(n, 1))).sum())


@register("block", streaming=True)
def block(model, calib_data, specs, graph: LayerGraph | None = None, loss_fn=None, seed: int = 0,
          measure: str = "anchor", noise_draws: int = 2, noise_rel: float = 0.03,
          anchor_batches: int | None = 1, timeout: float | None = None, checkpoint=None,
          checkpoint_every: float = 60.0, probes: int = 8, probe_batches: int = 1,
          anchors: int = 2) -> Sensitivity:
    """Block-streaming table (L, B) for a causal-LM folder (see the module docstring).

    ``model``: the folder, or a model loaded from one (only its config's folder is used; its weights
    are never read). ``measure``: "anchor" (``anchors`` measured options per layer, default) or "all".
    ``anchors``: measured options per layer (1: bits nearest 4; 2: also the fewest bits, γ linear in
    bits between them). ``anchor_batches``: calibration batches the anchors' errors are measured on (γ is a ratio of
    two errors on the same tokens, so a few batches suffice; None = all); "all" uses every batch.
    ``probes``: blocks (evenly spaced) whose output gets an isotropic noise probe carried to the end,
    measuring how later blocks amplify or damp a perturbation of the stream there (``gain``; between
    probes interpolated in log space; 0 = assume 1 everywhere), on ``probe_batches`` batches.
    ``timeout``: seconds one rank may lag the others in a process group. ``checkpoint`` (a path):
    after a block, at most every ``checkpoint_every`` seconds, the rows scored so far go to that
    JSON file and each rank's carried hidden states to ``<checkpoint>.rank<r>.safetensors``; a rerun
    with the same folder, batches and settings resumes at the next block (the same table as an
    uninterrupted run); the files are removed when the table is complete.

    Example: ``score("llama_dir", batches, method="block", measure="all")``
    """
    from .distributed import current
    t0 = time.perf_counter()
    if measure not in MEASURE:
        raise ValueError(f"measure={measure!r}; allowed: {list(MEASURE)}")
    if loss_fn not in (None, "kl") and getattr(loss_fn, "kind", None) != "kl":
        raise ValueError(f"sensitivity method 'block' predicts the label-free next-token KL; loss_fn={loss_fn!r} "
                         "is not supported (use loss_fn=None, or a whole-model method such as 'measured')")
    if anchors not in (1, 2):
        raise ValueError(f"anchors={anchors!r}; allowed: 1 (bits nearest 4) or 2 (also the fewest bits)")
    if anchor_batches is not None and (isinstance(anchor_batches, bool) or not isinstance(anchor_batches, int)
                                       or anchor_batches < 1):
        raise ValueError(f"anchor_batches={anchor_batches!r} must be a positive int or None (all batches)")
    path = source_dir(model)
    batches = as_batches(calib_data)
    ranks = current(timeout)
    world, rank = (ranks.world, ranks.rank) if ranks else (1, 0)
    def allsum(x, what: str):
        """A sum over this rank's batches made global (all-reduced when there is a process group)."""
        return x if ranks is None else ranks.all_reduce(x, what)

    def allsum_many(xs: list, what: str) -> list:
        """Several such sums in one collective (a rank syncs once per block, not once per cell:
        a collective per cell would make the ranks take turns instead of working side by side)."""
        return list(xs) if ranks is None else ranks.all_reduce_many(list(xs), what)
    if len(batches) < world:
        raise ValueError(f"{len(batches)} calibration batch(es) for {world} ranks: method 'block' shards the "
                         "batches over the ranks, each needs at least one (more --calib-samples, or fewer ranks)")
    mine = list(range(rank, len(batches), world))          # global indices of this rank's batches
    nb_probe = min(probe_batches, len(batches)) if probes > 0 else 0
    nb_anchor = len(batches) if measure == "all" or not anchor_batches else min(anchor_batches, len(batches))
    lm = StreamedLM(path)
    graph = graph or LayerGraph.build(lm.model)
    allowed = np.asarray(option_mask(graph.layers, specs)[0], dtype=bool)              # (L, B)
    L, B = allowed.shape
    D = np.zeros((L, B))        # mean per token ‖Δ stream‖² with only layer l at option b
    head_kl = np.zeros((L, B))  # KL of the head (lm_head layers)
    gamma = np.full(L, np.nan)
    row = {n: i for i, n in enumerate(graph.names)}
    fwd = 0
    # local batches: this rank's own, then the anchor / probe batches other ranks own (replicated:
    # every rank carries them, so the anchor cells and the probes can be split over the ranks)
    loc = mine + [g for g in range(max(nb_anchor if measure != "all" else 0, nb_probe)) if g % world != rank]
    own = len(mine)                                             # loc[:own]: the batches sums run over
    my_b = [batches[g] for g in loc]
    sub = sorted((q for q, g in enumerate(loc) if g < nb_anchor), key=lambda q: loc[q])   # anchor batches
    pb = sorted((q for q, g in enumerate(loc) if g < nb_probe), key=lambda q: loc[q])     # probe batches
    cells = {"forward": 0, "error": 0}       # cells dealt so far (the same count on every rank)

    def my_cell(kind: str = "forward") -> bool:
        """Is the next cell of this kind this rank's? Round-robin, each cell computed by one rank;
        "forward" (a measured anchor: block forwards) and "error" (an option's output error: a
        quantizer run) are dealt separately, so the ranks get equal shares of each."""
        cells[kind] += 1
        return (cells[kind] - 1) % world == rank

    def deal(j, a, todo) -> tuple[bool, list]:
        """Option ``j`` of a layer with anchors ``a`` and measured options ``todo``: (is its output
        error computed here, the local batches it is measured on here). An anchor is one rank's
        (its error and its forwards on the anchor batches: the option is quantized once); another
        measured option runs on every rank's own batches, its error on one rank."""
        if j in todo and measure != "all" and j in a:
            return (True, sub) if my_cell() else (False, [])
        return my_cell("error"), ([] if j not in todo else list(range(own)))
    n_blk = len(lm.block_names)
    at = sorted({int(round(x)) for x in np.linspace(0, n_blk - 1, min(probes, n_blk))}) if probes > 0 else []
    at = [k for k in at if k < n_blk - 1]                       # the last block's gain is 1: nothing follows
    probe_x, probe_sq = {}, {}                                  # start block -> noisy states, Σ noise²

    def global_stats(ns, diag, col, full, what):
        """{n: (Σ x_k², tokens, full LayerStats or None)} of layers ``ns``' inputs over every
        rank's batches (one collective); ``full``: the layers whose ``col`` stats are needed."""
        parts = []
        for n in ns:
            parts += [diag.sq.get(n, torch.zeros(1)), float(diag.n.get(n, 0))]
            if n in full:
                parts += [col.stats[n].xtx, col.stats[n].abs_sum]
        parts, out = allsum_many(parts, what), {}
        for n in ns:
            sq, cnt = parts.pop(0), int(parts.pop(0))
            st = None
            if n in full:
                st = col.stats[n]
                st.xtx, st.abs_sum, st.n_tokens = parts.pop(0), parts.pop(0), cnt
            out[n] = (sq, cnt, st)
        return out

    def local_sums(fn, idx, hs):
        """[Σ fn(q), Σ tokens] over local batches ``idx`` (states ``hs``): one rank's share of a
        mean that the ranks' shares make whole once summed (a replicated batch is in one rank's idx)."""
        return np.array([sum(fn(q) for q in idx), sum(_ntok(hs[q]) for q in idx)], dtype=np.float64)

    def ratio(s) -> float:
        return float(s[0]) / max(float(s[1]), 1.0)

    ck = BlockCheckpoint(checkpoint, ranks, lm, graph, specs, batches, {
        "seed": seed, "measure": measure, "noise_draws": noise_draws, "noise_rel": noise_rel,
        "anchor_batches": anchor_batches, "probes": probes, "probe_batches": probe_batches,
        "anchors": anchors}) \
        if checkpoint is not None else None
    start = 0
    if ck is not None and ck.state:
        start, fwd = ck.state["next_block"], ck.state["block_forwards"]
        probe_sq = {int(k): v for k, v in ck.state["probe_sq"].items()}
        D[:], gamma[:] = np.array(ck.state["D"]), np.array(ck.state["gamma"], dtype=float)
        gamma[gamma < 0] = np.nan                  # saved as -1: no anchor (γ itself is >= 0)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lm.load_outer()
        in_block = {lname: blk for blk in lm.block_names for lname in graph.names if lname.startswith(blk + ".")}
        outer = [l for l in graph.layers if l.name not in in_block]
        emb_layers = [l for l in outer if "embedding" in l.kinds]
        # ---- fp inputs of block 0 (this rank's batches), and how often each embedding row is read
        counts, hooks = {}, []
        for l in emb_layers:
            mod = lm.model.get_submodule(l.name)
            counts[l.name] = torch.zeros(mod.weight.shape[0], dtype=torch.float64)

            def cnt(m, args, name=l.name):
                counts[name] += torch.bincount(args[0].reshape(-1), minlength=counts[name].numel()).double()
            hooks.append(mod.register_forward_pre_hook(cnt))
        try:
            h, kws = lm.block_inputs(my_b[:own], run_uncached)
        finally:
            for hk in hooks:
                hk.remove()
        h2, kws2 = lm.block_inputs(my_b[own:], run_uncached)          # replicated batches: not counted
        h, kws = h + h2, kws + kws2
        tokens = int(allsum(float(sum(_ntok(x) for x in h[:own])), "counting calibration tokens"))
        if start:                   # resumed: the carried hidden states entering block `start`
            h, probe_x = ck.hidden(start, [x.shape for x in h],
                                   {k: [h[q].shape for q in pb] for k in probe_sq if at.index(k) % world == rank})
            emb_layers = []         # their rows were scored at block 0
        # ---- embeddings: exact row errors; block-0 inputs for the measured options
        emb_e, emb_in = {}, {}
        emb_cnt = allsum_many([counts[l.name] for l in emb_layers], "embedding counts")
        for l, cnt in zip(emb_layers, emb_cnt):
            i, mod = row[l.name], lm.model.get_submodule(l.name)
            w = mod.weight.detach().float()
            e = np.zeros(B)
            a, todo = _measured(specs, allowed[i], measure, anchors)
            for j in np.nonzero(allowed[i])[0]:
                mine_e, idx = deal(j, a, todo)
                if not (mine_e or idx):
                    continue
                wq = fake_weight(mod, l.kind, specs[j])
                if mine_e:
                    e[j] = float(((wq.float() - w).pow(2).sum(1).double() * cnt).sum() / max(float(cnt.sum()), 1.0))
                if idx:
                    with _perturbed(mod, wq, None):
                        emb_in[i, j] = (idx, lm.block_inputs([my_b[q] for q in idx], run_uncached)[0])
            emb_e[i] = (a, todo, e)
        # ---- decoder blocks, one at a time
        for k, bname in enumerate(lm.block_names):
            if k < start:
                continue
            names = [n for n in graph.names if in_block.get(n) == bname]
            with lm.materialised(bname) as blk:
                mods = {n: lm.model.get_submodule(n) for n in names}
                kinds = {n: graph.layers[row[n]].kind for n in names}
                full = [n for n in names if any(needs_stats(specs[j]) for j in np.nonzero(allowed[row[n]])[0])]
                diag = _Diag(mods, kinds)
                try:
                    with StatsCollector({n: mods[n] for n in full}) if full else contextlib.nullcontext() as col:
                        y = [lm.run_block(k, x, kw) for x, kw in zip(h[:own], kws[:own])]
                finally:
                    diag.close()
                fwd += 1
                # the statistics are made global first; a rank's replicated batches (no statistics)
                # run after that collective, while the others start on their cells
                stats = global_stats(names, diag, col, full, f"input statistics of block {k}")
                y += [lm.run_block(k, x, kw) for x, kw in zip(h[own:], kws[own:])]
                # this rank's shares, made whole by ONE collective at the end of the block:
                # option output errors (L-rows) and [Σ ‖Δ stream‖², tokens] per measured cell
                errs, sums = {}, {}
                if k == 0:
                    # embeddings, where block 0 has amplified them: the embedding output is a small
                    # stream that the first block normalises and writes a much larger one from
                    for i, (a, todo, e) in emb_e.items():
                        errs[i] = e
                        for j in todo:        # every cell on every rank (zeros where not this rank's)
                            idx, hq = emb_in.get((i, j), ([], []))
                            sums[i, j] = local_sums(lambda q: _sq(lm.run_block(0, hq[idx.index(q)], kws[q]), y[q]),
                                                    idx, h)
                            fwd += 1
                    emb_in = {}
                for n in names:
                    i, mod, info = row[n], mods[n], graph.layers[row[n]]
                    sq, cnt, st = stats[n]
                    w2 = layer_weight_2d(mod, info.kind).detach().float()
                    a, todo = _measured(specs, allowed[i], measure, anchors)
                    errs[i] = np.zeros(B)
                    for j in np.nonzero(allowed[i])[0]:
                        mine_e, idx = deal(j, a, todo)
                        wq = fake_weight(mod, info.kind, specs[j], st) if mine_e or idx else None
                        if mine_e:
                            errs[i][j] = _error(w2, layer_weight_2d(_Tmp(wq), info.kind), st, sq, cnt, specs[j])
                        if j in todo:
                            with _perturbed(mod, wq, specs[j].act_bits) if idx else contextlib.nullcontext():
                                sums[i, j] = local_sums(lambda q: _sq(lm.run_block(k, h[q], kws[q]), y[q]), idx, h)
                            fwd += 1
                for k0, xs in probe_x.items():        # the probes started before: on through this block
                    probe_x[k0] = [lm.run_block(k, x, kws[q]) for q, x in zip(pb, xs)]
                fwd += sum(k0 < k for k0 in at)       # (counted as one process counts them)
                sq_k = 0.0
                if k in at and at.index(k) % world == rank:   # a new probe: noise on this block's output
                    probe_x[k] = []                           # (one rank's, round-robin)
                    for q in pb:
                        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (k + 1) + loc[q])
                        eps = torch.randn(y[q].shape, generator=gen, dtype=y[q].dtype) * (
                            noise_rel * float(y[q].float().pow(2).mean().sqrt()))
                        probe_x[k].append(y[q] + eps)
                        sq_k += float(eps.pow(2).sum())
                red = allsum_many([*errs.values(), *sums.values(), sq_k], f"errors of block {k}")
                if k in at:
                    probe_sq[k] = red[-1]
                errs = dict(zip(errs, red[:len(errs)]))
                for (i, j), s2 in zip(sums, red[len(errs):-1]):
                    D[i, j] = ratio(s2)
                for i, e in errs.items():
                    a, todo = _measured(specs, allowed[i], measure, anchors)
                    _carry(D, gamma, i, a, todo, e, allowed[i], specs)
                del blk
            h = y
            if ck is not None and k + 1 < len(lm.block_names) and ck.due(checkpoint_every):
                ck.save(k + 1, h, D, gamma, fwd, probe_x, probe_sq)
        # ---- the head: reference output, A from isotropic noise, lm_head options
        heads = [l for l in outer if not all(kd == "embedding" for kd in l.kinds)]
        with lm.head_only() as set_final:
            def logits(x, b):
                set_final(x)
                out = run_uncached(lm.model, b)
                return out["logits"] if isinstance(out, dict) else out.logits
            head_mods = {l.name: next(lm.model.get_submodule(m) for m, kd in zip(l.modules, l.kinds)
                                      if kd != "embedding") for l in heads}
            head_kind = {l.name: l.kind if l.kind != "embedding" else "linear" for l in heads}
            full = [n for n in head_mods if any(needs_stats(specs[j]) for j in np.nonzero(allowed[row[n]])[0])]
            diag = _Diag(head_mods, head_kind) if head_mods else None
            try:
                with StatsCollector({n: head_mods[n] for n in full}) if full else contextlib.nullcontext() as col:
                    refs = [logits(x, b) for x, b in zip(h[:own], my_b[:own])]
            finally:
                if diag is not None:
                    diag.close()
            hstats = global_stats(list(head_mods), diag, col, full, "input statistics of the head") \
                if head_mods else {}
            refs += [logits(x, b) for x, b in zip(h[own:], my_b[own:])]      # replicated: no statistics
            noise = []                                  # per draw: this rank's [Σ KL·tokens, Σ noise²]
            for d in range(noise_draws):
                kl, s = 0.0, 0.0
                for x, b, r, g in zip(h[:own], my_b[:own], refs, mine):
                    # one generator per (draw, batch): the noise does not depend on which rank holds it
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + d * 65_537 + g)
                    sigma = noise_rel * float(x.float().pow(2).mean().sqrt())
                    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype) * sigma
                    kl += float(kl_to_reference(logits(x + eps, b), r)) * _ntok(x)
                    s += float(eps.pow(2).sum())
                noise.append(np.array([kl, s]))
            errs, sums = {}, {}                         # as in a block: this rank's shares
            for l in heads:
                i, mod = row[l.name], head_mods[l.name]
                sq, cnt, st = hstats[l.name]
                w2 = layer_weight_2d(mod, head_kind[l.name]).detach().float()
                a, todo = _measured(specs, allowed[i], measure, anchors)
                errs[i] = np.zeros(B)
                for j in np.nonzero(allowed[i])[0]:
                    mine_e, idx = deal(j, a, todo)
                    wq = fake_weight(mod, head_kind[l.name], specs[j], st) if mine_e or idx else None
                    if mine_e:
                        errs[i][j] = _error(w2, layer_weight_2d(_Tmp(wq), head_kind[l.name]), st, sq, cnt, specs[j])
                    if j in todo:
                        with _perturbed(mod, wq, specs[j].act_bits) if idx else contextlib.nullcontext():
                            sums[i, j] = local_sums(lambda q: float(kl_to_reference(logits(h[q], my_b[q]), refs[q]))
                                                    * _ntok(h[q]), idx, h)
            red = allsum_many([*noise, *errs.values(), *sums.values()], "head errors")
            ratios = [float(kl) / max(float(s), 1e-30) for kl, s in red[:noise_draws]]
            alpha = float(np.mean(ratios))
            errs = dict(zip(errs, red[noise_draws:noise_draws + len(errs)]))
            for (i, j), s2 in zip(sums, red[noise_draws + len(errs):]):
                head_kl[i, j] = ratio(s2)
            for i, e in errs.items():
                a, todo = _measured(specs, allowed[i], measure, anchors)
                _carry(head_kl[i][None, :], np.full(1, np.nan), 0, a, todo, e, allowed[i], specs)
    # ---- gains: how much of a perturbation of block k's output reaches the final stream
    moved = allsum_many([sum(_sq(x, h[q]) for q, x in zip(pb, probe_x.get(k0, ()))) for k0 in at], "probe gains")
    pts = {k0: float(v) / max(probe_sq[k0], 1e-30) for k0, v in zip(at, moved)}
    gain = _gains(pts, n_blk)
    blk_of = np.array([lm.block_names.index(in_block[n]) if n in in_block else 0 for n in graph.names])
    row_gain = np.where([l.name in in_block or "embedding" in l.kinds for l in graph.layers], gain[blk_of], 1.0)
    loss = np.where(allowed, alpha * D * row_gain[:, None] + head_kl, 0.0)
    meta = {"alpha": alpha, "alpha_draws": ratios, "block_gain": gain.tolist(), "probe_blocks": sorted(pts), "gamma": np.nan_to_num(gamma).tolist(), "block_sq_err": D,
            "head_kl": head_kl, "measure": measure, "anchors": anchors, "anchor_batches": anchor_batches, "block_forwards": fwd,
            "blocks": len(lm.block_names), "peak_block_params": lm.peak_block_params,
            "block_params": max(sum(p.numel() for p in b.parameters()) for b in lm.blocks),
            "bytes_read": lm.shards.bytes_read, "tokens": tokens, "source": path,
            "seconds": time.perf_counter() - t0, "loss": "label-free kl to the fp model's output (block-local)",
            "batches": len(batches)}
    if ranks is not None:
        meta["world_size"] = world
    if ck is not None:
        meta["resumed"] = start             # blocks read back from the checkpoint
        ck.finish()
    return Sensitivity(graph.names, tuple(specs), np.maximum(loss, 0.0), "block", allowed,
                       graph.fingerprint, meta)


def _gains(points: dict, n: int) -> np.ndarray:
    """(n,) gain per block from the probed ones (the last block's is 1), log-linear in between."""
    pts = {**{k: max(v, 1e-12) for k, v in points.items()}, n - 1: 1.0}
    ks = sorted(pts)
    return np.exp(np.interp(np.arange(n), ks, np.log([pts[k] for k in ks])))


def _carry(D, gamma, i, anchors, todo, e, allowed_row, specs) -> None:
    """Options of row ``i`` not measured get ``γ(bits) · e`` (in place): ``γ = D[i, a] / e[a]`` at each
    anchor ``a``, linear in bits between two anchors, the nearest one's outside; ``gamma[i]`` keeps the
    first anchor's."""
    if not anchors:
        return
    g = {specs[a].bits: (D[i, a] / e[a] if e[a] > 0 else 0.0) for a in reversed(anchors)}
    gamma[i] = D[i, anchors[0]] / e[anchors[0]] if e[anchors[0]] > 0 else 0.0
    xs = sorted(g)
    for j in np.nonzero(allowed_row)[0]:
        if j not in todo:
            D[i, j] = float(np.interp(specs[j].bits, xs, [g[x] for x in xs])) * e[j]


class _Tmp:
    """Holds a weight so ``layer_weight_2d`` can view it in the module's layout."""

    def __init__(self, w):
        self.weight = w
