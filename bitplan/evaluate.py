"""Measuring a model (fp, fake-quantized or packed) on data: the loss to the fp model, sentence
embedding cosine, perplexity of causal LMs.

Example:
    >>> measure_loss(model, loss_fn, batches)
    >>> fidelity(packed_model, ref_embeddings, heldout_batches)
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["measure_loss", "embed", "fidelity", "next_token_ce", "perplexity"]


@torch.no_grad()
def measure_loss(model, loss_fn, batches) -> float:
    """Mean of ``loss_fn(model, batch)`` over ``batches`` (no gradients).

    Example: ``measure_loss(model, lambda m, b: m(b).pow(2).mean(), batches)``
    """
    return float(np.mean([float(loss_fn(model, b)) for b in batches]))


@torch.no_grad()
def embed(model: torch.nn.Module, batches: list) -> torch.Tensor:
    """Concatenated outputs of ``model`` over dict batches (sentence embeddings for a SentenceEncoder).

    Example: ``ref = embed(model, heldout_batches)``
    """
    return torch.cat([model(**b) for b in batches])


@torch.no_grad()
def fidelity(model, ref: torch.Tensor, batches) -> float:
    """Mean cosine similarity of ``model``'s embeddings to ``ref`` (n, d).

    Example: ``fidelity(quantized, embed(fp_model, held), held)``
    """
    return float(torch.nn.functional.cosine_similarity(embed(model, batches), ref, dim=-1).mean())


def next_token_ce(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a dict batch (input_ids, attention_mask).

    Example: ``allocate(lm, budget_mb=..., calib_data=batches, loss_fn=next_token_ce)``
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(**batch).logits[:, :-1].float()                       # (B, T-1, V)
    target = ids[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           reduction="none").reshape(target.shape)
    if mask is not None:
        m = mask[:, 1:].to(ce.dtype)
        return (ce * m).sum() / m.sum().clamp(min=1)
    return ce.mean()


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(token-weighted mean next-token cross-entropy) of a causal LM over dict batches.

    Example: ``perplexity(lm, heldout_batches)``
    """
    total, count = 0.0, 0
    for b in batches:
        n = int(b["attention_mask"][:, 1:].sum()) if "attention_mask" in b else b["input_ids"][:, 1:].numel()
        total += float(next_token_ce(model, b)) * n
        count += n
    if count == 0:
        raise ValueError("perplexity needs at least two tokens per sequence")
    return float(np.exp(total / count))
