"""Checkpoints of the block-streaming estimator (``streaming.block``): scoring a large model takes
hours, and a rerun must resume at the next block, not start over.

After a block, rank 0 writes the rows scored so far (JSON, through ``checkpoint.Checkpoint``: atomic,
refused for another run) and every rank writes the hidden states it carries — and its noise probes'
states — to ``<checkpoint>.rank<r>.safetensors`` (temp file + rename), before the JSON that points to
them. The run is guarded by :func:`folder_digest` of the safetensors files and the batches.

Example:
    >>> ck = BlockCheckpoint("sens.partial.json", None, lm, graph, specs, batches, {"seed": 0})
    >>> ck.state.get("next_block", 0)
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

__all__ = ["BlockCheckpoint", "folder_digest"]


def folder_digest(shards, batches) -> str:
    """blake2b of the safetensors files' names, sizes and headers, the first and last MiB of each file,
    and the calibration batches: a cheap guard against resuming on other weights or data (it reads
    ~2 MiB a shard, not the model; a change that keeps every shard's size, header and ends escapes it)."""
    import hashlib

    from .checkpoint import content_digest
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(set(shards.where.values())):
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 26)))                 # the JSON header: names, dtypes, offsets
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    h.update(content_digest(torch.nn.Module(), batches).encode())
    return h.hexdigest()


class BlockCheckpoint:
    """The partially scored rows (JSON, rank 0) and each rank's carried hidden states (safetensors)."""

    def __init__(self, path, ranks, lm, graph, specs, batches, settings: dict):
        from .checkpoint import Checkpoint
        from .table import _jsonable
        run = {"method": "block", "names": graph.names, "options": [s.to_dict() for s in specs],
               "model_fingerprint": graph.fingerprint, "content": folder_digest(lm.shards, batches),
               "settings": _jsonable({**settings, "batches": len(batches),
                                      "world_size": ranks.world if ranks else 1})}
        self.ranks, self.rank = ranks, ranks.rank if ranks else 0
        self.ck = Checkpoint(path, run, ranks)
        self.state = self.ck.resume()
        self.file = f"{os.fspath(path)}.rank{self.rank}.safetensors"
        self.last = time.perf_counter()

    def due(self, every: float) -> bool:
        """Time for a save? (the same answer on every rank: rank 0's clock decides)"""
        ok = time.perf_counter() - self.last >= every
        return self.ranks.broadcast(ok, "checkpoint timer") if self.ranks else ok

    def save(self, next_block: int, h, D, gamma, fwd, probe_x: dict, probe_sq: dict) -> None:
        from safetensors.torch import save_file
        tmp = self.file + ".tmp"
        t = {f"h{q}": x.contiguous() for q, x in enumerate(h)}
        t.update({f"p{k}_{q}": x.contiguous() for k, xs in probe_x.items() for q, x in enumerate(xs)})
        save_file(t, tmp, metadata={"next_block": str(next_block)})
        os.replace(tmp, self.file)                  # every rank's states first, then the JSON that points to them
        if self.ranks:
            self.ranks.sync("writing the checkpoint")
        self.ck.state.update({"D": D.tolist(), "gamma": np.nan_to_num(gamma, nan=-1.0).tolist(),
                              "block_forwards": fwd, "probe_sq": {str(k): v for k, v in probe_sq.items()}})
        self.ck.put("next_block", next_block)           # writes the whole state (rank 0)
        self.last = time.perf_counter()

    def hidden(self, block: int, shapes, probe_shapes: dict) -> tuple[list, dict]:
        """This rank's saved hidden states entering ``block`` and its probes' noisy states
        ({start block: [states]}); ValueError if they do not fit."""
        from safetensors import safe_open
        where = f"checkpoint {self.file}"
        if not os.path.isfile(self.file) or os.path.islink(self.file):
            raise ValueError(f"{where} is missing; delete {self.ck.path} to start over")
        try:
            with safe_open(self.file, "pt") as f:
                meta = f.metadata() or {}
                h = [f.get_tensor(f"h{q}") for q in range(len(shapes))]
                px = {k: [f.get_tensor(f"p{k}_{q}") for q in range(len(ps))] for k, ps in probe_shapes.items()}
        except Exception as e:          # safetensors raises its own errors on corrupt files
            raise ValueError(f"{where} does not read ({type(e).__name__}: {str(e)[:200]}); delete "
                             f"{self.ck.path} to start over") from None
        if meta.get("next_block") != str(block) or [tuple(x.shape) for x in h] != [tuple(s) for s in shapes]:
            raise ValueError(f"{where} holds hidden states for block {meta.get('next_block')!r} of shapes "
                             f"{[tuple(x.shape) for x in h][:2]}..., not block {block} of {[tuple(s) for s in shapes][:2]}...; "
                             f"delete {self.ck.path} to start over")
        if any([tuple(x.shape) for x in px[k]] != [tuple(s) for s in ps] for k, ps in probe_shapes.items()):
            raise ValueError(f"{where}: its noise probes do not fit the calibration batches; delete "
                             f"{self.ck.path} to start over")
        return h, px

    def finish(self) -> None:
        if self.ranks:
            self.ranks.sync("removing the checkpoint")
        self.ck.finish()
        if os.path.exists(self.file):
            os.remove(self.file)
