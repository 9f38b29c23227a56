"""Estimator registry and the public ``score`` entry point.

An estimator is ``fn(ctx: ScoreContext, **opts) -> (loss (L, B) array, meta dict)``, registered with
``@register("name")``. ``score`` prepares everything estimators share: a private deep copy of the model
(the user's model, its BatchNorm statistics and torch's global RNG are never touched), the layer graph,
materialised batches, the resolved loss, the options (columns) and which of them each layer can take.

An option perturbs a layer by its weight error ``Q(W) − W`` and, for ``act_bits`` options, by the
quantization of the layer's input activations too. Estimators that run the model (measured,
decoupled, fisher) apply both exactly (:meth:`ScoreContext.perturbed`); weight-space estimators
(hessian, lim, zd) add the activation error as an equivalent weight error (:meth:`ScoreContext.delta_sq`).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..core.batches import as_batches, run_model
from ..core.graph import LayerGraph, layer_weight_2d
from ..core.spec import QuantSpec, option_grid
from ..kernels.actquant import fake_quantize_act
from ..kernels.modules import fake_weight, needs_stats, option_mask
from .losses import resolve_loss
from .table import Sensitivity

__all__ = ["ESTIMATORS", "register", "score", "ScoreContext", "DATA_FREE", "STREAMING"]

ESTIMATORS: dict[str, Callable] = {}
DATA_FREE: set[str] = set()          # estimators that need no calibration data
STREAMING: set[str] = set()          # estimators that read the model from its folder, a block at a time


def register(name: str, data_free: bool = False, streaming: bool = False):
    """Decorator: ``@register("fisher") def fisher(ctx, **opts) -> (loss, meta)``.

    ``streaming=True``: ``fn(model_or_folder, calib_data, specs, graph=, loss_fn=, seed=, **opts)
    -> Sensitivity``; it gets no ScoreContext (which would copy the whole model)."""
    def deco(fn):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is registered twice")
        ESTIMATORS[name] = fn
        if data_free:
            DATA_FREE.add(name)
        if streaming:
            STREAMING.add(name)
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
    allowed: np.ndarray | None = None         # (L, B) bool: options each layer can take

    stats: dict | None = None                 # layer -> calibration statistics (AWQ / GPTQ options)
    ranks: object = None                      # distributed.Ranks when scoring is spread over a process group
    checkpoint: object = None                 # checkpoint.Checkpoint of a partially scored table

    def __post_init__(self):
        if self.allowed is None:
            self.allowed = np.asarray(option_mask(self.graph.layers, self.specs)[0], dtype=bool)
        want = sorted({self.names[i] for i, j in zip(*np.nonzero(self.allowed)) if needs_stats(self.specs[j])})
        if want and self.stats is None:
            if not self.batches:
                raise ValueError(f"options {sorted({s.label for s in self.specs if needs_stats(s)})} need "
                                 "calibration data (their methods read the layers' input statistics)")
            from ..kernels.calibstats import gather_stats
            fwd = self.loss_fn if callable(self.loss_fn) and not hasattr(self.loss_fn, "output") else None
            self.stats = gather_stats(self.model, self.batches, names=want, forward=fwd)

    def run_cells(self, cells: list, fn: Callable, name: str = "cells") -> dict:
        """``{cell: fn(cell)}`` for every cell (JSON-able values), spread over the ranks of the
        process group and resumed from / saved to the checkpoint when there is one
        (:func:`.distributed.run_cells`). ``fn`` must give the same value on any rank."""
        from .distributed import run_cells
        ck = self.checkpoint
        return run_cells(cells, fn, self.ranks, done=ck.cells(name) if ck else None,
                         on_round=(lambda out: ck.put_cells(out, name)) if ck else None, what=name)

    @property
    def names(self) -> list[str]:
        return self.graph.names

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)

    def layer(self, name: str):
        return self.graph.layers[self.graph.index(name)]

    def weight_2d(self, name: str) -> torch.Tensor:
        """(N, K) view of layer ``name``'s weight."""
        return layer_weight_2d(self.module(name), self.layer(name).kind)

    def quantized(self, i: int, j: int) -> torch.Tensor | None:
        """``Q_j(W_i)`` in the module's own layout, or None when layer i cannot take option j."""
        if not self.allowed[i, j]:
            return None
        name = self.names[i]
        return fake_weight(self.module(name), self.layer(name).kind, self.specs[j], (self.stats or {}).get(name))

    @contextlib.contextmanager
    def perturbed(self, i: int, j: int):
        """Run the model with ONLY layer i at option j: weight ``Q(W)`` and, for ``act_bits``
        options, its inputs fake-quantized per token (every module sharing the weight). Restored
        bit for bit afterwards."""
        w = self.quantized(i, j)
        if w is None:
            raise ValueError(f"{self.names[i]} cannot take option {self.specs[j].label}")
        p = self.module(self.names[i]).weight
        saved = p.detach().clone()
        handles = []
        bits = self.specs[j].act_bits
        if bits is not None:
            for m in self.layer(self.names[i]).modules:
                handles.append(self.model.get_submodule(m).register_forward_pre_hook(
                    lambda mod, args: (fake_quantize_act(args[0], bits),) + tuple(args[1:])))
        with torch.no_grad():
            p.copy_(w)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                p.copy_(saved)

    def delta_sq(self) -> np.ndarray:
        """(L, B) ‖Q_b(W_l) − W_l‖² with the shared quantizer (0 where not allowed; input-aware where
        the layer's calibration statistics were gathered, see below), plus for ``act_bits`` options
        the weight-equivalent activation error (:meth:`act_delta_sq`)."""
        def cell(c) -> float:                 # ‖ΔW‖² of layer i at option j
            i, j = c
            n = self.names[i]
            w = self.weight_2d(n).detach().float()
            st = (self.stats or {}).get(n)
            dw = layer_weight_2d_of(self.quantized(i, j), self.layer(n).kind) - w
            if st is None:
                return float(dw.pow(2).sum())
            # with the layer's input statistics (gathered when calibrated methods are options), the
            # weight error is input-aware: the output error tr(ΔW Σ ΔWᵀ) as the equivalent isotropic
            # ‖ΔW‖² (× K / tr Σ) — equal to ‖ΔW‖² for isotropic inputs, and it credits AWQ / GPTQ,
            # which trade a larger ‖ΔW‖ for a smaller output error
            return float(st.output_error(dw) * (st.k / max(float(st.xtx.diagonal().sum()) / max(st.n_tokens, 1), 1e-30)))
        L, B = len(self.names), len(self.specs)
        # the allowed cells, largest layer first: on several ranks (round-robin, each cell exact)
        # an embedding table's options go to different ranks instead of one rank getting them all
        size = [self.graph.layers[i].n_params for i in range(L)]
        cells = sorted(((int(i), int(j)) for i, j in zip(*np.nonzero(self.allowed))), key=lambda c: (-size[c[0]], c))
        if self.ranks is not None:
            from .distributed import run_cells
            vals = run_cells(cells, cell, self.ranks, per_round=len(cells), what="weight errors")   # one gather
        else:
            vals = {c: cell(c) for c in cells}
        out = np.zeros((L, B), dtype=np.float64)
        for (i, j), v in vals.items():
            out[i, j] = v
        if any(s.act_bits is not None for s in self.specs):
            out += self.act_delta_sq()
        return out

    def act_delta_sq(self) -> np.ndarray:
        """(L, B) activation error of ``act_bits`` options as an equivalent squared weight error.

        Quantizing a layer's input X (T tokens x K) moves its output by W ΔX. A weight error ΔW moves
        it by ΔW X, with E‖ΔW X‖² ≈ ‖ΔW‖²·‖X‖²/K for inputs of equal energy per channel; so the
        activation error counts as ‖W ΔX‖² · K / ‖X‖² of weight error (cross terms neglected). Measured
        on the calibration batches with one forward pass. Without data: 0 (data-free estimators).
        """
        out = np.zeros((len(self.names), len(self.specs)))
        act = sorted({s.act_bits for s in self.specs if s.act_bits is not None})
        if not act or not self.batches:
            return out
        sums = {n: {"x2": 0.0, **{b: 0.0 for b in act}} for n in self.names}
        owner = {m: (l.name, k) for l in self.graph.layers for m, k in zip(l.modules, l.kinds)
                 if k != "embedding"}

        def hook(mname):
            def fn(mod, args, out):
                lname, kind = owner[mname]
                x = args[0].detach().float()
                w = self.module(lname).weight.detach().float()
                y = out.detach().float() if isinstance(out, torch.Tensor) else None
                for b in act:
                    dx = fake_quantize_act(x, b).float() - x
                    if kind in ("linear", "hf_conv1d"):
                        dy = dx.reshape(-1, x.shape[-1]) @ layer_weight_2d_of(w, kind).t()
                    else:              # conv: the layer's own op on the input perturbation
                        dy = mod._conv_forward(dx, w, None)
                    sums[lname][b] += float(dy.pow(2).sum())
                # energy of the (N, K) matmul's input rows: ‖X‖² for a matmul; for a conv each input
                # element is read by about K / C_in output positions per in->out position ratio
                x2 = float(x.pow(2).sum())
                if kind not in ("linear", "hf_conv1d") and y is not None:
                    k = self.layer(lname).in_features
                    x2 *= (k / x.shape[1]) * (y[0, 0].numel() / max(1, x[0, 0].numel()))
                sums[lname]["x2"] += x2
            return fn
        handles = [self.model.get_submodule(m).register_forward_hook(hook(m)) for m in owner]
        try:
            with torch.no_grad():
                for b in self.batches:
                    if callable(self.loss_fn):
                        self.loss_fn(self.model, b)
                    else:
                        run_model(self.model, b)
        finally:
            for h in handles:
                h.remove()
        for i, n in enumerate(self.names):
            k = self.layer(n).in_features
            for j, s in enumerate(self.specs):
                if s.act_bits is not None and self.allowed[i, j] and sums[n]["x2"] > 0:
                    out[i, j] = sums[n][s.act_bits] * k / sums[n]["x2"]
        return out


