"""Estimator registry and the public ``score`` entry point.

An estimator is ``fn(ctx: ScoreContext, **opts) -> (loss (L, B) array, meta dict)``, registered with
``@register("name")``. ``score`` prepares everything estimators share: a private deep copy of the model
(the user's model is never touched), the layer graph, materialised batches, the resolved loss.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bitplan.batches import as_batches
from bitplan.graph import LayerGraph, layer_weight_2d

from ..kernels.formats import QuantSpec, check_bits
from ..kernels.quantizer import fake_quantize
from .losses import resolve_loss
from .table import Sensitivity

__all__ = ["ESTIMATORS", "register", "score", "ScoreContext", "DATA_FREE"]

ESTIMATORS: dict[str, Callable] = {}
DATA_FREE: set[str] = set()          # estimators that need no calibration data


def register(name: str, data_free: bool = False):
    """Decorator: ``@register("fisher") def fisher(ctx, **opts) -> (loss, meta)``."""
    def deco(fn):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        ESTIMATORS[name] = fn
        if data_free:
            DATA_FREE.add(name)
        return fn
    return deco


@dataclass
class ScoreContext:
    """What every estimator gets. ``model`` is a private eval-mode copy it may modify freely."""
    model: torch.nn.Module
    graph: LayerGraph
    batches: list
    loss_fn: Callable | None                  # callable(model, batch) -> scalar (None if data-free)
    specs: list[QuantSpec]                    # (B,) columns
    seed: int = 0
    loss_desc: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.graph.names

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)

    def weight_2d(self, name: str) -> torch.Tensor:
        """(N, K) view of layer ``name``'s weight."""
        info = self.graph.layers[self.graph.index(name)]
        return layer_weight_2d(self.module(name), info.kind)

    def delta_sq(self) -> np.ndarray:
        """(L, B) ‖Q_b(W_l) − W_l‖² with the shared quantizer."""
        out = np.zeros((len(self.names), len(self.specs)))
        for i, n in enumerate(self.names):
            w = self.weight_2d(n).detach()
            for j, s in enumerate(self.specs):
                out[i, j] = float((fake_quantize(w, s.bits, s.group_size, s.symmetric).float()
                                   - w.float()).pow(2).sum())
        return out


def score(model: torch.nn.Module, calib_data=None, method: str = "hessian", bits=(2, 3, 4, 8),
          loss_fn=None, seed: int = 0, group_size: int | None = None, symmetric: bool = True,
          graph: LayerGraph | None = None, **opts) -> Sensitivity:
    """Score every quantizable layer of ``model`` at every bit option; the model is not modified.

    Example:
        >>> t = score(model, batches, method="hessian", bits=(2, 3, 4, 8))
        >>> t.loss.shape        # (layers, options)
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity method {method!r}; known: {sorted(ESTIMATORS)}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bits = tuple(check_bits(b) for b in bits)
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"bits={bits!r} must be a non-empty tuple of distinct options")
    specs = [QuantSpec(b, group_size, symmetric) for b in bits]
    t0 = time.perf_counter()
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    if method in DATA_FREE and calib_data is None:
        batches, fn, desc = [], None, ""
        graph = graph or LayerGraph.build(work)
    else:
        batches = as_batches(calib_data)
        fn, desc = resolve_loss(loss_fn, work, batches)
        graph = graph or LayerGraph.build(work, batches[0], forward=fn if callable(loss_fn) else None)
    ctx = ScoreContext(work, graph, batches, fn, specs, seed, desc)
    torch.manual_seed(seed)
    loss, meta = ESTIMATORS[method](ctx, **opts)
    loss = np.asarray(loss, dtype=np.float64)
    bad = ~np.isfinite(loss)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{method} produced a non-finite sensitivity for {graph.names[i]} at {bits[j]} bits "
                         "(NaN/inf in the loss or its gradients; check the model and calibration data)")
    meta = {**meta, "seconds": time.perf_counter() - t0, "loss": desc, "batches": len(batches)}
    return Sensitivity(graph.names, bits, np.maximum(loss, 0.0), method, group_size, symmetric,
                       graph.fingerprint, meta)
