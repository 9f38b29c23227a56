"""``bitplan apply``: pack a model by a plan, write a self-contained model folder."""
from __future__ import annotations

from . import args as A
from .common import load, log

__all__ = ["add", "run"]


def add(sub, common):
    ap = sub.add_parser("apply", parents=[common], help="pack a model by a plan, write a model folder",
                        description="Quantize the model as the plan says with packed weights and real kernels; "
                                    "write DIR/model.safetensors + DIR/plan.json + manifest (+ the HF config "
                                    "and tokenizer, so the folder rebuilds by itself). A Hugging Face causal-LM "
                                    "folder with safetensors weights is streamed: one decoder block at a time is "
                                    "in memory, and DIR gets one safetensors shard per block + "
                                    "model.safetensors.index.json. Load back with bitplan.load_packed(DIR).")
    A.model_args(ap, calib=False)
    ap.add_argument("--plan", required=True, type=A.existing_file, metavar="FILE", help="plan JSON from `bitplan plan`")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (created or replaced; an "
                    "existing non-empty folder that is not a bitplan packed folder is refused)")
    ap.add_argument("--no-stream", action="store_true",
                    help="load the whole model and write one model.safetensors, even for a causal-LM folder "
                         "that could be streamed block by block")


def run(args) -> int:
    from ..packed_io import save_packed
    from ..packed_stream import save_packed_streamed, streamable
    from ..plan import Plan
    plan = Plan.load(args.plan)
    why = "--no-stream" if args.no_stream else streamable(args.model)
    if why is None:
        spec = load(args, lazy=True)             # meta device: the weights are read a block at a time
        m = save_packed_streamed(spec.source_dir, plan, args.out, calib_data=spec.calib_data, model_spec=args.model)
        st = m["streamed"]
        print(f"streamed {st['blocks']} decoder blocks one at a time; wrote {args.out}: {st['shards']} safetensors "
              f"shards + model.safetensors.index.json ({m['size_bytes'] / 1e6:.6f} MB of tensors), plan.json; "
              f"load with bitplan.load_packed({args.out!r})")
        return 0
    log.info("not streamed (%s): loading the whole model", why)
    spec = load(args)
    kind = spec.kind if spec.kind in ("causal_lm", "encoder") else None
    manifest = save_packed(spec.model, plan, args.out, model_spec=args.model, source_dir=spec.source_dir,
                           model_class=kind, calib_data=spec.calib_data)
    how = ("" if manifest["skeleton"]["kind"] != "none" else
           f", '{args.model}'")   # a factory the folder cannot name
    print(f"wrote {args.out}: model.safetensors ({manifest['size_bytes'] / 1e6:.6f} MB of tensors), plan.json; "
          f"load with bitplan.load_packed({args.out!r}{how})")
    return 0
