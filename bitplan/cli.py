"""Command line: ``bitplan plan | calibrate | apply | frontier | show | export | demo`` (also
``python -m bitplan``). Parses, calls the library, writes files.

Exit codes: 0 success; 2 bad arguments (argparse names the argument) or bad values / infeasible
budgets / mismatched plans (the message names the value); 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

log = logging.getLogger("bitplan")

MODEL_HELP = ("model spec: 'minilm' (built-in all-MiniLM-L6-v2, offline), a local Hugging Face model "
              "folder, or 'pkg.module:function' returning a model or (model, calib_batches); the "
              "current directory is importable")


# ---------------------------------------------------------------- argument types (name the bad value)
def _bits(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated integers, e.g. 2,3,4,8") from None
    if not out or len(set(out)) != len(out) or any(b not in (2, 3, 4, 5, 6, 7, 8, 16) for b in out):
        raise argparse.ArgumentTypeError(f"{s!r}: distinct bit-widths from 2..8 or 16 (fp16), e.g. 2,3,4,8")
    return out


def _positive_number(cast, what: str):
    """An argparse type: ``cast(s)`` that must be > 0 and finite; the error names the value."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            v = None
        if v is None or not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError(f"{s!r}: must be a positive {what}")
        return v
    return parse


_positive = _positive_number(float, "finite number")
_positive_int = _positive_number(int, "integer")


def _group(s: str):
    if s in ("none", "channel", "per-channel"):
        return None
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{s!r}: a positive integer or 'none' (per output channel)") from None


def _ints(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated positive integers, e.g. 1,16,128")
    return out


def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(not v > 0 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated positive numbers, e.g. 20,30,40")
    return out


def _existing_file(s: str) -> str:
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s!r}: no such file")
    return s


def _keep(s: str) -> str:
    pat, sep, b = s.rpartition("=")
    if not sep or not pat or not b.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected LAYER_GLOB=BITS, e.g. 'encoder.*.dense=8'")
    return s


# ---------------------------------------------------------------- parser
def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging (on stderr)")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and only warnings/errors on stderr (bars are also off when "
                        "stderr is not a terminal)")
    return c


def _model_args(p, calib=True):
    p.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    if calib:
        p.add_argument("--calib-batches", type=_positive_int, default=None, metavar="N",
                       help="use only the first N calibration batches the model spec provides "
                            "(default: all; fewer = faster, noisier sensitivity)")


def _quant_args(p):
    p.add_argument("--bits", type=_bits, default=(2, 3, 4, 8), metavar="B,B,...",
                   help="weight bit-width options per layer (default 2,3,4,8; 16 = keep in fp16)")
    p.add_argument("--group-size", type=_group, default=None, metavar="G",
                   help="quantization group size in weights along the input dimension, or 'none' = one "
                        "scale per output channel (default none)")
    p.add_argument("--asymmetric", action="store_true",
                   help="store an fp16 zero point per group as well as the scale (default symmetric)")


