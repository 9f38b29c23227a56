"""Bad input gives errors naming the cause; every estimator's table round-trips through JSON."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.sensitivity import ESTIMATORS, load, score
from bitplan.sensitivity.registry import STREAMING
from bitplan.sensitivity.table import _jsonable
from sens_helpers import mlp

# estimators that take any nn.Module; the streaming ones (HF causal-LM folders only) have their own
# error / round-trip tests in test_streaming.py
IN_MEMORY = sorted(set(ESTIMATORS) - set(STREAMING))

FAST = {"hessian": {"max_probes": 8}, "fisher": {"samples": 2}}


class NoLayers(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("method", IN_MEMORY)
def test_no_quantizable_layers(method):
    with pytest.raises(ValueError, match="no quantizable layers"):
        score(NoLayers(), [torch.randn(2, 3)], method=method)


@pytest.mark.parametrize("method", IN_MEMORY)
def test_calibration_data_that_does_not_run(method, net):
    # zd is data-free, but calibration data that is given must still run
    with pytest.raises(ValueError, match="does not run"):
        score(net, [torch.randn(4, 7)], method=method)


@pytest.mark.parametrize("method", ["hessian", "fisher", "measured", "decoupled", "lim"])
def test_nan_in_data_is_named(method, blocks_model, block_batches):
    bad = [block_batches[0].clone()]
    bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite|NaN"):
        score(blocks_model, bad, method=method, loss_fn=lambda m, b: m(b).pow(2).mean())


@pytest.mark.parametrize("method", ["hessian", "fisher", "measured"])
def test_nan_with_label_free_loss_is_named(method, net, batches):
    bad = [b.clone() for b in batches]
    bad[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match="batch 1 is not finite"):
        score(net, bad, method=method)


def test_nan_weight_is_named_by_zd(net):
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 has NaN/inf"):
        score(net, None, method="zd")


@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_nan_gradient_is_named(method, net, batches):
    def sqrt_loss(m, b):                # finite value (0 at the fp point), NaN gradient
        out = m(b)
        return (out - out.detach() + 0 * out).pow(2).sum().sqrt()
    with pytest.raises(ValueError, match="not finite"):
        score(net, batches, method=method, loss_fn=sqrt_loss, **FAST.get(method, {}))


def test_frozen_and_unused_layers_are_handled(blocks_model, block_batches):
    for p in blocks_model.parameters():
        p.requires_grad_(False)         # a frozen model: scoring must still work, and not unfreeze it
    for method in ("hessian", "fisher", "measured"):
        t = score(blocks_model, block_batches, method=method, **FAST.get(method, {}))
        assert np.all(t.loss[t.names.index("unused")] == 0)
    assert not any(p.requires_grad for p in blocks_model.parameters())


def test_model_is_not_modified(net, batches):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in IN_MEMORY:
        if method != "lim":
            score(net, batches, method=method, **FAST.get(method, {}))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("method", IN_MEMORY)
def test_every_table_round_trips(method, blocks_model, block_batches, tmp_path):
    t = score(blocks_model, block_batches, method=method, **FAST.get(method, {}))
    t.save(tmp_path / "s.json")
    u = load(tmp_path / "s.json")
    assert u.names == t.names and u.bits == t.bits and u.method == method
    assert np.array_equal(u.loss, t.loss) and u.model_fingerprint == t.model_fingerprint
    assert u.meta == json.loads(json.dumps(_jsonable(t.meta)))
    u.save(tmp_path / "t.json")
    assert (tmp_path / "s.json").read_text() == (tmp_path / "t.json").read_text()
