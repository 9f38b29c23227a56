"""Per-layer Hessian traces on MiniLM-L6: bitplan vs PyHessian, same probes count, same data.

Data: the built-in ``minilm`` calibration set (4 batches x 16 sentences), label-free MSE of the
sentence embedding to the fp embedding (the default ``score`` loss). Parameters: the quantizable
weights that get a gradient (36 Linear weights; the pooler is unused by the sentence embedding).
Every run uses exactly --probes Rademacher probes, all batches per probe, --threads threads.

Compared in one process, in --rounds interleaved rounds (order reversed every round; the least
disturbed round is reported, with CPU seconds next to wall seconds):
  pyhessian-whole    PyHessian 0.1 ``hessian(...).trace()`` in its full-batch mode (gradient graph of
                     all 4 batches built once and reused by every probe) over all 36 weights at once:
                     ONE number per probe (Σ_l Tr H_l), no per-layer traces.
  pyhessian-layer    PyHessian's only route to per-layer traces: one ``trace()`` per layer with only
                     that weight requiring grad; timed on --pyhessian-layers layers, extrapolated to 36.
  bitplan-weight     ``hutchinson_traces(probe="weight")``: one HVP per probe (batched, 4 probes per
                     double backward) restricted to the quantizable weights -> all 36 traces.
  bitplan-output     ``hutchinson_traces(probe="output")`` (the default for label-free losses): exact
                     because H = Jᵀ H_out J at the fp point; one ordinary backward per probe -> all 36.
"Speed-up" = wall(PyHessian run) / wall(bitplan run). Variance: standard error of the whole-model
trace (Σ_l) and per-layer relative standard errors, each from the run's own probes.

Then the wall time and peak RSS of every estimator (``score`` end to end, own subprocess, cached by
benchmarks/sensitivity_validity.py in benchmarks/out/).

Run: python benchmarks/hessian_speed.py [--probes 16] [--threads 2] [--pyhessian-layers 2] [--batches 4] [--rounds 2]
The machine may be shared with other jobs: say so when quoting the numbers.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_ctx(model, batches, seed=0):
    """The ScoreContext ``score`` would build (private copy, loss, graph)."""
    from bitplan.core.batches import as_batches
    from bitplan.core.graph import LayerGraph
    from bitplan.kernels.formats import QuantSpec
    from bitplan.sensitivity.losses import resolve_loss
    from bitplan.sensitivity.registry import ScoreContext
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    batches = as_batches(batches)
    fn, desc = resolve_loss(None, work, batches)
    graph = LayerGraph.build(work, batches[0])
    return ScoreContext(work, graph, batches, fn, [QuantSpec(4)], seed, desc)


def pyhessian_run(ctx, names, probes):
    """PyHessian trace() over the weights of ``names`` together: (per-probe totals, wall s)."""
    from pyhessian import hessian as PyHessian

    from bitplan.sensitivity._common import checked_loss, math_sdpa

    class LossAsModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ctx.model

        def forward(self, idx):
            return torch.stack([checked_loss(ctx, ctx.batches[int(i)], int(i)) for i in idx]).mean()

    ws = [ctx.module(n).weight for n in names]
    for w in ws:
        w.requires_grad_(True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        with math_sdpa(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = PyHessian(LossAsModel(), lambda out, y: out,
                          data=(torch.arange(len(ctx.batches)), torch.zeros(len(ctx.batches))), cuda=False)
            vals = np.array(h.trace(maxIter=probes, tol=float("-inf")))
    finally:
        for w in ws:
            w.grad = None
            w.requires_grad_(False)
    return vals, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pyhessian-layers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="calibration batches used (of 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round is reported")
    ap.add_argument("--skip-estimators", action="store_true", help="no per-estimator wall/RSS table")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bitplan.models import load_model
    from bitplan.sensitivity.hessian import hutchinson_traces
    spec = load_model("minilm")
    ctx = make_ctx(spec.model, spec.calib_data[:a.batches])
    P = a.probes
    live_info = hutchinson_traces(ctx, tol=1e-12, min_probes=2, max_probes=2, probe="output")[3]
    live = [nm for nm in ctx.names if nm not in live_info["no_grad_layers"]]
    li = [ctx.names.index(nm) for nm in live]
    picks = [live[0], live[-1]][:a.pyhessian_layers] if a.pyhessian_layers <= 2 else \
        live[:: max(1, len(live) // a.pyhessian_layers)][:a.pyhessian_layers]

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - t0, time.process_time() - c0

    def run_bitplan(mode):
        tr, se, n, info = hutchinson_traces(ctx, tol=1e-12, min_probes=P, max_probes=P, probe_batch=4, probe=mode)
        return {"tr": tr, "se": se, "n": n, "total_se": info["total_trace_stderr"]}

    def run_whole():
        vals, _ = pyhessian_run(ctx, live, P)
        return {"total": vals.mean(), "total_se": vals.std(ddof=1) / np.sqrt(P)}

    def run_layers():
        per = {}
        for nm in picks:
            v, _ = pyhessian_run(ctx, [nm], P)
            per[nm] = (v.mean(), v.std(ddof=1) / np.sqrt(P))
        return {"per": per}

    runs = {"pyhessian-whole": run_whole, "pyhessian-layer": run_layers,
            "bitplan-weight": lambda: run_bitplan("weight"), "bitplan-output": lambda: run_bitplan("output")}
    rows, times = {}, {k: [] for k in runs}
    order = list(runs)
    for r in range(a.rounds):          # interleaved, order reversed every round: shared-machine noise
        for k in (order if r % 2 == 0 else order[::-1]):
            rows[k], w, c = timed(runs[k])
            times[k].append((w, c))
    scale = {k: (len(live) / len(picks) if k == "pyhessian-layer" else 1.0) for k in runs}
    for k in runs:                     # best (least disturbed) round; extrapolated for pyhessian-layer
        rows[k]["wall"] = min(w for w, _ in times[k]) * scale[k]
        rows[k]["cpu"] = min(c for _, c in times[k]) * scale[k]
        rows[k]["measured_wall"] = min(w for w, _ in times[k])
    info = live_info
    per = rows["pyhessian-layer"]["per"]

    print(f"MiniLM-L6, {len(ctx.batches)} calibration batches x 16 sentences, label-free MSE, {P} probes, "
          f"{a.threads} threads, torch {torch.__version__} (shared machine: other jobs were running)")
    print(f"{len(live)} quantizable weights with a gradient ({len(ctx.names) - len(live)} without: "
          f"{info['no_grad_layers']})\n")
    print(f"best of {a.rounds} interleaved rounds (wall per round: " + "; ".join(
        f"{k} {', '.join(f'{w:.1f}' for w, _ in v)}" for k, v in times.items()) + ")\n")
    print(f"{'run':16} {'yields':22} {'wall s':>8} {'CPU s':>7} {'s/probe':>8} {'Σ_l Tr H_l':>11} {'± se':>9} "
          f"{'rel se':>7} {'median layer rel se':>19}")
    for k in ("pyhessian-whole", "pyhessian-layer", "bitplan-weight", "bitplan-output"):
        r = rows[k]
        if k.startswith("bitplan"):
            tot, tot_se = r["tr"][li].sum(), r["total_se"]      # se from the per-probe totals
            rel = np.median(r["se"][li] / np.abs(r["tr"][li]))
            yields = f"{len(live)} layer traces"
        elif k == "pyhessian-whole":
            tot, tot_se, rel, yields = r["total"], r["total_se"], np.nan, "1 whole-model trace"
        else:
            tot, tot_se = np.nan, np.nan
            rel = np.median([s / abs(m) for m, s in r["per"].values()])
            yields = f"{len(live)} traces (extrap.)"
        print(f"{k:16} {yields:22} {r['wall']:8.1f} {r['cpu']:7.1f} {r['wall'] / P:8.2f} {tot:11.4f} {tot_se:9.4f} "
              f"{tot_se / abs(tot) if tot == tot else np.nan:7.3f} {rel:19.3f}")
    print(f"\npyhessian-layer: measured {rows['pyhessian-layer']['measured_wall']:.1f} s on {len(picks)} layers "
          f"({', '.join(picks)}), x {len(live)}/{len(picks)}")
    for nm, (m, s) in per.items():
        i = ctx.names.index(nm)
        print(f"  {nm}: pyhessian {m:.4f} ± {s:.4f} | bitplan-output {rows['bitplan-output']['tr'][i]:.4f} ± "
              f"{rows['bitplan-output']['se'][i]:.4f} | bitplan-weight {rows['bitplan-weight']['tr'][i]:.4f} ± "
              f"{rows['bitplan-weight']['se'][i]:.4f}")
    bo, bw = rows["bitplan-output"]["wall"], rows["bitplan-weight"]["wall"]
    pw, pl = rows["pyhessian-whole"]["wall"], rows["pyhessian-layer"]["wall"]
    pc, bc, wc, lc = (rows[k]["cpu"] for k in ("pyhessian-whole", "bitplan-output", "bitplan-weight", "pyhessian-layer"))
    print(f"\nCPU-time ratios: whole/output {pc / bc:.2f}x, whole/weight {pc / wc:.2f}x, "
          f"layer/output {lc / bc:.2f}x, layer/weight {lc / wc:.2f}x")
    print(f"\nspeed-up (wall), same {P} probes, same data:")
    print(f"  pyhessian-whole (1 number)    / bitplan-output (36 traces) = {pw / bo:6.2f}x")
    print(f"  pyhessian-whole (1 number)    / bitplan-weight (36 traces) = {pw / bw:6.2f}x")
    print(f"  pyhessian-layer (36, extrap.) / bitplan-output (36 traces) = {pl / bo:6.2f}x")
    print(f"  pyhessian-layer (36, extrap.) / bitplan-weight (36 traces) = {pl / bw:6.2f}x")

    if not a.skip_estimators:
        from sensitivity_validity import BITS, METHODS, table
        print(f"\nevery estimator, score() end to end on MiniLM (bits {BITS}), own subprocess, "
              f"{a.threads} threads, shared machine:")
        print(f"{'method':10} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'RSS after load MiB':>19}  notes")
        for m in METHODS:
            t = table("minilm", m, a.threads, False)
            note = ""
            if m == "hessian":
                note = f"probes={t.meta['probes']} mode={t.meta.get('probe_mode')} converged={t.meta.get('converged')}"
            print(f"{m:10} {t.meta['bench_wall_s']:8.1f} {t.meta.get('bench_cpu_s', float('nan')):8.1f} "
                  f"{t.meta['bench_peak_rss_mib']:13.0f} "
                  f"{t.meta['bench_rss_before_mib']:19.0f}  {note}")


if __name__ == "__main__":
    main()
