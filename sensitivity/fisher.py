"""Output-Taylor ("Fisher") sensitivity, as in NVIDIA TensorRT Model Optimizer's ``auto_quantize``.

ModelOpt scores a quantization option of layer l by a second-order Taylor expansion in the layer's
OUTPUT Y_l, with the Hessian replaced by the diagonal (empirical) Fisher:

    score_l(b) = Σ_batches Σ_elements (∂L/∂Y_l)² ⊙ (Y_l^(b) − Y_l)²

Y_l^(b) is the layer's output with only its own weight quantized to option b, on the same input
(the rest of the model in fp). Forward hooks record every layer's input and output; ONE backward per
batch (per probe) gives ∂/∂Y_l for all layers at once, and that one gradient serves all B options.
The table is ½ · score (the ½ of the Taylor term) so its unit is the loss.

The gradient, and why it is not simply ∂L/∂Y:
- A label-free loss (KL / MSE to the fp outputs, the default) has ZERO gradient at the fp weights,
  so ModelOpt's empirical Fisher would be identically 0. Its Hessian w.r.t. the model output is
  ``H_out = S Sᵀ`` (:meth:`LabelFreeLoss.hessian_sqrt`), and back-propagating a sampled output
  gradient ``S u`` (u Rademacher, ``samples`` per batch) gives ``g = J_lᵀ S u`` with
  ``E[g ⊙ g] = diag(J_lᵀ H_out J_l)``: the exact diagonal of the loss Hessian w.r.t. Y_l (Gauss-Newton
  = Hessian at the fp point). For KL this is the true Fisher of the output distribution — the same
  expectation as ModelOpt-style sampled labels y ~ p(y|x), ``g = p − e_y``, without label noise
  beyond the probes. ``exact=True`` uses every output basis vector instead of probes (tiny models).
- A user ``loss_fn`` (task loss with labels) uses its real gradient, as ModelOpt does. For a loss that
  is a mean over n samples, the per-sample empirical Fisher diagonal is ``n · (∂L/∂Y)²`` (each
  sample's rows), which is what is used.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from ..core.batches import batch_size

from ..kernels.actquant import fake_quantize_act
from ._common import checked_loss, math_sdpa, weights_require_grad
from .hessian import _check, _grad, _rademacher
from .losses import LabelFreeLoss
from .registry import ScoreContext, register

__all__ = ["fisher"]


def _record(ctx):
    """Forward hooks saving (input, output) of every call of every quantizable layer."""
    calls: dict[int, list] = {i: [] for i in range(len(ctx.names))}

    def hook(i):
        def fn(mod, inp, out):
            calls[i].append((inp[0].detach(), out))
        return fn
    handles = [ctx.module(n).register_forward_hook(hook(i)) for i, n in enumerate(ctx.names)]
    return calls, handles


@register("fisher")
def fisher(ctx: ScoreContext, samples: int = 4, exact: bool = False):
    """ModelOpt auto_quantize output-Taylor table (L, B) = ½ Σ diag-Fisher(Y_l) ⊙ (Y_l^(b) − Y_l)².

    Example: ``score(model, batches, method="fisher", samples=4)``
    """
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"samples={samples!r} must be a positive int (probe gradients per batch)")
    label_free = isinstance(ctx.loss_fn, LabelFreeLoss)
    if exact and not label_free:
        raise ValueError("exact=True needs the built-in label-free loss (loss_fn=None, 'kl' or 'mse')")
    L, B = len(ctx.names), len(ctx.specs)
    qw = [[ctx.quantized(i, j) for j in range(len(ctx.specs))] for i in range(len(ctx.names))]

    def one_batch(bi):
        """(this batch's (L, B) contribution as lists, (L,) layers that got a gradient)."""
        batch = ctx.batches[bi]
        out, seen = np.zeros((L, B)), np.zeros(L, dtype=bool)
        calls, handles = _record(ctx)
        try:
            if label_free:                             # fp point: loss 0, only the output matters
                t = ctx.loss_fn.output(ctx.model, batch)
                _check(t, f"model output on batch {bi}")
            else:
                loss = checked_loss(ctx, batch, bi)
        finally:
            for h in handles:
                h.remove()
        ys = [(i, x, y) for i, c in calls.items() for x, y in c if y.requires_grad]
        if not ys:
            return out, seen
        if label_free:
            if exact:
                k = t.numel()
                u = torch.eye(k, dtype=t.dtype).reshape((k,) + tuple(t.shape))
            else:
                k = samples                            # one generator per batch: any rank draws the same
                u = _rademacher((k,) + tuple(t.shape), torch.Generator().manual_seed(ctx.seed * 1_000_003 + bi))
            w = ctx.loss_fn.hessian_sqrt(batch, u).to(t.dtype)
            gs = _grad([t], [y for _, _, y in ys], [w], k, allow_unused=True)
            diag = [None if g is None else (g.pow(2).sum(0) if exact else g.pow(2).mean(0)) for g in gs]
        else:
            gs = torch.autograd.grad(loss, [y for _, _, y in ys], allow_unused=True)
            nb = batch_size(batch)
            diag = [None if g is None else nb * g.pow(2) for g in gs]
        for (i, x, y), d in zip(ys, diag):
            if d is None:
                continue
            _check(d, f"output gradient of {ctx.names[i]}")
            seen[i] = True
            mod, y0 = ctx.module(ctx.names[i]), y.detach()
            with torch.no_grad():
                for j in range(B):
                    if qw[i][j] is None:            # an option this layer cannot take
                        continue
                    xq = fake_quantize_act(x, ctx.specs[j].act_bits)
                    dy = functional_call(mod, {"weight": qw[i][j]}, (xq,)) - y0
                    out[i, j] += 0.5 * float((d * dy.pow(2)).sum())
        return out, seen

    # rounds of one batch per rank of a process group, summed in batch order (as one process sums
    # them: the same table bit for bit); the running sum is checkpointed after every round
    nb, ck = len(ctx.batches), ctx.checkpoint
    out, seen, nxt = np.zeros((L, B)), np.zeros(L, dtype=bool), 0
    if ck is not None and "fisher" in ck.state:
        st = ck.state["fisher"]
        out, seen, nxt = np.array(st["sum"], dtype=np.float64), np.array(st["seen"], bool), int(st["next"])
        ck.resumed += nxt
    world, rank = (ctx.ranks.world, ctx.ranks.rank) if ctx.ranks is not None else (1, 0)
    with math_sdpa(), weights_require_grad(ctx):
        while nxt < nb:
            block = list(range(nxt, min(nb, nxt + world)))
            mine = one_batch(block[rank]) if rank < len(block) else None
            parts = ctx.ranks.gather(mine, f"fisher batches {nxt}..{block[-1] + 1}") if world > 1 else [mine]
            for o, s in parts[:len(block)]:
                out += o
                seen |= s
            nxt += len(block)
            if ck is not None:
                ck.put("fisher", {"next": nxt, "sum": out.tolist(), "seen": seen.tolist()})
    if not seen.any():
        raise ValueError("no quantizable layer's output gets a gradient from the loss; "
                         "the loss does not depend on any quantizable layer")
    return out, {"samples": None if exact else samples, "exact": bool(exact),
                 "gradient": "sampled output-Hessian factor (label-free)" if label_free
                 else "empirical Fisher of loss_fn",
                 "no_grad_layers": [n for n, s in zip(ctx.names, seen) if not s]}
