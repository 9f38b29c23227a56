"""``bitplan show``: a plan or sensitivity table as a per-layer text table (torch-free for plans)."""
from __future__ import annotations

from . import args as A

__all__ = ["add", "run"]


def add(sub, common):
    sh = sub.add_parser("show", parents=[common], help="print a plan (or sensitivity table) as a per-layer table",
                        description="Print a per-layer table and totals of a plan JSON, or of a sensitivity "
                                    "table JSON; optionally plot it.")
    sh.add_argument("file", type=A.existing_file, metavar="FILE", help="plan JSON or sensitivity JSON")
    sh.add_argument("--plot", metavar="PNG",
                    help="write a PNG: bits per layer along the network (plan) or the layer x option heat "
                         "map (sensitivity)")


def run(args) -> int:
    from ..core.jsonio import read_json
    from ..report import format_plan, format_sensitivity
    d = read_json(args.file, "bitplan plan or sensitivity table")
    if isinstance(d, dict) and "layers" in d and "model_fingerprint" in d:
        from ..plan import Plan
        obj = Plan.from_dict(d, args.file)
        print(format_plan(obj))
        if args.plot:
            from ..plots import plot_bits
            print(f"wrote {plot_bits(obj, args.plot)}")
    elif isinstance(d, dict) and "loss" in d and "names" in d:
        from ..sensitivity.table import Sensitivity
        obj = Sensitivity.from_dict(d, args.file)
        print(format_sensitivity(obj))
        if args.plot:
            from ..plots import plot_sensitivity
            print(f"wrote {plot_sensitivity(obj, args.plot)}")
    else:
        raise ValueError(f"{args.file}: neither a bitplan plan nor a sensitivity table")
    return 0
