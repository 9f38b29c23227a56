"""Checkpoints of a partially scored sensitivity table, so an interrupted scoring resumes.

Scoring a large model takes hours; ``score(..., checkpoint="sens.partial.json")`` writes what is done
(measured cells, fisher batches, hessian probe rows) after every round, atomically (a crash leaves
the previous checkpoint or the new one), from rank 0 only. A rerun with the same arguments reads it
and computes only what is missing: the finished table is the one an uninterrupted run gives (the
estimators' pieces do not depend on when or on which rank they were computed). The file is removed
once the table is complete.

The checkpoint records the run it belongs to — estimator, layers, options, model fingerprint, a
digest of the weights and calibration batches, seed, loss and estimator settings — and a run that
differs in any of them is refused with a ``ValueError`` naming the difference (delete the file to
start over).

Example:
    >>> t = score(model, batches, method="measured", checkpoint="sens.partial.json")
"""
from __future__ import annotations

import hashlib
import os

import torch

from ..core.jsonio import atomic_write_json, read_json

__all__ = ["Checkpoint", "content_digest", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1
_KIND = "bitplan sensitivity checkpoint"


def _tensors(obj):
    """Tensors and other leaves of a batch (tensor, tuple/list, dict), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield str(k)
            yield from _tensors(obj[k])
    else:
        yield repr(obj)


def content_digest(model: torch.nn.Module, batches) -> str:
    """blake2b of every parameter and buffer (name, dtype, shape, bytes) and the calibration batches:
    the checkpoint's guard against resuming with other weights or data of the same shapes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.state_dict().items()) + [(f"batch{k}", b) for k, b in enumerate(batches)]:
        h.update(name.encode())
        for leaf in _tensors(t):
            if isinstance(leaf, torch.Tensor):
                x = leaf.detach().cpu().contiguous()
                h.update(f"{x.dtype}{tuple(x.shape)}".encode())
                h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
            else:
                h.update(leaf.encode())
    return h.hexdigest()


def _json_key(c):
    return list(c) if isinstance(c, tuple) else c


def _py_key(c):
    return tuple(c) if isinstance(c, list) else c


class Checkpoint:
    """One checkpoint file: ``run`` (what it belongs to) and ``state`` (what is done).

    Collective when ``ranks`` is given: :meth:`resume` must be called on every rank.
    """

    def __init__(self, path, run: dict, ranks=None):
        self.path, self.run, self.ranks = os.fspath(path), run, ranks
        self.resumed = 0                     # pieces read back from the file
        self.state: dict = {}

    def _read(self) -> dict | None:
        if not os.path.exists(self.path):
            return None
        d = read_json(self.path, _KIND)
        where = f"checkpoint {self.path}"
        if not isinstance(d, dict) or d.get("kind") != _KIND or d.get("schema_version") != CHECKPOINT_VERSION:
            raise ValueError(f"{where} is not a {_KIND} of version {CHECKPOINT_VERSION}; delete it to start over")
        run = d.get("run")
        if not isinstance(run, dict) or not isinstance(d.get("state"), dict):
            raise ValueError(f"{where}: 'run' and 'state' must be objects; delete it to start over")
        diffs = [f"{k}: {_short(run.get(k))} in the checkpoint, {_short(self.run.get(k))} now"
                 for k in sorted(set(run) | set(self.run)) if k != "settings" and run.get(k) != self.run.get(k)]
        a, b = run.get("settings") or {}, self.run.get("settings") or {}
        diffs += [f"setting {k}: {_short(a.get(k))} in the checkpoint, {_short(b.get(k))} now"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diffs:
            raise ValueError(f"{where} was written for another scoring run: " + "; ".join(diffs)
                             + ". Delete it (or give another --checkpoint) to start over")
        return d["state"]

    def resume(self) -> dict:
        """Read the saved state into ``self.state`` (``{}`` when there is none) and return it;
        ValueError on every rank when the file belongs to another run."""
        if self.ranks is None:
            state = self._read() or {}
        else:
            msg = None
            if self.ranks.main:
                try:
                    msg = ("ok", self._read() or {})
                except ValueError as e:
                    msg = ("error", str(e))
            kind, state = self.ranks.broadcast(msg, "reading the checkpoint")
            if kind == "error":
                raise ValueError(state)
        self.state = state
        return state

    def put(self, name: str, value) -> None:
        """Set one piece of the state (JSON value) and write the file atomically (rank 0 only)."""
        self.state[name] = value
        if self.ranks is None or self.ranks.main:
            atomic_write_json(self.path, {"kind": _KIND, "schema_version": CHECKPOINT_VERSION,
                                          "run": self.run, "state": self.state}, indent=None)

    def finish(self) -> None:
        """The table is complete: remove the file (rank 0 only)."""
        if (self.ranks is None or self.ranks.main) and os.path.exists(self.path):
            os.remove(self.path)

    def cells(self, name: str = "cells") -> dict:
        """The saved ``{cell: value}`` (keys back to tuples); counted in ``resumed``."""
        out = {_py_key(k): v for k, v in self.state.get(name, [])}
        self.resumed += len(out)
        return out

    def put_cells(self, cells: dict, name: str = "cells") -> None:
        """Save ``{cell: value}`` as a list of [key, value] pairs."""
        self.put(name, [[_json_key(k), v] for k, v in sorted(cells.items())])


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."
