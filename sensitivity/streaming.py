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
  The default ``measure="anchor"`` measures ONE option per layer (bits nearest 4) and carries it
  to the others through the layer's exact output error ``e_l(b) = E‖ΔW_b x‖²`` (from the block's
  input statistics ``Σ x xᵀ``): ``D_l(b) ≈ γ_l · e_l(b)``, ``γ_l = D_l(anchor) / e_l(anchor)`` —
  HIGGS' linearity inside the block. Options with activation quantization are always measured.
- ``A``: the loss (KL of the next-token distribution to the fp one) per unit of squared
  perturbation of the final residual stream, measured at the end by adding isotropic noise to the
  final hidden states and running the model's own head. The same ``A`` serves every block: in a
  pre-norm decoder a perturbation of the residual stream is carried forward additively by the skip
  connections (each later block reads a normalised stream and adds to it), so to first order it
  reaches the head unchanged; blocks differ only by how far their layers move the stream, which
  ``D`` measures. What this neglects — later blocks amplifying or damping a perturbation — is
  what ``benchmarks/sensitivity_validity.py`` measures (Spearman ρ against whole-model Δloss).
- Embeddings: ``D`` is the move of block 0's OUTPUT with the table quantized (its input, the
  embedding output, is a small stream that trained models' first block normalises and amplifies:
  measured at the input, the embedding of the trained 4-block Llama of sensitivity_validity.py
  scored ~1/100 of its measured Δloss and ρ was 0.90; at block 0's output ρ is 0.968).
  lm_head: its KL is measured exactly on the final fp hidden states (one head forward per option).
  A tied embedding/lm_head (one decision) gets both terms.

Cost: one pass over the blocks; per block, ``1 + Σ_l (measured options)`` forwards of that block
over the calibration tokens; peak memory = outer modules + one block + calibration activations.

Example:
    >>> t = score("path/to/llama", batches, method="block", bits=(2, 3, 4, 8))
    >>> t.meta["peak_block_params"], t.meta["alpha"]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..core.batches import as_batches, run_model
from ..core.graph import LayerGraph, layer_weight_2d
from ..kernels.actquant import fake_quantize_act
from ..kernels.calibstats import StatsCollector
from ..kernels.modules import fake_weight, needs_stats, option_mask
from .hf_stream import StreamedLM, source_dir
from .losses import kl_to_reference
from .registry import register
from .table import Sensitivity

__all__ = ["block", "MEASURE"]

MEASURE = ("anchor", "all")


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).sum())


def _anchor(specs, allowed_row) -> int:
    """The allowed weight-only option with bits nearest 4 (ties: the first): where linearity is best."""
    cand = [j for j, s in enumerate(specs) if allowed_row[j] and s.act_bits is None]
    return min(cand, key=lambda j: abs(specs[j].bits - 4)) if cand else -1


def _run(model, batch):
    """One batch through the model without a KV cache (blocks are replayed on the same inputs)."""
    if isinstance(batch, dict):
        return model(**batch, use_cache=False)
    return run_model(model, batch)


def _swap(module, w):
    saved = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.copy_(w)
    return saved


