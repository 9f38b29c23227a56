"""The README's numbers, generated from the committed results files — never typed by hand.

Every measured number in the README sits between ``<!-- numbers:NAME -->`` and
``<!-- /numbers:NAME -->``; the block is what ``SECTIONS[NAME](results)`` renders from
``benchmarks/results/<file>``. ``tests/test_readme.py`` regenerates every block and fails when the
README differs, so a re-run benchmark whose README was not updated (or a hand-edited number) fails CI.

    python benchmarks/readme_numbers.py            # rewrite the blocks in README.md from the results
    python benchmarks/readme_numbers.py --check    # exit 1 and show the first difference
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BLOCK = re.compile(r"<!-- numbers:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /numbers:(?P=name) -->", re.S)


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        return json.load(f)


def _commit(d: dict) -> str:
    c = d.get("commit") or d.get("env", {}).get("commit") or {}
    cmd = d.get("command") or d.get("env", {}).get("command", "?")
    sha = (c.get("sha") or "?")[:10]
    return f"`{cmd}` at commit {sha}{' (uncommitted changes)' if c.get('dirty') else ''}"


def _metric(v, m):
    return "—" if v is None else (f"{v:.5f}" if m == "cosine" else f"{v:.4f}" if m == "accuracy" else f"{v:.3f}")


def quality(d=None) -> str:
    """Primary metric per budget: uniform, round-1 default, default allocate, + refine, best anchor."""
    d = d or _load("results.json")
    out = [f"From {_commit(d)}; test split; sizes are real packed bytes.", ""]
    for t in d["tasks"]:
        m, hb, u = t["metrics"][0], t["higher_better"][t["metrics"][0]], t["units"]
        scale = 1e6 if u == "MB" else 1e3
        rows = {(r["method"], r["budget_bits"]): r for r in t["rows"]}
        anchors = ["hawq_v3", "modelopt", "lwq_lim", "lwq_zd", "calibtip"]
        cols = [("uniform", "uniform"), ("bitplan_old_default", "round-1 default"),
                ("bitplan_default", "**default**"), ("bitplan_refine", "default + refine")]
        out += [f"**{t['task']}** ({m}, {'higher' if hb else 'lower'} is better; fp32 {_metric(t['fp32'][m], m)})", "",
                f"| budget ({u}) | " + " | ".join(c[1] for c in cols) + " | best anchor | bitplan best* |",
                "|---|" + "---|" * (len(cols) + 2)]
        for b in sorted({r["budget_bits"] for r in t["rows"]}):
            cells = []
            for key, _ in cols:
                r = rows.get((key, b))
                cells.append(_metric(r["metrics"][m], m) if r and r["metrics"] else "")
            an = [(rows[a, b]["metrics"][m], a) for a in anchors if (a, b) in rows and rows[a, b]["metrics"]]
            best_a = (max if hb else min)(an) if an else None
            bb = rows.get(("bitplan_best", b))
            out.append(f"| u{b} = {t['budgets'][str(b)] / scale:.3f} | " + " | ".join(cells)
                       + f" | {_metric(best_a[0], m) + ' ' + best_a[1] if best_a else '—'}"
                       + f" | {_metric(bb['metrics'][m], m) if bb and bb['metrics'] else '—'} |")
        out += ["", f"\\* bitplan best = `{t.get('bitplan_best')}`, chosen on the "
                    f"{t.get('bitplan_best_chosen_on', 'test')} split.", ""]
    return "\n".join(out).rstrip() + "\n"


def refine(d=None) -> str:
    """Calibration-loss reduction of refine over the ILP plan, held-out metric before -> after."""
    d = d or _load("refine_gain.json")
    out = [f"From {_commit(d)} ({d['seconds']:.0f} s limit per plan, shared 2-core CPU).", "",
           "| task | avg bits | calib loss reduction | held-out reduction | held-out metric: ILP → refined |",
           "|---|---|---|---|---|"]
    for t in d["tasks"]:
        for r in t["rows"]:
            ms = " ".join(f"{k} {_metric(v, k)} → {_metric(r['refined']['metrics'][k], k)}"
                          for k, v in r["ilp"]["metrics"].items())
            out.append(f"| {t['task']} | {r['avg_bits']:g} | {r['calib_reduction'] * 100:.1f} % | "
                       f"{r['heldout_reduction'] * 100:.1f} % | {ms} |")
    return "\n".join(out) + "\n"


def methods(d=None) -> str:
    """Whole-model cosine (every layer quantized by one method) and quantization time per method."""
    d = d or _load("quantizer_methods.json")
    names = ["rtn", "clip", "awq", "gptq", "awq_gptq"]
    out = [f"From {_commit(d)}; MiniLM, {d['calib_sentences']} calibration sentences, every layer at the "
           "configuration below, held-out cosine to fp32 (time: all layers, 1 thread).", "",
           "| weights | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in d["results"]:
        lab = f"w{r['bits']}" + (f"g{r['group_size']}" if r["group_size"] else " per channel")
        out.append(f"| {lab} | " + " | ".join(
            f"{r['methods'][n]['summary']['cosine']:.4f} ({r['methods'][n]['summary']['time_s_total']:.1f} s)"
            for n in names if n in r["methods"]) + " |")
    return "\n".join(out) + "\n"


def kernel_constraints() -> str:
    """Per CPU measured: how often each raw op crashes / is wrong, and whether bitplan's supports() let
    any such case through (violations must be 0 on every CPU)."""
    files = ("kernel_constraints.json", "kernel_constraints_avx512.json")      # one results file per CPU
    out = ["| CPU (torch ISA) | W8A8 path | op | cases | crash | wrong | raise | supports() let through | refused although it works |",
           "|---|---|---|---|---|---|---|---|---|"]
    cmds = []
    for name in files:
        if not os.path.exists(os.path.join(RESULTS, name)):
            continue
        d = _load(name)
        cap = d["cpu_capability"]
        cmds.append(_commit(d))
        for op, v in d["ops"].items():
            if not v.get("kernel_checked"):
                continue
            st = v["status"]
            out.append(f"| {cap['cpu']} ({cap['torch_isa']}) | {cap['w8a8_cpu']} | {op} | {v['cases']} | "
                       f"{st.get('crash', 0)} | {st.get('wrong', 0)} | {st.get('raise', 0)} | "
                       f"{v['violations'] if isinstance(v['violations'], int) else len(v['violations'])} | "
                       f"{v['refused_ok'] if isinstance(v['refused_ok'], int) else len(v['refused_ok'])} |")
    return "From " + "; ".join(cmds) + ".\n\n" + "\n".join(out) + "\n"


def kernels(d=None) -> str:
    """Speed of each kernel relative to fp32 dense at every shape and row count (median CPU time)."""
    d = d or _load("kernels.json")
    cells = d["calibration"]["cells"]
    fp = {(c["n"], c["k"], c["m"]): c["median_us"] for c in cells if c["column"] == "fp32"}
    cols = []
    for c in cells:
        if c["column"] not in cols and c["column"] != "fp32":
            cols.append(c["column"])
    out = [f"From {_commit(d)}; CPU {d['cpu_capability']['cpu']} ({d['cpu_capability']['torch_isa']}), "
           f"{d['threads']} thread, {d['clock']} clock; speed-up over fp32 dense (>1 = faster).", "",
           "| K×N | M | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (n, k, m), t in sorted(fp.items(), key=lambda kv: (kv[0][1] * kv[0][0], kv[0][2])):
        by = {c["column"]: c["median_us"] for c in cells if (c["n"], c["k"], c["m"]) == (n, k, m)}
        out.append(f"| {k}×{n} | {m} | " + " | ".join(f"{t / by[c]:.2f}" if c in by else "—" for c in cols) + " |")
    return "\n".join(out) + "\n"


def _load_avg(v) -> str:
    return f"{v[0]:.1f}" if isinstance(v, (list, tuple)) else "?"


def latency(d=None) -> str:
    """Predicted vs measured end-to-end latency of random plans, four profile procedures."""
    d = d or _load("latency_model.json")
    e = d["errors"]
    out = [f"From {_commit(d)}; {d['model']}, {d['plans']} random plans × {d['rounds']} interleaved rounds, "
           f"{d['tokens']} tokens, {d['threads']} thread, {d['clock']} clock, CPU {d['device']['cpu']} "
           f"({d['device']['capability']}), load average {_load_avg(d['load_average']['start'])}–"
           f"{_load_avg(d['load_average']['end'])} on a shared 2-core machine.", "",
           "| profile | median \\|error\\| | mean signed error | max \\|error\\| |", "|---|---|---|---|"]
    for k in ("isolated", "in-model", "isolated, anchored", "in-model, anchored"):
        if k in e:
            out.append(f"| {k}{' (default)' if k == 'isolated, anchored' else ''} | {e[k]['median_abs_error'] * 100:.1f} % | "
                       f"{e[k]['mean_signed_error'] * 100:+.1f} % | {e[k]['max_abs_error'] * 100:.1f} % |")
    return "\n".join(out) + "\n"


def distributed(d=None) -> str:
    """1 process vs 2 processes scoring MiniLM: speed-ups and identical results."""
    d = d or _load("distributed_scoring.json")
    st = d["settings"]
    loads = [x["load_before"] for m in d["methods"].values() for x in m["runs"]]
    llm = f"; block: {os.path.basename(st['llm'].rstrip('/'))} (llm_scale.py's random Llama), default calibration" \
        if st.get("llm") and "block" in d["methods"] else ""
    out = [f"From {_commit(d)}; MiniLM, bits {st['bits']} per channel, {st['calib_batches']} calibration batch, "
           f"hessian ≤ {st['max_probes']} probes{llm}; 1 thread per process, {st['rounds']} interleaved rounds, "
           f"1-min load {min(loads):.1f}–{max(loads):.1f} before the runs, on 2 cores.", "",
           "| estimator | scoring s 1p → 2p (median) | speed-up | whole command speed-up | same table / plan as 1p |",
           "|---|---|---|---|---|"]
    for name, m in d["methods"].items():
        sc = m["median"]["score_s"]
        same = "yes" if m["identical_tables"] else (
            f"to {m['max_rel_diff']:.0e} (float order)" if name == "block" and m.get("max_rel_diff", 1) < 1e-4 else "NO")
        out.append(f"| {name} | {sc['1p']:.1f} → {sc['2p']:.1f} | {m['speedup_scoring']:.2f}× | {m['speedup_wall']:.2f}× | "
                   f"{same} / {'yes' if m['identical_plans'] else 'NO'} |")
    return "\n".join(out) + "\n"


def estimator_speed(d=None) -> str:
    """Hessian vs measured on the small residual CNN with a task loss (issue 16 item 11)."""
    d = d or _load("estimator_speed.json")
    out = [f"From {_commit(d)}; {d['case']}; {d['rounds']} interleaved rounds, load average "
           f"{_load_avg(d['loadavg_before'])}.", "",
           "| estimator | median s | × measured | probes | max \\|z\\| vs a 400-probe reference |", "|---|---|---|---|---|"]
    for k, lab in (("measured", "measured"), ("hessian-old", "hessian (round 1)"), ("hessian", "hessian (now, default)")):
        h = d.get(k, {}) if k != "measured" else {}
        out.append(f"| {lab} | {d['median_s'][k]:.1f} | {d['ratio_to_measured'][k]:.1f} | {h.get('probes', '—')} | "
                   f"{h['max_abs_z']:.2f} |" if h else f"| {lab} | {d['median_s'][k]:.1f} | 1.0 | — | — |")
    return "\n".join(out) + "\n"


def decoupled(d=None) -> str:
    """Which of decoupled's metrics are distinct on each model, and the groups they form."""
    d = d or _load("decoupled_metrics.json")
    out = [f"From {_commit(d)}; bits {d['bits']}, {d['batches']} calibration batch.", "",
           "| model | merged as proportional | distinct metrics | group sizes | gram / loss spread over layers |",
           "|---|---|---|---|---|"]
    for name, m in d["models"].items():
        out.append(f"| {name} | {', '.join(f'{a} ∝ {b}' for a, b in m['proportional'].items()) or '—'} | "
                   f"{', '.join(m['distinct_metrics'])} | {', '.join(f'{k} {v}' for k, v in m['group_sizes'].items())} | "
                   f"{m['ratio_to_loss']['gram']['spread_max_over_min']:.1f}× |")
    return "\n".join(out) + "\n"


