"""``bitplan plan``: score, solve under budgets, write plan.json."""
from __future__ import annotations

import os
from collections import Counter

from . import args as A
from .common import log, prepare_scoring

__all__ = ["add", "run"]


def add(sub, common):
    pl = sub.add_parser("plan", parents=[common], help="score layers, solve under budgets, write plan.json",
                        description="Score every quantizable layer's sensitivity at every option, solve for "
                                    "each layer's option under the budgets, write the plan JSON. Give at "
                                    "least one budget.")
    A.model_args(pl)
    b = pl.add_mutually_exclusive_group()
    b.add_argument("--budget-mb", type=A.positive, metavar="MB",
                   help="whole-model size after packing, in MB (10**6 bytes), every parameter and buffer")
    b.add_argument("--avg-bits", type=A.positive, metavar="BITS",
                   help="size budget as average bits per quantized weight element, counting codes and "
                        "fp16 scales/zeros (non-quantized parameters added at their size)")
    pl.add_argument("--max-latency-ms", type=A.positive, metavar="MS",
                    help="latency budget in milliseconds per forward, from a measured profile (needs --profile); the "
                         "feasible range depends on the device: `bitplan calibrate` prints it")
    pl.add_argument("--profile", type=A.existing_file, metavar="FILE",
                    help="latency profile JSON written by `bitplan calibrate` on the target device")
    pl.add_argument("--latency-tokens", type=A.positive_int, default=None, metavar="M",
                    help="rows M of each layer's matmul per forward for the latency cost (tokens or "
                         "pixels x samples; default: per sample of the calibration batch)")
    pl.add_argument("--latency-fixed", default=None, metavar="NAME",
                    help="which fixed cost (ms of the ops no option changes) of the profile to add; "
                         "default: its only one")
    pl.add_argument("--max-bops", type=A.positive, metavar="BOPS",
                    help="bit-operations budget per sample: Σ MACs x weight bits x activation bits")
    A.quant_args(pl)
    A.score_args(pl)
    pl.add_argument("--keep", action="append", type=A.keep_arg, default=[], metavar="LAYER_GLOB=BITS",
                    help="fix the bits of every layer whose name matches the glob (fnmatch), e.g. "
                         "'*.head=8'; repeatable, later wins; BITS must be one of --bits")
    pl.add_argument("--tie", choices=["shared_input"], default=None,
                    help="shared_input: layers reading the same input tensor (q/k/v) get the same option")
    pl.add_argument("--group-budgets", choices=["proportional"], default=None,
                    help="with --sensitivity decoupled (MixDQ): one size budget per metric group (layers "
                         "grouped by the metric they move most: 'loss' = output fidelity, 'gram' = "
                         "similarity structure between samples); proportional = each group gets the same "
                         "fraction of its own size range, the caps summing to the size budget")
    pl.add_argument("--refine", type=A.positive, default=None, metavar="SECONDS",
                    help="after the solver, search whole plans for this many seconds, measuring each "
                         "candidate's real loss on calibration data (never worse, never over budget)")
    pl.add_argument("--plot-dir", metavar="DIR",
                    help="also write DIR/bits.png (bits per layer) and DIR/sensitivity.png (heat map)")
    pl.add_argument("--out", required=True, metavar="FILE", help="where to write the plan JSON")


def run(args) -> int:
    if args.budget_mb is None and args.avg_bits is None and args.max_latency_ms is None and args.max_bops is None:
        raise A.UsageError("give at least one budget: --budget-mb, --avg-bits, --max-latency-ms or --max-bops")
    if args.max_latency_ms is not None and args.profile is None:
        raise A.UsageError("--max-latency-ms needs --profile (a latency profile from `bitplan calibrate`)")
    from ..allocator import InfeasibleBudgetError
    from ..api import allocate
    from ..budgets import avg_bits_budget_mb
    spec, loss_fn, calib, graph, opts, table = prepare_scoring(args)
    if args.rank:                    # torchrun: rank 0 solves and writes; the others are done
        return 0
    keep = getattr(args, "keep_resolved", {})
    budget_mb = args.budget_mb if args.avg_bits is None else avg_bits_budget_mb(spec.model, args.avg_bits)
    latency = {k: v for k, v in (("latency_tokens", args.latency_tokens),
                                 ("latency_fixed", args.latency_fixed)) if v is not None}
    try:
        plan = allocate(spec.model, budget_mb=budget_mb, calib_data=calib, loss_fn=loss_fn,
                        options=opts.specs, solver=args.solver, latency_profile=args.profile,
                        max_latency_ms=args.max_latency_ms, max_bops=args.max_bops, seed=args.seed,
                        tie=args.tie, keep=keep, sensitivity_table=table, refine_seconds=args.refine,
                        group_budgets=args.group_budgets,
                        **latency)
    except InfeasibleBudgetError as e:
        size_flag = None if budget_mb is None else f"--budget-mb {args.budget_mb:g}" if args.avg_bits is None \
            else f"--avg-bits {args.avg_bits:g} ({budget_mb:.6f} MB)"
        flags = [f for f in (size_flag, args.max_latency_ms and f"--max-latency-ms {args.max_latency_ms:g}",
                             args.max_bops and f"--max-bops {args.max_bops:g}") if f]
        raise ValueError(f"{', '.join(flags)}: {e}") from e
    plan.save(args.out)
    kern = Counter(plan.meta.get("kernels_here", {}).values())
    msg = (f"wrote {args.out}: {len(plan.layers)} layers, predicted size "
           f"{plan.predicted['size_bytes'] / 1e6:.6f} MB, solver {plan.solver['name']} ({plan.solver['status']}); "
           f"kernels on this machine: {dict(sorted(kern.items()))}")
    if args.plot_dir:
        from ..plots import plot_bits, plot_sensitivity
        a = plot_bits(plan, os.path.join(args.plot_dir, "bits.png"))
        b = plot_sensitivity(table, os.path.join(args.plot_dir, "sensitivity.png"))
        msg += f"; plots {a}, {b}"
    log.debug("plan options per layer: %s", {k: v.label for k, v in plan.layers.items()})
    print(msg)
    return 0
