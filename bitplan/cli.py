"""Command line: ``bitplan plan | demo`` (also ``python -m bitplan``). Parses, calls the library, writes files.

Exit codes: 0 success, 2 bad arguments (argparse) or bad values / infeasible budgets.
"""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]

log = logging.getLogger("bitplan")


def _bits(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits {s!r}: give comma-separated integers, e.g. 2,3,4,8")


def _group(s: str):
    if s in ("none", "channel", "per-channel"):
        return None
    try:
        g = int(s)
        assert g > 0
        return g
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--group-size {s!r}: a positive integer or 'none' (per channel)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitplan", description="Mixed-precision bit allocation for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="score layers, solve under budgets, write plan.json")
    pl.add_argument("--model", required=True, help="'minilm', a local Hugging Face folder, or 'pkg.module:function'")
    pl.add_argument("--budget-mb", type=float, help="whole-model size after packing, MB (10**6 bytes)")
    pl.add_argument("--max-bops", type=float, help="BOPs budget per sample (MACs x weight bits x act bits)")
    pl.add_argument("--max-latency-ms", type=float, help="latency budget in ms (needs --profile)")
    pl.add_argument("--profile", help="latency profile JSON from `bitplan calibrate`")
    pl.add_argument("--bits", type=_bits, default=(2, 3, 4, 8), help="weight bit options (default 2,3,4,8; 16 = fp16)")
    pl.add_argument("--group-size", type=_group, default=None, help="quantization group size along the input dim, or 'none' (per output channel, default)")
    pl.add_argument("--asymmetric", action="store_true", help="store a zero point per group (default symmetric)")
    pl.add_argument("--sensitivity", default="hessian", help="estimator name (default hessian)")
    pl.add_argument("--solver", default="ilp", help="solver name (default ilp)")
    pl.add_argument("--seed", type=int, default=0, help="random seed (probes, sampling)")
    pl.add_argument("--out", required=True, help="where to write the plan JSON")

    dm = sub.add_parser("demo", help="whole pipeline on the built-in MiniLM model, offline")
    dm.add_argument("--max-probes", type=int, default=32, help="Hutchinson probe cap (default 32)")
    dm.add_argument("--out", default=None, help="also write the demo's plan JSON here")
    return p


def cmd_plan(args) -> int:
    from .api import allocate
    from .models import load_model
    spec = load_model(args.model)
    if spec.calib_data is None:
        raise ValueError(f"model spec {args.model!r} returned no calibration data; return (model, calib_data)")
    plan = allocate(spec.model, budget_mb=args.budget_mb, calib_data=spec.calib_data, bits=args.bits,
                    sensitivity=args.sensitivity, solver=args.solver, latency_profile=args.profile,
                    max_latency_ms=args.max_latency_ms, max_bops=args.max_bops, seed=args.seed,
                    group_size=args.group_size, symmetric=not args.asymmetric)
    plan.save(args.out)
    print(f"wrote {args.out}: {len(plan.layers)} layers, predicted size "
          f"{plan.predicted['size_bytes'] / 1e6:.3f} MB, solver {plan.solver['name']} "
          f"({plan.solver['status']})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    print(run_demo(max_probes=args.max_probes, out=args.out))
    return 0


COMMANDS = {"plan": cmd_plan, "demo": cmd_demo}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as e:       # bad values, infeasible budgets, mismatched plans
        print(f"bitplan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
