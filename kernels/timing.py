"""Honest wall-clock timing of several candidates on a shared, noisy machine.

Method (``time_interleaved``):
1. warm up every candidate (at least ``warmup_ms`` of calls and 3 calls);
2. choose per candidate how many calls make one timed batch (about ``target_ms``), so timer
   resolution and Python overhead vanish and a preemption hits few batches;
3. time ``reps`` rounds; each round runs one batch of every candidate, in an order that rotates
   every round (interleaving: slow drifts of the machine hit all candidates alike);
4. drop preempted batches (> ``2 ×`` the 10th percentile: another process took the core, the ~8 ms
   steps seen on this machine; the fast tail is the undisturbed one, so the threshold stays valid
   even when over half the batches were hit), keep the median, the quartiles and
   ``spread = (p75 − p25) / median`` of the rest;
5. a candidate whose spread exceeds ``max_spread`` is re-measured (up to ``retries`` times) and the
   attempt with the smallest spread is kept; ``stable`` says whether the final spread is below it.

Pure measurement: no prints; times are returned in milliseconds per call.

Clocks (``clock_fn``): ``"wall"`` (``time.perf_counter``, what a user waits on a dedicated machine)
or ``"cpu"`` (``time.thread_time``: CPU time of the calling thread, valid with one torch thread).
On a shared machine a forward pass longer than a scheduler time slice cannot dodge other
processes, so its wall time measures the neighbours (MiniLM-L6 at 1 × 128 tokens, 1 thread, load
average ~7 on 2 cores: 70 ms wall vs 29 ms CPU); short calibration batches can dodge them. The CPU
clock measures both the same way; caches shared with the neighbours still slow it somewhat.

Example:
    >>> t = time_interleaved({"fp32": lambda: x @ w, "bf16": lambda: xb @ wb})
    >>> t["bf16"].median_ms, t["bf16"].spread
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

__all__ = ["Timing", "time_interleaved", "clock_fn", "CLOCKS"]

CLOCKS = ("wall", "cpu")


def clock_fn(name: str) -> Callable[[], float]:
    """The timer for ``"wall"`` or ``"cpu"``; the CPU clock needs ``torch.get_num_threads() == 1``."""
    if name == "wall":
        return time.perf_counter
    if name == "cpu":
        import torch
        if torch.get_num_threads() != 1:
            raise ValueError(f"clock='cpu' times the calling thread only; it needs torch.set_num_threads(1) "
                             f"(now {torch.get_num_threads()} threads)")
        return time.thread_time
    raise ValueError(f"clock={name!r} is not supported; allowed: {list(CLOCKS)}")

PREEMPTED = 2.0     # a batch slower than PREEMPTED × the 10th percentile was interrupted: dropped


@dataclass(frozen=True)
class Timing:
    median_ms: float      # per call
    p25_ms: float
    p75_ms: float
    spread: float         # (p75 - p25) / median, the instability measure
    batches: int          # timed batches kept
    dropped: int          # batches dropped as preempted
    inner: int            # calls per batch
    retries: int          # re-measurements because the spread was too large
    stable: bool          # spread <= max_spread at the end

    def to_dict(self) -> dict:
        return asdict(self)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _summary(samples: list[float], inner: int, retries: int, max_spread: float) -> Timing:
    fast = sorted(samples)[len(samples) // 10]
    kept = [s for s in samples if s <= PREEMPTED * fast]
    p25, p50, p75 = _quantiles(kept)
    spread = (p75 - p25) / p50 if p50 > 0 else 0.0
    return Timing(p50 * 1e3, p25 * 1e3, p75 * 1e3, spread, len(kept), len(samples) - len(kept), inner,
                  retries, spread <= max_spread)


def _run_rounds(fns, inner, reps, clock, sync) -> dict[str, list[float]]:
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(reps):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            f, n = fns[name], inner[name]
            sync()
            t0 = clock()
            for _ in range(n):
                f()
            sync()
            out[name].append((clock() - t0) / n)              # seconds per call
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int = 31, target_ms: float = 1.0,
                     warmup_ms: float = 20.0, max_spread: float = 0.10, retries: int = 2,
                     max_seconds: float = 0.5, clock: Callable[[], float] = time.perf_counter,
                     sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Median ms per call of each zero-argument callable, measured interleaved (see module doc).

    ``max_seconds`` caps the timed time of one candidate per attempt (rounds shrink to >= 7 when
    one call is slow). ``sync`` runs before and after each batch (``torch.cuda.synchronize``).

    Example: ``time_interleaved({"a": f, "b": g})["a"].median_ms``
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one callable")
    per_call = {}
    for name, f in fns.items():                                   # 1. warm-up
        calls, t_start, last = 0, clock(), []
        while calls < 3 or (clock() - t_start) * 1e3 < warmup_ms:
            sync()
            t0 = clock()
            f()
            sync()
            last.append(clock() - t0)
            calls += 1
            if calls >= 10_000:
                break
        per_call[name] = max(statistics.median(last[-5:]), 1e-7)
    inner = {n: max(1, round(target_ms * 1e-3 / t)) for n, t in per_call.items()}     # 2.
    batch_s = max(inner[n] * per_call[n] for n in fns)
    reps = max(7, min(reps, int(max_seconds / batch_s)))
    samples = _run_rounds(fns, inner, reps, clock, sync)                             # 3.
    best = {n: _summary(samples[n], inner[n], 0, max_spread) for n in fns}          # 4.
    for attempt in range(1, retries + 1):                                            # 5.
        unstable = {n: fns[n] for n in fns if not best[n].stable}
        if not unstable:
            break
        again = _run_rounds(unstable, inner, reps, clock, sync)
        for n in unstable:
            t = _summary(again[n], inner[n], attempt, max_spread)
            if t.spread < best[n].spread:
                best[n] = t
            else:
                best[n] = Timing(**{**best[n].to_dict(), "retries": attempt})
    return best
