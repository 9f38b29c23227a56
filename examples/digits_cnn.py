"""Train a small CNN on scikit-learn's 8x8 digits, give it mixed-precision weights under a size
budget, and measure test accuracy — then run its 8-bit layers as W8A8 (int8 activations too).

The sensitivity uses the task loss (cross-entropy with labels) via ``loss_fn``; calibration batches
are (images, labels) tuples from the training split, accuracy is on the held-out test split.

    python examples/digits_cnn.py                      # ~10 s on 2 CPU cores
    python examples/digits_cnn.py --avg-bits 3.5 --epochs 40
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import bitplan
from bitplan.costmodels import model_nbytes
from bitplan.budgets import avg_bits_budget_mb


def digits(seed: int = 0):
    """(X_train (n, 1, 8, 8), y_train, X_test, y_test): pixel values scaled to [0, 1], 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    t = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8)   # noqa: E731
    return t(Xtr), torch.tensor(ytr), t(Xte), torch.tensor(yte)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),             # (n, 32, 8, 8)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),            # (n, 64, 8, 8)
        nn.MaxPool2d(2), nn.Flatten(),                         # (n, 64 * 4 * 4)
        nn.Linear(1024, 128), nn.ReLU(),
        nn.Linear(128, 10))


def train(model, X, y, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, X, y) -> float:
    return float((model(X).argmax(-1) == y).float().mean())


def task_loss(model, batch):
    """loss_fn(model, batch) -> scalar: what the sensitivity estimator differentiates."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avg-bits", type=float, default=4.0, help="size budget as average weight bits (default 4)")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    ap.add_argument("--max-probes", type=int, default=16, help="Hutchinson probes (default 16)")
    ap.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 64 (default 4)")
    args = ap.parse_args(argv)

    Xtr, ytr, Xte, yte = digits()
    model = train(make_cnn(), Xtr, ytr, args.epochs)
    calib = [(Xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 64 * args.calib_batches, 64)]
    budget = avg_bits_budget_mb(model, args.avg_bits)
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=calib, loss_fn=task_loss,
                            bits=(2, 3, 4, 8), group_size=None, sensitivity_opts={"max_probes": args.max_probes,
                                                                 "min_probes": min(8, args.max_probes)})
    print(f"fp32: {model_nbytes(model) / 1e3:.1f} kB, test accuracy {accuracy(model, Xte, yte):.4f}")
    print(f"budget {budget * 1e3:.1f} kB ({args.avg_bits} bits per weight on average); plan bits: {plan.bits}")

    from bitplan.assemble import uniform_plan
    from bitplan.core.graph import LayerGraph
    from bitplan.costmodels import base_nbytes
    g = LayerGraph.build(model)
    base = base_nbytes(model, g.names)
    # W8A8 as options: the solver may give any layer int8 activations (per-token dynamic scales)
    w8a8 = bitplan.allocate(model, budget_mb=budget, calib_data=calib, loss_fn=task_loss,
                            bits=(2, 3, 4, 8), group_size=None, act_bits=(None, 8),
                            sensitivity_opts={"max_probes": args.max_probes, "min_probes": min(8, args.max_probes)})
    rows = [("bitplan", plan), ("bitplan, options with W8A8", w8a8)] + \
        [(f"uniform int{b}", uniform_plan(g, bitplan.QuantSpec(b), base)) for b in (2, 3, 4)]
    print(f"\n{'plan':<28} {'size kB':>8} {'test acc':>9}  kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # conv layers run the reference path
        for name, p in rows:
            q = bitplan.apply_plan_(copy.deepcopy(model), p, mode="packed")
            kernels = sorted(set(q.bitplan_plan.kernels.values()))
            print(f"{name:<28} {model_nbytes(q) / 1e3:>8.1f} {accuracy(q, Xte, yte):>9.4f}  {', '.join(kernels)}")
    return plan


if __name__ == "__main__":
    main()
