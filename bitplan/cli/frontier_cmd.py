"""``bitplan frontier``: sweep size budgets from one scoring, measure each plan, write PNG + JSON."""
from __future__ import annotations

import os

from . import args as A
from .common import prepare_scoring

__all__ = ["add", "run", "metric_for"]


def add(sub, common):
    fr = sub.add_parser("frontier", parents=[common], help="sweep size budgets from one scoring, write PNG + JSON",
                        description="Score once, solve at several size budgets, measure each plan with it "
                                    "fake-applied (cosine to fp32 for sentence encoders, perplexity for causal "
                                    "LMs, else the loss to the fp model); write the Pareto frontier as PNG and JSON.")
    A.model_args(fr)
    fr.add_argument("--points", type=A.positive_int, default=8, metavar="N",
                    help="number of budgets evenly spaced between the smallest and largest size (default 8)")
    fr.add_argument("--budgets-mb", type=A.floats, default=None, metavar="MB,MB,...",
                    help="explicit size budgets in MB (10**6 bytes) instead of --points")
    A.quant_args(fr)
    A.score_args(fr)
    fr.add_argument("--no-measure", action="store_true",
                    help="skip measuring each plan (predicted loss only; faster)")
    fr.add_argument("--out", required=True, metavar="PATH",
                    help="output path; writes PATH.png and PATH.json (a .png/.json suffix is replaced)")


def metric_for(spec):
    """(metric(model) -> float on held-out data, name) the user cares about for this kind of model."""
    from ..evaluate import embed, fidelity, perplexity
    held = spec.eval_data
    if held is None:
        return None
    if spec.kind == "encoder":
        ref = embed(spec.model, held)

        def cosine_to_fp32(m):
            return fidelity(m, ref, held)
        return cosine_to_fp32
    if spec.kind == "causal_lm":
        def heldout_perplexity(m):
            return perplexity(m, held)
        return heldout_perplexity
    return None


def run(args) -> int:
    from ..core.jsonio import atomic_write_json
    from ..frontier import sweep
    from ..plots import plot_frontier
    spec, loss_fn, calib, graph, opts, table = prepare_scoring(args)
    if args.rank:                    # torchrun: rank 0 sweeps and writes; the others are done
        return 0
    metric = None if args.no_measure else metric_for(spec)
    front = sweep(spec.model, calib, table, opts, graph, args.budgets_mb, args.points, args.solver,
                  loss_fn, spec.eval_data, measure=not args.no_measure, quiet=args.quiet, metric=metric)
    if not front["points"]:
        raise ValueError(f"--budgets-mb: every budget is infeasible; the smallest feasible size is "
                         f"{front['size_range_mb'][0]:.6f} MB")
    front["model"] = args.model
    stem, ext = os.path.splitext(args.out)
    stem = stem if ext in (".png", ".json") else args.out
    atomic_write_json(stem + ".json", front)
    plot_frontier(front, stem + ".png", title=f"{args.model}: size vs {front['metric'] or 'predicted loss'} "
                  f"({table.method} sensitivity)")
    print(f"wrote {stem}.png and {stem}.json: {len(front['points'])} plans from "
          f"{front['size_range_mb'][0]:.6f} to {front['size_range_mb'][1]:.6f} MB")
    return 0
