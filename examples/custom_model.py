"""bitplan on your own nn.Module with your own loss and data: a small residual MLP regressor
trained on a synthetic task, calibration from a DataLoader of dict batches, a task loss_fn.

Anything works as a batch (tensor, tuple, dict); with ``loss_fn`` bitplan never unpacks it — it
calls ``loss_fn(model, batch)``. Quantizable layers are nn.Linear / nn.Conv1d / nn.Conv2d (and HF
Conv1D); everything else (norms, embeddings) is kept as is and counted in the size.

    python examples/custom_model.py
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bitplan
from bitplan.costmodels import MB, model_nbytes


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):                                          # (n, d) -> (n, d)
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Regressor(nn.Module):
    """(n, 16) features -> (n, 4) targets through 3 residual blocks of width 64."""

    def __init__(self, d_in: int = 16, d: int = 64, d_out: int = 4, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class Synthetic(Dataset):
    """y = sin(x W1) W2 + noise, fixed seed: dict samples {"features", "target"}."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        w = torch.Generator().manual_seed(1234)                    # same task for train and test
        self.x = torch.randn(n, 16, generator=g)
        w1, w2 = torch.randn(16, 32, generator=w) / 4, torch.randn(32, 4, generator=w) / 4   # smooth target
        self.y = torch.sin(self.x @ w1) @ w2 + 0.01 * torch.randn(n, 4, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "target": self.y[i]}


def loss_fn(model, batch):
    """Your loss: bitplan differentiates it for sensitivity (label-free defaults exist too)."""
    return F.mse_loss(model(batch["features"]), batch["target"])


@torch.no_grad()
def evaluate(model, loader) -> float:
    return sum(float(loss_fn(model, b)) * len(b["target"]) for b in loader) / len(loader.dataset)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avg-bits", type=float, default=3.5, help="size budget as average weight bits (default 3.5)")
    ap.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = Regressor()
    train = DataLoader(Synthetic(4096, seed=0), batch_size=128, shuffle=True)
    test = DataLoader(Synthetic(1024, seed=1), batch_size=256)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    step = 0
    while step < args.steps:
        for b in train:
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()
            step += 1
            if step >= args.steps:
                break
    model.eval()

    calib = DataLoader(Synthetic(256, seed=2), batch_size=64)        # a DataLoader is fine as calib_data
    from bitplan.budgets import avg_bits_budget_mb
    budget = avg_bits_budget_mb(model, args.avg_bits)
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=calib, loss_fn=loss_fn, bits=(2, 3, 4, 8),
                            group_size=32, keep={"out": 8},             # pin the head at 8 bits
                            sensitivity_opts={"max_probes": 16})
    var = float(test.dataset.y.var())
    print(f"fp32 {model_nbytes(model) / 1e3:.1f} kB, test MSE {evaluate(model, test):.5f} "
          f"(target variance {var:.5f})")
    print(f"budget {budget * 1e3:.1f} kB ({args.avg_bits} bits/weight): {plan.bits}")
    fake = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="fake")        # simulated
    with warnings.catch_warnings():     # 'out' (4 x 64, groups of 32) is too small for the int8 kernel
        warnings.simplefilter("ignore", RuntimeWarning)
        packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")    # real packed weights
    print(f"plan: packed {model_nbytes(packed) / 1e3:.1f} kB (predicted {plan.predicted['size_bytes'] / 1e3:.1f}), "
          f"test MSE fake {evaluate(fake, test):.5f}, packed {evaluate(packed, test):.5f}")
    from bitplan.assemble import uniform_plan
    from bitplan.core.graph import LayerGraph
    u3 = bitplan.apply_plan_(copy.deepcopy(model), uniform_plan(LayerGraph.build(model), bitplan.QuantSpec(3, 32), 0),
                             mode="packed")
    print(f"uniform int3 g32: packed {model_nbytes(u3) / 1e3:.1f} kB, test MSE {evaluate(u3, test):.5f}")
    assert plan.predicted["size_bytes"] <= budget * MB
    return plan


if __name__ == "__main__":
    main()
