"""``bitplan calibrate``: time the real kernels at the model's layer shapes, anchor the profile to
whole forwards of the model, write it, and print the feasible latency range for ``plan``."""
from __future__ import annotations

from . import args as A
from .common import load, log

__all__ = ["add", "run"]


def add(sub, common):
    ca = sub.add_parser("calibrate", parents=[common], help="time real kernels on this device, write a latency profile",
                        description="Measure the latency of every option's real kernel at the model's layer "
                                    "shapes on this device, anchor the per-layer times to whole forwards of the "
                                    "model's uniform plans (fit a fixed cost + a common factor, kernels/anchor.py), "
                                    "write a versioned latency profile JSON for `bitplan plan --max-latency-ms`, "
                                    "and print the feasible latency range (fastest and slowest plan).")
    A.model_args(ca, calib=False)
    ca.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to time on (default cpu)")
    A.quant_args(ca)
    ca.add_argument("--tokens", type=A.ints, default=(1, 16, 128), metavar="M,M,...",
                    help="token counts M (rows of each layer's matmul per forward = batch x sequence "
                         "positions) to time at (default 1,16,128); plans interpolate between them")
    ca.add_argument("--reps", type=A.positive_int, default=None, metavar="N",
                    help="timed batches per measurement cell (default: the calibrator's, 31)")
    ca.add_argument("--max-seconds", type=A.positive, default=None, metavar="S",
                    help="time cap in seconds per measurement cell (default: the calibrator's, 0.5)")
    ca.add_argument("--in-model", action="store_true",
                    help="time each layer inside the model's own forward on one calibration sample "
                         "(M = that sample's tokens; --tokens is ignored); covers only its shapes at that M")
    ca.add_argument("--no-anchor", action="store_true",
                    help="keep the raw per-layer times: do not fit them to whole forwards of the uniform "
                         "plans; the fixed cost is then the model with its linears stubbed out (isolated) or "
                         "forward minus the layers (--in-model)")
    ca.add_argument("--no-fixed", action="store_true",
                    help="per-layer times only: no fixed cost and no anchoring (the latency budget then "
                         "bounds the quantizable layers alone)")
    ca.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: what a user waits on a dedicated machine (default); cpu: thread CPU time "
                         "(sets torch to 1 thread), for a shared machine where whole forwards cannot dodge "
                         "other processes (kernels/timing.py)")
    ca.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")


def _print_range(prof, spec, args, graph) -> None:
    """The feasible latency range of this model under these options (fastest..slowest plan)."""
    from ..costmodels.latency import latency_range
    from .common import resolve_args_options
    opts = resolve_args_options(args, graph)
    try:
        r = latency_range(prof, graph, opts, fixed=spec.name if spec.name in prof.fixed else None,
                          warn_device=False)
    except ValueError as e:
        print(f"latency range: not printed ({e})")
        return
    print(f"feasible latency on this device: {r['min_ms']:.4g} ms (fastest plan) to {r['max_ms']:.4g} ms "
          f"(slowest plan), {r['fixed_ms']:.4g} ms of it fixed, one sample per forward; pick "
          "`plan --max-latency-ms` in between (the size budget may exclude the fastest plans)")


def run(args) -> int:
    from ..core.batches import first_sample, to_device
    from ..core.graph import LayerGraph
    from ..core.spec import option_grid
    from ..kernels.calibrate import calibrate
    if args.clock == "cpu":
        import torch
        torch.set_num_threads(1)                 # the CPU clock times the calling thread only
    spec = load(args)
    specs = list(option_grid(args.bits, args.group_size, args.act_bits, args.quant_method, not args.asymmetric))
    timing = {k: v for k, v in (("reps", args.reps), ("max_seconds", args.max_seconds)) if v is not None}
    sample = first_sample(list(spec.calib_data)[0]) if spec.calib_data else None
    if args.in_model:
        from ..kernels.calibrate import calibrate_model
        if sample is None:
            raise ValueError(f"--in-model needs calibration data from --model {args.model!r}")
        if args.device != "cpu":
            raise ValueError(f"--in-model times on cpu only; got --device {args.device}")
        prof = calibrate_model(spec.model, sample, specs, reps=args.reps or 15, fixed_name=spec.name,
                               quiet=args.quiet, clock=args.clock)
        what = f"{len(prof.entries)} in-model timings"
    else:
        prof = calibrate(spec.model, device=args.device, tokens=args.tokens, kernels=specs, quiet=args.quiet,
                         clock=args.clock, **timing)
        what = (f"{len(prof.entries)} timings ({len(prof.options)} options x shapes x {len(args.tokens)} "
                f"token counts)")
    if sample is not None and args.device == "cuda":
        spec.model.to("cuda")
        sample = to_device(sample, "cuda")
    graph = LayerGraph.build(spec.model, sample) if sample is not None else None   # anchors + range
    if args.no_fixed:
        prof.fixed.pop(spec.name, None)
    elif sample is not None and not args.no_anchor:
        from ..kernels.anchor import anchor_profile
        anchor_profile(prof, spec.model, sample, specs, fixed_name=spec.name, clock=args.clock, graph=graph,
                       **({"reps": args.reps} if args.reps else {}))
        a = prof.meta["anchor"]
        worst = max(abs(r["rel_error"]) for r in a["anchors"])
        log.info("anchored to %d whole forwards: fixed %.4f ms, per-layer times x %.3f, worst anchor residual "
                 "%.1f %%", len(a["anchors"]), a["fixed_ms"], a["scale"], 100 * worst)
        what += f", anchored to {len(a['anchors'])} whole forwards (per-layer times x {a['scale']:.3f})"
    elif sample is not None and not args.in_model:
        from ..kernels.calibrate import measure_fixed_cost
        prof.fixed[spec.name] = measure_fixed_cost(spec.model, sample, clock=args.clock, **timing)
    if spec.name in prof.fixed:
        what += f", fixed cost {spec.name!r} {prof.fixed[spec.name]['median_ms']:.4f} ms"
    prof.save(args.out)
    print(f"wrote {args.out}: {what} on {prof.device.get('type')} "
          f"{prof.device.get('cpu') or prof.device.get('gpu') or ''}".rstrip())
    if graph is not None:
        _print_range(prof, spec, args, graph)
    return 0
