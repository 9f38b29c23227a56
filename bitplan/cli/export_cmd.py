"""``bitplan export``: a plan as the config another toolkit reads (torch-free)."""
from __future__ import annotations

from . import args as A

__all__ = ["add", "run"]


def add(sub, common):
    ex = sub.add_parser("export", parents=[common], help="export a plan to torchao / HF / llama.cpp (GGUF) / vLLM",
                        description="torchao: the FqnToConfig JSON (load with config_from_dict and quantize_). "
                                    "hf: a transformers TorchAoConfig quantization_config (TorchAoConfig.from_dict, "
                                    "pass to from_pretrained). gguf: per-tensor types for llama-quantize "
                                    "--tensor-type-file (OUT), plus a real .gguf file when OUT ends in .gguf "
                                    "(needs --check DIR). compressed-tensors: the quantization_config vLLM and "
                                    "llm-compressor read. Layers a target cannot load as planned are named in "
                                    "one warning.")
    ex.add_argument("plan", type=A.existing_file, metavar="PLAN", help="plan JSON from `bitplan plan`")
    ex.add_argument("--to", required=True, choices=["torchao", "hf", "gguf", "compressed-tensors"],
                    help="target format")
    ex.add_argument("--out", required=True, metavar="PATH", help="where to write (JSON; for gguf a .txt "
                    "overrides file, or a .gguf model file + PATH.tensor-types.txt)")
    ex.add_argument("--check", metavar="DIR", default=None,
                    help="local Hugging Face folder the export is for: its config.json builds the model "
                         "skeleton on the meta device (no weights read, no download, no remote code) and "
                         "every exported name must resolve there, else the export refuses and names the "
                         "unmatched layers; gguf needs it (and reads the fp weights from it for a .gguf)")
    ex.add_argument("--keys", choices=["param", "module"], default=None,
                    help="torchao only: key layers by weight parameter name ('fc1.weight', torchao >= 0.17) "
                         "or module name ('fc1', torchao 0.15/0.16); default param unless an older "
                         "torchao is installed (hf always uses param)")
    ex.add_argument("--strip-prefix", default="", metavar="PREFIX",
                    help="remove this prefix from layer names (e.g. 'encoder.' for the built-in minilm, "
                         "to match the bare Hugging Face model)")
    ex.add_argument("--add-prefix", default="", metavar="PREFIX",
                    help="then put this prefix in front of layer names (e.g. 'model.' to go from a bare "
                         "decoder's names to AutoModelForCausalLM's)")


def run(args) -> int:
    from ..export import export_plan
    from ..plan import Plan
    if args.keys and args.to != "torchao":
        raise A.UsageError("--keys is only for --to torchao")
    if args.to == "gguf" and args.check is None:
        raise A.UsageError("--to gguf needs --check DIR (the model folder: GGUF names depend on its architecture)")
    print(export_plan(Plan.load(args.plan), args.to, args.out, strip_prefix=args.strip_prefix,
                      add_prefix=args.add_prefix, check=args.check, key_style=args.keys))
    return 0
