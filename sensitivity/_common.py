"""Helpers the estimators share: quantized weights in storage layout, one-layer swaps, checked losses.

Private to ``bitplan.sensitivity``; every estimator quantizes through the shared quantizer
(``ScoreContext.quantized`` / ``perturbed``, i.e. ``kernels.modules.fake_weight``), so all tables
see the same ΔW.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..core.batches import first_tensor, run_model

from .losses import LabelFreeLoss

__all__ = ["math_sdpa", "weights_require_grad", "checked_loss",
           "mean_loss", "model_output", "rel_delta_sq"]


def math_sdpa():
    """Double backward through CPU flash attention is not implemented: force the math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:                  # older torch: no SDPA context manager
        return contextlib.nullcontext()


@contextlib.contextmanager
def weights_require_grad(ctx):
    """Make the quantizable weights (and only them) require grad; yields the list (L,)."""
    params = [ctx.module(n).weight for n in ctx.names]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)


def checked_loss(ctx, batch, k: int) -> torch.Tensor:
    """``loss_fn(model, batch)`` as a finite scalar tensor, or a ValueError naming the cause."""
    try:
        loss = ctx.loss_fn(ctx.model, batch)
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"calibration batch {k} does not run through the loss: {type(e).__name__}: {e}") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(getattr(loss, 'shape', ()))} on batch {k}")
    loss = loss.reshape(())
    if not torch.isfinite(loss):
        raise ValueError(f"calibration loss is {loss.item()} (not finite) on batch {k}; "
                         "check the model and calibration data")
    return loss


@torch.no_grad()
def mean_loss(ctx) -> float:
    """Mean of the loss over the calibration batches (the quantity every table predicts the rise of)."""
    return float(np.mean([float(checked_loss(ctx, b, k)) for k, b in enumerate(ctx.batches)]))


def model_output(ctx, batch) -> torch.Tensor:
    """The tensor the label-free loss compares (logits or first output tensor)."""
    if isinstance(ctx.loss_fn, LabelFreeLoss):
        return ctx.loss_fn.output(ctx.model, batch)
    t = first_tensor(run_model(ctx.model, batch))
    if t is None or not t.is_floating_point():
        raise ValueError(f"{type(ctx.model).__name__} returned no floating-point tensor")
    return t


def rel_delta_sq(ctx) -> np.ndarray:
    """(L, B) relative quantization perturbation ‖Q_b(W_l) − W_l‖² / ‖W_l‖²."""
    d = ctx.delta_sq()
    w = np.array([float(ctx.weight_2d(n).detach().float().pow(2).sum()) for n in ctx.names])
    return d / np.maximum(w, 1e-30)[:, None]
