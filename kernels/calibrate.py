"""Calibration: time every distinct layer shape under every kernel option on this device.

For each distinct (N, K) and each token count M, every option's real module (the packed module that
``apply_plan_(mode="packed")`` would install, built from a random-weight ``nn.Linear(K, N)`` with
bias, fp32 in and out — so casts, activation quantization and bias are timed too) is timed with
``timing.time_interleaved`` (warm-up, many interleaved batches, median, spread, re-measure when
unstable). A few cells are measured a second time at the end; ``profile.repeatability`` holds the
ratios. ``measure_fixed_cost`` times a whole model with its quantizable layers stubbed out (the ops
no option changes: embeddings, attention matmuls, norms, activations). Neither kind of per-layer
profile adds up to a real forward on every machine; ``anchor.anchor_profile`` fits either one to whole
forwards of the model's uniform plans (a fixed cost + a common factor), the default of ``bitplan calibrate``.

Cache state: inside a model, a layer's weights were evicted from the core's L2 by the layers that
ran since its last call; timing one module in a loop keeps them hot and flatters it (MiniLM-L6 at
1 × 128 tokens: the sum of hot per-layer times came out ~13 % under the measured forward). So each
option is timed rotating through deep copies of its module until ``rotate_mb`` MB of weights are
touched between two calls of the same copy (default 8 MB = 4 × this machine's 2 MB L2; at most
64 copies; ``rotate_mb=0`` times hot). Weights larger than the last-level cache are cold anyway.

Example:
    >>> prof = calibrate([(384, 384), (1536, 384), (384, 1536)], tokens=(1, 16, 128))
    >>> prof.save("prof.json")
"""
from __future__ import annotations

import copy
import itertools
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone

import torch
from torch import nn

from .formats import QuantSpec
from .profile import DENSE_OPTIONS, LatencyProfile, device_fingerprint, option_key
from .registry import device_type, get_kernel, select_kernel
from .timing import clock_fn, time_interleaved

__all__ = ["calibrate", "calibrate_model", "measure_fixed_cost", "DEFAULT_SPECS", "layer_shapes", "build_option"]

# options timed when ``kernels=None``: fp16, int8 weight-only, W8A8, int4 g32/g128, 3- and 2-bit
DEFAULT_SPECS = (QuantSpec(16), QuantSpec(8), QuantSpec(8, act_bits=8), QuantSpec(4, 32),
                 QuantSpec(4, 128), QuantSpec(3, 128), QuantSpec(2, 128))


class _DenseBF16(nn.Module):
    """The bf16 baseline: fp32 in, bf16 weight and matmul, fp32 out (like the packed modules)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def layer_shapes(layers_or_shapes) -> list[tuple[int, int]]:
    """Distinct (N, K) of a model / LayerGraph / LayerInfo list / list of (N, K), first-seen order.
    Conv and embedding layers are skipped with a warning (profiles cover matmul layers)."""
    from ..core.graph import LayerGraph, find_layers
    src = layers_or_shapes
    if isinstance(src, nn.Module):
        src = find_layers(src)
    elif isinstance(src, LayerGraph):
        src = src.layers
    try:
        items = list(src)
    except TypeError:
        raise TypeError(f"layers_or_shapes must be a model, LayerGraph, LayerInfo list or (N, K) list, "
                        f"got {type(layers_or_shapes).__name__}") from None
    out, convs = [], []
    for it in items:
        if hasattr(it, "out_features") and hasattr(it, "in_features"):
            if getattr(it, "kind", "linear") not in ("linear", "hf_conv1d"):
                convs.append(it.name)
                continue
            nk = (int(it.out_features), int(it.in_features))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in it):
            nk = (it[0], it[1])
        else:
            raise ValueError(f"shape {it!r} is not a LayerInfo or an (N, K) pair of positive ints")
        if nk not in out:
            out.append(nk)
    if convs:
        warnings.warn(f"calibration skips layers that are not matmuls (embedding lookups: their time is in "
                      f"the fixed cost; convs: not profiled): {convs}", RuntimeWarning, stacklevel=3)
    if not out:
        raise ValueError("no matmul layer shapes to calibrate")
    return out


def _option_specs(kernels) -> tuple[list[QuantSpec], set[str] | None]:
    """(specs to build, kernel-name filter or None) from ``kernels``: None | names | QuantSpecs."""
    if kernels is None:
        return list(DEFAULT_SPECS), None
    specs, names = [], set()
    for k in kernels:
        if isinstance(k, QuantSpec):
            specs.append(k)
        elif isinstance(k, str):
            get_kernel(k)                       # unknown name -> ValueError listing the known ones
            names.add(k)
        else:
            raise TypeError(f"kernels entries must be kernel names or QuantSpecs, got {k!r}")
    if names:
        specs += [s for s in DEFAULT_SPECS if s not in specs]
    return specs, (names or None)


def build_option(spec: QuantSpec | str, n: int, k: int, device="cpu", seed: int = 0):
    """(option key, module) for a spec or a dense baseline name ("fp32@dense" / "bf16@dense")."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n * 7919 + k)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.01)
    lin = lin.to(device).eval()
    if isinstance(spec, str):
        if spec not in DENSE_OPTIONS:
            raise ValueError(f"baseline {spec!r} is unknown; known: {list(DENSE_OPTIONS)}")
        return spec, (lin if spec == "fp32@dense" else _DenseBF16(lin))
    kname, _ = select_kernel(spec, n, k, device, "linear")
    with torch.no_grad():
        mod = get_kernel(kname).from_module(lin, "linear", lin.weight, spec).eval()
    return option_key(spec, kname), mod


