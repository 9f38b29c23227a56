"""RESULTS.md tables, claims computed from the numbers, and frontier PNGs for benchmarks/quality.py."""
from __future__ import annotations

import os

__all__ = ["write_report", "compare", "plot_frontier"]

ORDER = ["uniform", "random_mean", "random_worst", "hawq_v3", "modelopt", "lwq_lim", "lwq_zd", "calibtip"]
USER = ["bitplan_old_default", "bitplan_default", "bitplan_refine"]     # what allocate() gives a user
ANCHORS = {"hawq_v3": "HAWQ-V3", "modelopt": "ModelOpt-Fisher", "lwq_lim": "LWQ-LIM", "lwq_zd": "LWQ-ZD",
           "calibtip": "CalibTIP"}
TASK_DOC = {
    "minilm": "all-MiniLM-L6-v2 sentence embeddings. cosine = mean cosine similarity of each held-out sentence's "
              "embedding to the fp32 one; top-5 agreement = mean |top5_quant ∩ top5_fp32| / 5 of every held-out "
              "sentence's 5 nearest neighbours among the held-out set. Held-out: bitplan/data/heldout_sentences.txt "
              "(disjoint from the 64 calibration sentences).",
    "digits_mlp": "MLP 64-128-64-10 trained on sklearn load_digits (70/30 stratified split, random_state=0, seed 0); "
                  "metrics on the 540 test images (one image = 0.0019 accuracy).",
    "digits_cnn": "CNN conv16-conv32-fc64-fc10 trained on sklearn load_digits (same split); metrics on the 540 test images.",
    "charlm": "2-block character transformer (d=128 in the full run, context 64) trained on docstrings of this Python's standard "
              "library (every 10th file held out); perplexity on 16,384 held-out characters.",
}
PRETTY = {"cosine": "cosine to fp32", "top5_agreement": "top-5 agreement", "accuracy": "test accuracy",
          "cross_entropy": "test cross-entropy", "perplexity": "held-out perplexity"}


def _size(b, units):
    if b is None:
        return "—"
    return f"{b / 1e6:.3f}" if units == "MB" else f"{b / 1e3:.2f}"


def _fmt(v, metric):
    if v is None:
        return "—"
    if metric in ("accuracy", "top5_agreement"):
        return f"{v:.4f}"
    if metric == "cosine":
        return f"{v:.5f}"
    return f"{v:.4f}"


def _better(a, b, hb, tol=1e-12):
    """+1 if a is better than b, 0 tie, -1 worse."""
    if abs(a - b) <= tol * max(1.0, abs(a), abs(b)):
        return 0
    return 1 if (a > b) == hb else -1


def _methods(res):
    seen = []
    for r in res["rows"]:
        if r["method"] not in seen:
            seen.append(r["method"])
    cands = [m for m in seen if m.startswith("bitplan[")]
    user = [m for m in USER if m in seen]
    return [m for m in ORDER if m in seen] + cands + user + (["bitplan_best"] if "bitplan_best" in seen else [])


def _row(res, method, b):
    return next((r for r in res["rows"] if r["method"] == method and r["budget_bits"] == b), None)


def compare(res, metric=None) -> dict:
    """Per opponent: {'better': [budget bits], 'tie': [...], 'worse': [...], 'na': [...]} for bitplan_best."""
    metric = metric or res["metrics"][0]
    hb = res["higher_better"][metric]
    out = {}
    for opp in ["uniform", "random_mean", "random_worst"] + list(ANCHORS) + [
            m for m in _methods(res) if m.startswith("bitplan[")]:
        d = {"better": [], "tie": [], "worse": [], "na": []}
        for b in sorted(int(k) for k in res["budgets"]):
            me, ot = _row(res, "bitplan_best", b), _row(res, opp, b)
            if me is None or ot is None or not me["metrics"] or not ot["metrics"]:
                d["na"].append(b)
                continue
            c = _better(me["metrics"][metric], ot["metrics"][metric], hb)
            d[{1: "better", 0: "tie", -1: "worse"}[c]].append(b)
        out[opp] = d
    return out


