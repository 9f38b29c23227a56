"""The loss a sensitivity estimator differentiates or measures.

``loss_fn=None`` means a label-free loss against the fp model's own outputs (computed once per batch
before anything is perturbed):
- the output has a ``logits`` field (HF ModelOutput / dict): KL(p_fp || p_model) over the last dim,
  averaged over positions;
- otherwise (a tensor, a tuple, last_hidden_state, embeddings): mean squared error between the first
  output tensor and the fp one.
Both are minimal (zero) at the fp weights, so their Hessian there is positive semi-definite.
``loss_fn="kl"`` / ``"mse"`` force one of them (``"kl"`` treats the first output tensor as logits);
any callable ``loss_fn(model, batch) -> scalar tensor`` is used as given (e.g. a task loss with labels).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..core.batches import first_tensor, run_model

__all__ = ["resolve_loss", "LOSS_NAMES", "LabelFreeLoss", "kl_to_reference"]

LOSS_NAMES = ("kl", "mse")


def _logits(out):
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    return getattr(out, "logits", None) if not isinstance(out, torch.Tensor) else None


def kl_to_reference(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(out)) over the last dim, mean over all other positions."""
    n = max(1, ref.numel() // ref.shape[-1])
    return F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(ref.float(), -1),
                    log_target=True, reduction="sum") / n


def resolve_loss(loss_fn, model: torch.nn.Module, batches: list):
    """Return ``(callable(model, batch) -> scalar, description)``; computes fp references if needed."""
    if callable(loss_fn):
        return loss_fn, getattr(loss_fn, "__name__", "user loss_fn")
    if loss_fn is not None and loss_fn not in LOSS_NAMES:
        raise ValueError(f"loss_fn={loss_fn!r} is not supported; give a callable(model, batch) -> "
                         f"scalar, None (label-free) or one of {list(LOSS_NAMES)}")
    refs, kinds = {}, set()
    with torch.no_grad():
        for b in batches:
            try:
                out = run_model(model, b)
            except Exception as e:
                raise ValueError(f"calibration batch does not run through {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}") from e
            lg = _logits(out)
            kind = loss_fn or ("kl" if lg is not None else "mse")
            t = lg if lg is not None else first_tensor(out)
            if t is None or not t.is_floating_point():
                raise ValueError(f"{type(model).__name__} returned no floating-point tensor to compare; "
                                 "pass loss_fn=callable(model, batch)")
            if not torch.isfinite(t).all():
                raise ValueError(f"the fp model's output on calibration batch {len(refs)} is not finite "
                                 "(NaN/inf); check the model weights and calibration data")
            refs[id(b)] = t.detach()
            kinds.add(kind)
    kind = kinds.pop()
    return LabelFreeLoss(kind, refs), f"label-free {kind} to the fp model's output"


class LabelFreeLoss:
    """``loss(model, batch)``: KL or MSE of the model's output to the fp output on that batch.

    Also exposes what the curvature-based estimators need: ``output(model, batch)`` (the compared
    tensor), ``reference(batch)`` and ``hessian_sqrt(batch, u)``. At the fp weights the residual is
    zero, so the loss Hessian w.r.t. the output, ``H_out``, is all the curvature there is (the weight
    Hessian is exactly the Gauss-Newton matrix ``Jᵀ H_out J``). ``hessian_sqrt`` returns ``S u`` with
    ``S Sᵀ = H_out``:
    - mse: ``H_out = 2/N · I`` -> ``S u = sqrt(2/N) u`` (N = elements of the output);
    - kl:  per position ``H_out = (diag(p) − p pᵀ)/n`` -> ``S u = (√p ⊙ u − p (√p · u)) / √n``.
    """
    __name__ = "label_free"

    def __init__(self, kind: str, refs: dict):
        self.kind, self.refs = kind, refs

    def reference(self, b) -> torch.Tensor:
        ref = self.refs.get(id(b))
        if ref is None:           # references exist only for the calibration batches
            raise KeyError("label-free loss called on a batch that is not in the calibration set")
        return ref

    @staticmethod
    def output(m, b) -> torch.Tensor:
        out = run_model(m, b)
        lg = _logits(out)
        return lg if lg is not None else first_tensor(out)

    def compare(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return kl_to_reference(t, ref)
        return F.mse_loss(t.float(), ref.float())

    def __call__(self, m, b) -> torch.Tensor:
        return self.compare(self.output(m, b), self.reference(b))

    def hessian_sqrt(self, b, u: torch.Tensor) -> torch.Tensor:
        """``S u`` for probes ``u`` (..., *output shape); leading dims are independent probes."""
        ref = self.reference(b).float()
        if self.kind == "kl":
            n = max(1, ref.numel() // ref.shape[-1])
            p = torch.softmax(ref, -1)
            sp = p.sqrt()
            return (sp * u - p * (sp * u).sum(-1, keepdim=True)) / n ** 0.5
        return u * (2.0 / ref.numel()) ** 0.5