def _rotation(mod: nn.Module, rotate_mb: float, max_copies: int = 64) -> list[nn.Module]:
    """``mod`` plus deep copies so that ``rotate_mb`` MB of weights pass between two uses of one."""
    nbytes = max(1, sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()]))
    copies = min(max_copies, max(1, -(-int(rotate_mb * 1e6) // nbytes)))
    return [mod] + [copy.deepcopy(mod) for _ in range(copies - 1)]


def _time_cell(mods: dict, n: int, k: int, m: int, device: str, seed: int, topts: dict, clk):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        fns = {}
        for key, copies in mods.items():
            nxt = itertools.cycle(copies).__next__
            fns[key] = (lambda nxt=nxt: nxt()(x))
        return time_interleaved(fns, sync=sync, clock=clk, **topts)


def calibrate(layers_or_shapes, device="cpu", tokens=(1, 16, 128), kernels=None, quiet: bool = False, *,
              baselines=("fp32@dense",), reps: int = 31, target_ms: float = 1.0, max_spread: float = 0.10,
              retries: int = 2, max_seconds: float = 0.5, repeat_check: int = 2, seed: int = 0,
              clock: str = "wall", rotate_mb: float = 8.0) -> LatencyProfile:
    """Time every distinct layer shape under every kernel option at each token count M.

    ``kernels``: None (``DEFAULT_SPECS``), kernel names (the default specs that run on those
    kernels), or QuantSpecs. ``baselines``: dense options also timed ("fp32@dense", "bf16@dense").
    A tqdm bar shows progress on a terminal (off when ``quiet`` or stderr is not a TTY).
    ``clock``: "wall" or "cpu" (thread CPU time, one torch thread; see ``kernels/timing.py``).
    ``rotate_mb``: weights touched between two calls of one module copy (cache state, module doc).

    Example:
        >>> prof = calibrate(model, tokens=(1, 16, 128), kernels=["int4_wo", "w8a8"])
        >>> prof.save("prof.json"); prof.time_ms("w4g32@int4_wo", 1536, 384, 16)
    """
    dev = device_type(device)
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    if dev == "cuda" and clock != "wall":
        raise ValueError(f"clock={clock!r}: CUDA kernels run asynchronously; use clock='wall'")
    toks = sorted({int(t) for t in tokens})
    if not toks or toks[0] < 1 or any(isinstance(t, bool) for t in tokens):
        raise ValueError(f"tokens={tokens!r} must be positive ints (rows M of the matmul)")
    shapes = layer_shapes(layers_or_shapes)
    specs, only = _option_specs(kernels)
    topts = dict(reps=reps, target_ms=target_ms, max_spread=max_spread, retries=retries,
                 max_seconds=max_seconds)
    clk = clock_fn(clock)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(shapes) * len(toks), desc="calibrate", unit="cell",
               disable=quiet or not sys.stderr.isatty())
    prof = LatencyProfile(device_fingerprint(dev))
    again = set(shapes[i] for i in range(0, len(shapes), max(1, -(-len(shapes) // repeat_check)))
                ) if repeat_check > 0 else set()                  # shapes measured twice
    kept, t_start = {}, time.perf_counter()
    try:
        for n, k in shapes:
            mods = dict(build_option(b, n, k, dev, seed) for b in baselines)
            for s in specs:
                key, mod = build_option(s, n, k, dev, seed)
                if only is None or mod.kernel in only:
                    mods.setdefault(key, mod)
            mods = {key: _rotation(mod, rotate_mb) for key, mod in mods.items()}
            for m in toks:
                bar.set_postfix_str(f"N={n} K={k} M={m}")
                for key, t in _time_cell(mods, n, k, m, dev, seed, topts, clk).items():
                    prof.entries[(key, n, k, m)] = t.to_dict()
                bar.update(1)
            if (n, k) in again:
                kept[(n, k)] = mods
            del mods
        m = toks[len(toks) // 2]
        for (n, k), mods in kept.items():          # repeatability: same cell again, minutes later
            for key, t in _time_cell(mods, n, k, m, dev, seed + 1, topts, clk).items():
                first = prof.entries[(key, n, k, m)]["median_ms"]
                prof.repeatability.append({"option": key, "n": n, "k": k, "m": m, "first_ms": first,
                                           "second_ms": t.median_ms, "ratio": t.median_ms / first})
    finally:
        bar.close()
    from ..core.version import __version__
    prof.meta = {"bitplan_version": __version__, "created": datetime.now(timezone.utc).isoformat(),
                 "seconds": round(time.perf_counter() - t_start, 2), "tokens": toks,
                 "method": "median of interleaved batches (kernels/timing.py), fp32 in/out, hot weights",
                 "timing": topts, "clock": clock, "rotate_mb": rotate_mb}
    return prof


class _Stub(nn.Module):
    """Stands in for a quantizable layer: right output shape, no matmul."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.n)


def measure_fixed_cost(model: nn.Module, batch, forward=None, clock: str = "wall", **timing_opts) -> dict:
    """Time ``model`` on ``batch`` with every linear layer stubbed out: the fixed cost (ms) that no
    option changes. Returns the timing dict (median_ms, spread, ...); the model is restored.

    Example:
        >>> prof.fixed["minilm:b1x128"] = measure_fixed_cost(model, batch)
    """
    from ..core.batches import run_model
    from ..core.graph import find_layers
    run = forward or run_model
    layers = [l for l in find_layers(model) if l.kind in ("linear", "hf_conv1d")]
    originals = {l.name: model.get_submodule(l.name) for l in layers}

    def swap(mods):
        for name, mod in mods.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod)
    swap({l.name: _Stub(l.out_features) for l in layers})
    try:
        with torch.inference_mode():
            t = time_interleaved({"fixed": lambda: run(model, batch)}, clock=clock_fn(clock),
                                 **timing_opts)["fixed"]
    finally:
        swap(originals)
    return {**t.to_dict(), "clock": clock}


def calibrate_model(model: nn.Module, batch, specs=None, forward=None, reps: int = 15,
                    clock: str = "wall", fixed_name: str = "model", quiet: bool = False,
                    baseline: bool = True) -> LatencyProfile:
    """In-context calibration: per-layer times measured inside ``model``'s own forward.

    For every spec, a copy of the model is packed with that spec on every layer (kernels as packed
    apply picks them); all copies (and the fp32 model, ``baseline``) run ``batch`` ``reps`` times,
    round-robin, with a clock read before and after every quantizable layer (forward hooks). Each
    entry (option, N, K, M) is the median over runs of the median over the layers of that shape
    (M = the rows each layer really saw); ``fixed[fixed_name]`` is the median over runs and models
    of (forward time − Σ layer times): the cost of everything that is not a quantizable layer.
    Layer times so measured include what isolated timing misses: caches and CPU state left by
    the surrounding ops (on MiniLM-L6 isolated layers ran 3–70 % faster than in the model).

    Example:
        >>> prof = calibrate_model(model, batch, clock="cpu", fixed_name="minilm:1x128")
        >>> predict_latency_ms(graph.layers, plan_specs, prof, fixed="minilm:1x128")
    """
    from ..core.batches import run_model
    from ..core.graph import LayerGraph
    from .modules import option_reason, quantize_modules_
    run = forward or run_model
    clk = clock_fn(clock)
    g = LayerGraph.build(model, batch, forward=forward)
    layers = [l for l in g.layers if l.kind in ("linear", "hf_conv1d")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers to calibrate")
    specs = list(DEFAULT_SPECS if specs is None else specs)
    models = {}
    if baseline:
        models["fp32@dense"] = (model, {l.name: "fp32@dense" for l in layers})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # fallbacks are recorded in the keys
        for s in specs:
            if not isinstance(s, QuantSpec):
                raise TypeError(f"specs must be QuantSpecs, got {s!r}")
            pm = copy.deepcopy(model)
            ran = quantize_modules_(pm, {l.name: s for l in layers if option_reason(s, l) is None},
                                    mode="packed")
            models[s.label] = (pm, {l.name: option_key(s, ran[l.name]) for l in layers if l.name in ran})
    rows, t_layer, handles = {}, {}, []

    def pre(name):
        def f(mod, args):
            t_layer[name] = clk()
        return f

    def post(name, k):
        def f(mod, args, out):
            t_layer[name] = clk() - t_layer[name]
            rows[name] = args[0].numel() // k
        return f
    per = {key: {l.name: [] for l in layers} for key in models}
    fixed = []
    from tqdm.auto import tqdm
    bar = tqdm(total=(reps + 2) * len(models), desc="calibrate in model", unit="forward",
               disable=quiet or not sys.stderr.isatty())
    try:
        for key, (m, _) in models.items():
            for l in layers:
                mod = m.get_submodule(l.name)
                handles += [mod.register_forward_pre_hook(pre(l.name)),
                            mod.register_forward_hook(post(l.name, l.in_features))]
        with torch.inference_mode():
            for r in range(reps + 2):                              # 2 warm-up rounds
                for key, (m, _) in models.items():
                    t_layer.clear()
                    t0 = clk()
                    run(m, batch)
                    total = clk() - t0
                    bar.update(1)
                    if r < 2:
                        continue
                    for l in layers:
                        per[key][l.name].append(t_layer[l.name])
                    fixed.append(total - sum(t_layer[l.name] for l in layers))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    prof = LatencyProfile(device_fingerprint(next(model.parameters()).device))
    groups: dict = {}
    for key, (m, opts) in models.items():
        for l in layers:
            if l.name not in opts:          # the option is not possible on this layer
                continue
            cell = (opts[l.name], l.out_features, l.in_features, rows[l.name])
            groups.setdefault(cell, []).append(per[key][l.name])
    for cell, runs in groups.items():
        series = [statistics.median(col) for col in zip(*runs)]     # per run: median over layers
        q = statistics.quantiles(series, n=4, method="inclusive") if len(series) > 1 else series * 3
        med = statistics.median(series)
        prof.entries[cell] = {"median_ms": med * 1e3, "p25_ms": q[0] * 1e3, "p75_ms": q[-1] * 1e3,
                              "spread": (q[-1] - q[0]) / med, "batches": len(series), "dropped": 0,
                              "inner": 1, "retries": 0, "stable": (q[-1] - q[0]) / med <= 0.10}
    fq = statistics.quantiles(fixed, n=4, method="inclusive")
    fmed = statistics.median(fixed)
    prof.fixed[fixed_name] = {"median_ms": fmed * 1e3, "p25_ms": fq[0] * 1e3, "p75_ms": fq[2] * 1e3,
                              "spread": (fq[2] - fq[0]) / fmed, "runs": len(fixed), "clock": clock}
    from ..core.version import __version__
    prof.meta = {"bitplan_version": __version__, "created": datetime.now(timezone.utc).isoformat(),
                 "method": "in-model: per-layer hooks in uniform-plan copies of the model, round-robin",
                 "clock": clock, "reps": reps, "model": type(model).__name__}
    return prof
