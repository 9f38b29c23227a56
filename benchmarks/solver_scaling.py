"""Solver scaling: build time, solve time, objective, proven bound, gap and peak RSS, side by side.

L ∈ {50, 500, 5000, 50000, 500000} decision groups × 6 options (bits 2,3,4,5,6,8) × 1 or 3 budgets.
Tables (realistic, synthetic — no model is run):
* shapes drawn from real layers: BERT-base/large and LLaMA-7B linears (q/k/v/o, up, down) and
  ResNet-50 3×3 convs; n = out·in weights.
* loss[l, b] = trace_l · n_l · 4^(−b) · noise   (HAWQ-style: Tr(H)/n · ‖Q_b(W) − W‖², ‖·‖² ∝ n·4^(−b));
  trace lognormal(0, 1.5), noise lognormal(0, 0.1).
* size  = ceil(n·b/8) packed bytes + fp16 scale and zero per group of 128 (bytes, exact).
* bops  = MACs · b · 8 (8-bit activations), MACs = n · tokens (128) or n · H·W for convs.
* latency-like (µs): 3 + max(bytes / 20 GB/s, MACs / 50 GMAC/s · (0.7 if b <= 4 else 1))
  + unpack penalty n·2e-5 for 3/5/6-bit (no kernel): synthetic, NOT measured.
Budgets come from a feasible reference plan (bits by sensitivity rank): the size budget alone, or
size + latency + 0.9995·BOPs of that plan (two or three budgets bind).

Every solver runs in a fresh spawned process (peak RSS = max of that process's ru_maxrss and its
children's — CBC, the isolated HiGHS worker — including the interpreter, numpy and the problem's
own tables) with a hard wall limit. Exact solvers are
skipped where they would blow the time (ilp > 5,000 rows, highs/convex > 50,000, dp > 5,000 or
several budgets); --all runs everything.

    python benchmarks/solver_scaling.py --quick
    python benchmarks/solver_scaling.py --sizes 1000,100000 --budgets 3 --time-limit 30
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

BITS = np.array([2, 3, 4, 5, 6, 8])
# (out, in, tokens or H·W) of real layers
SHAPES = np.array([
    (768, 768, 128), (2304, 768, 128), (3072, 768, 128), (768, 3072, 128),          # BERT-base
    (1024, 1024, 128), (4096, 1024, 128), (1024, 4096, 128),                         # BERT-large
    (4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 128),                       # LLaMA-7B
    (64, 576, 3136), (128, 1152, 784), (256, 2304, 196), (512, 4608, 49),             # ResNet-50 3x3
], dtype=float)
SOLVERS = ("ilp", "highs", "dp", "lagrange", "convex", "auto")


def make_problem(L: int, n_budgets: int, seed: int = 0):
    """Realistic random problem; see the module docstring. Returns a bitplan Problem."""
    from bitplan.allocator import Problem

    rng = np.random.default_rng(seed)
    out, inn, tok = SHAPES[rng.integers(0, len(SHAPES), L)].T                    # (L,) each
    n = out * inn
    b = BITS[None, :].astype(float)                                               # (1, B)
    trace = rng.lognormal(0.0, 1.5, L)
    loss = trace[:, None] * n[:, None] * 4.0 ** (-b) * rng.lognormal(0.0, 0.1, (L, len(BITS)))
    size = np.ceil(n[:, None] * b / 8) + (out * np.ceil(inn / 128) * 4)[:, None]   # bytes
    macs = n * tok
    bops = macs[:, None] * b * 8
    lat = (3 + np.maximum(size / 2e4, macs[:, None] / 5e4 * np.where(b <= 4, 0.7, 1.0))
           + n[:, None] * np.where(np.isin(b, [3, 5, 6]), 2e-5, 0.0))              # µs, synthetic
    costs = {"size": size, "latency": lat, "bops": bops}
    sens = loss[:, 2] / size[:, 2]
    rank = np.argsort(np.argsort(sens)) / L
    ref = np.searchsorted([0.1, 0.3, 0.6, 0.8, 0.95], rank)                       # (L,) reference plan
    rows = np.arange(L)
    caps = {"size": float(size[rows, ref].sum()), "latency": float(lat[rows, ref].sum()),
            "bops": float(bops[rows, ref].sum()) * 0.9995}
    names = ["size"] if n_budgets == 1 else ["size", "latency", "bops"][:n_budgets]
    return Problem(loss, {k: costs[k] for k in names}, {k: caps[k] for k in names})


def skip_reason(method: str, L: int, K: int) -> str | None:
    if method == "ilp" and L > 5000:
        return "PuLP+CBC > 5k rows"
    if method in ("highs", "convex") and L > 50_000:
        return f"{method} > 50k rows"
    if method == "dp" and (K != 1 or L > 5000):
        return "dp: 1 budget, <= 5k rows"
    return None


def _child(q, method, L, K, seed, time_limit):
    import resource

    from bitplan.allocator import solve
    try:
        t0 = time.perf_counter()
        p = make_problem(L, K, seed)
        gen_s = time.perf_counter() - t0
        opts = {"bits": BITS} if method == "convex" else {}
        if method in ("ilp", "highs", "lagrange", "auto"):
            opts["time_limit"] = time_limit
        s = solve(p, method=method, **opts)
        build = s.info.get("build_s", float("nan"))
        q.put(dict(gen_s=gen_s, build_s=build, total_s=s.seconds, objective=s.objective, bound=s.bound,
                   gap=s.gap, status=s.status, ran=s.method,
                   rss_mb=max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,      # KiB on Linux
                              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024))
    except Exception as e:                                    # report, don't kill the table
        q.put({"error": f"{type(e).__name__}: {str(e)[:80]}"})


def run_one(method, L, K, seed, time_limit):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, method, L, K, seed, time_limit))
    t0 = time.perf_counter()
    proc.start()
    wall = 3 * time_limit + 120
    try:
        res = q.get(timeout=wall)
    except Exception:
        res = {"error": f"killed after {wall:.0f} s wall"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50,500,5000,50000,500000", help="comma-separated L values")
    ap.add_argument("--budgets", default="1,3", help="comma-separated budget counts (1..3)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per exact solve")
    ap.add_argument("--quick", action="store_true", help="sizes 50,500,5000; time limit 10 s")
    ap.add_argument("--all", action="store_true", help="do not skip exact solvers on big sizes")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sizes = [50, 500, 5000] if a.quick else [int(s) for s in a.sizes.split(",")]
    tl = min(a.time_limit, 10.0) if a.quick else a.time_limit
    budgets = [int(k) for k in a.budgets.split(",")]
    methods = [m for m in a.solvers.split(",") if m]
    hdr = (f"{'L':>7} {'K':>2} {'solver':<9} {'ran':<9} {'build_s':>8} {'solve_s':>8} {'total_s':>8} "
           f"{'objective':>14} {'bound':>14} {'gap':>9} {'status':<9} {'rss_MB':>7}")
    print(f"# solver_scaling: 6 options, time limit {tl:g} s per exact solve, seed {a.seed}", flush=True)
    print(hdr)
    print("-" * len(hdr), flush=True)
    for L in sizes:
        for K in budgets:
            for m in methods:
                why = None if a.all else skip_reason(m, L, K)
                if why:
                    print(f"{L:>7} {K:>2} {m:<9} skipped ({why})", flush=True)
                    continue
                r = run_one(m, L, K, a.seed, tl)
                if "error" in r:
                    print(f"{L:>7} {K:>2} {m:<9} ERROR {r['error']}  (wall {r['wall_s']:.1f} s)", flush=True)
                    continue
                solve_s = r["total_s"] - r["build_s"] if np.isfinite(r["build_s"]) else r["total_s"]
                print(f"{L:>7} {K:>2} {m:<9} {r['ran']:<9} {r['build_s']:>8.3f} {solve_s:>8.3f} "
                      f"{r['total_s']:>8.3f} {r['objective']:>14.8g} {r['bound']:>14.8g} "
                      f"{r['gap']:>9.2e} {r['status']:<9} {r['rss_mb']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
