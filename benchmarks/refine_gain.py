"""What ``refine`` gains over the exact additive optimum (issue 13): bitplan (hessian + ILP) vs
bitplan + refine, at the same budgets.

For each task (``quality_models.py``: MiniLM, the digits MLP, optionally the char LM) and each budget
(average weight bits, scales included: ``budgets.avg_bits_budget_mb``), the ILP plan is made by
``allocate`` from one cached hessian table, then refined for ``--seconds`` by
``allocate(..., sensitivity_table=table, refine_seconds=S)`` (so refine gets the very Problem the ILP
solved: every budget net of fixed costs). Reported per budget:

- calibration loss (the label-free loss refine optimises, measured on all calibration batches, fake
  quantization) of the ILP plan and of the refined plan, and the relative reduction;
- the held-out loss (the same loss on held-out batches, references from the fp model) and the task's
  held-out metrics (MiniLM: cosine to fp32 embeddings, top-5 retrieval agreement; digits: accuracy,
  cross-entropy; char LM: perplexity), both plans, from ``apply_plan_(copy, plan, "fake")``;
- the refine record: seconds, candidates measured, forwards, where the plan came from (search or the
  corrected re-solve), the start's additivity gap, and the reduction reached by 30 / 60 / 120 / 240 s
  (from the record's trace of every improvement);
- on models small enough (digits MLP: 3 layers x 12 options) the measured optimum over EVERY feasible
  plan, so the refined plan's distance to it shows.

    python benchmarks/refine_gain.py                          # minilm + digits_mlp, 3 and 5 bits
    python benchmarks/refine_gain.py --tasks digits_mlp --seconds 20 --out /tmp/r.json   # quick

Writes ``benchmarks/results/refine_gain.json`` (with the commit SHA and the command). Wall times are
from a shared 2-core machine: the refine time limit is wall time, so a loaded machine measures fewer
candidates in the same seconds (``forwards`` and ``cpu_s`` say how much work was done).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quality_models import load_task  # noqa: E402

GROUP = {"minilm": 128, "digits_mlp": 32, "digits_cnn": 32, "charlm": 32}


def commit() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def heldout_batches(task):
    """Held-out inputs for the label-free held-out loss (disjoint from calibration)."""
    if task.name == "minilm":
        from bitplan.models import sentences, text_batches
        from bitplan.models import load_model
        tok = load_model("minilm", n_calib=16, batch_size=16).extra["tokenizer"]
        return text_batches(tok, sentences("heldout")[:64], batch_size=16)
    if task.name.startswith("digits"):
        from quality_models import _digits
        xte = _digits()[2]
        return [xte[i:i + 64] for i in range(0, 256, 64)]
    if task.name == "charlm":
        from quality_models import encode, stdlib_docstrings
        ho = encode(stdlib_docstrings(2_000_000)[1])
        return [ho[i * 1024:(i + 1) * 1024].view(16, 64) for i in range(4)]
    raise ValueError(task.name)


def calib_loss(model, plan, batches, loss_fn, fn_cache={}):
    """Mean label-free loss of the fake-quantized plan over ``batches`` (references from the fp model)."""
    from bitplan.apply import apply_plan_
    from bitplan.sensitivity.losses import resolve_loss
    key = id(batches)
    if key not in fn_cache:
        fn_cache[key] = resolve_loss(loss_fn, model, batches)[0]
    q = apply_plan_(copy.deepcopy(model), plan, "fake")
    with torch.no_grad():
        return float(np.mean([float(fn_cache[key](q, b)) for b in batches]))


def enumerate_optimum(task, graph, opts, budget_mb, limit=5000):
    """(measured optimum, number of feasible plans) over EVERY plan of a small model, else None."""
    import itertools
    from bitplan.costmodels import MB, base_nbytes, cost_table
    from bitplan.joint.meter import PlanMeter
    rows = [np.flatnonzero(opts.allowed[i]) for i in range(len(graph.names))]
    if np.prod([len(r) for r in rows], dtype=float) > limit:
        return None
    size = cost_table("size", graph.layers, list(opts.specs), allowed=opts.allowed)
    cap = budget_mb * MB - base_nbytes(task.model, graph.names)
    meter = PlanMeter(task.model, graph, opts.specs, task.calib, task.loss_fn)
    ys = [meter.measure(c, range(len(task.calib))) for c in itertools.product(*rows)
          if size[np.arange(len(rows)), list(c)].sum() <= cap]
    return float(min(ys)), len(ys)


def run_task(name, bits_list, seconds, work, quick, seed, log, max_evals=None):
    import bitplan
    from bitplan.apply import apply_plan_
    from bitplan.budgets import avg_bits_budget_mb
    from bitplan.core.graph import LayerGraph
    from bitplan.options import resolve_options
    from bitplan.scoring import scored_table

    task = load_task(name, work, quick)
    held = heldout_batches(task)
    graph = LayerGraph.build(task.model, task.calib[0])
    opts = resolve_options(graph, bits=(2, 3, 4, 5, 6, 8), group_size=(None, GROUP[name]))
    os.makedirs(os.path.join(work, "refine"), exist_ok=True)
    cache = os.path.join(work, "refine", f"sens_{name}_hessian{'_quick' if quick else ''}.json")
    t0 = time.perf_counter()
    sopts = {"max_probes": 8, "min_probes": 4} if quick else {"max_probes": 24 if name == "minilm" else 64}
    table = scored_table(task.model, task.calib, opts, graph, "hessian", task.loss_fn, seed, cache, sopts, True)
    score_s = time.perf_counter() - t0
    fp = task.evaluate(task.model)
    log(f"[{name}] {len(graph.names)} layers x {len(opts.specs)} options; table {score_s:.1f} s; fp {fp}")
    rows = []
    for avg in bits_list:
        budget = avg_bits_budget_mb(task.model, avg)
        kw = dict(budget_mb=budget, calib_data=task.calib, loss_fn=task.loss_fn, options=opts.specs,
                  sensitivity_table=table, seed=seed)
        ilp = bitplan.allocate(task.model, **kw)
        t1, c1 = time.perf_counter(), time.process_time()
        ref = bitplan.allocate(task.model, refine_seconds=seconds, **kw,
                               refine_opts={"heldout": held, **({"max_evals": max_evals} if max_evals else {})})
        wall, cpu = time.perf_counter() - t1, time.process_time() - c1
        rec = ref.solver["refine"]
        out = {"avg_bits": avg, "budget_mb": budget, "ilp": {}, "refined": {}, "refine": rec,
               "refine_wall_s": wall, "refine_cpu_s": cpu}
        for key, plan in (("ilp", ilp), ("refined", ref)):
            assert plan.predicted["size_bytes"] <= budget * 1e6 * (1 + 1e-9)
            out[key] = {"size_bytes": plan.predicted["size_bytes"],
                        "calib_loss": calib_loss(task.model, plan, task.calib, task.loss_fn),
                        "heldout_loss": calib_loss(task.model, plan, held, task.loss_fn),
                        "metrics": task.evaluate(apply_plan_(copy.deepcopy(task.model), plan, "fake")),
                        "bits": {k: s.label for k, s in plan.layers.items()}}
        a, b = out["ilp"], out["refined"]
        opt = enumerate_optimum(task, graph, opts, budget)
        if opt is not None:
            out["enumerated"] = {"optimum_calib_loss": opt[0], "feasible_plans": opt[1]}
            log(f"[{name}] {avg} bits: measured optimum over all {opt[1]} feasible plans: {opt[0]:.5g}")
        out["calib_reduction"] = 1 - b["calib_loss"] / a["calib_loss"] if a["calib_loss"] > 0 else 0.0
        def by(t):                 # the refine record's own measured loss of the best plan found by t s
            v = [x["measured"] for x in rec["trace"] if x["s"] <= t]
            return 1 - (v[-1] if v else rec["start_measured"]) / rec["start_measured"] if rec["start_measured"] else 0.0
        marks = sorted({t for t in (30, 60, 120, 240) if t <= seconds} | {seconds})
        out["calib_reduction_by_s"] = {f"{t:g}": by(t) for t in marks}
        out["heldout_reduction"] = 1 - b["heldout_loss"] / a["heldout_loss"] if a["heldout_loss"] > 0 else 0.0
        out["metric_better"] = {m: (b["metrics"][m] - a["metrics"][m]) * (1 if task.higher_better[m] else -1) >= 0
                                for m in task.metrics}
        rows.append(out)
        log(f"[{name}] {avg} bits: calib {a['calib_loss']:.5g} -> {b['calib_loss']:.5g} "
            f"({100 * out['calib_reduction']:.1f} % lower), held-out loss {a['heldout_loss']:.5g} -> "
            f"{b['heldout_loss']:.5g}, metrics {a['metrics']} -> {b['metrics']}; refine {wall:.0f} s wall, "
            f"{rec['candidates']} candidates, {rec['forwards']} forwards, source {rec['source']}, "
            f"stopped {rec['stopped']}, start gap {rec['additivity_gap']}")
    return {"task": name, "layers": len(graph.names), "options": [s.label for s in opts.specs],
            "table_s": score_s, "fp_metrics": fp, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["minilm", "digits_mlp"])
    ap.add_argument("--bits", nargs="+", type=float, default=[3.0, 5.0])
    ap.add_argument("--seconds", type=float, default=300.0, help="refine time limit per plan (wall s)")
    ap.add_argument("--max-evals", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=os.path.join(HERE, "out"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "refine_gain.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda m: print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True)   # noqa: E731
    res = {"command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE))] + list(argv or sys.argv[1:])),
           "commit": commit(), "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "torch_threads": 1, "seconds": args.seconds, "tasks": []}
    for name in args.tasks:
        res["tasks"].append(run_task(name, args.bits, args.seconds, args.work, args.quick, args.seed, log,
                                     args.max_evals))
    res["total_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    os.replace(args.out + ".tmp", args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
