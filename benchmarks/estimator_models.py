"""The small task-loss model of issue 16 item 11: a ~110k-parameter residual CNN on 8x8 digits.

Trained in a few seconds on scikit-learn's ``load_digits`` (fixed split, fixed seed), calibrated with
4 batches of 100 (images, labels) and the cross-entropy task loss, the case where the default
``hessian`` estimator takes the weight-space (double backward) route.

Example:
    >>> model, calib = residual_cnn_case()
    >>> score(model, calib, method="hessian", loss_fn=ce_loss)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResidualCNN", "residual_cnn_case", "ce_loss"]


class Res(nn.Module):
    """x + conv(relu(bn(conv(x)))) with BatchNorm (frozen in eval mode)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    """stem conv(1->32) -> res(32) -> conv(32->64, stride 2) -> res(64) -> pool -> fc(64->10).

    7 quantizable layers, 111k weights: (n, 1, 8, 8) -> (n, 10) logits.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.block1 = Res(32)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.block2 = Res(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.block1(F.relu(self.stem(x)))                 # (n, 32, 8, 8)
        x = self.block2(F.relu(self.down(x)))                 # (n, 64, 4, 4)
        return self.fc(x.mean((2, 3)))                        # (n, 10)


def ce_loss(model, batch):
    """Cross-entropy task loss: batches are (images, labels)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def residual_cnn_case(epochs: int = 8, n_batches: int = 4, batch: int = 100, seed: int = 0):
    """(trained eval-mode ResidualCNN, [(x (100, 1, 8, 8), y (100,))] * 4) from the digits train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, _, ytr, _ = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    Xtr = torch.tensor(Xtr, dtype=torch.float32).reshape(-1, 1, 8, 8)
    ytr = torch.tensor(ytr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidualCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(Xtr), generator=g).split(64):
                opt.zero_grad()
                F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calib = [(Xtr[i * batch:(i + 1) * batch], ytr[i * batch:(i + 1) * batch]) for i in range(n_batches)]
    return model, calib
