"""``bitplan demo``: the whole pipeline on MiniLM-L6, offline.

Budget: halfway between the packed sizes of uniform 4-bit and uniform 8-bit. The plan is compared
with uniform baselines by output fidelity: mean cosine similarity of held-out sentence embeddings
to the fp32 model's (1.0 = identical). ``--model SPEC`` runs the same steps on any model spec,
compared by the label-free loss to the fp model's output instead.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import Counter

import torch

__all__ = ["run_demo", "uniform_plan", "fidelity"]


def uniform_plan(graph, bits: int, group_size=None, symmetric=True, base_bytes: int = 0):
    """A Plan giving every layer the same option (a baseline), with its exact predicted size."""
    from .kernels.formats import QuantSpec
    from .plan import Plan
    spec = QuantSpec(bits, group_size, symmetric)
    size = base_bytes + sum(spec.nbytes(l.out_features, l.in_features) for l in graph.layers)
    return Plan(graph.fingerprint, {l.name: spec for l in graph.layers}, {"size_bytes": float(size)},
                {}, {"name": "uniform"}, {"name": "uniform"},
                {"layer_shapes": {l.name: list(l.weight_shape) for l in graph.layers},
                 "layer_kinds": {l.name: l.kind for l in graph.layers}})


@torch.no_grad()
def fidelity(model, ref: torch.Tensor, batches) -> float:
    """Mean cosine similarity of ``model``'s embeddings to ``ref`` (n, d)."""
    from .models import embed
    return float(torch.nn.functional.cosine_similarity(embed(model, batches), ref, dim=-1).mean())


DEMO_BITS = (2, 3, 4, 5, 6, 8)     # the option set that won benchmarks/results (hessian + g128, bits 2..8)
DEMO_GROUP = 128


def run_demo(max_probes: int = 32, out: str | None = None, model: str = "minilm", quiet: bool = False,
             bits=DEMO_BITS, group_size: int | None = DEMO_GROUP) -> str:
    """Run the demo on ``model`` (a model spec; default the built-in MiniLM); returns the report.

    Every plan, bitplan's and the uniform baselines, uses the same quantizer settings (``group_size``),
    so the comparison is about the allocation alone.

    Text encoders (MiniLM, HF folders) are compared by embedding cosine to fp32 on held-out
    sentences; any other spec by the label-free loss to the fp model's output (lower is better) on
    its held-out batches, else its calibration batches.
    """
    from .api import allocate
    from .costmodels import MB, base_nbytes, model_nbytes
    from .graph import LayerGraph
    from .kernels.apply import apply_plan_
    from .models import embed, load_model
    from .progress import counting_loss, progress_bar
    from .sensitivity.losses import resolve_loss
    from .sweep import measure_loss

    spec = load_model(model)
    if spec.calib_data is None:
        raise ValueError(f"demo model {model!r} returned no calibration data; return (model, calib_batches)")
    net = spec.model
    graph = LayerGraph.build(net)
    base = base_nbytes(net, graph.names)
    uniform = {b: uniform_plan(graph, b, group_size, base_bytes=base) for b in (4, 5, 6, 8)}
    u4, u8 = uniform[4], uniform[8]
    budget_mb = (u4.predicted["size_bytes"] + u8.predicted["size_bytes"]) / 2 / MB
    held = spec.eval_data if spec.eval_data is not None else spec.calib_data
    if "tokenizer" in spec.extra:            # sentence encoder: cosine of embeddings to fp32
        ref = embed(net, held)
        metric, label = (lambda m: fidelity(m, ref, held)), "cosine to fp32"
        n_held = f"{sum(len(b['input_ids']) for b in held)} held-out sentences, not the calibration set"
    else:
        fn, desc = resolve_loss(None, net, held)
        metric, label = (lambda m: measure_loss(m, fn, held)), "loss to fp (lower=better)"
        n_held = (f"{len(held)} {'held-out' if spec.eval_data is not None else 'calibration'} batches; "
                  f"{desc}")
    opts = {"max_probes": max_probes, **({"min_probes": max_probes} if max_probes < 8 else {})}
    t0 = time.perf_counter()
    with progress_bar("scoring (hessian)", unit="loss eval", quiet=quiet) as bar:
        plan = allocate(net, budget_mb=budget_mb, calib_data=spec.calib_data, bits=bits, group_size=group_size,
                        loss_fn=counting_loss(None, net, list(spec.calib_data), bar), sensitivity_opts=opts)
    seconds = time.perf_counter() - t0
    if out:
        plan.save(out)
    rows = []
    g = f" g{group_size}" if group_size else ""
    candidates = [("bitplan", plan)] + [(f"uniform int{b}{g}", p) for b, p in uniform.items()]
    with warnings.catch_warnings():          # kernel fallback warnings: the report names the kernels
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, p in candidates:
            packed = apply_plan_(copy.deepcopy(net), p, mode="packed")
            rows.append((name, p.predicted["size_bytes"] / MB, model_nbytes(packed) / MB, metric(packed)))
    title = "all-MiniLM-L6-v2" if model == "minilm" else model
    lines = [f"bitplan demo: {title}, {len(graph.layers)} quantizable layers, "
             f"fp32 size {model_nbytes(net) / MB:.3f} MB ({base / MB:.3f} MB not quantizable)",
             f"options: bits {list(bits)}, group size {group_size or 'per channel'}; "
             f"budget {budget_mb:.3f} MB (halfway between uniform int4 and int8); "
             f"scoring + solving took {seconds:.1f} s "
             f"({plan.estimator['name']}, {plan.estimator['probes']} probes; solver {plan.solver['name']} "
             f"{plan.solver['status']})", "", "per-layer bits:"]
    for n, s in plan.layers.items():
        lines.append(f"  {n:<60} {s.bits:>2}")
    lines.append(f"  bits histogram: {dict(sorted(Counter(plan.bits.values()).items()))}")
    lines += ["", f"{'plan':<18} {'predicted MB':>13} {'packed MB':>10} {label:>26}"]
    for name, pred, real, fid in rows:
        lines.append(f"{name:<18} {pred:>13.4f} {real:>10.4f} {fid:>26.5g}")
    lines.append(f"\n({label}: mean over {n_held})")
    return "\n".join(lines)
