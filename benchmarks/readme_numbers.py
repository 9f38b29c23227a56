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
    out = [f"From {_commit(d)}; MiniLM, bits {st['bits']} per channel, {st['calib_batches']} calibration batch, "
           f"hessian ≤ {st['max_probes']} probes, 1 thread per process, {st['rounds']} interleaved rounds, load "
           f"average {_load_avg(d.get('load_average_end'))} on 2 cores (under load).", "",
           "| estimator | scoring s 1p → 2p (median) | speed-up | whole command speed-up | identical tables / plans |",
           "|---|---|---|---|---|"]
    for name, m in d["methods"].items():
        sc = m["median"]["score_s"]
        out.append(f"| {name} | {sc['1p']:.1f} → {sc['2p']:.1f} | {m['speedup_scoring']:.2f}× | {m['speedup_wall']:.2f}× | "
                   f"{'yes' if m['identical_tables'] else 'NO'} / {'yes' if m['identical_plans'] else 'NO'} |")
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
    """Peak memory and time of streamed scoring vs depth (random Llama folders)."""
    d = d or _load("llm_scale.json")
    base = d.get("baseline_whole_model", {})
    sh = d["shape"]
    runs = [_commit(d)] + [f"`{r['command']}` at commit {r['commit']['sha'][:10]}" for r in d.get("earlier_runs", [])]
    out = [f"{d['what']}; hidden {sh['hidden_size']}, intermediate {sh['intermediate_size']}, GQA "
           f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}, 2 shared cores at load ~10. From " + "; ".join(runs) + ".", "",
           "| layers | fp32 weights | peak RSS | scoring | s / layer | whole-model path before (peak RSS, s) |",
           "|---|---|---|---|---|---|"]
    for n, r in sorted(d["results"].items(), key=lambda kv: int(kv[0])):
        b = base.get(str(n))
        out.append(f"| {n} | {r['fp32_weights_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | {r['score_s']:.0f} s"
                   + (f" ({r['cpu_s']:.0f} CPU s)" if r.get("cpu_s") else "") + f" | {r['score_s_per_layer']:.0f} | "
                   + (f"{b['peak_rss_mib']:,} MiB, {b['seconds']} s" if b else "—") + " |")
    exact = [n for n, r in d["results"].items() if r.get("size_exact")]
    if exact:
        r = d["results"][exact[0]]
        out += ["", f"The {exact[0]}-layer plan packs to exactly its predicted {r['packed_model_bytes']:,} bytes."]
    applied = [(n, r) for n, r in sorted(d["results"].items(), key=lambda kv: int(kv[0])) if r.get("apply_peak_rss_mib")]
    if applied:                  # `bitplan apply` streamed (one shard per decoder block), its own process
        out += ["", "`bitplan apply` (streamed) peak RSS: " + "; ".join(
            f"{n} layers {r['apply_peak_rss_mib']:,.0f} MiB, {r['apply_shards']} shards, {r['apply_wall_s']:.0f} s"
            + (f" (whole model, `--no-stream`: {r['apply_whole_peak_rss_mib']:,.0f} MiB)"
               if r.get("apply_whole_peak_rss_mib") else "") for n, r in applied) + "."]
    return "\n".join(out) + "\n"


def validity(d=None, name: str = "sensitivity_validity_tinyllama.json") -> str:
    """Spearman rho of each estimator's predicted vs measured Δloss (single layers and mixed plans)."""
    d = d or _load(name)
    out = [f"From {_commit(d)}; bits {d['bits']}, {d['threads']} thread.", "",
           "| model | estimator | ρ calib | ρ held-out | ρ mixed plans | additivity err (fit) | wall s |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['model']} | {r['method']} | {r['rho_calib']:.3f} | {r['rho_held']:.3f} | {r['rho_cfg']:.3f} | "
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
