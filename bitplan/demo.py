"""``bitplan demo``: the whole pipeline on MiniLM-L6, offline.

Budget: halfway between the packed sizes of uniform 4-bit and uniform 8-bit. The plan is compared
with uniform baselines by output fidelity: mean cosine similarity of held-out sentence embeddings
to the fp32 model's (1.0 = identical).
"""
from __future__ import annotations

import copy
import time
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
                {"layer_shapes": {l.name: list(l.weight_shape) for l in graph.layers}})


@torch.no_grad()
def fidelity(model, ref: torch.Tensor, batches) -> float:
    """Mean cosine similarity of ``model``'s embeddings to ``ref`` (n, d)."""
    from .models import embed
    return float(torch.nn.functional.cosine_similarity(embed(model, batches), ref, dim=-1).mean())


def run_demo(max_probes: int = 32, out: str | None = None) -> str:
    """Run the demo; returns the printed report."""
    from .api import allocate
    from .costmodels import MB, base_nbytes, model_nbytes
    from .graph import LayerGraph
    from .kernels.apply import apply_plan_
    from .models import embed, load_model

    spec = load_model("minilm")
    model = spec.model
    graph = LayerGraph.build(model)
    base = base_nbytes(model, graph.names)
    u4, u8 = (uniform_plan(graph, b, base_bytes=base) for b in (4, 8))
    budget_mb = (u4.predicted["size_bytes"] + u8.predicted["size_bytes"]) / 2 / MB
    t0 = time.perf_counter()
    plan = allocate(model, budget_mb=budget_mb, calib_data=spec.calib_data,
                    sensitivity_opts={"max_probes": max_probes, **({"min_probes": max_probes} if max_probes < 8 else {})})
    seconds = time.perf_counter() - t0
    if out:
        plan.save(out)
    ref = embed(model, spec.eval_data)
    rows = []
    candidates = [("bitplan", plan), ("uniform int4", u4),
                  ("uniform int4 g32", uniform_plan(graph, 4, 32, base_bytes=base)),
                  ("uniform int5", uniform_plan(graph, 5, base_bytes=base)),
                  ("uniform int8", u8)]
    for name, p in candidates:
        packed = apply_plan_(copy.deepcopy(model), p, mode="packed")
        rows.append((name, p.predicted["size_bytes"] / MB, model_nbytes(packed) / MB,
                     fidelity(packed, ref, spec.eval_data)))
    lines = [f"bitplan demo: all-MiniLM-L6-v2, {len(graph.layers)} quantizable layers, "
             f"fp32 size {model_nbytes(model) / MB:.3f} MB ({base / MB:.3f} MB not quantizable)",
             f"budget {budget_mb:.3f} MB (halfway between uniform int4 and int8); "
             f"scoring + solving took {seconds:.1f} s "
             f"({plan.estimator['name']}, {plan.estimator['probes']} probes; solver {plan.solver['name']} "
             f"{plan.solver['status']})", "", "per-layer bits:"]
    for n, s in plan.layers.items():
        lines.append(f"  {n:<60} {s.bits:>2}")
    lines.append(f"  bits histogram: {dict(sorted(Counter(plan.bits.values()).items()))}")
    lines += ["", f"{'plan':<18} {'predicted MB':>13} {'packed MB':>10} {'cosine to fp32':>15}"]
    for name, pred, real, fid in rows:
        lines.append(f"{name:<18} {pred:>13.3f} {real:>10.3f} {fid:>15.5f}")
    lines.append(f"\n(cosine: mean over {sum(len(b['input_ids']) for b in spec.eval_data)} held-out "
                 "sentences, not the calibration set)")
    return "\n".join(lines)
