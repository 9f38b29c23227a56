"""``bitplan eval``: how much a plan costs in the metric users care about, on held-out data."""
from __future__ import annotations

import copy
import warnings

from . import args as A
from .common import load, log

__all__ = ["add", "run"]


def add(sub, common):
    ev = sub.add_parser("eval", parents=[common], help="perplexity (causal LMs) / cosine (encoders) of fp vs a plan",
                        description="Evaluate the fp model and the model quantized by a plan on held-out data: "
                                    "perplexity for causal LMs (built-in held-out text or --text), cosine of "
                                    "sentence embeddings to fp32 for encoders, the label-free loss to the fp "
                                    "model otherwise.")
    A.model_args(ev, calib=False)
    ev.add_argument("--plan", required=True, type=A.existing_file, metavar="FILE", help="plan JSON")
    ev.add_argument("--text", type=A.existing_file, metavar="FILE",
                    help="causal LMs: UTF-8 held-out text to measure perplexity on (default: built-in)")
    ev.add_argument("--seq-len", type=A.positive_int, default=None, metavar="T",
                    help="tokens per evaluation window (default 128)")
    ev.add_argument("--mode", choices=["fake", "packed"], default="fake",
                    help="apply the plan simulated (fake, default) or with packed weights and real kernels")
    ev.add_argument("--baselines", action="store_true",
                    help="also evaluate uniform plans (every layer at one bit-width, group 128 where possible) "
                         "and say their sizes next to the plan's")


def run(args) -> int:
    from ..apply import apply_plan_
    from ..assemble import uniform_plan
    from ..core.graph import LayerGraph
    from ..core.spec import QuantSpec
    from ..costmodels import MB, base_nbytes
    from ..evaluate import embed, fidelity, measure_loss, perplexity
    from ..models import lm_batches
    from ..plan import Plan
    from ..sensitivity.losses import resolve_loss
    plan = Plan.load(args.plan)
    spec = load(args)
    held = spec.eval_data or spec.calib_data
    if spec.kind == "causal_lm":
        if args.text or args.seq_len:
            txt = open(args.text, encoding="utf-8").read() if args.text else None
            from ..models import text
            held = lm_batches(spec.extra["tokenizer"], txt or text("heldout"), args.seq_len or 128, 32)
        name, better = "perplexity", "lower"
        metric = lambda m: perplexity(m, held)                        # noqa: E731
    elif spec.kind == "encoder":
        ref = embed(spec.model, held)
        name, better = "cosine to fp32", "higher"
        metric = lambda m: fidelity(m, ref, held)                     # noqa: E731
    else:
        if held is None:
            raise ValueError(f"--model {args.model!r} returned no data to evaluate on")
        fn, desc = resolve_loss(None, spec.model, held)
        name, better = f"loss to fp ({desc})", "lower"
        metric = lambda m: measure_loss(m, fn, held)                  # noqa: E731
    rows = [("fp32", None, metric(spec.model))]
    cands = [("plan", plan)]
    if args.baselines:
        graph = LayerGraph.build(spec.model)
        base = base_nbytes(spec.model, graph.names)
        cands += [(f"uniform int{b}", uniform_plan(graph, QuantSpec(b, 128), base)) for b in (3, 4, 5, 6, 8)]
    with warnings.catch_warnings():
        if args.mode == "fake":
            warnings.simplefilter("ignore", RuntimeWarning)
        for label, p in cands:
            log.info("evaluating %s (%s) ...", label, args.mode)
            m = apply_plan_(copy.deepcopy(spec.model), p, mode=args.mode, calib_data=spec.calib_data)
            rows.append((label, p.predicted.get("size_bytes"), metric(m)))
    print(f"{'model':<14} {'size MB':>12} {name + f' ({better} is better)':>34}")
    for label, size, v in rows:
        print(f"{label:<14} {'' if size is None else f'{size / MB:.4f}':>12} {v:>34.6g}")
    return 0
