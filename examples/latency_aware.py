"""Latency-aware allocation: calibrate a latency profile of the real kernels on this machine, then
allocate under a size budget alone and under size + latency, and time both packed models.

2- and 3-bit weights are smallest but have no PyTorch kernel (they run by unpacking), int4 / int8
run real kernels: a latency budget trades a little size headroom for kernels that are fast *here*.
Latency numbers are measured on this machine and are only meaningful on it (the profile records
the device; ``bitplan plan --profile`` warns when it is used elsewhere). So the latency budget is not
a fixed number: it is picked from what this machine measured, ``--position`` of the way from the
fastest plan that fits the size budget (the allocator minimising predicted latency under the size
budget) to the size-only plan. ``latency_range`` prints the model's whole feasible range.

    python examples/latency_aware.py
"""
from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np
import torch
from torch import nn

import bitplan
from bitplan.allocator import Problem, solve
from bitplan.core.graph import LayerGraph
from bitplan.costmodels import MB, base_nbytes, cost_table, latency_range, model_nbytes
from bitplan.kernels.anchor import anchor_profile
from bitplan.kernels.calibrate import calibrate
from bitplan.kernels.formats import QuantSpec
from bitplan.kernels.timing import time_interleaved
from bitplan.sensitivity import score
from bitplan.budgets import avg_bits_budget_mb


def make_mlp(d: int = 512, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(d, d), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(d, 16)).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avg-bits", type=float, default=4.0, help="size budget as average weight bits (default 4)")
    ap.add_argument("--position", type=float, default=0.5,
                    help="latency budget between the fastest plan within the size budget (0) and the "
                         "size-only plan (1); default 0.5, midway")
    ap.add_argument("--reps", type=int, default=9, help="timed batches per calibration cell (default 9)")
    args = ap.parse_args(argv)

    model = make_mlp()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 512, generator=g) for _ in range(4)]         # one sample per forward: M = 1
    bits, group = (2, 3, 4, 8), 32
    specs = [QuantSpec(b, group) for b in bits]
    prof = calibrate(model, tokens=(1,), kernels=specs, quiet=True, reps=args.reps, max_seconds=0.1)
    anchor_profile(prof, model, calib[0], specs, fixed_name="mlp:b1", reps=args.reps)   # + the GELUs
    print(f"profile: {len(prof.entries)} timings on {prof.device.get('cpu', prof.device.get('type'))}, "
          f"{prof.device.get('threads')} threads; options {prof.options}; anchored to whole forwards: "
          f"fixed {prof.fixed['mlp:b1']['median_ms']:.4f} ms, layer times x {prof.meta['anchor']['scale']:.3f}")

    budget = avg_bits_budget_mb(model, args.avg_bits)
    graph = LayerGraph.build(model, calib[0])
    lat = cost_table("latency", graph.layers, specs, profile=prof)                        # (L, B) ms
    span = latency_range(prof, graph, specs)
    print(f"feasible latency, any size: {span['min_ms']:.4f} ms (fastest plan) to {span['max_ms']:.4f} ms")
    # the fastest plan that fits the size budget: minimise predicted ms subject to the size budget
    base = base_nbytes(model, graph.names)
    size = cost_table("size", graph.layers, specs)                                       # (L, B) bytes
    fastest = solve(Problem(lat, {"size_bytes": size}, {"size_bytes": budget * MB - base}, names=graph.names))
    lo = float(lat[np.arange(len(graph.layers)), fastest.choice].sum()) + span["fixed_ms"]

    table = score(model, calib, bits=bits, group_size=group, max_probes=8)              # score once, solve twice
    common = dict(budget_mb=budget, calib_data=calib, bits=bits, group_size=group, sensitivity_table=table,
                  latency_profile=prof)
    loose = bitplan.allocate(model, max_latency_ms=1e6, **common)                 # size only (+ a huge latency cap)
    hi = loose.predicted["latency_ms"]
    limit = lo + args.position * (hi - lo)
    print(f"within the size budget: fastest plan {lo:.4f} ms, size-only plan {hi:.4f} ms -> latency "
          f"budget {limit:.4f} ms")
    try:
        tight = bitplan.allocate(model, max_latency_ms=limit * (1 + 1e-9), **common)
    except bitplan.InfeasibleBudgetError as e:
        print(f"latency budget {limit:.4f} ms is infeasible with this size budget: {e}")
        raise

    x = calib[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        packed = {name: bitplan.apply_plan_(copy.deepcopy(model), p, mode="packed")
                  for name, p in (("size only", loose), ("size + latency", tight))}
    with torch.inference_mode():
        measured = time_interleaved({k: (lambda m=m: m(x)) for k, m in packed.items()}, reps=args.reps)
    print(f"\nsize budget {budget * 1e3:.1f} kB ({args.avg_bits} bits/weight); latency budget {limit:.4f} ms\n")
    print(f"{'plan':<16} {'bits':<22} {'kB':>7} {'pred ms':>8} {'measured ms':>12}")
    for (name, m), p in zip(packed.items(), (loose, tight)):
        b = " ".join(str(v) for v in p.bits.values())
        print(f"{name:<16} {b:<22} {model_nbytes(m) / 1e3:>7.1f} {p.predicted['latency_ms']:>8.4f} "
              f"{measured[name].median_ms:>12.4f}")
    assert tight.predicted["latency_ms"] <= limit * (1 + 1e-6)
    assert tight.predicted["size_bytes"] <= budget * MB
    print(f"latency budget respected by the prediction: {tight.predicted['latency_ms']:.4f} <= {limit:.4f} ms")
    return tight


if __name__ == "__main__":
    main()
