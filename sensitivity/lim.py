"""LIM (Layer Input Modification) importance, turned into a loss table.

Dumitru et al., "Layer-Wise Quantization: A Pragmatic and Effective Method for Quantizing LLMs Beyond
Integer Bit-Levels" (2024, arXiv:2406.17415). For a block (transformer layer) i with input hidden
states x_in and output x_out on calibration data:

    LIM_i = −cos(x_in, x_out)          (mean over positions of the per-position cosine)

DIRECTION: higher LIM = the block changes its input more = MORE important (keep more bits).
LIM ∈ [−1, 1]; we use the importance ``imp_i = 1 + LIM_i = 1 − cos ∈ [0, 2]`` (non-negative).

The paper ranks whole blocks; to give the allocator a per-layer (L, B) table, every quantizable layer
inherits its block's importance and is scaled by its own relative quantization perturbation:

    loss[l, b] = imp_block(l) · ‖Q_b(W_l) − W_l‖² / ‖W_l‖²

Blocks: the children of the model's largest ``nn.ModuleList`` that hold quantizable layers (the
``layers``/``layer``/``h`` stack of HF models), whose input and output hidden states have the same
shape. Layers outside every block (embeddings-side projections, heads, poolers) get the largest block
importance (kept conservative, as the paper keeps them at high precision); they are listed in
``meta["outside_blocks"]``. The table is a relative ranking, not in loss units.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.batches import first_tensor

from ._common import checked_loss, rel_delta_sq
from .registry import ScoreContext, register

__all__ = ["lim", "find_blocks", "block_of"]


def find_blocks(model: torch.nn.Module, layer_names: list[str]) -> list[str]:
    """Names of the block modules: children of the ModuleList holding the most quantizable layers."""
    best, best_n = [], 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList):
            continue
        kids = [f"{name}.{k}" if name else k for k, _ in m.named_children()]
        held = [k for k in kids if any(l.startswith(k + ".") for l in layer_names)]
        n = sum(any(l.startswith(k + ".") for k in held) for l in layer_names)
        if len(held) >= 2 and n > best_n:
            best, best_n = held, n
    return best


def block_of(layer_names: list[str], blocks: list[str]) -> list[int]:
    """(L,) index of each layer's block, −1 when it is in none."""
    return [next((i for i, b in enumerate(blocks) if l.startswith(b + ".")), -1) for l in layer_names]


@register("lim")
def lim(ctx: ScoreContext):
    """LIM table (L, B) = (1 − cos(block in, block out)) · relative ‖ΔW‖² of each layer.

    Example: ``score(model, batches, method="lim")``
    """
    blocks = find_blocks(ctx.model, ctx.names)
    if not blocks:
        raise ValueError(f"lim needs a block-structured model: an nn.ModuleList of >= 2 blocks holding "
                         f"the quantizable layers; {type(ctx.model).__name__} has none (use 'zd' or "
                         f"'hessian')")
    cos_sum, count = np.zeros(len(blocks)), np.zeros(len(blocks))

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            y = first_tensor(out)
            if not isinstance(x, torch.Tensor) or y is None or x.shape != y.shape:
                raise ValueError(f"lim: block {blocks[i]} input {tuple(getattr(x, 'shape', ()))} and output "
                                 f"{tuple(getattr(y, 'shape', ()))} hidden states differ in shape; LIM needs "
                                 "residual-style blocks")
            c = F.cosine_similarity(x.float(), y.float(), dim=-1)          # (..., positions)
            cos_sum[i] += float(c.sum())
            count[i] += c.numel()
        return fn
    handles = [ctx.model.get_submodule(b).register_forward_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for bi, batch in enumerate(ctx.batches):
                checked_loss(ctx, batch, bi)
    finally:
        for h in handles:
            h.remove()
    if (count == 0).any():
        raise ValueError(f"lim: block {blocks[int(np.argmin(count))]} never ran on the calibration data")
    score_ = -cos_sum / count                                           # (blocks,) LIM in [-1, 1]
    imp_block = 1.0 + score_
    idx = block_of(ctx.names, blocks)
    imp = np.array([imp_block[i] if i >= 0 else imp_block.max() for i in idx])   # (L,)
    return imp[:, None] * rel_delta_sq(ctx), {
        "blocks": blocks, "lim": score_, "importance": imp, "direction": "higher = more important",
        "outside_blocks": [n for n, i in zip(ctx.names, idx) if i < 0]}
