"""Cost of planning a causal LM vs depth with the block-streaming estimator (``--method block``).

Randomly initialised Llama-architecture folders (hidden 1024, intermediate 2816, GQA 16 query / 4
key-value heads, SwiGLU, the 512-token byte-level BPE tokenizer of tests/llm_fixtures.py, saved as
safetensors shards of <= 100 MB) at 4, 8, 16 (32) decoder layers. For each, ONE subprocess runs
``bitplan plan --model DIR --method block --avg-bits 4`` (default options: bits 2,3,4,5,6,8 x
per-channel / group 128; default calibration: 32 windows x 128 tokens of the built-in text) and
reports its wall time, the scoring time (plan.estimator.seconds), the solve time, and its peak RSS
(``VmHWM`` of /proc/self/status at exit: the high-water mark of the worker's own memory since its
exec — ``ru_maxrss`` is not, it keeps the RSS of the parent at fork, which builds the folders). ``--apply`` also packs the plan with
``bitplan apply`` in its own subprocess (streamed: one decoder block at a time, one safetensors shard
per block) and records that process's peak RSS, wall / CPU time and shard count — apply memory vs
depth — then compares the packed tensors' bytes with the plan's predicted size; ``--apply-whole``
also runs ``bitplan apply --no-stream`` (the whole model in memory) for comparison.

Random weights measure cost (time, memory), never quality.

Baseline (the whole-model path before the streaming estimator, issue 12, same folders, 2 cores):
4 layers 3,177 MiB / 192 s, 16 layers 10,432 MiB / 745 s.

``--baseline 4 16`` also plans the same folders with the whole-model path (``--method hessian``, the
default before streaming), each right after the streamed run of the same depth, so the speed-up is a
ratio measured side by side under the same load; ``--one-b`` adds a ≈1 B-parameter model
(TinyLlama-1.1B's shape, 22 layers, random weights).

Run:  python benchmarks/llm_scale.py [--layers 4 8 16 32] [--timeout 1500] [--apply 4 16 32] [--apply-whole]
                                     [--baseline 4 16] [--one-b]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "out", "llm_scale")
RESULT = os.path.join(ROOT, "benchmarks", "results", "llm_scale.json")
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             max_position_embeddings=2048)
# ≈ 1 B parameters: TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, GQA 32/4 heads, 22 layers)
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                max_position_embeddings=2048)
LAYERS_1B = 22
BASELINE = {"4": {"peak_rss_mib": 3177, "seconds": 192}, "16": {"peak_rss_mib": 10432, "seconds": 745}}


def build(layers: int, big: bool = False) -> str:
    """Write (once) a random Llama folder with ``layers`` decoder blocks (``big``: the ≈1 B shape);
    returns its path."""
    path = os.path.join(OUT, f"llama_{layers}L" + ("_1b" if big else ""))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from llm_fixtures import train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = train_tokenizer(512)
    cfg = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                               vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **(SHAPE_1B if big else SHAPE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layers)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size="100MB")
    tok.save_pretrained(path)
    return path


def peak_rss_mib() -> float:
    """This process's peak resident memory since its exec (VmHWM), in MiB. Not ``ru_maxrss``: Linux
    carries the parent's high-water mark into a child at fork, so a worker started by a parent that
    had just built a 4 GB folder reported 4 GB before it read a weight."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _progress(out: str, t0: float) -> None:
    """Write this process's peak RSS so far to ``out.progress`` every 20 s (a background thread), so
    that a run cut by the timeout still says something."""
    import threading

    def loop():
        while True:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            with open(out + ".progress", "w", encoding="utf-8") as f:
                json.dump({"elapsed_s": time.perf_counter() - t0, "peak_rss_mib_so_far": peak_rss_mib(),
                           "cpu_s_so_far": ru.ru_utime + ru.ru_stime}, f)
            time.sleep(20)
    threading.Thread(target=loop, daemon=True).start()


def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # peak RSS of this process since its exec; CPU seconds (user + sys, all threads): less sensitive than wall time to the other jobs
    return {"peak_rss_mib": peak_rss_mib(), "cpu_s": ru.ru_utime + ru.ru_stime}


def goal(path: str, tokens: int) -> dict:
    """Issue 12's memory goal for scoring, in MiB: 2 x one decoder block's fp32 weights + the carried
    calibration activations (input and output of a block, fp32) + everything outside the blocks."""
    from safetensors import safe_open
    block, outer, hidden = 0, 0, 0
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), "pt") as f:
                for k in f.keys():
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= d
                    if ".layers.0." in k:
                        block += n
                    elif ".layers." not in k:
                        outer += n
                    if k.endswith("embed_tokens.weight"):
                        hidden = f.get_slice(k).get_shape()[1]
    return {"block_params": block, "outer_params": outer,
            "goal_mib": (2 * block * 4 + 2 * tokens * hidden * 4 + outer * 4) / 2 ** 20}


