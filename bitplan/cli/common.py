"""What several commands share: loading the model (timed, logged), resolving options and losses."""
from __future__ import annotations

import inspect
import logging
import os
import time

__all__ = ["load", "need_calib", "check_names", "probe_opts", "resolve_args_options", "loss_for", "log",
           "prepare_scoring", "init_distributed", "close_distributed"]

log = logging.getLogger("bitplan")
_OWNED: list = []            # non-empty while this CLI owns the default process group


def load(args, lazy: bool = False):
    """The ModelSpec of ``--model``; says what it is loading and how long it took. ``lazy``: a causal
    LM stays on the meta device (its weights are read a block at a time by a streaming estimator)."""
    from ..models import load_model
    t0 = time.perf_counter()
    log.info("loading model %s ...", args.model)
    calib_text = None
    if getattr(args, "calib_text", None):
        with open(args.calib_text, encoding="utf-8", errors="strict") as f:
            try:
                calib_text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"--calib-text {args.calib_text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    spec = load_model(args.model, calib_text=calib_text, seq_len=getattr(args, "seq_len", None),
                      calib_samples=getattr(args, "calib_samples", None), lazy=lazy)
    if getattr(args, "calib_batches", None) and spec.calib_data is not None:
        spec.calib_data = list(spec.calib_data)[:args.calib_batches]
    log.info("loaded %s (%s) in %.1f s", args.model, spec.kind, time.perf_counter() - t0)
    return spec


def need_calib(spec, what):
    if spec.calib_data is None:
        raise ValueError(f"--model {spec.name!r} returned no calibration data, which {what} needs; "
                         "make the function return (model, calib_batches)")


def probe_opts(max_probes):
    """Hutchinson options for a probe cap (min_probes lowered to it when it is below the default 8)."""
    if max_probes is None:
        return {}
    return {"max_probes": max_probes, **({"min_probes": max(2, max_probes)} if max_probes < 8 else {})}


def auto_sensitivity(args) -> str:
    """``--sensitivity auto``: ``block`` (streamed one decoder block at a time, memory flat in depth)
    for a Hugging Face causal-LM folder with safetensors weights scored on the label-free KL with no
    ``--refine``; ``hessian`` otherwise. Says which, and why."""
    from ..models import is_causal_lm_config, read_hf_config
    path = args.model
    lm = False
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")):
        try:
            lm = is_causal_lm_config(read_hf_config(path))
        except ValueError:
            lm = False                     # load() names what is wrong with the folder
    has_st = lm and any(os.path.isfile(os.path.join(path, f))
                        for f in ("model.safetensors", "model.safetensors.index.json"))
    why = ("a causal-LM folder with safetensors weights: scored a decoder block at a time" if has_st else
           "a causal-LM folder without safetensors weights" if lm else "not a causal-LM folder")
    if has_st and getattr(args, "loss", "kl") != "kl":
        has_st, why = False, f"--loss {args.loss} (block predicts the label-free KL)"
    if has_st and getattr(args, "refine", None) is not None:
        has_st, why = False, "--refine needs the whole model loaded"
    name = "block" if has_st else "hessian"
    log.info("--sensitivity auto: %s (%s)", name, why)
    return name


def check_names(args) -> dict:
    """Fail fast (before loading or scoring) on unknown estimator / solver / method names."""
    from ..allocator import available
    from ..kernels.modules import METHODS
    from ..sensitivity import ESTIMATORS
    if args.sensitivity == "auto":
        args.sensitivity = auto_sensitivity(args)
    if args.sensitivity not in ESTIMATORS:
        raise ValueError(f"--sensitivity {args.sensitivity!r} is not known; known: {sorted(ESTIMATORS)}")
    if args.solver not in available():
        raise ValueError(f"--solver {args.solver!r} is not known; known: {available()}")
    bad = [m for m in args.quant_method if m not in METHODS]
    if bad:
        raise ValueError(f"--quant-method {','.join(bad)} is not known; known: {list(METHODS)}")
    opts = probe_opts(args.max_probes)
    if opts and "max_probes" not in inspect.signature(ESTIMATORS[args.sensitivity]).parameters:
        log.warning("--max-probes %d: the %s estimator draws no Hutchinson probes; ignored",
                    args.max_probes, args.sensitivity)
        return {}
    return opts


