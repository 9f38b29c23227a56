"""Scoring spread over the ranks of an initialised ``torch.distributed`` process group.

Nothing here starts processes: the user (or ``torchrun -m bitplan plan``) initialises the process
group, then calls :func:`bitplan.sensitivity.score` on EVERY rank. :func:`current` finds the group
(None without one, and nothing changes), the estimators split their work with it, and every rank
returns the same table:

- ``measured`` / ``decoupled``: the (layer, option) cells, round-robin in rounds (:func:`run_cells`);
  each cell is computed exactly as one process computes it, so the table is identical bit for bit.
- ``fisher``: the calibration batches (one (L, B) contribution each, summed in batch order).
- ``hessian``: the Hutchinson probe chunks (each probe has its own generator, so its estimate does
  not depend on which rank draws it); the per-probe rows are gathered and the stopping rule is
  applied chunk by chunk in probe order, as one process applies it: same seed, same table.
- other estimators (lim, zd, ...) run whole on every rank (cheap; same result everywhere).

All control traffic (small pickled objects) goes over a gloo side group, whatever the default
backend (gloo on CPU, nccl on GPU): gloo's ``monitored_barrier`` before every gather turns a rank
that died or stalls into a ``RuntimeError`` on rank 0 that names the rank, after ``timeout``
seconds at most (the time one rank may lag the others at a sync point), instead of a hang.

Example:
    >>> dist.init_process_group("gloo")                 # or torchrun + bitplan's CLI
    >>> t = score(model, batches, method="measured", timeout=600)   # on every rank; same t
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Callable

__all__ = ["Ranks", "current", "run_cells", "DEFAULT_TIMEOUT_S", "CELLS_PER_ROUND"]

DEFAULT_TIMEOUT_S = 1800.0      # torch's own default process-group timeout (30 min)
CELLS_PER_ROUND = 4             # cells each rank scores between two gathers (and checkpoints)
_GROUPS: dict = {}              # timeout s -> (default group it was made in, gloo side group)


@dataclass
class Ranks:
    """This process's place in the group and the gloo group used for control traffic."""
    rank: int
    world: int
    timeout: float                 # seconds one rank may lag the others at a sync point
    group: object                  # gloo ProcessGroup (monitored_barrier needs gloo)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def sync(self, what: str) -> None:
        """Barrier that names the ranks that did not arrive within ``timeout`` (RuntimeError)."""
        import torch.distributed as dist
        try:
            dist.monitored_barrier(group=self.group, timeout=datetime.timedelta(seconds=self.timeout),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise RuntimeError(self._failure(str(e), what)) from None

    def _failure(self, msg: str, what: str) -> str:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", msg)
        if m:
            bad = [int(r) for r in re.findall(r"\d+", m.group(1))]
            who = ", ".join(str(r) for r in bad)
            return (f"distributed scoring stopped at {what}: rank{'s' if len(bad) > 1 else ''} {who} of "
                    f"{self.world} did not arrive within the timeout of {self.timeout:g} s (the rank died, "
                    "raised an error or stalls; see its log). A checkpoint, if one was given, keeps the "
                    "cells done so far: rerun to resume")
        if self.rank != 0:
            return (f"distributed scoring stopped at {what}: lost contact with rank 0 or another rank "
                    f"(rank {self.rank} of {self.world}): {msg.splitlines()[0][:300]}")
        return f"distributed scoring stopped at {what} (rank 0 of {self.world}): {msg.splitlines()[0][:300]}"

    def gather(self, obj, what: str) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist
        self.sync(what)
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise RuntimeError(self._failure(str(e), what)) from None
        return out

    def all_reduce(self, x, what: str):
        """``x`` (float, numpy array or tensor) summed over every rank; the same type back (a tensor
        in place). Example: ``total = ranks.all_reduce(np.array([err, tokens]), "block 3")``"""
        import numpy as np
        import torch
        import torch.distributed as dist
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
        self.sync(what)
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as e:
            raise RuntimeError(self._failure(str(e), what)) from None
        if isinstance(x, torch.Tensor):
            return t
        return float(t) if np.ndim(x) == 0 else t.numpy()

    def all_reduce_many(self, xs: list, what: str) -> list:
        """Each of ``xs`` (floats, numpy arrays, tensors) summed over every rank in ONE collective
        (float64 on the wire); the same types back (tensors in their own dtype, new objects).
        Example: ``a, b = ranks.all_reduce_many([np.zeros(3), torch.ones(2, 2)], "block 3")``"""
        import numpy as np
        import torch
        flat = [x.detach().reshape(-1).double() if isinstance(x, torch.Tensor)
                else torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1) for x in xs]
        if not flat:
            return []
        buf = self.all_reduce(torch.cat(flat), what)
        out, at = [], 0
        for x, f in zip(xs, flat):
            part, at = buf[at:at + f.numel()], at + f.numel()
            if isinstance(x, torch.Tensor):
                out.append(part.to(x.dtype).reshape(x.shape))
            else:
                out.append(float(part[0]) if np.ndim(x) == 0 else part.numpy().reshape(np.shape(x)))
        return out

    def broadcast(self, obj, what: str):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist
        self.sync(what)
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as e:
            raise RuntimeError(self._failure(str(e), what)) from None
        return box[0]


def current(timeout: float | None = None) -> Ranks | None:
    """The initialised process group as :class:`Ranks`, or None (no group, or a group of one).

    Collective on first use per timeout: every rank must call it (``score`` does). Example:
    ``r = current(60); r.rank, r.world``
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    t = float(DEFAULT_TIMEOUT_S if timeout is None else timeout)
    if not 0 < t < float("inf"):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    world_pg = dist.group.WORLD
    if t not in _GROUPS or _GROUPS[t][0] is not world_pg:      # new, or the default group was re-made
        _GROUPS[t] = (world_pg, dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=t)))
    return Ranks(dist.get_rank(), world, t, _GROUPS[t][1])


def run_cells(cells: list, fn: Callable, ranks: Ranks | None = None, done: dict | None = None,
              on_round: Callable | None = None, per_round: int = CELLS_PER_ROUND, what: str = "cells") -> dict:
    """``{cell: fn(cell)}`` for every cell, spread round-robin over the ranks in rounds.

    ``done`` (e.g. from a checkpoint) is kept and not recomputed. After every round the results
    are gathered on every rank and ``on_round(results_so_far)`` is called (on every rank), e.g. to
    write a checkpoint. Cells must be hashable and picklable; ``fn`` must not depend on the rank.

    Example: ``vals = run_cells([(i, j) for ...], lambda c: score_one(*c), current())``
    """
    out = dict(done or {})
    todo = [c for c in cells if c not in out]
    world, rank = (ranks.world, ranks.rank) if ranks else (1, 0)
    step = max(1, per_round) * world
    for r0 in range(0, len(todo), step):
        block = todo[r0:r0 + step]
        mine = {c: fn(c) for c in block[rank::world]}
        if ranks is not None:
            for part in ranks.gather(mine, f"{what} {len(out)}..{len(out) + len(block)} of {len(cells)}"):
                out.update(part)
        else:
            out.update(mine)
        if on_round is not None:
            on_round(out)
    return out