def layer_weight_2d_of(w: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, K) view of a weight tensor in a module's storage layout."""
    return w.t().float() if kind == "hf_conv1d" else w.reshape(w.shape[0], -1).float()


def score(model: torch.nn.Module, calib_data=None, method: str = "hessian", bits=(2, 3, 4, 8),
          loss_fn=None, seed: int = 0, group_size=None, symmetric=True, act_bits=None,
          quant_method="rtn", options=None, graph: LayerGraph | None = None, checkpoint=None,
          timeout: float | None = None, **opts) -> Sensitivity:
    """Score every quantizable layer of ``model`` at every option; the model is not modified.

    Options are the product of ``bits``, ``group_size``, ``act_bits``, ``quant_method`` and
    ``symmetric`` (each a value or a tuple; ``core.spec.option_grid``), or the explicit ``options``
    (a sequence of QuantSpec). Options a layer cannot take are masked (``table.allowed``).

    In an initialised ``torch.distributed`` process group, call it on every rank: the work is
    spread over the ranks and every rank gets the same table (``.distributed``); ``timeout`` is how
    many seconds a rank may lag the others before rank 0 stops with an error naming it (default
    1800). ``checkpoint`` (a path) keeps the pieces scored so far, so an interrupted run resumes
    (``.checkpoint``; removed when the table is complete).

    Example:
        >>> t = score(model, batches, method="hessian", bits=(2, 3, 4, 8), group_size=(None, 128))
        >>> t.loss.shape        # (layers, options)
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity method {method!r}; known: {sorted(ESTIMATORS)}")
    if method not in STREAMING and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    if options is not None:
        specs = list(options)
        if not specs or not all(isinstance(s, QuantSpec) for s in specs) or len(set(specs)) != len(specs):
            raise ValueError(f"options={options!r} must be a non-empty sequence of distinct QuantSpec")
    else:
        specs = list(option_grid(bits, group_size, act_bits, quant_method, symmetric))
    if method in STREAMING:     # the model stays on disk: only its folder is read, a block at a time
        return ESTIMATORS[method](model, calib_data, specs, graph=graph, loss_fn=loss_fn, seed=seed,
                                  timeout=timeout, checkpoint=checkpoint, **opts)
    t0 = time.perf_counter()
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):            # estimators draw from their own generators
        torch.manual_seed(seed)
        if method in DATA_FREE and calib_data is None:
            batches, fn, desc = [], None, ""
            graph = graph or LayerGraph.build(work)
        else:
            batches = as_batches(calib_data)
            fn, desc = resolve_loss(loss_fn, work, batches)
            graph = graph or LayerGraph.build(work, batches[0], forward=fn if callable(loss_fn) else None)
        from .distributed import current
        ranks = current(timeout)                        # None without a process group
        ckpt = None
        if checkpoint is not None:
            from .checkpoint import Checkpoint, content_digest
            from .table import _jsonable
            run = {"method": method, "names": graph.names, "options": [s.to_dict() for s in specs],
                   "model_fingerprint": graph.fingerprint, "content": content_digest(work, batches),
                   "settings": _jsonable({**opts, "seed": seed, "loss": desc, "batches": len(batches)})}
            ckpt = Checkpoint(checkpoint, run, ranks)
            ckpt.resume()
        ctx = ScoreContext(work, graph, batches, fn, specs, seed, desc, ranks=ranks, checkpoint=ckpt)
        if not ctx.allowed.any(1).all():
            i = int(np.argmin(ctx.allowed.any(1)))
            why = option_mask([graph.layers[i]], specs)[1]
            raise ValueError(f"layer {graph.names[i]} can take none of the options "
                             f"{[s.label for s in specs]}: {sorted(set(why.values()))[:3]}")
        loss, meta = ESTIMATORS[method](ctx, **opts)
    loss = np.where(ctx.allowed, np.asarray(loss, dtype=np.float64), 0.0)
    bad = ~np.isfinite(loss)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{method} produced a non-finite sensitivity for {graph.names[i]} at option "
                         f"{specs[j].label} (NaN/inf in the loss or its gradients; check the model and data)")
    meta = {**meta, "seconds": time.perf_counter() - t0, "loss": desc, "batches": len(batches)}
    if ranks is not None:
        meta["world_size"] = ranks.world
    if ckpt is not None:
        meta["resumed"] = ckpt.resumed                # pieces read back from the checkpoint
        ckpt.finish()
    return Sensitivity(graph.names, tuple(specs), np.maximum(loss, 0.0), method, ctx.allowed,
                       graph.fingerprint, meta)
