"""Tiny model factories for CLI and example tests (``--model tests.fixtures_models:tiny``).

Each factory returns ``(model, calib_batches)``: deterministic weights and data (fixed seeds), small
enough that every CLI command runs in a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny", "tiny_cnn", "tiny_embed", "TinyMLP", "TinyEmbed"]


class TinyMLP(nn.Module):
    """32 -> 64 -> 64 -> 16 MLP with GELU; 4 quantizable Linear layers (one is a 64x64 'head')."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x):                                   # (n, 32) -> (n, 16)
        x = nn.functional.gelu(self.fc1(x))
        x = nn.functional.gelu(self.fc2(x)) + x
        x = nn.functional.gelu(self.fc3(x)) + x
        return self.head(x)


def tiny():
    """(TinyMLP, 4 calibration batches of (8, 32))."""
    torch.manual_seed(0)
    model = TinyMLP().eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 32, generator=g) for _ in range(4)]


def tiny_cnn():
    """A 2-conv + linear CNN on (8, 1, 8, 8) inputs, 3 calibration batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)]


class TinyEmbed(TinyMLP):
    """TinyMLP whose output is L2-normalised per row, like a sentence embedding (MiniLM): with the
    label-free MSE, NSR and 1 - cos are exactly proportional to the loss."""

    def forward(self, x):                                   # (n, 32) -> (n, 16), unit rows
        return nn.functional.normalize(super().forward(x), dim=-1)


def tiny_embed():
    """(TinyEmbed, 4 calibration batches of (8, 32))."""
    torch.manual_seed(0)
    model = TinyEmbed().eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 32, generator=g) for _ in range(4)]
