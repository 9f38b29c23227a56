"""measured and decoupled against a direct one-layer-at-a-time computation."""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from bitplan.kernels.quantizer import fake_quantize
from bitplan.sensitivity import score

BITS = (2, 3, 8)


@torch.no_grad()
def direct(net, batches, loss):
    """(L, B) loss increase, and output noise-to-signal ratio, quantizing one Linear at a time."""
    refs = [net(x).detach() for x in batches]
    base = np.mean([float(loss(net(x), r)) for x, r in zip(batches, refs)])
    idx = [i for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    d, nsr = np.zeros((len(idx), len(BITS))), np.zeros((len(idx), len(BITS)))
    for a, i in enumerate(idx):
        for j, b in enumerate(BITS):
            q = copy.deepcopy(net)
            with torch.no_grad():
                q[i].weight.copy_(fake_quantize(q[i].weight, b))
                outs = [q(x) for x in batches]
            d[a, j] = np.mean([float(loss(o, r)) for o, r in zip(outs, refs)]) - base
            nsr[a, j] = np.mean([float((o - r).pow(2).sum() / r.pow(2).sum()) for o, r in zip(outs, refs)])
    return d, nsr


def kl(out, ref):
    return F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum") / len(out)


def test_measured_mse_equals_direct(net, batches):
    t = score(net, batches, method="measured", bits=BITS)
    want, _ = direct(net, batches, F.mse_loss)
    np.testing.assert_allclose(t.loss, want, rtol=1e-5, atol=1e-12)
    assert t.meta["base_loss"] == 0.0


def test_measured_label_free_kl_equals_direct(net, batches):
    t = score(net, batches, method="measured", bits=BITS, loss_fn="kl")
    want, _ = direct(net, batches, kl)
    np.testing.assert_allclose(t.loss, want, rtol=1e-4, atol=1e-10)
    assert "kl" in t.meta["loss"]


def test_decoupled_metrics_groups_and_combined_table(net, batches):
    t = score(net, batches, method="decoupled", bits=BITS, loss_fn="kl", metrics=("loss", "sqnr"))
    d, nsr = direct(net, batches, kl)
    pm = t.meta["per_metric"]
    np.testing.assert_allclose(pm["loss"], np.maximum(d, 0), rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(pm["sqnr"], nsr, rtol=1e-4)
    norm = {m: pm[m] / np.median(pm[m], 0).sum() for m in ("loss", "sqnr")}
    group = np.array(t.meta["group"])
    for l, g in enumerate(group):
        other = "sqnr" if g == "loss" else "loss"
        assert norm[g][l].sum() >= norm[other][l].sum()
        np.testing.assert_allclose(t.loss[l], norm[g][l] * t.meta["group_scale"][g], rtol=1e-9)
    for g in ("loss", "sqnr"):              # each group's total is its measured loss increase
        np.testing.assert_allclose(t.loss[group == g].sum(), pm["loss"][group == g].sum(), rtol=1e-9)
    assert sorted(sum(t.meta["groups"].values(), [])) == sorted(t.names)