def _score_args(p):
    p.add_argument("--sensitivity", default="hessian", metavar="NAME",
                   help="sensitivity estimator: hessian (default, HAWQ-V3 Hutchinson traces), fisher, "
                        "measured, decoupled, lim, zd, ... (an unknown name lists the installed ones)")
    p.add_argument("--max-probes", type=_positive_int, default=None, metavar="N",
                   help="hessian only: cap on Hutchinson probes (one Hessian-vector product each; "
                        "estimator default 64)")
    p.add_argument("--solver", default="ilp", metavar="NAME", help="allocation solver: ilp (default, PuLP + CBC), highs, dp, lagrange, auto, ... "
                        "(an unknown name lists the installed ones)")
    p.add_argument("--seed", type=int, default=0, help="random seed for probes and sampling (default 0)")
    p.add_argument("--sensitivity-cache", metavar="FILE",
                   help="sensitivity table JSON: loaded if FILE exists (no re-scoring), else scored and "
                        "saved there")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitplan", description="Mixed-precision bit allocation for PyTorch "
                                "models: score layers, solve under budgets, apply, export.")
    p.add_argument("-v", "--verbose", dest="verbose_all", action="store_true", help="debug logging (on stderr)")
    p.add_argument("-q", "--quiet", dest="quiet_all", action="store_true",
                   help="no progress bars, only warnings/errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    pl = sub.add_parser("plan", parents=[common], help="score layers, solve under budgets, write plan.json",
                        description="Score every quantizable layer's sensitivity, solve for per-layer bits "
                                    "under the budgets, write the plan JSON. Give at least one budget.")
    _model_args(pl)
    b = pl.add_mutually_exclusive_group()
    b.add_argument("--budget-mb", type=_positive, metavar="MB",
                   help="whole-model size after packing, in MB (10**6 bytes), every parameter and buffer")
    b.add_argument("--avg-bits", type=_positive, metavar="BITS",
                   help="size budget as average bits per quantized weight element, counting codes and "
                        "fp16 scales/zeros (non-quantized parameters added at their size)")
    pl.add_argument("--max-latency-ms", type=_positive, metavar="MS",
                    help="latency budget in milliseconds per forward, from a measured profile (needs --profile)")
    pl.add_argument("--profile", type=_existing_file, metavar="FILE",
                    help="latency profile JSON written by `bitplan calibrate` on the target device")
    pl.add_argument("--latency-tokens", type=_positive_int, default=None, metavar="M",
                    help="rows M of each layer's matmul per forward for the latency cost (tokens or "
                         "pixels x samples; default: per sample of the calibration batch)")
    pl.add_argument("--latency-fixed", default=None, metavar="NAME",
                    help="which fixed cost (ms of the ops no option changes) of the profile to add; "
                         "default: its only one")
    pl.add_argument("--max-bops", type=_positive, metavar="BOPS",
                    help="bit-operations budget per sample: Σ MACs x weight bits x activation bits")
    _quant_args(pl)
    _score_args(pl)
    pl.add_argument("--keep", action="append", type=_keep, default=[], metavar="LAYER_GLOB=BITS",
                    help="fix the bits of every layer whose name matches the glob (fnmatch), e.g. "
                         "'*.head=8'; repeatable, later wins; BITS must be one of --bits")
    pl.add_argument("--tie", choices=["shared_input"], default=None,
                    help="shared_input: layers reading the same input tensor (q/k/v) get the same bits")
    pl.add_argument("--plot-dir", metavar="DIR",
                    help="also write DIR/bits.png (bits per layer) and DIR/sensitivity.png (heat map)")
    pl.add_argument("--out", required=True, metavar="FILE", help="where to write the plan JSON")

    ca = sub.add_parser("calibrate", parents=[common], help="time real kernels on this device, write a latency profile",
                        description="Measure the latency of every bit option's real kernel at the model's "
                                    "layer shapes on this device; write a versioned latency profile JSON "
                                    "for `bitplan plan --max-latency-ms`.")
    _model_args(ca, calib=False)
    ca.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to time on (default cpu)")
    _quant_args(ca)
    ca.add_argument("--tokens", type=_ints, default=(1, 16, 128), metavar="M,M,...",
                    help="token counts M (rows of each layer's matmul per forward = batch x sequence "
                         "positions) to time at (default 1,16,128); plans interpolate between them")
    ca.add_argument("--reps", type=_positive_int, default=None, metavar="N",
                    help="timed batches per measurement cell (default: the calibrator's, 31)")
    ca.add_argument("--max-seconds", type=_positive, default=None, metavar="S",
                    help="time cap in seconds per measurement cell (default: the calibrator's, 0.5)")
    ca.add_argument("--in-model", action="store_true",
                    help="time each layer inside the model's own forward on one calibration sample "
                         "(M = that sample's tokens; --tokens is ignored). More accurate for that model "
                         "(benchmarks/latency_model.py: median error 6.7%% vs 13.6%% for per-shape "
                         "timing on MiniLM) but covers only its shapes at that M")
    ca.add_argument("--no-fixed", action="store_true",
                    help="skip timing the model's fixed cost (its non-quantizable ops on one calibration "
                         "sample, recorded as the profile's fixed cost named after --model)")
    ca.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")

    ap = sub.add_parser("apply", parents=[common], help="pack a model by a plan, write a model folder",
                        description="Quantize the model as the plan says with packed weights and real "
                                    "kernels; write DIR/model.safetensors + DIR/plan.json + manifest. "
                                    "Load back with bitplan.packed_io.load_packed(DIR).")
    _model_args(ap, calib=False)
    ap.add_argument("--plan", required=True, type=_existing_file, metavar="FILE", help="plan JSON from `bitplan plan`")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")

    fr = sub.add_parser("frontier", parents=[common], help="sweep size budgets from one scoring, write PNG + JSON",
                        description="Score once, solve at several size budgets, measure each plan's loss "
                                    "with it fake-applied; write the Pareto frontier as PNG and JSON.")
    _model_args(fr)
    fr.add_argument("--points", type=_positive_int, default=8, metavar="N",
                    help="number of budgets evenly spaced between all-min-bits and all-max-bits size (default 8)")
    fr.add_argument("--budgets-mb", type=_floats, default=None, metavar="MB,MB,...",
                    help="explicit size budgets in MB (10**6 bytes) instead of --points")
    _quant_args(fr)
    _score_args(fr)
    fr.add_argument("--no-measure", action="store_true",
                    help="skip measuring each plan's loss (predicted loss only; faster)")
    fr.add_argument("--out", required=True, metavar="PATH",
                    help="output path; writes PATH.png and PATH.json (a .png/.json suffix is replaced)")

    sh = sub.add_parser("show", parents=[common], help="print a plan (or sensitivity table) as a per-layer table",
                        description="Print a per-layer table and totals of a plan JSON, or of a sensitivity "
                                    "table JSON; optionally plot it.")
    sh.add_argument("file", type=_existing_file, metavar="FILE", help="plan JSON or sensitivity JSON")
    sh.add_argument("--plot", metavar="PNG",
                    help="write a PNG: bits per layer along the network (plan) or the layer x bits heat "
                         "map (sensitivity)")

    ex = sub.add_parser("export", parents=[common], help="export a plan to torchao / HF / llama.cpp (GGUF) / vLLM",
                        description="torchao: the FqnToConfig JSON (load with config_from_dict and quantize_). "
                                    "hf: a transformers TorchAoConfig quantization_config (TorchAoConfig.from_dict, "
                                    "pass to from_pretrained). gguf: per-tensor types for llama-quantize "
                                    "--tensor-type-file (OUT), plus a real .gguf file when OUT ends in .gguf "
                                    "(needs --check DIR). compressed-tensors: the quantization_config vLLM and "
                                    "llm-compressor read. Layers a target cannot load as planned are named in "
                                    "one warning.")
    ex.add_argument("plan", type=_existing_file, metavar="PLAN", help="plan JSON from `bitplan plan`")
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

    dm = sub.add_parser("demo", parents=[common], help="whole pipeline on the built-in MiniLM model, offline",
                        description="Score, solve and apply on all-MiniLM-L6-v2; compare with uniform baselines.")
    dm.add_argument("--model", default="minilm", metavar="SPEC",
                    help="model spec (default minilm); " + MODEL_HELP.split(": ", 1)[1])
    dm.add_argument("--max-probes", type=_positive_int, default=32, metavar="N",
                    help="Hutchinson probe cap (default 32; each probe is one Hessian-vector product)")
    dm.add_argument("--out", default=None, metavar="FILE", help="also write the demo's plan JSON here")
    return p


