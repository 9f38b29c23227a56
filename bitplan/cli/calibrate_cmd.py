"""``bitplan calibrate``: time the real kernels at the model's layer shapes, write a latency profile."""
from __future__ import annotations

from . import args as A
from .common import load, log

__all__ = ["add", "run"]


def add(sub, common):
    ca = sub.add_parser("calibrate", parents=[common], help="time real kernels on this device, write a latency profile",
                        description="Measure the latency of every option's real kernel at the model's layer "
                                    "shapes on this device; write a versioned latency profile JSON for "
                                    "`bitplan plan --max-latency-ms`.")
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
    ca.add_argument("--no-fixed", action="store_true",
                    help="skip timing the model's fixed cost (its non-quantizable ops on one calibration "
                         "sample, recorded as the profile's fixed cost named after --model)")
    ca.add_argument("--out", required=True, metavar="FILE", help="where to write the profile JSON")


def run(args) -> int:
    from ..core.batches import first_sample, to_device
    from ..core.spec import option_grid
    from ..kernels.calibrate import calibrate
    spec = load(args)
    specs = list(option_grid(args.bits, args.group_size, args.act_bits, args.quant_method, not args.asymmetric))
    timing = {k: v for k, v in (("reps", args.reps), ("max_seconds", args.max_seconds)) if v is not None}
    if args.in_model:
        from ..kernels.calibrate import calibrate_model
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
        from ..kernels.calibrate import measure_fixed_cost
        sample = first_sample(list(spec.calib_data)[0])
        if args.device == "cuda":
            spec.model.to("cuda")
            sample = to_device(sample, "cuda")
        prof.fixed[spec.name] = measure_fixed_cost(spec.model, sample, **timing)
        log.info("fixed cost of %s (one sample): %.4f ms", spec.name, prof.fixed[spec.name]["median_ms"])
    prof.save(args.out)
    print(f"wrote {args.out}: {len(prof.entries)} timings ({len(prof.options)} options x shapes x "
          f"{len(args.tokens)} token counts) on {prof.device.get('type')} "
          f"{prof.device.get('cpu') or prof.device.get('gpu') or ''}".rstrip())
    return 0
