"""Shape constraints of every low-level op the packed kernels call, found by sweeping odd M / K / N
in crash-isolated child processes, and checked against each kernel's ``supports()``.

Ops swept (CPU): ``torch._weight_int8pack_mm`` (bf16 / fp16 / fp32 activations, contiguous and
strided), ``torch._convert_weight_to_int4pack_for_cpu`` + ``torch._weight_int4pack_mm_for_cpu`` (group
sizes 8..256), ``onednn.qlinear_prepack`` + ``onednn.qlinear_pointwise`` with 7-bit and 8-bit
activation codes, and ``torch._int_mm``. Every case runs in a forked child; a child that dies
(SIGSEGV) marks its case "crash" and a new child continues with the next case, so one sweep
survives any number of crashes (Linux: needs ``os.fork``).

Each case is compared with an exact float64 / int64 reference; accuracy = −20·log10 of the worst
|y − ref| / Σ_k|x_k·w_nk| (digits right relative to the size of the terms). Status: ok (≥ 35 dB for
bf16 ops, bit-exact for integer ops), wrong, raise (a Python exception: safe), crash (the process
died). Then, for the ops a kernel calls, the kernel's ``supports()`` is evaluated on every swept
shape: ``violations`` are shapes it accepts where the op is not ok (must be 0); ``refused_ok`` are
shapes it refuses where the op works (over-cautious, harmless: the reference path runs).

Run:  python benchmarks/kernel_constraints.py [--out benchmarks/results/kernel_constraints.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OK_DB = {"int8pack": 35.0, "int4": 35.0, "qlinear_u7": 999.0, "qlinear_u8": 999.0, "int_mm": 999.0}


def _accuracy_db(y, ref, mag):
    if tuple(y.shape) != tuple(ref.shape):
        return None
    if ref.numel() == 0:
        return 999.0
    rel = float(((y.double() - ref).abs() / mag.clamp(min=1e-30)).max())
    return 999.0 if rel == 0 else -20 * float(torch.log10(torch.tensor(rel)))


def _gen(m, k, n):
    return torch.Generator().manual_seed(m * 1_000_003 + k * 1009 + n)


def op_int8pack(m, k, n, dtype="bf16", strided=False):
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = _gen(m, k, n)
    x = torch.randn(m, 2 * k if strided else k, generator=g).to(dt)
    x = x[:, ::2] if strided else x
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) + 0.5).to(dt)
    y = torch._weight_int8pack_mm(x, w, s)
    wd = w.double() * s.double()[:, None]
    return y, x.double() @ wd.t(), x.double().abs() @ wd.abs().t()


def op_int4(m, k, n, group):
    g = _gen(m, k, n)
    x = torch.randn(m, k, generator=g).bfloat16()
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    ng = -(-k // group)
    sc = (torch.rand(n, ng, generator=g) + 0.5).bfloat16()
    z = torch.randn(n, ng, generator=g).bfloat16()
    wp = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    y = torch._weight_int4pack_mm_for_cpu(x, wp, group, torch.stack([sc, z], -1).transpose(0, 1).contiguous())
    col = lambda t: t.double().repeat_interleave(group, 1)[:, :k]  # noqa: E731
    part, zz = (q.double() - 8) * col(sc), col(z)
    return y, x.double() @ (part + zz).t(), x.double().abs() @ (part.abs() + zz.abs()).t()


def _qlinear(m, k, n, qmax):
    g = _gen(m, k, n)
    xq = torch.randint(-qmax, qmax + 1, (m, k), generator=g, dtype=torch.int16)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    y = torch.ops.onednn.qlinear_pointwise(
        (xq + qmax + 1).to(torch.uint8), 1.0, qmax + 1, torch.ops.onednn.qlinear_prepack(w, None),
        torch.ones(n), torch.zeros(1, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
    return y, xq.double() @ w.double().t(), xq.double().abs() @ w.double().abs().t()


def op_qlinear_u7(m, k, n):
    return _qlinear(m, k, n, 63)


def op_qlinear_u8(m, k, n):
    return _qlinear(m, k, n, 127)


def op_int_mm(m, k, n):
    g = _gen(m, k, n)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    y = torch._int_mm(xq, w.t().contiguous())
    return y, xq.double() @ w.double().t(), xq.double().abs() @ w.double().abs().t()


OPS = {"int8pack": op_int8pack, "int4": op_int4, "qlinear_u7": op_qlinear_u7, "qlinear_u8": op_qlinear_u8,
       "int_mm": op_int_mm}


def grids() -> dict[str, list[tuple]]:
    Ms = (0, 1, 2, 3, 4, 7, 8, 16, 17, 33)
    Ks = (1, 2, 3, 7, 8, 9, 16, 17, 20, 24, 32, 36, 64, 100, 128, 384)
    Ns = (1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 32, 100, 384)
    i8 = [(m, k, n, "bf16", False) for m in Ms for k in Ks for n in Ns]
    i8 += [(m, k, n, dt, st) for dt in ("bf16", "fp16", "fp32") for st in (False, True) for m in (0, 1, 3, 17)
           for k in (8, 17, 384) for n in (8, 17) if dt != "bf16" or st]
    kg = [(k, gr) for gr in (8, 16, 32, 64, 128, 256) for k in (16, 24, 32, 48, 64, 96, 100, 128, 160, 256, 384)]
    i4 = [(m, k, n, gr) for m in (0, 1, 3, 17) for n in (1, 7, 8, 15, 16, 17, 24, 32, 48, 100) for k, gr in kg]
    q = [(m, k, n) for m in (0, 1, 2, 3, 7, 17, 33) for k in (1, 2, 3, 7, 8, 17, 20, 36, 64, 100, 384)
         for n in (1, 2, 3, 7, 8, 17, 24, 100, 384)]
    mm = [(m, k, n) for m in (0, 1, 2, 3, 7, 17, 33) for k in (1, 3, 8, 17, 100) for n in (1, 3, 8, 17, 100)]
    return {"int8pack": i8, "int4": i4, "qlinear_u7": q, "qlinear_u8": q, "int_mm": mm}


def _evaluate(op, args):
    try:
        y, ref, mag = OPS[op](*args)
    except Exception as e:                                      # noqa: BLE001 - recorded, not hidden
        return {"status": "raise", "msg": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    db = _accuracy_db(y, ref, mag)
    if db is None:
        return {"status": "wrong", "msg": f"shape {tuple(y.shape)} != {tuple(ref.shape)}"}
    return {"status": "ok" if db >= OK_DB[op] else "wrong", "db": round(db, 1)}


def run_isolated(op: str, cases: list[tuple], timeout_s: int = 60) -> list[dict]:
    """Evaluate ``cases`` in forked children; a child that dies marks its case 'crash'."""
    out: list[dict] = []
    while len(out) < len(cases):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                            # child: run from where the last one died
            os.close(r)
            for args in cases[len(out):]:
                signal.alarm(timeout_s)
                os.write(w, (json.dumps(_evaluate(op, args)) + "\n").encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            for line in f:
                out.append(json.loads(line))
        _, st = os.waitpid(pid, 0)
        if len(out) < len(cases):
            sig = os.WTERMSIG(st) if os.WIFSIGNALED(st) else None
            out.append({"status": "crash", "msg": f"signal {signal.Signals(sig).name}" if sig else
                        f"exit status {os.WEXITSTATUS(st)}"})
    return out


def kernel_claims(op: str, args: tuple) -> str | None | bool:
    """What the kernel calling ``op`` says about this shape: None (runs it), a reason string (refuses),
    or False when no kernel calls ``op`` with these arguments."""
    from bitplan.kernels.formats import QuantSpec
    from bitplan.kernels.qlinear import INT4_GROUPS, Int4WeightOnly, Int8WeightOnly
    from bitplan.kernels.w8a8 import W8A8
    from bitplan.kernels.capability import w8a8_cpu_path
    m, k, n = args[:3]
    if op == "int8pack":
        if args[3] != "bf16" or args[4]:        # the kernel feeds bf16, made contiguous in forward
            return False
        return Int8WeightOnly.supports(QuantSpec(8), n, k, "cpu", "linear")
    if op == "int4":
        if args[3] not in INT4_GROUPS:
            return Int4WeightOnly.supports(QuantSpec(4, args[3]), n, k, "cpu", "linear") or "group refused"
        return Int4WeightOnly.supports(QuantSpec(4, args[3]), n, k, "cpu", "linear")
    if op in ("qlinear_u7", "qlinear_u8"):
        if w8a8_cpu_path().impl != ("onednn_u7" if op == "qlinear_u7" else "onednn_u8"):
            return False                        # not the path this CPU runs
        return W8A8.supports(QuantSpec(8, act_bits=8), n, k, "cpu", "linear")
    return False                                # _int_mm: no CPU kernel calls it


def summarise(op, cases, results):
    groups: dict[tuple, list] = {}
    for args, res in zip(cases, results):       # messages grouped with their numbers masked
        if res["status"] != "ok":
            groups.setdefault((res["status"], re.sub(r"\d+", "#", res.get("msg", ""))), []).append(list(args))
    failures = [{"status": s, "msg": msg, "count": len(a), "examples": a[:8]}
                for (s, msg), a in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    violations, refused_ok, checked = [], 0, 0
    for args, res in zip(cases, results):
        claim = kernel_claims(op, args)
        if claim is False:
            continue
        checked += 1
        if claim is None and res["status"] != "ok":
            violations.append({"args": list(args), **res})
        elif claim is not None and res["status"] == "ok":
            refused_ok += 1
    return {"cases": len(cases), "status": dict(Counter(r["status"] for r in results)),
            "failures": failures, "kernel_checked": checked, "violations": violations,
            "refused_ok": refused_ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    args = ap.parse_args()
    torch.set_num_threads(1)            # before any fork: children inherit one thread, no OpenMP pool
    from provenance import provenance                                       # noqa: E402 (benchmarks/provenance.py)
    t0 = time.perf_counter()
    g = grids()
    raw = {op: run_isolated(op, g[op]) for op in args.ops}
    from bitplan.kernels.capability import cpu_capability                   # probes run after the forks
    report = {op: summarise(op, g[op], raw[op]) for op in args.ops}
    record = {**provenance(), "cpu_capability": cpu_capability(), "seconds": round(time.perf_counter() - t0, 1),
              "ok_threshold_db": OK_DB, "ops": report}
    for op, r in report.items():
        print(f"\n{op}: {r['cases']} cases {r['status']}; kernel supports() checked on {r['kernel_checked']}: "
              f"{len(r['violations'])} violations, {r['refused_ok']} refused although the op works")
        for f in r["failures"]:
            print(f"  {f['count']:>5} {f['status']:<6} {f['msg'][:100]!s:<100}  e.g. {f['examples'][:3]}")
        for v in r["violations"][:10]:
            print(f"  VIOLATION {v}")
    print(f"\n{record['seconds']} s; CPU: {record['cpu_capability']['cpu']} ({record['cpu_capability']['torch_isa']}),"
          f" W8A8 path {record['cpu_capability']['w8a8_cpu']}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.out)
    return 1 if any(r["violations"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