def _claims(res) -> list[str]:
    prim = res["metrics"][0]
    best = res.get("bitplan_best")
    if not best:
        return ["- no bitplan candidate produced plans at every budget"]
    lines = []
    for metric in res["metrics"]:
        cmp = compare(res, metric)
        n = len(res["budgets"])
        dom = [o for o in ("uniform", "random_mean", "random_worst")
               if not cmp[o]["worse"] and not cmp[o]["na"]]
        strict = [o for o in dom if not cmp[o]["tie"]]
        name = PRETTY.get(metric, metric)
        if len(dom) == 3:
            lines.append(f"- **{name}**: `{best}` is at least as good as uniform, random-mean and random-worst at "
                         f"all {n} budgets" + (f" (strictly better than all three everywhere)" if len(strict) == 3
                                               else f" (ties: " + "; ".join(
                                                   f"{o} at uniform-{','.join(map(str, cmp[o]['tie']))}"
                                                   for o in dom if cmp[o]["tie"]) + ")") + ".")
        else:
            for o in ("uniform", "random_mean", "random_worst"):
                c = cmp[o]
                if c["worse"]:
                    lines.append(f"- **{name}**: `{best}` is WORSE than {o} at budgets uniform-"
                                 f"{', uniform-'.join(map(str, c['worse']))}; better at {len(c['better'])}, "
                                 f"tied at {len(c['tie'])} of {n}.")
            if dom:
                lines.append(f"- **{name}**: it is at least as good as {', '.join(dom)} at every budget.")
        for o, label in ANCHORS.items():
            c = cmp[o]
            ok = [b for b in c["better"] + c["tie"] + c["worse"]]
            if not ok:
                why = next((r["note"] for r in res["rows"] if r["method"] == o and r["note"]), "")
                lines.append(f"  - vs {label}: not comparable ({why[:120]})")
                continue
            parts = [f"better at {_blist(c['better'])}" if c["better"] else "",
                     f"tied at {_blist(c['tie'])}" if c["tie"] else "",
                     f"**worse at {_blist(c['worse'])}**" if c["worse"] else "",
                     f"{label} infeasible/unavailable at {_blist(c['na'])}" if c["na"] else ""]
            lines.append(f"  - vs {label}: " + "; ".join(p for p in parts if p) + ".")
        if metric != prim:
            continue
    return lines


def _blist(bs):
    return ", ".join(f"u{b}" for b in bs)


def _table_compact(res, metric) -> list[str]:
    bs = sorted(int(k) for k in res["budgets"])
    u = res["units"]
    head = "| method | " + " | ".join(f"u{b} ({_size(res['budgets'][str(b)], u)} {u})" for b in bs) + " | score s |"
    lines = [head, "|" + "---|" * (len(bs) + 2)]
    for m in _methods(res):
        cells = []
        score_s = None
        for b in bs:
            r = _row(res, m, b)
            if r is None:
                cells.append("—")
                continue
            score_s = r["score_s"]
            if r["metrics"]:
                cells.append(_fmt(r["metrics"][metric], metric))
            else:
                cells.append(r["status"])
        label = _row(res, m, bs[0])["label"] if _row(res, m, bs[0]) else m
        if m == "bitplan_best":
            label = f"**{label}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {score_s:.1f} |" if score_s is not None else "|")
    return lines


def _table_full(res) -> list[str]:
    u = res["units"]
    mets = res["metrics"]
    head = (f"| budget | method | packed size ({u}) | " + " | ".join(PRETTY.get(m, m) for m in mets)
            + " | bits (count per option; g = grouped) | score s | solve s |")
    lines = [head, "|" + "---|" * (6 + len(mets))]
    for b in sorted(int(k) for k in res["budgets"]):
        for m in _methods(res):
            if m == "bitplan_best":
                continue
            r = _row(res, m, b)
            if r is None:
                continue
            vals = " | ".join(_fmt(r["metrics"][x], x) if r["metrics"] else r["status"] for x in mets)
            star = "*" if r.get("size_source") == "predicted" else ""
            lines.append(f"| u{b} ≤ {_size(r['budget_bytes'], u)} | {r['label']} | {_size(r['size_bytes'], u)}{star} | "
                         f"{vals} | {r['bits']} | {r['score_s']:.2f} | {r['solve_s']:.3f} |")
    return lines