@register("block", streaming=True)
def block(model, calib_data, specs, graph: LayerGraph | None = None, loss_fn=None, seed: int = 0,
          measure: str = "anchor", noise_draws: int = 2, noise_rel: float = 0.03,
          anchor_batches: int | None = 2) -> Sensitivity:
    """Block-streaming table (L, B) for a causal-LM folder (see the module docstring).

    ``model``: the folder, or a model loaded from one (only its config's folder is used; its weights
    are never read). ``measure``: "anchor" (one measured option per layer, default) or "all".
    ``anchor_batches``: calibration batches the anchor's block error is measured on (γ is a ratio of
    two errors on the same tokens, so a few batches suffice; None = all); "all" uses every batch.

    Example: ``score("llama_dir", batches, method="block", measure="all")``
    """
    t0 = time.perf_counter()
    if measure not in MEASURE:
        raise ValueError(f"measure={measure!r}; allowed: {list(MEASURE)}")
    if loss_fn not in (None, "kl") and getattr(loss_fn, "kind", None) != "kl":
        raise ValueError(f"sensitivity method 'block' predicts the label-free next-token KL; loss_fn={loss_fn!r} "
                         "is not supported (use loss_fn=None, or a whole-model method such as 'measured')")
    path = source_dir(model)
    batches = as_batches(calib_data)
    lm = StreamedLM(path)
    graph = graph or LayerGraph.build(lm.model)
    allowed = np.asarray(option_mask(graph.layers, specs)[0], dtype=bool)              # (L, B)
    L, B = allowed.shape
    D = np.zeros((L, B))        # mean per token ‖Δ stream‖² with only layer l at option b
    head_kl = np.zeros((L, B))  # measured KL of the head (lm_head layers)
    gamma = np.full(L, np.nan)
    row = {n: i for i, n in enumerate(graph.names)}
    fwd = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lm.load_outer()
        h, kws = lm.block_inputs(batches, _run)
        tokens = sum(x[..., 0].numel() for x in h)
        in_block = {lname: blk for blk in lm.block_names for lname in graph.names if lname.startswith(blk + ".")}
        outer = [l for l in graph.layers if l.name not in in_block]
        # ---- embeddings: block 0's inputs with each option (their error is measured at block 0's output)
        emb_in = {}
        for l in outer:
            if "embedding" not in l.kinds:
                continue
            i, mod = row[l.name], lm.model.get_submodule(l.name)
            for j in np.nonzero(allowed[i])[0]:
                saved = _swap(mod, fake_weight(mod, l.kind, specs[j]))
                emb_in[i, j], _ = lm.block_inputs(batches[:anchor_batches or len(batches)], _run)
                _swap(mod, saved)
        # ---- decoder blocks, one at a time
        for k, bname in enumerate(lm.block_names):
            names = [n for n in graph.names if in_block.get(n) == bname]
            with lm.materialised(bname) as blk:
                mods = {n: lm.model.get_submodule(n) for n in names}
                with StatsCollector(mods) as col:
                    y = [lm.run_block(k, x, kw) for x, kw in zip(h, kws)]
                fwd += 1
                for (i, j), hq in (emb_in.items() if k == 0 else ()):
                    # where block 0 has amplified it: the embedding output is a small stream that the
                    # first block normalises and writes a much larger one from (trained models)
                    ntok = sum(x[..., 0].numel() for x in hq)
                    D[i, j] = sum(_sq(lm.run_block(0, x, kw), yy) for x, kw, yy in zip(hq, kws, y)) / ntok
                    fwd += 1
                emb_in = {}
                for n in names:
                    i, mod, info = row[n], mods[n], graph.layers[row[n]]
                    st = col.stats[n]
                    w2 = layer_weight_2d(mod, info.kind).detach().float()
                    e = np.zeros(B)
                    dcols = st.xtx.diagonal() / max(st.n_tokens, 1)                    # (K,) E[x_k²]
                    for j in np.nonzero(allowed[i])[0]:
                        wq = fake_weight(mod, info.kind, specs[j], st)
                        dw = layer_weight_2d(_Tmp(wq), info.kind).float() - w2                # (N, K)
                        # only ratios e(b)/e(anchor) matter: the diagonal of Σ is enough for rounding
                        # errors that are independent across input channels (rtn, clip); methods that
                        # shape ΔW against Σ (gptq, awq) get the exact tr(ΔW Σ ΔWᵀ)
                        e[j] = st.output_error(dw) if needs_stats(specs[j]) else float((dw.pow(2) * dcols).sum())
                    a = _anchor(specs, allowed[i])
                    todo = [j for j in np.nonzero(allowed[i])[0]
                            if measure == "all" or j == a or specs[j].act_bits is not None]
                    for j in todo:
                        saved = _swap(mod, fake_weight(mod, info.kind, specs[j], st))
                        hook = None
                        if specs[j].act_bits is not None:
                            bits = specs[j].act_bits
                            hook = mod.register_forward_pre_hook(
                                lambda m, args, b=bits: (fake_quantize_act(args[0], b),) + tuple(args[1:]))
                        nb = len(h) if (measure == "all" or j != a or not anchor_batches) else min(anchor_batches, len(h))
                        ntok = sum(x[..., 0].numel() for x in h[:nb])
                        try:
                            D[i, j] = sum(_sq(lm.run_block(k, x, kw), yy)
                                          for x, kw, yy in zip(h[:nb], kws[:nb], y[:nb])) / ntok
                        finally:
                            if hook is not None:
                                hook.remove()
                            _swap(mod, saved)
                        fwd += 1
                    if a >= 0:
                        gamma[i] = D[i, a] / e[a] if e[a] > 0 else 0.0
                        for j in np.nonzero(allowed[i])[0]:
                            if j not in todo:
                                D[i, j] = gamma[i] * e[j]
                del blk
            h = y
        # ---- the head: reference output, A from isotropic noise, lm_head options measured
        with lm.head_only() as set_final:
            def logits(x, b):
                set_final(x)
                out = _run(lm.model, b)
                return out["logits"] if isinstance(out, dict) else out.logits
            refs = [logits(x, b) for x, b in zip(h, batches)]
            gen = torch.Generator().manual_seed(seed)
            ratios = []
            for _ in range(noise_draws):
                kl, s = 0.0, 0.0
                for x, b, r in zip(h, batches, refs):
                    sigma = noise_rel * float(x.float().pow(2).mean().sqrt())
                    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype) * sigma
                    kl += float(kl_to_reference(logits(x + eps, b), r)) * x[..., 0].numel()
                    s += float(eps.pow(2).sum())
                ratios.append(kl / max(s, 1e-30))
            alpha = float(np.mean(ratios))
            for l in outer:
                if all(kd == "embedding" for kd in l.kinds):
                    continue
                i = row[l.name]
                mod = next(lm.model.get_submodule(m) for m, kd in zip(l.modules, l.kinds) if kd != "embedding")
                for j in np.nonzero(allowed[i])[0]:
                    saved = _swap(mod, fake_weight(mod, l.kind if l.kind != "embedding" else "linear", specs[j]))
                    head_kl[i, j] = sum(float(kl_to_reference(logits(x, b), r)) * x[..., 0].numel()
                                        for x, b, r in zip(h, batches, refs)) / tokens
                    _swap(mod, saved)
    loss = np.where(allowed, alpha * D + head_kl, 0.0)
    meta = {"alpha": alpha, "alpha_draws": ratios, "gamma": np.nan_to_num(gamma).tolist(), "block_sq_err": D,
            "head_kl": head_kl, "measure": measure, "anchor_batches": anchor_batches, "block_forwards": fwd, "blocks": len(lm.block_names),
            "peak_block_params": lm.peak_block_params,
            "block_params": max(sum(p.numel() for p in b.parameters()) for b in lm.blocks),
            "bytes_read": lm.shards.bytes_read, "tokens": tokens, "source": path,
            "seconds": time.perf_counter() - t0, "loss": "label-free kl to the fp model's output (block-local)",
            "batches": len(batches)}
    return Sensitivity(graph.names, tuple(specs), np.maximum(loss, 0.0), "block", allowed,
                       graph.fingerprint, meta)


class _Tmp:
    """Holds a weight so ``layer_weight_2d`` can view it in the module's layout."""

    def __init__(self, w):
        self.weight = w
