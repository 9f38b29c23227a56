"""``bitplan demo``: the whole pipeline on MiniLM-L6, offline.

Budget: halfway between the packed sizes of uniform 4-bit and uniform 8-bit (group 128). The plan is
compared with uniform baselines by output fidelity: mean cosine similarity of held-out sentence
embeddings to the fp32 model's (1.0 = identical). ``--model SPEC`` runs the same steps on any model
spec, compared by the label-free loss to the fp model's output instead.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import Counter

__all__ = ["run_demo"]


def run_demo(max_probes: int = 32, out: str | None = None, model: str = "minilm", quiet: bool = False,
             grid: dict | None = None) -> str:
    """Run the demo on ``model`` (a model spec; default the built-in MiniLM); returns the report.

    ``grid`` overrides the option grid (``bits``, ``group_size``, ``act_bits``, ``quant_method``);
    default ``options.DEFAULTS``. Uniform baselines use group 128 where a layer allows it.

    Example: ``print(run_demo(max_probes=16))``
    """
    from .api import allocate
    from .assemble import uniform_plan
    from .apply import apply_plan_
    from .core.graph import LayerGraph
    from .core.spec import QuantSpec
    from .costmodels import MB, base_nbytes, model_nbytes
    from .evaluate import embed, fidelity, measure_loss
    from .models import load_model
    from .options import DEFAULTS, describe, resolve_options
    from .progress import counting_loss, progress_bar
    from .sensitivity.losses import resolve_loss

    grid = {**{k: DEFAULTS[k] for k in ("bits", "group_size", "act_bits", "quant_method")}, **(grid or {})}
    spec = load_model(model)
    if spec.calib_data is None:
        raise ValueError(f"demo model {model!r} returned no calibration data; return (model, calib_batches)")
    net = spec.model
    graph = LayerGraph.build(net)
    opts = resolve_options(graph, grid["bits"], grid["group_size"], grid["act_bits"], grid["quant_method"])
    base = base_nbytes(net, graph.names)
    uniform = {b: uniform_plan(graph, QuantSpec(b, 128), base) for b in (4, 5, 6, 8)}
    budget_mb = (uniform[4].predicted["size_bytes"] + uniform[8].predicted["size_bytes"]) / 2 / MB
    held = spec.eval_data if spec.eval_data is not None else spec.calib_data
    if spec.kind == "encoder":                # sentence encoder: cosine of embeddings to fp32
        ref = embed(net, held)
        metric, label = (lambda m: fidelity(m, ref, held)), "cosine to fp32"
        n_held = f"{sum(len(b['input_ids']) for b in held)} held-out sentences, not the calibration set"
    else:
        fn, desc = resolve_loss(None, net, held)
        metric, label = (lambda m: measure_loss(m, fn, held)), "loss to fp (lower=better)"
        n_held = (f"{len(held)} {'held-out' if spec.eval_data is not None else 'calibration'} batches; "
                  f"{desc}")
    sopts = {"max_probes": max_probes, **({"min_probes": max_probes} if max_probes < 8 else {})}
    t0 = time.perf_counter()
    with progress_bar("scoring (hessian)", unit=" evals", quiet=quiet) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # kernel fallbacks: the report names kernels
        plan = allocate(net, budget_mb=budget_mb, calib_data=spec.calib_data, options=opts.specs,
                        loss_fn=counting_loss(None, net, list(spec.calib_data), bar), sensitivity_opts=sopts)
    seconds = time.perf_counter() - t0
    if out:
        plan.save(out)
    rows = []
    candidates = [("bitplan", plan)] + [(f"uniform int{b} g128", p) for b, p in uniform.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, p in candidates:
            packed = apply_plan_(copy.deepcopy(net), p, mode="packed", calib_data=spec.calib_data)
            rows.append((name, p.predicted["size_bytes"] / MB, model_nbytes(packed) / MB, metric(packed)))
    title = "all-MiniLM-L6-v2" if model == "minilm" else model
    fp_bytes = model_nbytes(net)
    quant_params = sum(l.n_params for l in graph.layers)
    lines = [f"bitplan demo: {title}, {len(graph.layers)} quantizable layers ({quant_params:,} weights, "
             f"embeddings included), fp32 size {fp_bytes / MB:.3f} MB; {base / MB:.3f} MB stays "
             f"unquantized (biases, norms{', ' + str(len(graph.skipped)) + ' skipped layers' if graph.skipped else ''})",
             f"options: {describe(opts.specs)} ({len(opts.specs)} per layer); budget {budget_mb:.3f} MB "
             f"(halfway between uniform int4 and int8, g128); scoring + solving took {seconds:.1f} s "
             f"({plan.estimator['name']}, {plan.estimator['probes']} probes; solver {plan.solver['name']} "
             f"{plan.solver['status']})", "", "per-layer options:"]
    for n, s in plan.layers.items():
        lines.append(f"  {n:<60} {s.label:>10}")
    lines.append(f"  bits histogram: {dict(sorted(Counter(plan.bits.values()).items()))}")
    lines += ["", f"{'plan':<18} {'predicted MB':>13} {'packed MB':>10} {label:>26}"]
    for name, pred, real, fid in rows:
        lines.append(f"{name:<18} {pred:>13.4f} {real:>10.4f} {fid:>26.5g}")
    lines.append(f"\n({label}: mean over {n_held})")
    return "\n".join(lines)