# ---------------------------------------------------------------- commands
def _load(args):
    from .models import load_model
    spec = load_model(args.model)
    if getattr(args, "calib_batches", None) and spec.calib_data is not None:
        spec.calib_data = list(spec.calib_data)[:args.calib_batches]
    return spec


def _need_calib(spec, what):
    if spec.calib_data is None:
        raise ValueError(f"--model {spec.name!r} returned no calibration data, which {what} needs; "
                         "make the function return (model, calib_batches)")


def _check_names(args):
    """Fail fast (before scoring) on unknown estimator / solver names."""
    from .allocator import available
    from .sensitivity import ESTIMATORS
    if args.sensitivity not in ESTIMATORS:
        raise ValueError(f"--sensitivity {args.sensitivity!r} is not known; known: {sorted(ESTIMATORS)}")
    if args.solver not in available():
        raise ValueError(f"--solver {args.solver!r} is not known; known: {available()}")
    return probe_opts(args.max_probes)


def probe_opts(max_probes):
    """Hutchinson options for a probe cap (min_probes lowered to it when it is below the default 8)."""
    if max_probes is None:
        return {}
    return {"max_probes": max_probes, **({"min_probes": max(2, max_probes)} if max_probes < 8 else {})}


def cmd_plan(args) -> int:
    if args.budget_mb is None and args.avg_bits is None and args.max_latency_ms is None and args.max_bops is None:
        raise _UsageError("give at least one budget: --budget-mb, --avg-bits, --max-latency-ms or --max-bops")
    if args.max_latency_ms is not None and args.profile is None:
        raise _UsageError("--max-latency-ms needs --profile (a latency profile from `bitplan calibrate`)")
    from .api import allocate
    from .errors import InfeasibleBudgetError
    from .graph import find_layers
    from .sweep import avg_bits_budget_mb, resolve_keep, scored_table
    opts = _check_names(args)
    spec = _load(args)
    _need_calib(spec, "scoring")
    keep = resolve_keep([l.name for l in find_layers(spec.model)], args.keep)
    bad = sorted({b for b in keep.values() if b not in args.bits})
    if bad:
        raise ValueError(f"--keep: {bad} bits are not among the options --bits {','.join(map(str, args.bits))}")
    budget_mb = args.budget_mb if args.avg_bits is None else avg_bits_budget_mb(spec.model, args.avg_bits)
    table = scored_table(spec.model, spec.calib_data, args.sensitivity, args.bits, seed=args.seed,
                         group_size=args.group_size, symmetric=not args.asymmetric,
                         cache=args.sensitivity_cache, sensitivity_opts=opts, quiet=args.quiet)
    latency_opts = {k: v for k, v in (("latency_tokens", args.latency_tokens),
                                      ("latency_fixed", args.latency_fixed)) if v is not None}
    try:
        plan = allocate(spec.model, budget_mb=budget_mb, calib_data=spec.calib_data, bits=args.bits,
                        solver=args.solver, latency_profile=args.profile, max_latency_ms=args.max_latency_ms,
                        max_bops=args.max_bops, seed=args.seed, group_size=args.group_size,
                        symmetric=not args.asymmetric, tie=args.tie, keep=keep, sensitivity_table=table,
                        **latency_opts)
    except InfeasibleBudgetError as e:
        small = e.smallest if isinstance(getattr(e, "smallest", None), dict) else {}
        size_flag = None if budget_mb is None else f"--budget-mb {args.budget_mb:g}" if args.avg_bits is None \
            else f"--avg-bits {args.avg_bits:g} ({budget_mb:.6f} MB)"
        flags = [f for f in (size_flag,
                             args.max_latency_ms and f"--max-latency-ms {args.max_latency_ms:g}",
                             args.max_bops and f"--max-bops {args.max_bops:g}") if f]
        if size_flag and small.get("size_mb") is not None and small["size_mb"] > budget_mb:
            msg = (f"{size_flag} is infeasible: the smallest feasible size with these options"
                   f"{' and --keep' if keep else ''} is {small['size_mb']:.6f} MB")
        else:
            msg = f"{', '.join(flags)}: no plan meets {'these budgets together' if len(flags) > 1 else 'this budget'}"
            if args.max_latency_ms and small.get("latency_ms") is not None:   # fixed ms included
                msg += f"; the smallest feasible latency on its own is {small['latency_ms']:.4f} ms"
        raise ValueError(f"{msg} ({e})") from e
    plan.save(args.out)
    msg = (f"wrote {args.out}: {len(plan.layers)} layers, predicted size "
           f"{plan.predicted['size_bytes'] / 1e6:.6f} MB, solver {plan.solver['name']} ({plan.solver['status']})")
    if args.plot_dir:
        from .plots import plot_bits, plot_sensitivity
        a = plot_bits(plan, os.path.join(args.plot_dir, "bits.png"))
        b = plot_sensitivity(table, os.path.join(args.plot_dir, "sensitivity.png"))
        msg += f"; plots {a}, {b}"
    print(msg)
    return 0


