"""Progress bars (tqdm on stderr) for the long steps: scoring, calibration, frontier sweeps.

Bars are off under ``quiet=True`` and, by tqdm's own rule (``disable=None``), whenever stderr is not
a TTY (CI logs, pipes, subprocess tests), so captured output stays clean.

Example:
    >>> with progress_bar("frontier", total=8, unit="budget") as bar:
    ...     for b in budgets: ...; bar.update()
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar", "counting_loss"]


def progress_bar(desc: str, total: int | None = None, unit: str = "it", quiet: bool = False):
    """A tqdm bar on stderr; disabled when ``quiet`` or stderr is not a TTY."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None)


def counting_loss(loss_fn, model, batches: list, bar):
    """``loss_fn`` resolved as the estimators resolve it, ticking ``bar`` once per evaluation.

    Estimators call the loss once per probe / perturbed forward, so the bar shows scoring progress
    without any change to the estimators. ``loss_fn=None`` / "kl" / "mse" become the same label-free
    loss the estimators would build (references from ``model``'s own fp outputs on ``batches``).
    """
    from .sensitivity.losses import LabelFreeLoss, resolve_loss
    fn, desc = resolve_loss(loss_fn, model, batches)
    if isinstance(fn, LabelFreeLoss):
        # stay a LabelFreeLoss: estimators pick their exact, faster paths (output-space probes) by type
        class CountedLabelFree(LabelFreeLoss):
            __name__ = desc

            def output(self, m, b):
                out = LabelFreeLoss.output(m, b)
                bar.update()
                return out
        return CountedLabelFree(fn.kind, fn.refs)

    def counted(m, b):
        out = fn(m, b)
        bar.update()
        return out
    counted.__name__ = desc          # recorded in the table's meta["loss"]
    return counted