def worker(path: str, out: str, method: str = "block") -> None:
    """Run `bitplan plan --method METHOD` in this process; write timings and peak RSS to ``out``."""
    from bitplan.cli import main
    from bitplan.models import load_model
    plan_path = out + ".plan.json"
    t0 = time.perf_counter()
    _progress(out, t0)
    load_model(path, lazy=True)             # what `plan` holds before scoring: runtime, meta model, batches
    before = peak_rss_mib()
    rc = main(["plan", "--model", path, "--method", method, "--avg-bits", "4", "--out", plan_path, "--quiet"])
    wall = time.perf_counter() - t0
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    rec = {"rc": rc, "wall_s": wall, "score_s": plan["estimator"]["seconds"], "solve_s": plan["solver"]["seconds"],
           "solver_status": plan["solver"]["status"], "method": plan["estimator"]["name"], "predicted_size_bytes": plan["predicted"]["size_bytes"],
           "budget_size_bytes": plan["budgets"]["size_bytes"], "layers_planned": len(plan["layers"]),
           "rss_before_scoring_mib": before, **goal(path, plan["estimator"].get("tokens") or 32 * 128),
           **_usage(), "bits": sorted({v["bits"] for v in plan["layers"].values()})}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rec, f)


def apply_worker(path: str, plan: str, packed: str, out: str, stream: bool = True) -> None:
    """Run `bitplan apply` (streamed unless ``stream`` is False) in this process; write its wall / CPU
    time, peak RSS and the shards it wrote to ``out``."""
    from bitplan.cli import main
    from bitplan.packed_io import SHARD_PATTERN
    t0 = time.perf_counter()
    _progress(out, t0)
    rc = main(["apply", "--model", path, "--plan", plan, "--out", packed, "--quiet"]
              + ([] if stream else ["--no-stream"]))
    rec = {"rc": rc, "wall_s": time.perf_counter() - t0, **_usage(), "streamed": stream,
           "shards": sum(bool(SHARD_PATTERN.fullmatch(f)) for f in os.listdir(packed)) if rc == 0 else None}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rec, f)


def packed_bytes(folder: str) -> int:
    from safetensors import safe_open
    total = 0
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    total += t.numel() * t.element_size()
    return total


def check_size(packed: str, predicted: float) -> dict:
    """The packed model's bytes (every parameter and buffer, as the size cost model counts them) vs the
    plan's prediction; the safetensors hold 256 B less: the rotary inv_freq buffers are computed, not stored."""
    from bitplan import load_packed
    from bitplan.costmodels import model_nbytes
    real = model_nbytes(load_packed(packed))
    return {"packed_model_bytes": real, "packed_tensor_bytes": packed_bytes(packed), "size_exact": real == predicted}