def plot_frontier(res, path: str) -> None:
    """Size vs each metric, one panel per metric (+ a linear zoom on u4..u8 for perplexity), PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, False) for m in res["metrics"]] + ([("perplexity", True)] if "perplexity" in res["metrics"] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    u = res["units"]
    scale = 1e6 if u == "MB" else 1e3
    zoom_from = res["budgets"].get("4", 0) * 0.98
    style = {"uniform": dict(color="black", marker="o", lw=2), "random_mean": dict(color="gray", marker=".", ls="--"),
             "random_worst": dict(color="gray", marker="x", ls=":"), "hawq_v3": dict(color="tab:blue", marker="s"),
             "modelopt": dict(color="tab:green", marker="^"), "lwq_lim": dict(color="tab:purple", marker="v"),
             "lwq_zd": dict(color="tab:pink", marker="<"), "calibtip": dict(color="tab:orange", marker="D"),
             "bitplan_best": dict(color="tab:red", marker="*", lw=2.5, ms=11)}
    for ax, (metric, zoom) in zip(axes[0], panels):
        for m in [x for x in _methods(res) if x in style]:
            pts = sorted((r["size_bytes"] / scale, r["metrics"][metric]) for r in res["rows"]
                         if r["method"] == m and r["metrics"] and (not zoom or r["size_bytes"] >= zoom_from))
            if not pts or (zoom and m.startswith("random")):
                continue
            lab = next(r["label"] for r in res["rows"] if r["method"] == m)
            y = [(1 - p[1]) if metric == "cosine" else p[1] for p in pts]
            ax.plot([p[0] for p in pts], y, label=lab, **style[m])
        ax.set_xlabel(f"model size after packing ({u}); grey lines = budgets u3..u8")
        if metric == "cosine":
            ax.set_ylabel("1 − cosine to fp32 (log; lower is better)")
            ax.set_yscale("log")
        elif metric in ("perplexity", "cross_entropy"):
            ax.set_ylabel(f"{PRETTY[metric]} ({'linear' if zoom else 'log'}; lower is better)")
            if not zoom:
                ax.set_yscale("log")
            ref = res["fp32"][metric]
            ax.axhline(ref, color="k", lw=0.8, ls="-.", label=f"fp32 ({ref:.4g})")
        else:
            ax.set_ylabel(f"{PRETTY.get(metric, metric)} (higher is better)")
            ax.axhline(res["fp32"][metric], color="k", lw=0.8, ls="-.", label=f"fp32 ({res['fp32'][metric]:.3g})")
        for b, v in res["budgets"].items():
            if not zoom or v >= zoom_from:
                ax.axvline(v / scale, color="0.85", lw=0.6, zorder=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{res['task']}: {PRETTY.get(metric, metric)}" + (", zoom u4..u8 (random off-scale)" if zoom else ""))
    axes[0][0].legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], env: dict, out: str) -> None:
    L = ["## Results", "",
         f"Generated by `{env['command']}` on {env['date']} ({env['cpus']} CPUs visible, {env['threads']} torch "
         f"threads, torch {env['torch']}, Python {env['python']}); total {env['seconds'] / 60:.1f} min"
         + (" — **--quick smoke run: tiny training, few probes, 2 budgets; not the real numbers**" if env["quick"] else "")
         + ".", "",
         "Budgets are the real packed sizes of uniform 3..8-bit per-channel plans (`uN` = the size of uniform-N). "
         "Every plan is evaluated on held-out data (not the calibration set) with `apply_plan_(copy, plan, \"fake\")`; "
         "its size is the real byte count of `apply_plan_(copy, plan, \"packed\")` measured with "
         "`costmodels.model_nbytes`, and every packed plan's bytes are checked equal to the cost model's prediction "
         "(\"packed-size mismatches\" below). Exception, to keep the run short: on MiniLM the random plans and the "
         "bitplan candidates that did not win are sized by the cost model (marked * in the full table); the uniform, "
         "anchor and bitplan-best plans are all really packed. "
         "Each estimator is scored once per model (\"score s\", wall time on the shared 2-core box) and re-solved at "
         "every budget (\"solve s\"). Anchors: HAWQ-V3 = hessian (avg Hutchinson trace × ‖ΔW‖²), options {4,8}, ILP; "
         "ModelOpt-Fisher = `fisher` + ILP; LWQ = rank-and-cut on `lim`/`zd` importance with two levels "
         "((2,4) below u4, (4,8) from u4 on); CalibTIP = `measured` + ILP; all anchors per-channel, options "
         "{2,3,4,6,8} except HAWQ-V3. bitplan candidates: an estimator + ILP over {2,3,4,6,8} × {per-channel, "
         "group g}; **bitplan best** is the candidate with the best mean rank over all budgets and metrics on a "
         "VALIDATION split (disjoint from calibration and from the test data the tables report; chosen among "
         f"{len(results[0].get('bitplan_candidates', {})) if results else 0} candidates; all are listed). "
         "`bitplan_default` is `bitplan.allocate` with its defaults (bits {2,3,4,5,6,8} × {per channel, group 128}, "
         "hessian); `bitplan_old_default` the round-1 grid (bits {2,3,4,8}, per channel, same traces); "
         "`bitplan_refine` the default plan after `bitplan.refine` (joint search measuring whole plans on the "
         "calibration data; its time limit is in the note).", ""]
    notes = os.path.join(out, "ANALYSIS.md")        # hand-written reading of the committed run
    if os.path.exists(notes):
        with open(notes) as f:
            L += [f.read().strip(), ""]
    for res in results:
        u = res["units"]
        L += [f"### {res['task']}", "", TASK_DOC.get(res["task"], ""), "",
              f"{res['layers']} quantizable layers; fp32 {_size(res['fp32_bytes'], u)} {u}, of which "
              f"{_size(res['base_bytes'], u)} {u} never quantized; fp32 metrics: "
              + ", ".join(f"{PRETTY.get(k, k)} {_fmt(v, k)}" for k, v in res["fp32"].items())
              + f". Info: {', '.join(f'{k}={v}' for k, v in res['info'].items())}.", "",
              f"![{res['task']} frontier](frontier_{res['task']}.png)", ""]
        for metric in res["metrics"]:
            L += [f"**{PRETTY.get(metric, metric)}** by method × budget:", ""] + _table_compact(res, metric) + [""]
        L += ["Claims (computed from the numbers above, bitplan best vs each method, per budget):", ""]
        L += _claims(res) + [""]
        ranked = res.get("bitplan_candidates", {})
        if ranked:
            L += ["bitplan candidates, mean rank over budgets × metrics (0 = best): " + ", ".join(f"`{k}` {v:.2f}" for k, v in sorted(ranked.items(), key=lambda kv: kv[1])), ""]
        L += ["Scoring runs: " + "; ".join(
            f"`{k}` {v['seconds']:.1f} s" + (f" (unavailable: {v['error'][:100]})" if v["error"] else "")
            for k, v in res["scoring"].items()), "",
            f"Checks: {res.get('packed_plans', '?')} distinct plans really packed, packed-size mismatches "
            f"{len(res['size_mismatches'])}; packed vs fake forward on u4, max |Δmetric| "
            + ", ".join(f"{k} {v:.2e}" for k, v in res["packed_vs_fake_max_abs_diff"].items())
            + f"; {res['distinct_plans']} distinct plans evaluated in {res['eval_seconds']:.0f} s; task total "
            f"{res['seconds']:.0f} s.", "",
            "<details><summary>Full table (every plan: packed size, all metrics, bits, runtime)</summary>", ""]
        L += _table_full(res) + ["", "</details>", ""]
        plot_frontier(res, os.path.join(out, f"frontier_{res['task']}.png"))
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(L) + "\n")
