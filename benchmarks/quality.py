"""Quality benchmark (issue #6): bitplan vs uniform, random, HAWQ-V3, ModelOpt, LWQ, CalibTIP.

For every task (quality_models.py) and every budget = the packed size of uniform-b (b = 3..8), each
method makes a plan; the plan is evaluated with ``apply_plan_(copy, plan, "fake")`` (numerically the
same as packed) on held-out data, and its size is the REAL byte count of
``apply_plan_(copy, plan, "packed")`` measured with ``costmodels.model_nbytes`` (checked equal to the
prediction). Estimators are scored once per task and re-solved at every budget.

    python benchmarks/quality.py                  # full: 4 models, 6 budgets (~9 min on 2 cores with cached
                                                  # weights; ~20 min with the one-time training)
    python benchmarks/quality.py --quick --out /tmp/q    # smoke test: 2 tiny models, 2 budgets

Writes ``<out>/RESULTS.md`` (tables + claims), ``<out>/results.json``, ``<out>/frontier_<task>.png``.
Trained weights are cached in ``--work`` (default ``benchmarks/out``, git-ignored).

Besides the anchors, three rows answer "what does a user get":

- ``bitplan_default``: ``bitplan.allocate`` exactly as a user calls it — the default option grid
  (``bitplan.options.DEFAULTS``: bits {2,3,4,5,6,8} x {per channel, group 128}, per-layer masks), the
  default estimator (hessian, this benchmark's probe settings) — re-solved at every budget from one table.
- ``bitplan_old_default``: the round-1 default grid (bits {2,3,4,8}, per channel), same traces.
- ``bitplan_refine``: ``bitplan_default`` + ``bitplan.refine`` (joint search, ``--refine-seconds`` per
  budget) at the budgets in ``--refine-bits`` on the tasks in ``--refine-tasks``; its calibration loss
  before/after is recorded next to the held-out metrics.

``bitplan_best`` (the candidate the headline reports) is chosen by mean rank on a VALIDATION split
(disjoint from calibration and test, see quality_models.py), then reported on the test split.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_methods import (BITS, Context, get_table, hessian_with_specs, make_plan,  # noqa: E402
                             random_plans, rank_and_cut, solve_plan, uniform)
from quality_models import load_task  # noqa: E402
from quality_report import write_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# method key -> (label, what it is); order = table order
METHODS = {
    "uniform": ("uniform", "every layer at the budget's bit-width, per-channel"),
    "random_mean": ("random (mean of 10)", "random plans over {2,3,4,6,8} filling the budget"),
    "random_worst": ("random (worst of 10)", "worst of the same 10 plans, per metric"),
    "hawq_v3": ("HAWQ-V3", "hessian avg trace x ||dW||^2, options {4,8}, ILP"),
    "modelopt": ("ModelOpt-Fisher", "fisher (output Taylor) + ILP, {2,3,4,6,8}"),
    "lwq_lim": ("LWQ-LIM", "rank-and-cut on LIM, levels (2,4) / (4,8)"),
    "lwq_zd": ("LWQ-ZD", "rank-and-cut on ZD, levels (2,4) / (4,8)"),
    "calibtip": ("CalibTIP", "measured one-layer dloss + ILP, {2,3,4,6,8}"),
}
ANCHORS = ["hawq_v3", "modelopt", "lwq_lim", "lwq_zd", "calibtip"]


def settings(task_name: str, quick: bool) -> dict:
    """Per-task benchmark settings (estimator options, group size of bitplan's candidates)."""
    minilm = task_name == "minilm"
    s = {"budget_bits": [3, 6] if quick else [3, 4, 5, 6, 7, 8],
         "group": 128 if minilm else 32,
         "random_n": 10,
         "opts": {"hessian": {"max_probes": 8 if quick else (24 if minilm else 64), "min_probes": 4 if quick else 8},
                  "fisher": {"samples": 2 if quick else 4}},
         "calib_subset": {},
         "bitplan": ["hessian", "fisher", "measured"],
         "pack_all": not minilm}
    if minilm:       # one-at-a-time forwards are the expensive part on MiniLM: 2 of the 4 batches
        s["calib_subset"] = {"measured": 2}
    if quick:
        s["calib_subset"] = {"measured": 1, "fisher": 2, "hessian": 2}
    return s


class Evaluator:
    """Held-out metrics (fake apply) + real packed bytes of a plan, cached per distinct plan.

    ``pack=False`` takes the size from the cost model instead (used for MiniLM's random plans and
    non-selected candidates, where packing 10^7 weights per plan would dominate the run time); every
    packed plan is checked against the cost model, so a mismatch would show in ``size_mismatch``.
    """

    def __init__(self, task):
        self.task, self.cache, self.sizes, self.seconds = task, {}, {}, 0.0
        self.size_mismatch, self.packed_plans, self.val = [], 0, {}

    @staticmethod
    def key(plan):
        return tuple((s.bits, s.group_size, s.symmetric, s.act_bits, s.method) for s in plan.layers.values())

    def validation(self, plan) -> dict | None:
        """Metrics on the task's validation split (None when the task has none)."""
        from bitplan.apply import apply_plan_
        if self.task.validate is None:
            return None
        k = self.key(plan)
        if k not in self.val:
            t0 = time.perf_counter()
            self.val[k] = self.task.validate(apply_plan_(copy.deepcopy(self.task.model), plan, "fake",
                                                         calib_data=self.task.calib))
            self.seconds += time.perf_counter() - t0
        return self.val[k]

    def packed_size(self, plan) -> int:
        from bitplan.costmodels import model_nbytes
        from bitplan.apply import apply_plan_
        k = self.key(plan)
        if k not in self.sizes:
            t0 = time.perf_counter()
            with warnings.catch_warnings():      # "runs the reference dequant path": size is all we need
                warnings.simplefilter("ignore", RuntimeWarning)
                packed = model_nbytes(apply_plan_(copy.deepcopy(self.task.model), plan, "packed",
                                                  calib_data=self.task.calib))
            if packed != int(plan.predicted["size_bytes"]):
                self.size_mismatch.append((plan.estimator.get("name"), packed, plan.predicted["size_bytes"]))
            self.sizes[k] = packed
            self.packed_plans += 1
            self.seconds += time.perf_counter() - t0
        return self.sizes[k]

    def __call__(self, plan, pack: bool = True) -> tuple[dict, int, str]:
        """(metrics, size bytes, "packed" | "predicted")."""
        from bitplan.apply import apply_plan_
        k = self.key(plan)
        if k not in self.cache:
            t0 = time.perf_counter()
            self.cache[k] = self.task.evaluate(apply_plan_(copy.deepcopy(self.task.model), plan, "fake",
                                                           calib_data=self.task.calib))
            self.seconds += time.perf_counter() - t0
        if pack or k in self.sizes:
            return self.cache[k], self.packed_size(plan), "packed"
        return self.cache[k], int(plan.predicted["size_bytes"]), "predicted"


def plan_bits(plan) -> str:
    """Compact bits histogram, e.g. '2:3 4:10 8:1' (g = grouped)."""
    from collections import Counter
    c = Counter(f"{s.bits}{'g' if s.group_size else ''}" for s in plan.layers.values())
    return " ".join(f"{k}:{v}" for k, v in sorted(c.items(), key=lambda kv: (int(kv[0].rstrip('g')), kv[0])))


def run_task(name: str, quick: bool, work: str, seed: int, log, refine: dict | None = None) -> dict:
    from bitplan.costmodels import base_nbytes
    from bitplan.core.graph import LayerGraph
    from bitplan.core.spec import QuantSpec
    from bitplan.core.batches import run_model

    t_task = time.perf_counter()
    task = load_task(name, work, quick)
    st = settings(name, quick)
    graph = LayerGraph.build(task.model, task.calib[0])
    base = base_nbytes(task.model, graph.names)
    ctx = Context(task.model, graph, base, task.calib, task.loss_fn, seed, st["opts"],
                  {k: task.calib[:n] for k, n in st["calib_subset"].items()})
    ev = Evaluator(task)
    fp = task.evaluate(task.model)
    rows = []
    budgets = {b: uniform(ctx, b).predicted["size_bytes"] for b in st["budget_bits"]}
    log(f"[{name}] {len(graph.layers)} layers, base {base} B, budgets {budgets}, fp32 {fp}")

    pack_all = st["pack_all"]
    plans = {}                                     # (method, budget bits) -> Plan

    def add(method, label, b, plan, score_s, solve_s, status="ok", metrics=None, size=None, note="",
            pack=True, size_source="packed", extra=None):
        if plan is not None and metrics is None:
            metrics, size, size_source = ev(plan, pack)
            plans[method, b] = plan
        rows.append({"method": method, "label": label, "budget_bits": b, "budget_bytes": budgets[b],
                     "size_bytes": size, "size_source": size_source if size is not None else None,
                     "metrics": metrics, "score_s": score_s, "solve_s": solve_s,
                     "status": status, "bits": plan_bits(plan) if plan is not None else "", "note": note,
                     **(extra or {})})

    # --- uniform and random
    for b in budgets:
        add("uniform", "uniform", b, uniform(ctx, b), 0.0, 0.0)
        t0 = time.perf_counter()
        rplans = random_plans(ctx, budgets[b], st["random_n"], seed + b)
        gen_s = (time.perf_counter() - t0) / len(rplans)
        res = [ev(p, pack_all) for p in rplans]
        mean = {m: float(np.mean([r[0][m] for r in res])) for m in task.metrics}
        worst = {m: float((min if task.higher_better[m] else max)(r[0][m] for r in res)) for m in task.metrics}
        size = max(r[1] for r in res)
        src = res[0][2]
        add("random_mean", METHODS["random_mean"][0], b, None, 0.0, gen_s, metrics=mean, size=size,
            note=f"{len(rplans)} plans, max size shown", size_source=src)
        add("random_worst", METHODS["random_worst"][0], b, None, 0.0, gen_s, metrics=worst, size=size,
            size_source=src)
    log(f"[{name}] uniform + random done ({time.perf_counter() - t_task:.0f} s)")

    def ilp_method(key, label, scored, cols, specs, pack=True):
        if scored.table is None:
            for b in budgets:
                add(key, label, b, None, scored.seconds, 0.0, "unavailable", note=scored.error)
            return
        loss = scored.table.loss[:, cols]
        for b in budgets:
            plan, s, status = solve_plan(ctx, loss, specs, budgets[b], key)
            add(key, label, b, plan, scored.seconds, s, status if plan is None else "ok",
                note="" if plan is not None else "below the smallest {4,8} size" if key == "hawq_v3" else "",
                pack=pack)
        log(f"[{name}] {key} done (score {scored.seconds:.1f} s)")

    # --- anchors
    pc = [QuantSpec(b) for b in BITS]
    ilp_method("hawq_v3", METHODS["hawq_v3"][0], get_table(ctx, "hessian"),
               [BITS.index(4), BITS.index(8)], [QuantSpec(4), QuantSpec(8)])
    ilp_method("modelopt", METHODS["modelopt"][0], get_table(ctx, "fisher"), list(range(len(BITS))), pc)
    size4 = uniform(ctx, 4).predicted["size_bytes"]
    for key, est, field in (("lwq_lim", "lim", "importance"), ("lwq_zd", "zd", "zd")):
        sc = get_table(ctx, est)
        for b in budgets:
            if sc.table is None:
                add(key, METHODS[key][0], b, None, sc.seconds, 0.0, "unavailable", note=sc.error)
                continue
            t0 = time.perf_counter()
            levels = (2, 4) if budgets[b] < size4 else (4, 8)
            plan = rank_and_cut(ctx, np.asarray(sc.table.meta[field], dtype=float), budgets[b], levels)
            add(key, METHODS[key][0], b, plan, sc.seconds, time.perf_counter() - t0,
                note=f"levels {levels}")
        log(f"[{name}] {key} done (score {sc.seconds:.1f} s)")
    ilp_method("calibtip", METHODS["calibtip"][0], get_table(ctx, "measured"), list(range(len(BITS))), pc)

    # --- bitplan candidates: estimator + ILP over {2,3,4,6,8} x {per-channel, group g}
    g = st["group"]
    specs = pc + [QuantSpec(b, g) for b in BITS]
    cands = []
    for est in st["bitplan"]:
        key = f"bitplan[{est}+g{g}]"
        if est == "hessian":
            scored = hessian_with_specs(ctx, specs)
        else:
            a, bg = get_table(ctx, est), get_table(ctx, est, g)
            if a.table is None or bg.table is None:
                scored = a if a.table is None else bg
            else:
                from bitplan.sensitivity import Sensitivity
                scored = type(a)(Sensitivity(a.table.names, a.table.options + bg.table.options,
                                             np.hstack([a.table.loss, bg.table.loss]), est),
                                 a.seconds + bg.seconds)
        ilp_method(key, key, scored, list(range(len(specs))), specs, pack_all)
        cands.append(key)
    # per-channel-only hessian: separates the option set from the group sizes
    key = "bitplan[hessian]"
    ilp_method(key, key, get_table(ctx, "hessian"), list(range(len(BITS))), pc, pack_all)
    cands.append(key)
    # every bit-width 2..8 (5 and 7 too), both granularities: same traces, no extra scoring
    all_specs = [QuantSpec(b, gg) for gg in (None, g) for b in range(2, 9)]
    key = f"bitplan[hessian+g{g}, bits 2-8]"
    ilp_method(key, key, hessian_with_specs(ctx, all_specs), list(range(len(all_specs))), all_specs, pack_all)
    cands.append(key)

    # --- what a user gets: allocate() with the default grid, the old default, + refine
    user_rows(ctx, task, st, budgets, add, log, refine or {})
    cands += ["bitplan_default"]

    # --- pick bitplan's best candidate: best mean rank over budgets and metrics (ties share the rank),
    # ranked on the VALIDATION split (test metrics never choose)
    ranks = {c: [] for c in cands}
    for b in budgets:
        for m in task.metrics:
            hb = task.higher_better[m]
            vals = {c: v[m] for c in cands if (c, b) in plans
                    for v in [ev.validation(plans[c, b]) or {}] if m in v}
            for c, v in vals.items():
                ranks[c].append(sum((w > v) if hb else (w < v) for w in vals.values()))
    full = len(budgets) * len(task.metrics)
    ranked = {c: float(np.mean(v)) for c, v in ranks.items() if len(v) == full}
    score_s = {r["method"]: r["score_s"] for r in rows}
    best = min(ranked, key=lambda c: (ranked[c], score_s[c])) if ranked else None
    if best:
        for r in [r for r in rows if r["method"] == best]:
            if r["size_source"] == "predicted":          # the winner's plans are always really packed
                r["size_bytes"], r["size_source"] = ev.packed_size(plans[best, r["budget_bits"]]), "packed"
            rows.append({**r, "method": "bitplan_best", "label": f"bitplan best = {best}"})

    # --- packed numerics check on one plan: packed forward == fake forward
    from bitplan.apply import apply_plan_
    u4 = uniform(ctx, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        packed_metrics = task.evaluate(apply_plan_(copy.deepcopy(task.model), u4, "packed"))
    fake_metrics = ev(u4)[0]
    packed_check = {m: abs(packed_metrics[m] - fake_metrics[m]) for m in task.metrics}

    scoring = {f"{k[0]}{'' if k[1] is None else f'+g{k[1]}'}": {"seconds": v.seconds, "error": v.error,
               "meta": _meta_summary(v.table)} for k, v in ctx.tables.items()}
    out = {"task": name, "metrics": task.metrics, "higher_better": task.higher_better, "units": task.units,
           "fp32": fp, "fp32_bytes": int(sum(p.numel() * p.element_size() for p in task.model.parameters())
                                         + sum(b.numel() * b.element_size() for b in task.model.buffers())),
           "base_bytes": base, "layers": len(graph.layers), "budgets": {str(k): v for k, v in budgets.items()},
           "rows": rows, "bitplan_candidates": ranked, "bitplan_best": best,
           "bitplan_best_chosen_on": "validation" if task.validate is not None else "test (no validation split)",
           "validation": {f"{c}@{b}": ev.validation(plans[c, b]) for c in cands for b in budgets if (c, b) in plans},
           "scoring": scoring,
           "size_mismatches": ev.size_mismatch, "packed_vs_fake_max_abs_diff": packed_check,
           "eval_seconds": ev.seconds, "distinct_plans": len(ev.cache), "packed_plans": ev.packed_plans, "info": task.info,
           "settings": st, "seconds": time.perf_counter() - t_task}
    log(f"[{name}] done in {out['seconds']:.0f} s; best bitplan candidate {best}")
    return out


def user_rows(ctx, task, st, budgets, add, log, refine: dict) -> None:
    """Rows ``bitplan_default`` (allocate with its defaults), ``bitplan_old_default`` (round 1's grid)
    and ``bitplan_refine`` (the default plan + refine) — see the module docstring."""
    import bitplan
    from bitplan.core.spec import QuantSpec
    from bitplan.options import DEFAULTS, resolve_options
    from bitplan.scoring import scored_table
    calib = ctx.estimator_calib.get("hessian", ctx.calib)
    hopts = st["opts"]["hessian"]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # "no real kernel on this CPU" notes
        table = scored_table(task.model, calib, resolve_options(ctx.graph), ctx.graph, "hessian",
                             loss_fn=task.loss_fn, seed=ctx.seed, sensitivity_opts=hopts, quiet=True)
    score_s = time.perf_counter() - t0
    grid = f"bits {DEFAULTS['bits']} x group {DEFAULTS['group_size']}, {DEFAULTS['quant_method']}"
    old = [QuantSpec(b) for b in (2, 3, 4, 8)]
    old_table = hessian_with_specs(ctx, old)
    defaults = {}
    for b, budget in budgets.items():
        for key, tab, kw, s_s, note in (("bitplan_default", table, {}, score_s, grid),
                                        ("bitplan_old_default", old_table.table, {"bits": (2, 3, 4, 8), "group_size": None},
                                         old_table.seconds, "bits (2, 3, 4, 8), per channel")):
            t1 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    plan = bitplan.allocate(task.model, budget_mb=budget / 1e6, calib_data=calib, loss_fn=task.loss_fn,
                                            sensitivity_table=tab, seed=ctx.seed, **kw)
            except bitplan.InfeasibleBudgetError as e:
                add(key, key, b, None, s_s, time.perf_counter() - t1, "infeasible", note=str(e)[:120])
                continue
            add(key, key, b, plan, s_s, time.perf_counter() - t1, note=note)
            if key == "bitplan_default":
                defaults[b] = plan
    log(f"[{task.name}] default / old default done (default table {score_s:.1f} s)")
    if task.name not in refine.get("tasks", ()):
        return
    for b in refine.get("bits", ()):
        if b not in defaults:
            continue
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            plan = bitplan.refine(task.model, defaults[b], ctx.calib, task.loss_fn, seconds=refine["seconds"],
                                  table=table, seed=ctx.seed)
        wall = time.perf_counter() - t1
        rec = plan.solver.get("refine", {})
        add("bitplan_refine", "bitplan_default + refine", b, plan, score_s, wall,
            note=f"refine {refine['seconds']:.0f} s limit",
            extra={"refine": {k: rec.get(k) for k in ("start_measured", "measured", "gain", "additivity_gap",
                                                      "stopped", "candidates", "source", "seconds")}})
        log(f"[{task.name}] refine at uniform-{b}: {wall:.0f} s")


def _meta_summary(table) -> dict:
    if table is None:
        return {}
    keep = ("probes", "samples", "forwards", "batches", "loss", "no_grad_layers", "blocks", "probe_mode",
            "converged")
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in table.meta.items() if k in keep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 tiny models, 2 budgets (CI)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder (RESULTS.md, PNG, JSON)")
    ap.add_argument("--work", default=os.path.join(HERE, "out"), help="cache of trained weights (git-ignored)")
    ap.add_argument("--tasks", nargs="*", default=None,
                    help="subset of: minilm digits_cnn digits_mlp charlm (default: all; quick: digits_mlp charlm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the shared 2-core box, 2 threads ran MiniLM ~5x slower)")
    ap.add_argument("--refine-tasks", nargs="*", default=["minilm", "charlm"],
                    help="tasks that get the bitplan_refine row (default: minilm charlm)")
    ap.add_argument("--refine-bits", type=int, nargs="*", default=[3, 5],
                    help="budgets (uniform-b sizes) at which the default plan is refined (default: 3 5)")
    ap.add_argument("--refine-seconds", type=float, default=None,
                    help="refine time limit per plan (wall s; default 120, --quick 10)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-write RESULTS.md and the PNGs from <out>/results.json without re-running")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        write_report(saved["tasks"], saved["env"], args.out)
        return 0
    from provenance import provenance
    prov = provenance()                  # at the start: the code that runs, not the tree at the end
    torch.set_num_threads(args.threads)
    tasks = args.tasks or (["digits_mlp", "charlm"] if args.quick else ["digits_mlp", "digits_cnn", "charlm", "minilm"])
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - t0:7.1f}s {msg}", flush=True)
    results = []
    for name in tasks:
        results.append(run_task(name, args.quick, args.work, args.seed, log,
                                {"tasks": args.refine_tasks, "bits": args.refine_bits,
                                 "seconds": args.refine_seconds or (10.0 if args.quick else 120.0)}))
        with open(os.path.join(args.out, "results.json"), "w") as f:      # partial results survive a kill
            json.dump({"tasks": results}, f, indent=1, default=float)
    env = {**prov, "loadavg": os.getloadavg(),
           "quick": args.quick, "seconds": time.perf_counter() - t0, "threads": args.threads,
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"env": env, "tasks": results}, f, indent=1, default=float)
    write_report(results, env, args.out)
    log(f"wrote {args.out}/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
