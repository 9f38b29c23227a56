"""Are decoupled's metrics distinct? (issue 16 item 13) Per-layer metric ratios on MiniLM and a digits CNN.

For each model: ``score(..., method="decoupled", metrics=("loss", "sqnr", "cos", "gram"))`` with the
default label-free loss, and for every metric the per-layer ratio (row sum of its table) / (row sum
of the loss table). A metric proportional to the loss has the same ratio on every layer (spread
max/min = 1); ``meta["proportional"]`` says which metrics the estimator merged, ``groups`` how many
layers each distinct metric got.

Run: python benchmarks/decoupled_metrics.py [--batches 1] [--threads 1]
     [--out benchmarks/results/decoupled_metrics.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BITS = (2, 4, 8)
METRICS = ("loss", "sqnr", "cos", "gram")


def cases(n_batches: int):
    from bitplan.models import load_model
    from estimator_models import residual_cnn_case
    spec = load_model("minilm")
    yield "minilm (L2-normalised sentence embedding, label-free MSE)", spec.model, spec.calib_data[:n_batches]
    model, calib = residual_cnn_case(n_batches=n_batches)
    yield "residual CNN on digits (plain logits tensor, label-free MSE)", model, [x for x, _ in calib]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "decoupled_metrics.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from provenance import provenance

    from bitplan.core.jsonio import atomic_write_json
    from bitplan.sensitivity import score
    prov, out = provenance(), {}
    for name, model, batches in cases(a.batches):
        t0 = time.perf_counter()
        t = score(model, batches, method="decoupled", bits=BITS, metrics=METRICS)
        pm = t.meta["per_metric"]
        base = pm["loss"].sum(1)
        rec = {"seconds": time.perf_counter() - t0, "layers": len(t.names), "proportional": t.meta["proportional"],
               "distinct_metrics": t.meta["distinct_metrics"],
               "group_sizes": {g: len(v) for g, v in t.meta["groups"].items()}, "ratio_to_loss": {}}
        for m in METRICS[1:]:
            r = pm[m].sum(1) / np.maximum(base, 1e-300)
            r = r[base > 0]
            rec["ratio_to_loss"][m] = {"median": float(np.median(r)), "spread_max_over_min": float(r.max() / r.min())}
        out[name] = rec
        print(name, {k: rec[k] for k in ("proportional", "distinct_metrics", "group_sizes")})
        for m, v in rec["ratio_to_loss"].items():
            print(f"  {m:5} / loss per layer: median {v['median']:.4g}, spread max/min {v['spread_max_over_min']:.4g}")
    atomic_write_json(a.out, {**prov, "bits": list(BITS), "batches": a.batches, "threads": a.threads,
                              "loadavg": list(os.getloadavg()), "models": out})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
