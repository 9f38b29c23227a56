"""Scoring spread over torch.distributed ranks: 1 process x 1 thread vs 2 processes x 1 thread.

MiniLM (built-in ``minilm``, first --calib-batches calibration batches of 16 sentences), the real
CLI end to end, in interleaved rounds (the order of the two variants flips every round):

  1p   OMP_NUM_THREADS=1 python -m bitplan plan --model minilm --sensitivity M ...
  2p   OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 -m bitplan plan ...  (gloo)

for M in measured and hessian; and ``block`` (the streamed causal-LM estimator, batches sharded over
the ranks) on the causal-LM folder ``--llm DIR`` (e.g. benchmarks/out/llm_scale/llama_4L from
llm_scale.py) with its default calibration (32 windows x 128 tokens). Reported per run: the command's wall time (model loading, scoring,
solving, writing), the CPU seconds of all its processes (user + sys; model loading is repeated
in every process) and the scoring time alone (``meta.seconds`` of the sensitivity table rank 0
wrote: its own share plus waiting for the other rank). Speed-up = median(1p) / median(2p). Every
2p table must equal the 1p table exactly (``block``: up to floating-point summation order — its
largest relative difference is reported) and every plan must choose the same option per layer.

The machine may be shared: 1-minute load averages before and after each run are recorded, and
numbers measured under load are to be quoted as such (two processes need two free cores).

Run: python benchmarks/distributed_scoring.py [--rounds 3] [--calib-batches 2] [--bits 2,4,8]
         [--methods measured,hessian,block --llm benchmarks/out/llm_scale/llama_4L]
Writes benchmarks/results/distributed_scoring.json (with provenance).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import ROOT, provenance  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "distributed_scoring.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(method: str, world: int, args, folder: str) -> dict:
    """One CLI run; returns wall / scoring seconds, the table and the plan's per-layer options."""
    cache, plan = os.path.join(folder, "sens.json"), os.path.join(folder, "plan.json")
    for f in (cache, plan):
        if os.path.exists(f):
            os.remove(f)
    if method == "block":
        cli = ["-m", "bitplan", "plan", "--model", args.llm, "--sensitivity", "block", "--avg-bits", "4",
               "--sensitivity-cache", cache, "--out", plan, "-q"]
    else:
        cli = ["-m", "bitplan", "plan", "--model", "minilm", "--sensitivity", method, "--bits", args.bits,
               "--group-size", "channel", "--calib-batches", str(args.calib_batches), "--avg-bits",
               str(args.avg_bits), "--sensitivity-cache", cache, "--out", plan, "-q"]
    if method == "hessian":
        cli += ["--max-probes", str(args.max_probes)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_port", str(_free_port()), *cli, "--timeout", "600"]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    table = json.load(open(cache))
    layers = json.load(open(plan))["layers"]
    return {"world": world, "wall_s": wall, "score_s": table["meta"]["seconds"], "cpu_s": cpu,
            "load_before": load0, "load_after": os.getloadavg()[0],
            "_loss": table["loss"], "_layers": layers, "probes": table["meta"].get("probes")}


def _max_rel(runs, ref) -> float:
    """Largest |table - reference| / max |reference| over every run."""
    import numpy as np
    r = np.asarray(ref, dtype=float)
    return float(max(np.abs(np.asarray(x["_loss"], dtype=float) - r).max() for x in runs) / max(np.abs(r).max(), 1e-300))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--avg-bits", type=float, default=5.0)
    ap.add_argument("--max-probes", type=int, default=16)
    ap.add_argument("--methods", default="measured,hessian")
    ap.add_argument("--llm", metavar="DIR", help="causal-LM folder for --methods block")
    args = ap.parse_args()
    if "block" in args.methods.split(",") and not args.llm:
        ap.error("--methods block needs --llm DIR (a causal-LM folder with safetensors weights)")
    import torch
    res = {**provenance(), "what": __doc__.split("\n\n")[0], "cpu_count": os.cpu_count(),
           "threads_per_process": 1, "settings": vars(args), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            runs = []
            for r in range(args.rounds):
                for world in ((1, 2) if r % 2 == 0 else (2, 1)):
                    runs.append(run_once(method, world, args, tmp))
                    x = runs[-1]
                    print(f"{method} round {r} {world}p: wall {x['wall_s']:.1f} s, scoring {x['score_s']:.1f} s, "
                          f"load {x['load_before']:.1f}->{x['load_after']:.1f}", flush=True)
            one = [x for x in runs if x["world"] == 1]
            two = [x for x in runs if x["world"] == 2]
            med = {k: {w: statistics.median(x[k] for x in g) for w, g in (("1p", one), ("2p", two))}
                   for k in ("wall_s", "score_s", "cpu_s")}
            res["methods"][method] = {
                "runs": [{k: v for k, v in x.items() if not k.startswith("_")} for x in runs],
                "median": med,
                "speedup_wall": med["wall_s"]["1p"] / med["wall_s"]["2p"],
                "speedup_scoring": med["score_s"]["1p"] / med["score_s"]["2p"],
                "identical_tables": all(x["_loss"] == one[0]["_loss"] for x in runs),
                "max_rel_diff": _max_rel(runs, one[0]["_loss"]),
                "identical_plans": all(x["_layers"] == one[0]["_layers"] for x in runs),
                "layers": len(one[0]["_layers"]), "options": len(one[0]["_loss"][0])}
            m = res["methods"][method]
            print(f"{method}: speed-up wall {m['speedup_wall']:.2f}x, scoring {m['speedup_scoring']:.2f}x; "
                  f"identical tables {m['identical_tables']}, plans {m['identical_plans']}", flush=True)
    res["load_average_end"] = list(os.getloadavg())
    res["torch_threads_default"] = torch.get_num_threads()
    from bitplan.core.jsonio import atomic_write_json
    atomic_write_json(OUT, res)
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
