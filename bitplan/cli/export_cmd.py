"""``bitplan export``: a plan as the config another toolkit reads (torch-free)."""
from __future__ import annotations

from . import args as A

__all__ = ["add", "run"]


def add(sub, common):
    ex = sub.add_parser("export", parents=[common], help="export a plan as torchao or HF quantization config",
                        description="torchao: the FqnToConfig JSON (torchao's config_to_dict layout; load with "
                                    "config_from_dict and quantize_). hf: a transformers TorchAoConfig "
                                    "quantization_config with per-module overrides (load with "
                                    "TorchAoConfig.from_dict and pass to from_pretrained).")
    ex.add_argument("plan", type=A.existing_file, metavar="PLAN", help="plan JSON from `bitplan plan`")
    ex.add_argument("--to", required=True, choices=["torchao", "hf"], help="target format")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to write the JSON")
    ex.add_argument("--keys", choices=["param", "module"], default=None,
                    help="torchao only: key layers by weight parameter name ('fc1.weight', torchao >= 0.17) "
                         "or module name ('fc1', torchao 0.15/0.16); default param unless an older "
                         "torchao is installed (hf always uses param)")
    ex.add_argument("--strip-prefix", default="", metavar="PREFIX",
                    help="remove this prefix from layer names (e.g. 'encoder.' for the built-in minilm, "
                         "to match the bare Hugging Face model)")


def run(args) -> int:
    from ..core.jsonio import atomic_write_json
    from ..export import to_hf_quantization_config, to_torchao_dict, torchao_version
    from ..plan import Plan
    plan = Plan.load(args.plan)
    if args.keys and args.to != "torchao":
        raise A.UsageError("--keys is only for --to torchao")
    d = to_torchao_dict(plan, args.strip_prefix, key_style=args.keys) if args.to == "torchao" else \
        to_hf_quantization_config(plan, args.strip_prefix)
    atomic_write_json(args.out, d)
    ver = torchao_version()
    print(f"wrote {args.out} ({args.to}; " + (f"built with torchao {ver})" if ver else
                                               "torchao not importable: torchao 0.18 layout written by hand)"))
    return 0
