"""Scoring with a cache and a progress bar: what ``bitplan plan`` / ``frontier`` / ``demo`` call.

Example:
    >>> table = scored_table(model, batches, opts, graph, cache="sens.json")   # scores once, then reloads
"""
from __future__ import annotations

import logging
import os

__all__ = ["scored_table", "expected_evals", "checkpoint_path"]

log = logging.getLogger("bitplan")


def expected_evals(method: str, n_options: int, n_batches: int, sensitivity_opts: dict | None = None):
    """Upper bound on the loss evaluations an estimator makes (the bar's total), None if unknown.

    Example: ``expected_evals("measured", 96, 4)`` -> 388
    """
    o = sensitivity_opts or {}
    if method in ("measured", "decoupled"):
        return n_batches * (1 + n_options)
    if method == "hessian":
        from .sensitivity.hessian import auto_max_probes      # automatic cap: "output" mode's is the larger
        probes = o.get("max_probes") or auto_max_probes("output", n_options, o.get("min_probes", 8))
        chunk = o.get("probe_batch", 4)
        return n_batches * -(-probes // chunk)
    if method in ("fisher", "lim"):
        return n_batches
    return None


def checkpoint_path(cache, checkpoint=None):
    """Where a partially scored table is kept: ``checkpoint``, else next to the cache
    (``sens.json`` -> ``sens.partial.json``), else nowhere (None).

    Example: ``checkpoint_path("out/sens.json")`` -> ``"out/sens.partial.json"``
    """
    if checkpoint is not None or cache is None:
        return checkpoint
    root, ext = os.path.splitext(os.fspath(cache))
    return root + ".partial" + (ext or ".json")


def scored_table(model, calib_data, opts, graph, method: str = "hessian", loss_fn=None, seed: int = 0,
                 cache=None, sensitivity_opts: dict | None = None, quiet: bool = False, checkpoint=None,
                 timeout: float | None = None):
    """The sensitivity table for ``opts`` (an ``options.Options``): loaded from ``cache`` when that
    file exists (it must match the model's layers and these options, else ``ValueError`` says what
    differs), else scored with a progress bar and saved to ``cache`` when given. The partial table
    is checkpointed to :func:`checkpoint_path` while scoring, so an interrupted run resumes.

    In a ``torch.distributed`` process group (call it on every rank) the scoring is spread over the
    ranks; rank 0 alone shows the bar, reads and writes the files, and is the only rank that gets
    the table when the cache already exists (the others get None).

    Example: ``scored_table(model, batches, resolve_options(graph), graph, cache="sens.json")``
    """
    from .core.batches import as_batches
    from .progress import counting_loss, progress_bar
    from .sensitivity import load, score
    from .sensitivity.distributed import current
    ranks = current(timeout)
    main = ranks is None or ranks.main
    have_cache = cache is not None and main and os.path.exists(cache)
    if ranks is not None:                     # the cache lives on rank 0's disk
        have_cache = ranks.broadcast(have_cache, "checking the sensitivity cache")
        if have_cache and not main:
            return None
    if have_cache:
        table = load(cache)
        table.check_matches(graph.names, opts.specs, graph.fingerprint, where=f"sensitivity cache {cache}")
        log.info("loaded sensitivity table %s (%s, %d layers x %d options); not re-scoring",
                 cache, table.method, len(table.names), len(table.options))
        return table
    batches = as_batches(calib_data)
    from .sensitivity.registry import STREAMING
    if method in STREAMING:      # reads the model from its folder a block at a time; never runs it whole
        log.info("scoring %s sensitivity (streamed): %d layers x %d options on %d calibration batches", method,
                 len(graph.names), len(opts.specs), len(batches))
        table = score(model, batches, method=method, loss_fn=loss_fn, seed=seed, options=opts.specs, graph=graph,
                      timeout=timeout, checkpoint=checkpoint_path(cache, checkpoint), **(sensitivity_opts or {}))
        if cache is not None and main:
            table.save(cache)
        return table
    log.info("scoring %s sensitivity: %d layers x %d options on %d calibration batches", method,
             len(graph.names), len(opts.specs), len(batches))
    total = expected_evals(method, int(opts.allowed.sum()), len(batches), sensitivity_opts)
    if ranks is not None and total is not None:      # the bar counts rank 0's own evaluations
        total = -(-total // ranks.world) + len(batches)
    with progress_bar(f"scoring ({method})", total=total, unit=" evals", quiet=quiet or not main) as bar:
        fn = counting_loss(loss_fn, model, batches, bar)
        table = score(model, batches, method=method, loss_fn=fn, seed=seed, options=opts.specs, graph=graph,
                      checkpoint=checkpoint_path(cache, checkpoint), timeout=timeout, **(sensitivity_opts or {}))
    if cache is not None and main:
        table.save(cache)
        log.info("saved sensitivity table to %s", cache)
    return table