def cmd_calibrate(args) -> int:
    from .kernels.calibrate import calibrate
    from .kernels.formats import QuantSpec
    spec = _load(args)
    specs = [QuantSpec(b, args.group_size, not args.asymmetric) for b in args.bits]
    timing = {k: v for k, v in (("reps", args.reps), ("max_seconds", args.max_seconds)) if v is not None}
    if args.in_model:
        from .kernels.calibrate import calibrate_model
        from .sweep import first_sample
        if not spec.calib_data:
            raise ValueError(f"--in-model needs calibration data from --model {args.model!r}")
        if args.device != "cpu":
            raise ValueError(f"--in-model times on cpu only; got --device {args.device}")
        prof = calibrate_model(spec.model, first_sample(list(spec.calib_data)[0]), specs,
                               reps=args.reps or 15, fixed_name=spec.name, quiet=args.quiet)
        prof.save(args.out)
        print(f"wrote {args.out}: {len(prof.entries)} in-model timings, fixed cost {spec.name!r} "
              f"{prof.fixed[spec.name]['median_ms']:.4f} ms")
        return 0
    prof = calibrate(spec.model, device=args.device, tokens=args.tokens, kernels=specs, quiet=args.quiet,
                     **timing)
    if not args.no_fixed and spec.calib_data:
        from .kernels.calibrate import measure_fixed_cost
        from .sweep import first_sample
        sample = first_sample(list(spec.calib_data)[0])
        if args.device == "cuda":
            from .sweep import to_device
            spec.model.to("cuda")
            sample = to_device(sample, "cuda")
        prof.fixed[spec.name] = measure_fixed_cost(spec.model, sample, **timing)
        log.info("fixed cost of %s (one sample): %.4f ms", spec.name, prof.fixed[spec.name]["median_ms"])
    prof.save(args.out)
    print(f"wrote {args.out}: {len(prof.entries)} timings ({len(prof.options)} options x shapes x "
          f"{len(args.tokens)} token counts) on {prof.device.get('type')} "
          f"{prof.device.get('cpu') or prof.device.get('gpu') or ''}".rstrip())
    return 0