def _apply(path: str, plan: str, packed: str, timeout: float, stream: bool) -> dict:
    """One `bitplan apply` in a subprocess (apply_worker): its record, or why there is none."""
    rec_file = packed + ".apply.json"
    if os.path.exists(rec_file):
        os.remove(rec_file)
    try:
        q = subprocess.run([sys.executable, os.path.abspath(__file__), "--apply-worker", path, plan, packed, rec_file,
                            "stream" if stream else "whole"], timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        rec = {"timed_out_after_s": timeout}
        if os.path.exists(rec_file + ".progress"):
            with open(rec_file + ".progress", encoding="utf-8") as f:
                rec.update(json.load(f))
        return rec
    if q.returncode != 0 or not os.path.exists(rec_file):
        return {"rc": q.returncode, "error": q.stderr[-2000:]}
    with open(rec_file, encoding="utf-8") as f:
        return json.load(f)


def pack_and_check(path: str, out: str, n: int, timeout: float, predicted: float, whole: bool = False) -> dict:
    """`bitplan apply` (streamed) of run ``out``'s plan, its peak RSS and shards, then check_size;
    ``whole``: also `bitplan apply --no-stream` (whole model in memory) for comparison."""
    packed = os.path.join(OUT, f"packed_{n}L")
    a = _apply(path, out + ".plan.json", packed, timeout, stream=True)
    rec = {"apply_rc": a.get("rc"), "apply_wall_s": a.get("wall_s"), "apply_cpu_s": a.get("cpu_s"),
           "apply_peak_rss_mib": a.get("peak_rss_mib"), "apply_shards": a.get("shards"),
           **({"apply_error": a["error"]} if "error" in a else {}),
           **({"apply_timed_out_after_s": timeout} if "timed_out_after_s" in a else {})}
    if a.get("rc") == 0:
        rec.update(check_size(packed, predicted))
    if whole:
        w = _apply(path, out + ".plan.json", packed + "_whole", timeout, stream=False)
        rec.update({"apply_whole_rc": w.get("rc"), "apply_whole_wall_s": w.get("wall_s"),
                    "apply_whole_peak_rss_mib": w.get("peak_rss_mib")})
    return rec


def run_one(path: str, out: str, n: int, method: str, timeout: float) -> dict:
    """`bitplan plan --method METHOD` on ``path`` in a subprocess; its record (or why it has none)."""
    fp32 = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", path, out, "--worker-method",
                            method], timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        rec = {"timed_out_after_s": timeout, "layers": n, "method": method}
        if os.path.exists(out + ".progress"):
            with open(out + ".progress", encoding="utf-8") as f:
                rec.update(json.load(f))
        return rec
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "layers": n, "method": method}
    with open(out, encoding="utf-8") as f:
        rec = json.load(f)
    rec.update({"layers": n, "fp32_weights_mib": fp32 / 2 ** 20, "subprocess_wall_s": time.perf_counter() - t0,
                "score_s_per_layer": rec["score_s"] / n, "loadavg_before": load0, "loadavg_after": os.getloadavg()})
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per model (the machine is shared)")
    ap.add_argument("--apply", type=int, nargs="*", default=[], help="depths to also pack and check the size of")
    ap.add_argument("--apply-only", action="store_true",
                    help="pack the plans of an earlier run (--layers) and check their size; no re-scoring")
    ap.add_argument("--apply-whole", action="store_true",
                    help="with --apply / --apply-only: also time `bitplan apply --no-stream` (whole model in memory)")
    ap.add_argument("--baseline", type=int, nargs="*", default=[],
                    help="depths to also plan with the whole-model path (--method hessian, the default before "
                         "streaming), each right after the streamed run: results key hessian_N")
    ap.add_argument("--one-b", action="store_true", help=f"also the ≈1 B-parameter model ({LAYERS_1B} layers of "
                    "TinyLlama-1.1B's shape): results key 1b (packed too when --apply is given)")
    ap.add_argument("--worker", nargs=2, metavar=("DIR", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-method", default="block", help=argparse.SUPPRESS)
    ap.add_argument("--apply-worker", nargs=5, metavar=("DIR", "PLAN", "PACKED", "OUT", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--check-size", nargs=2, metavar=("PACKED", "PREDICTED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker, method=args.worker_method)
    if args.apply_worker:
        return apply_worker(*args.apply_worker[:4], stream=args.apply_worker[4] == "stream")
    if args.check_size:
        return print(json.dumps(check_size(args.check_size[0], float(args.check_size[1]))))
    sys.path.insert(0, ROOT)
    from benchmarks.provenance import provenance
    os.makedirs(OUT, exist_ok=True)
    rows = {}
    for n in args.layers:
        if args.apply_only:
            with open(RESULT, encoding="utf-8") as f:
                rec = json.load(f)["results"][str(n)]
            rows[str(n)] = {**rec, **pack_and_check(build(n), os.path.join(OUT, f"run_{n}L.json"), n, args.timeout,
                                                    rec["predicted_size_bytes"], args.apply_whole)}
            print(json.dumps(rows[str(n)]), flush=True)
            continue
        path = build(n)
        out = os.path.join(OUT, f"run_{n}L.json")
        rec = run_one(path, out, n, "block", args.timeout)
        if n in args.apply and "score_s" in rec:
            rec.update(pack_and_check(path, out, n, args.timeout, rec["predicted_size_bytes"], args.apply_whole))
        rows[str(n)] = rec
        print(str(n), json.dumps(rec), flush=True)
        if n in args.baseline:              # right after, on the same folder: the ratio under the same load
            rows[f"hessian_{n}"] = run_one(path, os.path.join(OUT, f"run_hessian_{n}L.json"), n, "hessian", args.timeout)
            print(f"hessian_{n}", json.dumps(rows[f"hessian_{n}"]), flush=True)
    if args.one_b:
        path = build(LAYERS_1B, big=True)
        out = os.path.join(OUT, "run_1b.json")
        rec = {**run_one(path, out, LAYERS_1B, "block", args.timeout), "shape": SHAPE_1B}
        if args.apply and "score_s" in rec:
            rec.update(pack_and_check(path, out, "1b", args.timeout, rec["predicted_size_bytes"], args.apply_whole))
        rows["1b"] = rec
        print("1b", json.dumps(rec), flush=True)
    for n in sorted(set(args.baseline) - set(args.layers)):
        rows[f"hessian_{n}"] = run_one(build(n), os.path.join(OUT, f"run_hessian_{n}L.json"), n, "hessian", args.timeout)
        print(f"hessian_{n}", json.dumps(rows[f"hessian_{n}"]), flush=True)
    record = {**provenance(), "what": "bitplan plan --method block --avg-bits 4 on random Llama folders "
              "(random weights: cost only, not quality)", "shape": SHAPE, "baseline_whole_model": BASELINE,
              "cpu_count": os.cpu_count(), "results": rows}
    from bitplan.core.jsonio import atomic_write_json as write_json
    if os.path.exists(RESULT):       # keep depths measured by earlier (bounded) runs
        with open(RESULT, encoding="utf-8") as f:
            old = json.load(f)
        record["results"] = {**old.get("results", {}), **rows}
        record["earlier_runs"] = old.get("earlier_runs", []) + [{k: old.get(k) for k in ("commit", "command", "created")}]
    write_json(RESULT, record)
    print("wrote", RESULT)


if __name__ == "__main__":
    main()
