"""Kernel speeds on this device: fp32, bf16, int8-wo, int4-wo (g32/g128), W8A8 side by side.

Shapes: MiniLM-L6's layers (K→N: 384→384, 384→1536, 1536→384) and LLaMA-7B-like 4096→4096,
4096→11008, at M ∈ {1, 16, 128} rows. Every cell is the real module packed apply installs (fp32 in
and out, so casts / activation quantization / bias are included), timed by
``bitplan.kernels.calibrate`` (interleaved batches, preempted batches dropped, median, spread,
re-measured when unstable). Weights are hot in cache (repeated calls on one layer).

"bytes-moved limit" at M=1: the layer must at least read its stored weight bytes (exact, from the
size model) + bias; limit time = bytes / read bandwidth, the bandwidth measured here as the median
time of ``torch.dot`` over a 512 MB fp32 tensor (the fastest of sum/amax/dot/copy tried) with the
same thread count and clock. fraction = limit / measured; > 1 means the weights were served from
cache (L2 2 MB/core, L3 480 MB shared on this machine) faster than DRAM.

Clock: ``--clock cpu`` (default; thread CPU time, 1 thread) or ``wall``. The 2 cores are shared
(load average 5–10 while this was written), so wall time is mostly the neighbours' time slices.

Run:  python benchmarks/kernels.py [--threads 1] [--clock cpu] [--out prof_kernels.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitplan.kernels.calibrate import calibrate          # noqa: E402
from bitplan.kernels.formats import QuantSpec            # noqa: E402
from bitplan.kernels.registry import kernel_for          # noqa: E402
from bitplan.kernels.timing import clock_fn              # noqa: E402

SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096), (11008, 4096)]     # (N, K)
SPECS = {"int8-wo": QuantSpec(8), "int4-wo g32": QuantSpec(4, 32), "int4-wo g128": QuantSpec(4, 128),
         "W8A8": QuantSpec(8, act_bits=8)}
COLS = ["fp32", "bf16"] + list(SPECS)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores are shared)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--out", default=None, help="also save the profile JSON here")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--rotate-mb", type=float, default=8.0,
                    help="MB of weights touched between two calls of one module copy (0 = hot cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    prof = calibrate(SHAPES, tokens=args.tokens, kernels=list(SPECS.values()),
                     baselines=("fp32@dense", "bf16@dense"), repeat_check=2, clock=args.clock,
                     rotate_mb=args.rotate_mb)
    bw = read_bandwidth(clock_fn(args.clock))
    if args.out:
        prof.save(args.out)
    key = {"fp32": "fp32@dense", "bf16": "bf16@dense"}
    print(f"device: {prof.device}")
    print(f"clock={args.clock}  weights rotated through copies ({prof.meta['rotate_mb']} MB between reuses)"
          f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"threads={args.threads}  read bandwidth {bw / 1e9:.1f} GB/s  calibration {time.perf_counter() - t0:.0f} s")
    print("cells: median µs per call (speedup vs fp32 / vs bf16); '*' = spread > 10 % after re-measuring\n")
    print("| K→N | M | " + " | ".join(COLS) + " |")
    print("|" + "---|" * (len(COLS) + 2))
    frac_rows = []
    for n, k in SHAPES:
        for m in args.tokens:
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
                    if c == "fp32":
                        nbytes = n * k * 4
                    elif c == "bf16":
                        nbytes = n * k * 2
                    else:
                        nbytes = SPECS[c].nbytes(n, k, "cpu")
                    nbytes += n * 4                                   # fp32 bias
                    row.append(f"{nbytes / bw * 1e6 / ref[c]:.2f}")
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
    errs = prof.interpolation_errors()
    if errs:
        print("interpolation leave-one-out (shape predicted from the other shapes, piecewise-linear in N·K):")
        for e in errs:
            if e["m"] == args.tokens[-1] or e["m"] == args.tokens[0]:
                print(f"  {e['option']:>18} N={e['n']:>5} K={e['k']:>5} M={e['m']:>3}: "
                      f"{e['rel_error'] * 100:+.1f} %")


if __name__ == "__main__":
    main()
