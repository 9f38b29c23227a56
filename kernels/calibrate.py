"""Calibration: time every distinct layer shape under every kernel option on this device.

For each distinct (N, K) and each token count M, every option's real module (the packed module that
``apply_plan_(mode="packed")`` would install, built from a random-weight ``nn.Linear(K, N)`` with
bias, fp32 in and out — so casts, activation quantization and bias are timed too) is timed with
``timing.time_interleaved`` (warm-up, many interleaved batches, median, spread, re-measure when
unstable). A few cells are measured a second time at the end; ``profile.repeatability`` holds the
ratios. ``measure_fixed_cost`` times a whole model with its quantizable layers stubbed out (the ops
no option changes: embeddings, attention matmuls, norms, activations).

Weights stay hot in cache between calls of one cell, as they do when one layer runs a batch; a model
whose weights far exceed the last-level cache will run slower at M=1 than the profile says.

Example:
    >>> prof = calibrate([(384, 384), (1536, 384), (384, 1536)], tokens=(1, 16, 128))
    >>> prof.save("prof.json")
"""
from __future__ import annotations

import sys
import time
import warnings
from datetime import datetime, timezone

import torch
from torch import nn

from .formats import QuantSpec
from .profile import DENSE_OPTIONS, LatencyProfile, device_fingerprint, option_key
from .registry import device_type, get_kernel, select_kernel
from .timing import time_interleaved

__all__ = ["calibrate", "measure_fixed_cost", "DEFAULT_SPECS", "layer_shapes", "build_option"]

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
    Conv layers are skipped with a warning (profiles cover matmul layers)."""
    from ..graph import LayerGraph, find_layers
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
        warnings.warn(f"calibration skips conv layers (profiles cover matmul layers): {convs}",
                      RuntimeWarning, stacklevel=3)
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


def _time_cell(mods: dict, n: int, k: int, m: int, device: str, seed: int, topts: dict):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        fns = {key: (lambda mod=mod: mod(x)) for key, mod in mods.items()}
        return time_interleaved(fns, sync=sync, **topts)


def calibrate(layers_or_shapes, device="cpu", tokens=(1, 16, 128), kernels=None, quiet: bool = False, *,
              baselines=("fp32@dense",), reps: int = 31, target_ms: float = 1.0, max_spread: float = 0.10,
              retries: int = 2, max_seconds: float = 0.5, repeat_check: int = 2, seed: int = 0
              ) -> LatencyProfile:
    """Time every distinct layer shape under every kernel option at each token count M.

    ``kernels``: None (``DEFAULT_SPECS``), kernel names (the default specs that run on those
    kernels), or QuantSpecs. ``baselines``: dense options also timed ("fp32@dense", "bf16@dense").
    A tqdm bar shows progress on a terminal (off when ``quiet`` or stderr is not a TTY).

    Example:
        >>> prof = calibrate(model, tokens=(1, 16, 128), kernels=["int4_wo", "w8a8"])
        >>> prof.save("prof.json"); prof.time_ms("w4g32@int4_wo", 1536, 384, 16)
    """
    dev = device_type(device)
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    toks = sorted({int(t) for t in tokens})
    if not toks or toks[0] < 1 or any(isinstance(t, bool) for t in tokens):
        raise ValueError(f"tokens={tokens!r} must be positive ints (rows M of the matmul)")
    shapes = layer_shapes(layers_or_shapes)
    specs, only = _option_specs(kernels)
    topts = dict(reps=reps, target_ms=target_ms, max_spread=max_spread, retries=retries,
                 max_seconds=max_seconds)
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
            for m in toks:
                bar.set_postfix_str(f"N={n} K={k} M={m}")
                for key, t in _time_cell(mods, n, k, m, dev, seed, topts).items():
                    prof.entries[(key, n, k, m)] = t.to_dict()
                bar.update(1)
            if (n, k) in again:
                kept[(n, k)] = mods
            del mods
        m = toks[len(toks) // 2]
        for (n, k), mods in kept.items():          # repeatability: same cell again, minutes later
            for key, t in _time_cell(mods, n, k, m, dev, seed + 1, topts).items():
                first = prof.entries[(key, n, k, m)]["median_ms"]
                prof.repeatability.append({"option": key, "n": n, "k": k, "m": m, "first_ms": first,
                                           "second_ms": t.median_ms, "ratio": t.median_ms / first})
    finally:
        bar.close()
    from .. import __version__
    prof.meta = {"bitplan_version": __version__, "created": datetime.now(timezone.utc).isoformat(),
                 "seconds": round(time.perf_counter() - t_start, 2), "tokens": toks,
                 "method": "median of interleaved batches (kernels/timing.py), fp32 in/out, hot weights",
                 "timing": topts}
    return prof


class _Stub(nn.Module):
    """Stands in for a quantizable layer: right output shape, no matmul."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.n)


def measure_fixed_cost(model: nn.Module, batch, forward=None, **timing_opts) -> dict:
    """Time ``model`` on ``batch`` with every linear layer stubbed out: the fixed cost (ms) that no
    option changes. Returns the timing dict (median_ms, spread, ...); the model is restored.

    Example:
        >>> prof.fixed["minilm:b1x128"] = measure_fixed_cost(model, batch)
    """
    from ..batches import run_model
    from ..graph import find_layers
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
            t = time_interleaved({"fixed": lambda: run(model, batch)}, **timing_opts)["fixed"]
    finally:
        swap(originals)
    return t.to_dict()