def llm_scale(d=None) -> str:
    """Peak memory and time of streamed scoring and packing vs depth (random Llama folders), and the
    whole-model path measured right after on the same folders."""
    d = d or _load("llm_scale.json")
    res = {k: r for k, r in d["results"].items() if r.get("method")}     # rows of the recorded run only
    sh, big = d["shape"], res.get("1b", {}).get("shape")
    loads = [x for r in res.values() for x in (r.get("loadavg_before", [None])[0], r.get("loadavg_after", [None])[0]) if x]
    out = [f"{d['what']}. Hidden {sh['hidden_size']}, intermediate {sh['intermediate_size']}, GQA "
           f"{sh['num_attention_heads']}/{sh['num_key_value_heads']} heads"
           + (f"; ≈1 B: TinyLlama-1.1B's shape (hidden {big['hidden_size']}, intermediate {big['intermediate_size']}, "
              f"GQA {big['num_attention_heads']}/{big['num_key_value_heads']})" if big else "")
           + f"; 2 shared cores, 1-min load {min(loads):.1f}–{max(loads):.1f}. From {_commit(d)}.", "",
           "| layers | parameters | fp32 weights | `plan` peak RSS | above the runtime¹ | goal² | scoring (CPU) | "
           "s / layer | `apply` peak RSS | `apply` | packed bytes = predicted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted((k for k in res if k.isdigit()), key=int) + (["1b"] if "1b" in res else [])
    for k in keys:
        r = res[k]
        if "score_s" not in r:
            out.append(f"| {r.get('layers', k)} | — | — | — | — | — | did not finish: "
                       f"{'timed out' if 'timed_out_after_s' in r else 'error'} | — | — | — | — |")
            continue
        ap = (f"{r['apply_peak_rss_mib']:,.0f} MiB | {r['apply_wall_s']:.0f} s, {r['apply_shards']} shards | "
              f"{'yes' if r.get('size_exact') else 'NO'} ({r['packed_model_bytes']:,} B)") \
            if r.get("apply_peak_rss_mib") and r.get("apply_rc") == 0 else "— | — | —"
        out.append(f"| {r['layers']}{' (≈1 B)' if k == '1b' else ''} | {r['fp32_weights_mib'] * 2 ** 20 / 4 / 1e6:,.0f} M | "
                   f"{r['fp32_weights_mib']:,.0f} MiB | {r['peak_rss_mib']:,.0f} MiB | "
                   f"{r['peak_rss_mib'] - r['rss_before_scoring_mib']:,.0f} MiB | {r['goal_mib']:,.0f} MiB | {r['score_s']:.0f} s "
                   f"({r['cpu_s']:.0f} s) | {r['score_s_per_layer']:.1f} | {ap} |")
    out += ["", "¹ peak RSS minus the RSS before scoring (Python, torch, transformers, the meta-device model and "
            "the calibration batches). ² issue 12's goal: 2 × one decoder block's fp32 weights + the carried "
            "calibration activations (a block's input and output, fp32) + every weight outside the blocks."]
    base = [(k.split("_")[1], r) for k, r in res.items() if k.startswith("hessian_") and "score_s" in r]
    if base:
        out += ["", "The whole-model path (`--method hessian`, the default before streaming), run right after "
                "the streamed run on the same folder: " + "; ".join(
                    f"{n} layers: peak RSS {r['peak_rss_mib']:,.0f} MiB, scoring {r['score_s']:.0f} s "
                    f"({r['cpu_s']:.0f} CPU s) — streamed {res[n]['score_s'] / r['score_s'] * 100:.0f} % of its time "
                    f"({r['score_s'] / res[n]['score_s']:.1f}× faster), {res[n]['peak_rss_mib'] / r['peak_rss_mib'] * 100:.0f} % "
                    "of its memory" for n, r in sorted(base, key=lambda t: int(t[0])) if n in res) + "."]
    old = d.get("baseline_whole_model", {})
    if old:
        out += ["", "Issue 12's measurement of that path: " + "; ".join(
            f"{n} layers {b['peak_rss_mib']:,} MiB, {b['seconds']} s" for n, b in sorted(old.items(), key=lambda t: int(t[0]))) + "."]
    return "\n".join(out) + "\n"


def validity(d=None, name: str = "sensitivity_validity_tinyllama.json") -> str:
    """Spearman rho of each estimator's predicted vs measured Δloss (single layers and mixed plans)."""
    d = d or _load(name)
    out = [f"From {_commit(d)}; bits {d['bits']}, {d['threads']} thread.", "",
           "| model | estimator | ρ calib | ρ held-out | ρ mixed plans | additivity err (fit) | wall s |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        name, _, opts = r["method"].partition(":")
        method = f"{name} ({opts.replace(',', ', ')})" if opts else name
        out.append(f"| {r['model']} | {method} | {r['rho_calib']:.3f} | {r['rho_held']:.3f} | {r['rho_cfg']:.3f} | "
                   f"{r['rel_err_fit']:.3f} | {r['wall_s']:.1f} |")
    return "\n".join(out) + "\n"


def vs_modelopt(d=None) -> str:
    """bitplan vs ModelOpt auto_quantize on MiniLM at equal real bytes (cosine to fp32)."""
    d = d or _load("vs_modelopt.json")
    rows = {(r["label"], r["budget_bits"]): r for r in d["rows"]}
    cols = [("modelopt_awq", "ModelOpt + AWQ"), ("modelopt_max", "ModelOpt (RTN)"), ("bitplan_rtn", "bitplan RTN"),
            ("bitplan_methods", "bitplan, methods as an option"), ("bitplan_full_grid", "bitplan default grid × {rtn, gptq}"),
            ("modelopt_alloc+bitplan_gptq", "ModelOpt's allocation + bitplan GPTQ")]
    su = d["setup"]
    out = [f"From {_commit(d)}; ModelOpt {d['modelopt']['version']}, {su['calib_sentences']} calibration sentences, "
           f"{su['heldout_sentences']} held-out, cosine to fp32 (bytes: real packed bytes; every bitplan plan ≤ the "
           "smaller ModelOpt plan's bytes).", "",
           "| effective bits | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for b in sorted({r["budget_bits"] for r in d["rows"]}):
        out.append(f"| {b:g} | " + " | ".join(f"{rows[k, b]['cosine']:.5f}" if (k, b) in rows else "—" for k, _ in cols) + " |")
    return "\n".join(out) + "\n"


def validity_small(d=None) -> str:
    """The validity table of the whole-model estimators on MiniLM and the digits MLP."""
    return validity(d, "sensitivity_validity.json")


SECTIONS = {"validity": validity_small, "vs_modelopt": vs_modelopt, "llm_scale": llm_scale, "validity_llm": validity, "latency": latency, "distributed": distributed, "estimator_speed": estimator_speed, "decoupled": decoupled,
            "quality": quality, "refine": refine, "methods": methods, "kernel_constraints": kernel_constraints,
            "kernels": kernels}


def render(readme: str) -> str:
    """``readme`` with every numbers block regenerated."""
    def sub(mt):
        name = mt.group("name")
        if name not in SECTIONS:
            raise ValueError(f"README block numbers:{name} has no generator; known: {sorted(SECTIONS)}")
        return f"<!-- numbers:{name} -->\n{SECTIONS[name]()}<!-- /numbers:{name} -->"
    return BLOCK.sub(sub, readme)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when README differs")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        old = f.read()
    new = render(old)
    if args.check:
        if new != old:
            a, b = old.splitlines(), new.splitlines()
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"README.md line {i + 1} differs from the results:\n  README:  {a[i] if i < len(a) else ''}\n"
                  f"  results: {b[i] if i < len(b) else ''}")
            return 1
        return 0
    tmp = args.readme + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
