"""Tiny models and losses shared by the sensitivity tests (CPU, seconds)."""
import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


class Blocks(nn.Module):
    """Residual blocks in a ModuleList (what LIM needs), plus an unused head."""

    def __init__(self, d: int = 8, n: int = 3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d)) for _ in range(n))
        self.out = nn.Linear(d, 3)
        self.unused = nn.Linear(d, 2)          # never called: no gradient, no output change

    def forward(self, x):
        h = self.inp(x)
        for blk in self.layers:
            h = h + blk(h)
        return self.out(h)




def ce_loss(model, batch):
    """Task loss with labels: batches are (x, y)."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
