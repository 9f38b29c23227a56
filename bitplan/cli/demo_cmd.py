"""``bitplan demo``: the whole pipeline on the built-in MiniLM model, offline."""
from __future__ import annotations

from . import args as A

__all__ = ["add", "run"]


def add(sub, common):
    dm = sub.add_parser("demo", parents=[common], help="whole pipeline on the built-in MiniLM model, offline",
                        description="Score, solve and apply on all-MiniLM-L6-v2 (embeddings included); "
                                    "compare with uniform baselines.")
    dm.add_argument("--model", default="minilm", metavar="SPEC",
                    help="model spec (default minilm); " + A.MODEL_HELP.split(": ", 1)[1])
    dm.add_argument("--max-probes", type=A.positive_int, default=32, metavar="N",
                    help="Hutchinson probe cap (default 32; each probe is one Hessian-vector product)")
    dm.add_argument("--out", default=None, metavar="FILE", help="also write the demo's plan JSON here")


def run(args) -> int:
    from ..demo import run_demo
    print(run_demo(max_probes=args.max_probes, out=args.out, model=args.model, quiet=args.quiet))
    return 0
