"""Quantizer methods on MiniLM's real layers: output error vs RTN, time and memory per layer.

For every quantizable layer of all-MiniLM-L6-v2 (36 Linear layers) and every (bits, group size)
configuration, each method quantizes the weight with the layer's calibration statistics (gathered
once, one forward pass over the calibration sentences; padding tokens excluded) and is scored by

- ``calib`` / ``heldout``: the layer's mean squared output error E‖(Q(W) − W)x‖² on the calibration
  tokens / on the held-out sentences' tokens (exact, from each token set's Σxxᵀ), as a ratio to
  RTN's (< 1 = better). Summaries: the geometric mean over layers of the ratio, and the ratio of the
  summed errors normalised per layer by ‖Wx‖² (``sum_rel``);
- ``cosine``: the whole model with every layer quantized by the method, mean cosine of held-out
  sentence embeddings to fp32 (one quantized model per method; layer statistics from the fp32
  model — no sequential re-calibration);
- ``time_s``: CPU time of ``quantize`` (``time.thread_time``, 1 torch thread) per layer and total;
- ``peak_mb``: peak extra resident memory while quantizing one layer (Linux VmHWM after resetting it
  through /proc/self/clear_refs, with glibc's mmap threshold fixed at 64 KiB so freed tensors leave
  the resident set); the script re-executes itself with that setting.

Run:  python benchmarks/quantizer_methods.py [--bits 3,4] [--group-size channel,128] [--out PATH]
Writes benchmarks/results/quantizer_methods.json (with the git commit and the command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV_FLAG = "MALLOC_MMAP_THRESHOLD_"

VARIANTS = {                      # label -> (method, options); no options = the method's defaults
    "rtn": ("rtn", {}),
    "clip": ("clip", {}),
    "awq_noclip": ("awq", {"clip": False}),
    "awq": ("awq", {}),
    "gptq_plain": ("gptq", {"act_order": False, "clip": False}),     # the paper's basic algorithm
    "gptq_actorder": ("gptq", {"clip": False}),
    "gptq": ("gptq", {}),                                            # act_order + clip
    "awq_gptq": ("awq_gptq", {}),
}


def commit() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _kb("VmRSS")


def peak_mb_since(base_kb: int) -> float:
    return max(0, _kb("VmHWM") - base_kb) / 1024


def parse_groups(text: str):
    return [None if g == "channel" else int(g) for g in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", default="channel,128")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--n-calib", type=int, default=128)      # all shipped calibration sentences
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quantizer_methods.json"))
    args = ap.parse_args(argv)
    if os.environ.get(_ENV_FLAG) != "65536":         # fixed mmap threshold: freed tensors leave the RSS
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _ENV_FLAG: "65536"})

    import torch
    torch.set_num_threads(1)
    from bitplan.core.graph import find_layers, layer_weight_2d
    from bitplan.kernels.calibstats import gather_stats
    from bitplan.kernels.quantizer import fake_quantize, quantize, dequantize
    from bitplan.evaluate import embed
    from bitplan.models import load_model

    bits_list = [int(b) for b in args.bits.split(",")]
    groups = parse_groups(args.group_size)
    labels = ["rtn"] + [m for m in args.methods.split(",") if m != "rtn"]     # RTN first: the reference
    unknown = [m for m in labels if m not in VARIANTS]
    if unknown:
        ap.error(f"unknown methods {unknown}; allowed: {list(VARIANTS)}")
    sym = not args.asymmetric
    spec = load_model("minilm", n_calib=args.n_calib)
    model = spec.model.eval()
    layers = find_layers(model)
    w0 = {l.name: layer_weight_2d(model.get_submodule(l.name), l.kind).detach().clone() for l in layers}
    ref = embed(model, spec.eval_data)

    base = reset_peak()
    t0 = time.thread_time()
    calib = gather_stats(model, spec.calib_data)
    gather = {"time_s": time.thread_time() - t0, "peak_mb": peak_mb_since(base),
              "stats_mb": sum(s.nbytes for s in calib.values()) / 1e6,
              "tokens": next(iter(calib.values())).n_tokens}
    held = gather_stats(model, spec.eval_data)
    print(f"stats: {gather}", flush=True)

    results = []
    for bits in bits_list:
        for gs in groups:
            cfg = {"bits": bits, "group_size": gs, "symmetric": sym, "methods": {}}
            rtn_err = {}
            for label in labels:
                method, opts = VARIANTS[label]
                rows, wq_all = [], {}
                for l in layers:
                    w, sc, sh = w0[l.name], calib[l.name], held[l.name]
                    base = reset_peak()
                    t0 = time.thread_time()
                    q = quantize(w, bits, gs, sym, method, sc, **opts)
                    dt = time.thread_time() - t0
                    peak = peak_mb_since(base)
                    wq = dequantize(q)
                    wq_all[l.name] = wq
                    e_c, e_h = sc.output_error(wq - w), sh.output_error(wq - w)
                    if label == "rtn":
                        rtn_err[l.name] = (e_c, e_h)
                    rc, rh = rtn_err.get(l.name, (math.nan, math.nan))
                    rows.append({"layer": l.name, "n": l.out_features, "k": l.in_features, "time_s": dt,
                                 "peak_mb": peak, "calib_ratio": e_c / rc, "heldout_ratio": e_h / rh,
                                 "heldout_rel": e_h / max(sh.output_error(w), 1e-30)})
                with torch.no_grad():                 # whole model quantized by this method
                    for l in layers:
                        mod = model.get_submodule(l.name)
                        wq = wq_all[l.name]
                        mod.weight.copy_(wq.t() if l.kind == "hf_conv1d" else wq.reshape(mod.weight.shape))
                    cos = float(torch.nn.functional.cosine_similarity(embed(model, spec.eval_data), ref).mean())
                    for l in layers:
                        mod = model.get_submodule(l.name)
                        w = w0[l.name]
                        mod.weight.copy_(w.t() if l.kind == "hf_conv1d" else w.reshape(mod.weight.shape))
                gm = lambda key: math.exp(sum(math.log(r[key]) for r in rows) / len(rows))
                summ = {"calib_ratio_gmean": gm("calib_ratio"), "heldout_ratio_gmean": gm("heldout_ratio"),
                        "heldout_ratio_worst": max(r["heldout_ratio"] for r in rows),
                        "heldout_rel_mean": sum(r["heldout_rel"] for r in rows) / len(rows),
                        "cosine": cos, "time_s_total": sum(r["time_s"] for r in rows),
                        "time_s_max_layer": max(r["time_s"] for r in rows),
                        "peak_mb_max_layer": max(r["peak_mb"] for r in rows)}
                cfg["methods"][label] = {"method": method, "options": opts, "summary": summ, "layers": rows}
                print(f"w{bits} g{gs or 'ch'} {label:14s} " + " ".join(
                    f"{k}={v:.4g}" for k, v in summ.items()), flush=True)
            results.append(cfg)

    out = {"benchmark": "quantizer_methods", "commit": commit(),
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
           "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
                   or platform.machine(), "python": platform.python_version()},
           "model": "minilm", "n_layers": len(layers), "calib_sentences": args.n_calib,
           "gather": gather, "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
