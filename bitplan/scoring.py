"""Scoring with a cache and a progress bar: what ``bitplan plan`` / ``frontier`` / ``demo`` call.

Example:
    >>> table = scored_table(model, batches, opts, graph, cache="sens.json")   # scores once, then reloads
"""
from __future__ import annotations

import logging
import os

__all__ = ["scored_table", "expected_evals"]

log = logging.getLogger("bitplan")


def expected_evals(method: str, n_options: int, n_batches: int, sensitivity_opts: dict | None = None):
    """Upper bound on the loss evaluations an estimator makes (the bar's total), None if unknown.

    Example: ``expected_evals("measured", 96, 4)`` -> 388
    """
    o = sensitivity_opts or {}
    if method in ("measured", "decoupled"):
        return n_batches * (1 + n_options)
    if method == "hessian":
        probes, chunk = o.get("max_probes", 64), o.get("probe_batch", 4)
        return n_batches * -(-probes // chunk)
    if method in ("fisher", "lim"):
        return n_batches
    return None


def scored_table(model, calib_data, opts, graph, method: str = "hessian", loss_fn=None, seed: int = 0,
                 cache=None, sensitivity_opts: dict | None = None, quiet: bool = False):
    """The sensitivity table for ``opts`` (an ``options.Options``): loaded from ``cache`` when that
    file exists (it must match the model's layers and these options, else ``ValueError`` says what
    differs), else scored with a progress bar and saved to ``cache`` when given.

    Example: ``scored_table(model, batches, resolve_options(graph), graph, cache="sens.json")``
    """
    from .core.batches import as_batches
    from .progress import counting_loss, progress_bar
    from .sensitivity import load, score
    if cache is not None and os.path.exists(cache):
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
                      **(sensitivity_opts or {}))
        if cache is not None:
            table.save(cache)
        return table
    log.info("scoring %s sensitivity: %d layers x %d options on %d calibration batches", method,
             len(graph.names), len(opts.specs), len(batches))
    total = expected_evals(method, int(opts.allowed.sum()), len(batches), sensitivity_opts)
    with progress_bar(f"scoring ({method})", total=total, unit=" evals", quiet=quiet) as bar:
        fn = counting_loss(loss_fn, model, batches, bar)
        table = score(model, batches, method=method, loss_fn=fn, seed=seed, options=opts.specs, graph=graph,
                      **(sensitivity_opts or {}))
    if cache is not None:
        table.save(cache)
        log.info("saved sensitivity table to %s", cache)
    return table
