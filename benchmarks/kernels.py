"""Kernel speeds on this device: fp32, bf16, int8-wo, int4-wo (g32/g128), W8A8 side by side, and
the candidate W8A8 paths compared on speed and exactness.

Shapes: MiniLM-L6's layers (K→N: 384→384, 384→1536, 1536→384) and LLaMA-7B-like 4096→4096,
4096→11008, at M ∈ {1, 16, 128} rows. Every cell is the real module packed apply installs (fp32 in
and out, so casts / activation quantization / bias are included), timed by
``bitplan.kernels.calibrate`` (interleaved batches, preempted batches dropped, median, spread,
re-measured when unstable). The W8A8 column runs the path this CPU selects
(``kernels/capability.py``; its name is in the column header and the results file).

W8A8 paths (``--w8a8-paths``, default on): per shape and M, interleaved in one run, fp32 and bf16
dense against every W8A8 candidate — oneDNN with 8-bit activation codes (``onednn_u8``), with 7-bit
codes (``onednn_u7``), ``torch._int_mm`` (int8 x int8 -> int32, weights pre-transposed), and the
reference path (``dequant``: fake-quantized activations, dequantized weight, fp32 dense). Each
candidate's accuracy is measured against the int64 matmul of its own codes on Gaussian, ReLU'd and
constant inputs (the worst of the three, in dB; "exact" = bit-exact), so the table shows which
paths are wrong on this CPU and what the exact ones cost. ``_int_mm`` cells estimated over
``--int-mm-max-s`` per call are skipped (a scalar loop without VNNI).

"bytes-moved limit" at M=1: the layer must at least read its stored weight bytes (exact, from the
size model) + bias; limit time = bytes / read bandwidth, the bandwidth measured here as the median
time of ``torch.dot`` over a 512 MB fp32 tensor (the fastest of sum/amax/dot/copy tried) with the
same thread count and clock. fraction = limit / measured; > 1 means the weights were served from
cache (L2 2 MB/core, L3 480 MB shared on this machine) faster than DRAM.

Clock: ``--clock cpu`` (default; thread CPU time, 1 thread) or ``wall``. The 2 cores are shared
(load average 5–10 while this was written), so wall time is mostly the neighbours' time slices.

Results: ``--json`` (default ``benchmarks/results/kernels.json``) records the commit, the command,
the CPU capability (ISA flags, torch's ISA level, the W8A8 path and why), every cell and the
W8A8 path table.

Run:  python benchmarks/kernels.py [--threads 1] [--clock cpu] [--shapes 384x384 ...] [--out prof.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bitplan.kernels.actquant import act_qmax, quantize_act  # noqa: E402
from bitplan.kernels.calibrate import calibrate          # noqa: E402
from bitplan.kernels.capability import W8A8_CPU_IMPLS, cpu_capability, onednn_qlinear_available  # noqa: E402
from bitplan.kernels.formats import QuantSpec            # noqa: E402
from bitplan.kernels.packed import PackedLayer           # noqa: E402
from bitplan.kernels.w8a8 import W8A8                    # noqa: E402
from bitplan.kernels.registry import kernel_for          # noqa: E402
from bitplan.kernels.timing import clock_fn, time_interleaved  # noqa: E402
from provenance import provenance                        # noqa: E402

SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096), (11008, 4096)]     # (N, K)
SPECS = {"int8-wo": QuantSpec(8), "int4-wo g32": QuantSpec(4, 32), "int4-wo g128": QuantSpec(4, 128),
         "W8A8": QuantSpec(8, act_bits=8)}
COLS = ["fp32", "bf16"] + list(SPECS)
W8A8_SPEC = QuantSpec(8, act_bits=8)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json")


def read_bandwidth(clock, mb: int = 512, reps: int = 9) -> float:
    """Bytes/s of reading a large fp32 tensor (torch.dot of it with itself), median of ``reps``."""
    x = torch.ones(mb * 2 ** 20 // 4)
    torch.dot(x, x)
    ts = []
    for _ in range(reps):
        t0 = clock()
        torch.dot(x, x)
        ts.append(clock() - t0)
    return x.numel() * 4 / statistics.median(ts)


def _shape(text: str) -> tuple[int, int]:
    """'KxN' (in x out features) -> (N, K)."""
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be KxN, e.g. 384x1536") from None
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} must have positive K and N")
    return n, k


# ------------------------------------------------------------------ W8A8 candidate paths
def _linear(n: int, k: int) -> nn.Linear:
    g = torch.Generator().manual_seed(n * 7919 + k)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.01)
    return lin.eval()


def w8a8_candidates(n: int, k: int) -> dict[str, tuple]:
    """name -> (forward(x), activation qmax or None for dense) for every path tried on one layer."""
    lin = _linear(n, k)
    wb, bb = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    out = {"fp32": (lin, None),
           "bf16": (lambda x: nn.functional.linear(x.bfloat16(), wb, bb).float(), None)}
    if onednn_qlinear_available():
        for impl, qmax in W8A8_CPU_IMPLS.items():
            out[impl] = (W8A8.from_module(lin, "linear", lin.weight, W8A8_SPEC, impl=impl), qmax)
    ref_mod = out.get("onednn_u7", out.get("onednn_u8", (None,)))[0]
    w8 = (ref_mod.int8_weight() if ref_mod is not None else
          torch.round(lin.weight.detach() / (lin.weight.detach().abs().amax(1, keepdim=True) / 127)).to(torch.int8))
    sw = (ref_mod.scales.float().reshape(1, -1) if ref_mod is not None else
          (lin.weight.detach().abs().amax(1) / 127).reshape(1, -1))
    wt = w8.t().contiguous()                                                      # (K, N) int8
    bias = lin.bias.detach()

    def int_mm(x):
        xq, sx = quantize_act(x, 8)                                               # 8-bit codes
        return torch._int_mm(xq, wt).float() * (sx * sw) + bias
    out["int_mm"] = (int_mm, 127)
    out["dequant"] = (PackedLayer.from_module(lin, "linear", lin.weight, W8A8_SPEC), act_qmax(8, "cpu"))
    out["_exact"] = (w8, sw, bias)
    return out


def _sqnr(ref, y) -> float:
    err = (ref - y.double()).norm()
    return 999.0 if err == 0 else float(20 * torch.log10(ref.norm() / err))


def w8a8_accuracy(cands: dict, k: int) -> dict[str, dict]:
    """Per candidate: worst SQNR vs the int64 matmul of its own codes (Gaussian / ReLU / constant
    inputs) and SQNR vs fp32 dense on the Gaussian input (the quantization error itself)."""
    w8, sw, bias = cands["_exact"]
    g = torch.Generator().manual_seed(k)
    xg = torch.randn(16, k, generator=g)
    inputs = {"gauss": xg, "relu": xg.relu(), "const": torch.full((4, k), 0.3)}
    dense = cands["fp32"][0]
    out = {}
    with torch.inference_mode():
        for name, cand in cands.items():
            if name.startswith("_") or cand[1] is None:
                continue
            f, qmax = cand
            worst = 999.0
            for x in inputs.values():
                q, sx = quantize_act(x, 8, qmax)
                ref = (q.long() @ w8.long().t()).double() * sx.double() * sw.double() + bias.double()
                worst = min(worst, _sqnr(ref, f(x)))
            out[name] = {"act_qmax": qmax, "sqnr_vs_exact_db": round(worst, 1), "exact": worst >= 100,
                         "sqnr_vs_fp32_db": round(_sqnr(dense(xg).double(), f(xg)), 1)}
    return out


def w8a8_paths(shapes, tokens, clock, int_mm_max_s: float) -> dict:
    rows, acc = [], {}
    for n, k in shapes:
        cands = w8a8_candidates(n, k)
        acc[f"{k}->{n}"] = w8a8_accuracy(cands, k)
        for m in tokens:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            fns, single = {}, {}
            with torch.inference_mode():
                for name, cand in cands.items():
                    if name.startswith("_"):
                        continue
                    f = cand[0]
                    if name == "int_mm":
                        t0 = clock()
                        f(x)
                        one = clock() - t0
                        if one > int_mm_max_s:                 # scalar loop: one call, not interleaved
                            single[name] = one * 1e3
                            continue
                    fns[name] = (lambda f=f: f(x))
                t = time_interleaved(fns, clock=clock)
            for name in [c for c in cands if not c.startswith("_")]:
                us = t[name].median_ms * 1e3 if name in t else single[name] * 1e3
                rows.append({"n": n, "k": k, "m": m, "candidate": name, "median_us": round(us, 2),
                             "interleaved": name in t, "stable": t[name].stable if name in t else None})
    return {"cells": rows, "accuracy": acc}


def print_paths(res: dict, selected: str | None) -> None:
    names = list(dict.fromkeys(r["candidate"] for r in res["cells"]))
    print(f"\nW8A8 paths (this CPU selects {selected}); accuracy = worst SQNR vs the int64 matmul of each "
          "path's own codes (Gaussian / ReLU / constant inputs); 'vs fp32' = SQNR vs fp32 dense (Gaussian)\n")
    print("| K→N | " + " | ".join(n for n in names if n not in ("fp32", "bf16")) + " |")
    print("|" + "---|" * (len(names) - 1))
    for shp, a in res["accuracy"].items():
        print(f"| {shp.replace('->', '→')} | " + " | ".join(
            f"{a[n]['sqnr_vs_exact_db']:.1f} dB{' (exact)' if a[n]['exact'] else ''}, vs fp32 "
            f"{a[n]['sqnr_vs_fp32_db']:.1f}" for n in names if n in a) + " |")
    print("\ncells: median µs per call (speedup vs fp32 / vs bf16); '1×' = one call (too slow to interleave)\n")
    print("| K→N | M | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 2))
    by = {}
    for r in res["cells"]:
        by.setdefault((r["k"], r["n"], r["m"]), {})[r["candidate"]] = r
    for (k, n, m), cs in by.items():
        f32, b16 = cs["fp32"]["median_us"], cs["bf16"]["median_us"]
        cells = [f"{f32:,.1f}"] + [
            f"{cs[c]['median_us']:,.1f}{'' if cs[c]['interleaved'] else ' 1×'} "
            f"({f32 / cs[c]['median_us']:.2f}/{b16 / cs[c]['median_us']:.2f})" for c in names[1:]]
        print(f"| {k}→{n} | {m} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------ main table (calibrate)
def print_calibration(prof, shapes, tokens, bw, w8a8_impl) -> list[dict]:
    key = {"fp32": "fp32@dense", "bf16": "bf16@dense"}
    print("cells: median µs per call (speedup vs fp32 / vs bf16); '*' = spread > 10 % after re-measuring;"
          f" W8A8 runs {w8a8_impl}\n")
    print("| K→N | M | " + " | ".join(COLS) + " |")
    print("|" + "---|" * (len(COLS) + 2))
    frac_rows, cells_out = [], []
    for n, k in shapes:
        for m in tokens:
            cells, ref = [], {}
            for c in COLS:
                if c in ("fp32", "bf16"):
                    opt = key[c]
                else:
                    s = SPECS[c]
                    opt = f"{s.label}@{kernel_for(s, n, k, 'cpu')}"
                e = prof.entries.get((opt, n, k, m))
                if e is None:
                    cells.append("n/a")
                    continue
                us = e["median_ms"] * 1e3
                ref[c] = us
                star = "" if e["stable"] else "*"
                kern = opt.split("@")[1]
                tag = "" if kern in ("dense", "int8_wo", "int4_wo", "w8a8") else f" [{kern}]"
                cells_out.append({"column": c, "option": opt, "n": n, "k": k, "m": m, "median_us": round(us, 2),
                                  "stable": e["stable"], "impl": w8a8_impl if kern == "w8a8" else kern})
                if c == "fp32":
                    cells.append(f"{us:,.1f}{star}")
                else:
                    cells.append(f"{us:,.1f}{star} ({ref['fp32'] / us:.1f}/{ref.get('bf16', us) / us:.1f}){tag}")
            print(f"| {k}→{n} | {m} | " + " | ".join(cells) + " |")
            if m == 1:
                row = []
                for c in COLS:
                    if c not in ref:
                        row.append("n/a")
                        continue
                    nbytes = {"fp32": n * k * 4, "bf16": n * k * 2}.get(c) or SPECS[c].nbytes(n, k, "cpu")
                    row.append(f"{(nbytes + n * 4) / bw * 1e6 / ref[c]:.2f}")       # + fp32 bias
                frac_rows.append(f"| {k}→{n} | " + " | ".join(row) + " |")
    print("\nfraction of the bytes-moved limit reached at M=1 (limit = stored weight bytes / read bandwidth):\n")
    print("| K→N | " + " | ".join(COLS) + " |")
    print("|" + "---|" * (len(COLS) + 1))
    print("\n".join(frac_rows))
    unstable = sum(not e["stable"] for e in prof.entries.values())
    print(f"\n{len(prof.entries)} cells, {unstable} still unstable after re-measuring "
          f"(spread > 10 %), {sum(e['retries'] > 0 for e in prof.entries.values())} re-measured")
    rat = [r["ratio"] for r in prof.repeatability]
    if rat:
        print(f"repeatability (same cell measured again at the end, second/first): median "
              f"{statistics.median(rat):.3f}, range {min(rat):.3f}–{max(rat):.3f} over {len(rat)} cells")
    return cells_out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores are shared)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--shapes", type=_shape, nargs="+", default=None,
                    help="layer shapes as KxN (in x out features); default: MiniLM + 4096x4096 + 4096x11008")
    ap.add_argument("--out", default=None, help="also save the latency profile JSON here")
    ap.add_argument("--json", default=RESULTS, help="results file (commit, command, CPU capability, cells)")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--rotate-mb", type=float, default=8.0,
                    help="MB of weights touched between two calls of one module copy (0 = hot cache)")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the main kernel table")
    ap.add_argument("--no-w8a8-paths", action="store_true", help="skip the W8A8 path comparison")
    ap.add_argument("--int-mm-max-s", type=float, default=0.05,
                    help="_int_mm cells slower than this per call are timed once, not interleaved")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = args.shapes or SHAPES
    clock = clock_fn(args.clock)
    cap = cpu_capability()
    record = {**provenance(), "cpu_capability": cap, "w8a8_path": cap["w8a8_cpu"], "threads": args.threads,
              "clock": args.clock, "tokens": args.tokens, "shapes_KxN": [f"{k}x{n}" for n, k in shapes]}
    print(f"CPU: {cap['cpu']} ({cap['arch']}, torch ISA {cap['torch_isa']}, flags {cap['flags']}); "
          f"W8A8 path: {cap['w8a8_cpu']} — {cap['w8a8_reason']}")
    print(f"clock={args.clock}  threads={args.threads}  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.no_calibrate:
        t0 = time.perf_counter()
        prof = calibrate(shapes, tokens=args.tokens, kernels=list(SPECS.values()),
                         baselines=("fp32@dense", "bf16@dense"), repeat_check=2, clock=args.clock,
                         rotate_mb=args.rotate_mb)
        bw = read_bandwidth(clock)
        if args.out:
            prof.save(args.out)
        print(f"weights rotated through copies ({prof.meta['rotate_mb']} MB between reuses); read bandwidth "
              f"{bw / 1e9:.1f} GB/s; calibration {time.perf_counter() - t0:.0f} s")
        record["calibration"] = {"cells": print_calibration(prof, shapes, args.tokens, bw, cap["w8a8_cpu"]),
                                 "read_bandwidth_GBps": round(bw / 1e9, 2),
                                 "repeatability": prof.repeatability, "rotate_mb": args.rotate_mb}
    if not args.no_w8a8_paths:
        t0 = time.perf_counter()
        res = w8a8_paths(shapes, args.tokens, clock, args.int_mm_max_s)
        print_paths(res, cap["w8a8_cpu"])
        print(f"W8A8 path comparison {time.perf_counter() - t0:.0f} s (hot weights, interleaved)")
        record["w8a8_paths"] = res
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