def cmd_apply(args) -> int:
    from .packed_io import save_packed
    from .plan import Plan
    spec = _load(args)
    plan = Plan.load(args.plan)
    manifest = save_packed(spec.model, plan, args.out, model_spec=args.model)
    print(f"wrote {args.out}: {manifest['weights']} ({manifest['size_bytes'] / 1e6:.6f} MB of tensors), "
          f"{manifest['plan']}; load with bitplan.packed_io.load_packed({args.out!r})")
    return 0


def cmd_frontier(args) -> int:
    import json
    from .plan import atomic_write_text
    from .plots import plot_frontier
    from .sweep import scored_table, sweep
    opts = _check_names(args)
    spec = _load(args)
    _need_calib(spec, "scoring")
    table = scored_table(spec.model, spec.calib_data, args.sensitivity, args.bits, seed=args.seed,
                         group_size=args.group_size, symmetric=not args.asymmetric,
                         cache=args.sensitivity_cache, sensitivity_opts=opts, quiet=args.quiet)
    front = sweep(spec.model, spec.calib_data, args.budgets_mb, args.points, args.bits, table,
                  solver=args.solver, seed=args.seed, group_size=args.group_size,
                  symmetric=not args.asymmetric, eval_data=spec.eval_data, measure=not args.no_measure,
                  quiet=args.quiet)
    if not front["points"]:
        raise ValueError(f"--budgets-mb: every budget is infeasible; the smallest feasible size is "
                         f"{front['size_range_mb'][0]:.6f} MB")
    front["model"] = args.model
    stem, ext = os.path.splitext(args.out)
    stem = stem if ext in (".png", ".json") else args.out
    atomic_write_text(stem + ".json", json.dumps(front, indent=2, sort_keys=True, allow_nan=False) + "\n")
    plot_frontier(front, stem + ".png", title=f"{args.model}: size vs loss ({table.method} sensitivity)")
    print(f"wrote {stem}.png and {stem}.json: {len(front['points'])} plans from "
          f"{front['size_range_mb'][0]:.6f} to {front['size_range_mb'][1]:.6f} MB")
    return 0


def cmd_show(args) -> int:
    import json
    from .report import format_plan, format_sensitivity
    with open(args.file) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.file}: not valid JSON ({e})") from e
    if isinstance(d, dict) and "layers" in d and "model_fingerprint" in d:
        from .plan import Plan
        obj = Plan.load(args.file)
        print(format_plan(obj))
        if args.plot:
            from .plots import plot_bits
            print(f"wrote {plot_bits(obj, args.plot)}")
    elif isinstance(d, dict) and "loss" in d and "names" in d:
        from .sensitivity import load
        obj = load(args.file)
        print(format_sensitivity(obj))
        if args.plot:
            from .plots import plot_sensitivity
            print(f"wrote {plot_sensitivity(obj, args.plot)}")
    else:
        raise ValueError(f"{args.file}: neither a bitplan plan nor a sensitivity table")
    return 0


def cmd_export(args) -> int:
    from .export import export_plan
    from .plan import Plan
    if args.keys and args.to != "torchao":
        raise _UsageError("--keys is only for --to torchao")
    if args.to == "gguf" and args.check is None:
        raise _UsageError("--to gguf needs --check DIR (the model folder: GGUF names depend on its architecture)")
    print(export_plan(Plan.load(args.plan), args.to, args.out, strip_prefix=args.strip_prefix,
                      add_prefix=args.add_prefix, check=args.check, key_style=args.keys))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    print(run_demo(max_probes=args.max_probes, out=args.out, model=args.model, quiet=args.quiet))
    return 0


COMMANDS = {"plan": cmd_plan, "calibrate": cmd_calibrate, "apply": cmd_apply, "frontier": cmd_frontier,
            "show": cmd_show, "export": cmd_export, "demo": cmd_demo}


class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself (exit 2 with the usage line)."""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or args.verbose_all        # `bitplan -v plan ...` == `bitplan plan -v ...`
    args.quiet = args.quiet or args.quiet_all
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose
                        else "bitplan: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except _UsageError as e:
        parser._subparsers._group_actions[0].choices[args.command].error(str(e))   # usage + exit 2
    except (ValueError, TypeError) as e:       # bad values, infeasible budgets, mismatched plans
        print(f"bitplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"bitplan {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
