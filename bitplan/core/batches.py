"""Calibration batches: how bitplan feeds a batch to a model, whatever its form.

A batch is a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a dict (``model(**batch)``).
When the user gives ``loss_fn(model, batch)``, bitplan calls that instead and never unpacks the batch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["as_batches", "run_model", "batch_size", "first_tensor", "first_sample", "to_device"]


def as_batches(calib_data, what: str = "calib_data") -> list:
    """Materialise calibration data (iterable, generator or DataLoader) into a non-empty list."""
    if calib_data is None:
        raise ValueError(f"{what} is None; pass an iterable of batches (tensor, tuple or dict) or a DataLoader")
    if isinstance(calib_data, (torch.Tensor, Mapping)):
        return [calib_data]
    if not isinstance(calib_data, Iterable):
        raise TypeError(f"{what} must be an iterable of batches or a DataLoader, got {type(calib_data).__name__}")
    batches = list(calib_data)
    if not batches:
        raise ValueError(f"{what} is empty; give at least one batch")
    return batches


def run_model(model: torch.nn.Module, batch):
    """Call ``model`` on one batch (tensor -> model(x), tuple -> model(*b), dict -> model(**b))."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def first_tensor(obj):
    """The first tensor inside a (nested) output: tensor, tuple/list, dict or HF ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def batch_size(batch) -> int:
    """Leading dimension of the batch's first tensor (1 when it has none)."""
    t = first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else 1


def first_sample(batch):
    """The batch cut to its first sample (leading dim 1) — tensor, tuple/list or dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, Mapping):
        return {k: first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(first_sample(v) for v in batch)
    return batch


def to_device(batch, device):
    """The batch with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