def resolve_args_options(args, graph):
    """Options from ``--bits/--group-size/--act-bits/--quant-method/--asymmetric``; logs what some
    layers cannot take."""
    from ..options import describe, resolve_options
    opts = resolve_options(graph, args.bits, args.group_size, args.act_bits, args.quant_method,
                           not args.asymmetric)
    log.info("options: %s = %d per layer", describe(opts.specs), len(opts.specs))
    for line in opts.summary(graph.names)[:8]:
        log.info("  not possible: %s", line)
    return opts


def loss_for(args, spec):
    """The loss_fn for scoring: None (label-free) or next-token cross-entropy for ``--loss ce``."""
    if getattr(args, "loss", "kl") == "ce":
        if spec.kind != "causal_lm":
            raise ValueError(f"--loss ce needs a causal LM; {spec.name!r} is a {spec.kind} model")
        from ..evaluate import next_token_ce
        return next_token_ce
    return None


def init_distributed(args) -> int:
    """Under ``torchrun`` (RANK and WORLD_SIZE > 1 in the environment) initialise the default process
    group — gloo on CPU, gloo + nccl when CUDA is there — with ``--timeout``; the other ranks log
    warnings only. Returns this process's rank (0 without a group)."""
    import os
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=getattr(args, "timeout", 1800.0)))
        _OWNED.append(True)
    rank = dist.get_rank()
    if rank:
        log.setLevel(logging.WARNING)
    return rank


def close_distributed() -> None:
    """Destroy the default process group :func:`init_distributed` made (end of a CLI command)."""
    if _OWNED:
        import torch.distributed as dist
        _OWNED.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def prepare_scoring(args):
    """What `plan` and `frontier` share before solving: names checked, the model loaded, its graph
    and options resolved, the sensitivity table scored (or read from ``--sensitivity-cache``).

    Under ``torchrun`` every rank scores its share (:func:`init_distributed`); only rank 0 gets the
    table (the others get None and should stop: ``args.rank``).

    Returns ``(spec, loss_fn, calib, graph, opts, table)``.
    """
    from ..core.graph import LayerGraph
    from ..scoring import scored_table
    from ..sensitivity.registry import STREAMING
    sopts = check_names(args)
    args.rank = init_distributed(args)
    streaming = args.sensitivity in STREAMING
    if streaming and getattr(args, "refine", None) is not None:
        raise ValueError(f"--refine measures whole plans on the loaded model; --sensitivity {args.sensitivity} "
                         "keeps the model on disk (drop --refine, or use a whole-model estimator)")
    spec = load(args, lazy=streaming)
    if streaming and spec.kind != "causal_lm":
        raise ValueError(f"--sensitivity {args.sensitivity} streams a Hugging Face causal-LM folder; "
                         f"{spec.name!r} is a {spec.kind} model")
    need_calib(spec, "scoring")
    loss_fn = loss_for(args, spec)
    calib = list(spec.calib_data)
    graph = LayerGraph.build(spec.model, calib[0], forward=loss_fn)
    opts = resolve_args_options(args, graph)
    if getattr(args, "keep", None):          # bad --keep globs fail before the expensive scoring
        from ..budgets import resolve_keep
        args.keep_resolved = resolve_keep(graph.names, args.keep, graph)
        have = sorted({s.bits for s in opts.specs})
        bad = sorted({b for b in args.keep_resolved.values() if b not in have})
        if bad:
            raise ValueError(f"--keep: {bad} bits are not among the options --bits {','.join(map(str, have))}")
    table = scored_table(spec.model, calib, opts, graph, args.sensitivity, loss_fn, args.seed,
                         args.sensitivity_cache, sopts, args.quiet, args.checkpoint, args.timeout)
    return spec, loss_fn, calib, graph, opts, table
