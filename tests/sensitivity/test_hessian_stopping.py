"""Hutchinson stopping and probe design (issue 16 item 11): independent probes per batch, the
negligible-share rule, the automatic probe cap. Properties only, no timings."""
import numpy as np
import torch
from torch import nn

from bitplan.sensitivity import score
from bitplan.sensitivity.hessian import MEASURE_MULTIPLE, PROBE_FORWARDS, auto_max_probes

from sens_helpers import ce_loss


class Faint(nn.Module):
    """tanh MLP with a residual branch scaled by 1e-3: that branch's trace is ~1e-6 of the others',
    so its relative standard error stays large (cross-layer noise) however many probes run."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.faint = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h + 1e-3 * torch.tanh(self.faint(h)))


def faint_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    return Faint().eval(), data


def test_negligible_layer_stops_early_and_agrees_with_a_long_run():
    model, data = faint_case()
    kw = dict(loss_fn=ce_loss, bits=(2, 4, 8), tol=0.25, max_probes=96, probe_batch=8)
    new = score(model, data, method="hessian", **kw)                       # default negligible=0.01
    old = score(model, data, method="hessian", negligible=0.0, **kw)       # relative tolerance on every layer
    i = new.names.index("faint")
    assert new.meta["negligible_layers"] == ["faint"] and new.meta["converged"]
    assert not old.meta["converged"] and old.meta["probes"] == 96            # the faint trace never settles
    assert new.meta["probes"] < old.meta["probes"] / 2
    assert old.meta["trace_stderr"][i] > 0.1 * abs(old.meta["trace"][i])
    ref = score(model, data, method="hessian", loss_fn=ce_loss, bits=(2, 4, 8), max_probes=240,
                min_probes=240, probe_batch=40, seed=7)                   # long reference, other probes
    tr, se = np.asarray(new.meta["trace"]), np.asarray(new.meta["trace_stderr"])
    rtr, rse = np.asarray(ref.meta["trace"]), np.asarray(ref.meta["trace_stderr"])
    assert np.all(np.abs(tr - rtr) <= 4 * np.sqrt(se ** 2 + rse ** 2)), (tr, rtr, se, rse)
    # the faint layer's share of the predicted loss really is negligible in the long run
    share = new.loss.max(1) / new.loss.max(1).sum()
    assert share[i] < 0.01


def test_independent_probes_per_batch_average_out():
    """4 copies of one batch: with one probe per batch the 4 HVPs are independent samples, so the
    standard error is ~1/2 of one batch's at the same probe count (a shared probe would give exactly 1)."""
    model, data = faint_case()
    one = score(model, data[:1], method="hessian", loss_fn=ce_loss, bits=(4,), max_probes=64, min_probes=64)
    four = score(model, data[:1] * 4, method="hessian", loss_fn=ce_loss, bits=(4,), max_probes=64, min_probes=64)
    big = [0, 1]                                                             # fc1, fc2
    ratio = np.asarray(four.meta["trace_stderr"])[big] / np.asarray(one.meta["trace_stderr"])[big]
    assert np.all(ratio < 0.75), ratio


def test_automatic_probe_cap_bounds_cost_relative_to_measuring():
    model, data = faint_case()
    t = score(model, data, method="hessian", loss_fn=ce_loss, bits=(2, 3, 4, 8), tol=1e-6)   # never converges
    cells = int(t.allowed.sum())
    assert t.meta["max_probes_rule"] == "auto" and t.meta["probe_mode"] == "weight"
    assert t.meta["probes"] == t.meta["max_probes"] == auto_max_probes("weight", cells)
    # forward-pass equivalents spent <= MEASURE_MULTIPLE x the forwards of `measured`, unless the floor
    spent = t.meta["probes"] * PROBE_FORWARDS["weight"]
    assert spent <= MEASURE_MULTIPLE * (cells + 1) or t.meta["probes"] == 8
    assert auto_max_probes("weight", 10_000) == 64 and auto_max_probes("weight", 1) == 8
    assert auto_max_probes("output", 148) == 64 and auto_max_probes("weight", 28) == 11
    explicit = score(model, data, method="hessian", loss_fn=ce_loss, bits=(4,), tol=1e-6, max_probes=20)
    assert explicit.meta["probes"] == 20 and explicit.meta["max_probes_rule"] == "given"
