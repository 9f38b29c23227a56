"""Measuring whole plans fast: one private fake-quantized copy of the model, weights swapped in place.

:class:`PlanMeter` keeps the fp weights of every quantizable layer and, per (layer, option), the
fake-quantized weight ``Q(W)`` (computed once with ``kernels.modules.fake_weight``, the function fake
apply uses; least recently used entries are dropped past ``cache_mb``). Loading a plan copies only the
layers whose option differs from what is loaded now, and swaps the activation fake-quant pre-hooks
(``kernels.modules.ActFakeQuant``) of layers whose ``act_bits`` change — so the copy computes exactly
what ``apply_plan_(deepcopy(model), plan, "fake")`` computes. Losses are cached per (plan, batch):
staged selection measures a candidate on a few batches first and only adds the missing ones later.

Example:
    >>> meter = PlanMeter(model, graph, specs, batches, loss_fn=None)
    >>> meter.measure(choice, range(len(batches)))      # mean loss over all calibration batches
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch

from ..core.spec import QuantSpec
from ..kernels.modules import ActFakeQuant, fake_weight

__all__ = ["PlanMeter"]


class PlanMeter:
    """Measured mean loss of plans (option index per layer) on fixed batches."""

    def __init__(self, model: torch.nn.Module, graph, specs: list[QuantSpec], batches: list, loss_fn=None,
                 cache_mb: float = 1024.0, heldout: list | None = None):
        from ..sensitivity.losses import resolve_loss
        self.model = copy.deepcopy(model).eval()          # private: the user's model is never touched
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers, self.specs, self.batches = list(graph.layers), list(specs), list(batches)
        self.params = [self.model.get_submodule(l.name).weight for l in self.layers]
        # fp weights (as stored) read from the user's model, which nothing here writes: no third copy
        self.fp = [model.get_submodule(l.name).weight.detach() for l in self.layers]
        self.loaded = np.full(len(self.layers), -1)                    # option loaded per layer; -1 = fp
        self.hooks: dict[int, list] = {}
        self.qcache: OrderedDict = OrderedDict()                      # (layer, option) -> Q(W) tensor
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 1e6)
        self.losses: dict[tuple, np.ndarray] = {}                      # plan key -> (batches,) nan = unmeasured
        self.forwards, self.swaps, self.quantized = 0, 0, 0
        # calibrated rounding (AWQ / GPTQ) among the options: the layers' input statistics, once
        from ..kernels.modules import needs_stats
        want = [l.name for l in self.layers if "embedding" not in l.kinds] if any(map(needs_stats, self.specs)) else []
        self.stats = {}
        if want:
            from ..kernels.calibstats import gather_stats
            self.stats = gather_stats(self.model, self.batches, names=want,
                                      forward=loss_fn if callable(loss_fn) else None)
        with torch.random.fork_rng(devices=[]):
            self.loss_fn, self.desc = resolve_loss(loss_fn, self.model, self.batches)
            self.fp_loss = self._fp_loss(self.loss_fn, self.batches, loss_fn)
            self.heldout = list(heldout) if heldout is not None else None
            if self.heldout is not None:
                self.held_fn, _ = resolve_loss(loss_fn, self.model, self.heldout)
                self.held_fp = self._fp_loss(self.held_fn, self.heldout, loss_fn)

    @torch.no_grad()
    def _fp_loss(self, fn, batches, user) -> float:
        """Mean loss of the fp model (0 exactly for the label-free losses: no forward needed)."""
        if not callable(user):
            return 0.0
        return float(np.mean([self._call(fn, b) for b in batches]))

    def _call(self, fn, b) -> float:
        loss = fn(self.model, b)
        v = float(loss)
        if not np.isfinite(v):
            raise ValueError(f"the loss of a plan is {v} (not finite) on a calibration batch")
        return v

    # ---------------------------------------------------------------- loading plans
    def _q(self, i: int, j: int) -> torch.Tensor:
        key = (i, j)
        if key in self.qcache:
            self.qcache.move_to_end(key)
            return self.qcache[key]
        with torch.no_grad():        # fake_weight reads only .weight: give it the fp tensor, touch nothing
            q = fake_weight(SimpleNamespace(weight=self.fp[i]), self.layers[i].kind, self.specs[j],
                            self.stats.get(self.layers[i].name))
        self.quantized += 1
        self.qcache[key] = q
        self.cache_bytes += q.numel() * q.element_size()
        while self.cache_bytes > self.cache_limit and len(self.qcache) > 1:
            _, old = self.qcache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()
        return q

    def _act(self, i: int, bits: int | None) -> None:
        for h in self.hooks.pop(i, []):
            h.remove()
        if bits is not None:
            self.hooks[i] = [self.model.get_submodule(m).register_forward_pre_hook(ActFakeQuant(bits))
                             for m in self.layers[i].modules]

    def load(self, choice) -> None:
        """Make the private copy run ``choice`` (L,) option indices (-1 = fp); only changed layers move."""
        choice = np.asarray(choice)
        for i in np.flatnonzero(choice != self.loaded):
            j = int(choice[i])
            old = self.specs[self.loaded[i]].act_bits if self.loaded[i] >= 0 else None
            with torch.no_grad():
                self.params[i].copy_(self.fp[i] if j < 0 else self._q(i, j))
            new = self.specs[j].act_bits if j >= 0 else None
            if new != old:
                self._act(i, new)
            self.loaded[i] = j
            self.swaps += 1

    # ---------------------------------------------------------------- measuring
    @torch.no_grad()
    def measure(self, choice, idx, deadline: float | None = None) -> float | None:
        """Mean loss of ``choice`` over batches ``idx``; None when ``deadline`` (perf_counter) passed
        before every batch was measured (the batches measured so far stay cached)."""
        key = tuple(int(c) for c in choice)
        row = self.losses.setdefault(key, np.full(len(self.batches), np.nan))
        for k in idx:
            if np.isnan(row[k]):
                if deadline is not None and time.perf_counter() > deadline:
                    return None
                self.load(key)
                with torch.random.fork_rng(devices=[]):
                    row[k] = self._call(self.loss_fn, self.batches[k])
                self.forwards += 1
        return float(row[list(idx)].mean())

    def full(self, choice) -> float | None:
        """Mean loss over all batches if every batch was measured, else None."""
        row = self.losses.get(tuple(int(c) for c in choice))
        return None if row is None or np.isnan(row).any() else float(row.mean())

    @torch.no_grad()
    def heldout_loss(self, choice) -> float | None:
        """Mean loss on the held-out batches (same loss; label-free references from the fp model)."""
        if self.heldout is None:
            return None
        self.load(choice)
        with torch.random.fork_rng(devices=[]):
            return float(np.mean([self._call(self.held_fn, b) for b in self.heldout]))

    def close(self) -> None:
        """Drop the copy's hooks and caches (the copy itself is private and garbage)."""
        for i in list(self.hooks):
            self._act(i, None)
        self.qcache.clear()
        self.cache_bytes = 0
