"""Per-layer Hutchinson traces against the exact Hessian (torch.autograd.functional.hessian)."""
import numpy as np
import pytest
import torch
from torch.func import functional_call

from bitplan.sensitivity import score
from bitplan.sensitivity.losses import kl_to_reference

from sens_helpers import ce_loss

K = 4.0       # agreement within K standard errors


def exact_traces(net, batches, loss_of_output):
    """Tr of each Linear weight's Hessian block of mean_b loss(net(batch_b), b)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    out = []
    for name, m in net.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        key = f"{name}.weight"

        def f(w):
            ps = dict(params, **{key: w})
            return sum(loss_of_output(functional_call(net, ps, (x,)), b)
                       for b, x in enumerate(batches)) / len(batches)
        h = torch.autograd.functional.hessian(f, params[key])
        out.append(float(h.reshape(params[key].numel(), -1).trace()))
    return np.array(out)


def check(t, exact):
    tr, se = np.asarray(t.meta["trace"]), np.asarray(t.meta["trace_stderr"])
    assert tr.shape == se.shape == (len(t.names),) and isinstance(t.meta["probes"], int)
    assert np.all(np.abs(tr - exact) <= K * se + 1e-9), (tr, exact, se)
    assert np.all(se < 0.25 * np.abs(exact))          # the error bars are informative, not huge


def test_output_probes_match_exact_hessian_mse(net, batches):
    refs = [net(x).detach() for x in batches]
    exact = exact_traces(net, batches, lambda y, b: torch.nn.functional.mse_loss(y, refs[b]))
    t = score(net, batches, method="hessian", tol=0.05, max_probes=200, seed=0)
    assert t.meta["probe_mode"] == "output"
    check(t, exact)


def test_output_probes_match_exact_hessian_kl(net, batches):
    refs = [net(x).detach() for x in batches]
    exact = exact_traces(net, batches, lambda y, b: kl_to_reference(y, refs[b]))
    t = score(net, batches, method="hessian", loss_fn="kl", tol=0.05, max_probes=200, seed=1)
    check(t, exact)


def test_weight_probes_match_exact_hessian_task_loss(net, labelled):
    xs = [x for x, _ in labelled]
    exact = exact_traces(net, xs, lambda y, b: torch.nn.functional.cross_entropy(y, labelled[b][1]))
    t = score(net, labelled, method="hessian", loss_fn=ce_loss, tol=0.05, max_probes=600, probe_batch=60, seed=2)
    assert t.meta["probe_mode"] == "weight"
    check(t, exact)


def test_pyhessian_backend_matches_exact(net, batches):
    pytest.importorskip("pyhessian")
    refs = [net(x).detach() for x in batches]
    exact = exact_traces(net, batches, lambda y, b: torch.nn.functional.mse_loss(y, refs[b]))
    t = score(net, batches, method="hessian", backend="pyhessian", max_probes=200)
    assert t.meta["backend"] == "pyhessian" and t.meta["probes"] == 200
    check(t, exact)


def test_deterministic_under_seed_and_table_formula(net, batches):
    a = score(net, batches, method="hessian", seed=5, max_probes=16)
    b = score(net, batches, method="hessian", seed=5, max_probes=16)
    c = score(net, batches, method="hessian", seed=6, max_probes=16)
    assert np.array_equal(a.meta["trace"], b.meta["trace"]) and np.array_equal(a.loss, b.loss)
    assert not np.array_equal(a.meta["trace"], c.meta["trace"])
    n = np.array([30, 20, 12])
    from bitplan.kernels.quantizer import fake_quantize
    d = np.array([[float((fake_quantize(m.weight.detach(), bb) - m.weight.detach()).pow(2).sum()) for bb in a.bits]
                  for m in net if isinstance(m, torch.nn.Linear)])
    np.testing.assert_allclose(a.loss, 0.5 * (np.maximum(a.meta["trace"], 0) / n)[:, None] * d, rtol=1e-6)


def test_tolerance_stops_early_and_probe_batching_is_consistent(net, batches):
    t = score(net, batches, method="hessian", tol=0.2, min_probes=4, max_probes=400)
    se, tr = np.asarray(t.meta["trace_stderr"]), np.asarray(t.meta["trace"])
    assert t.meta["converged"] and t.meta["probes"] < 400 and np.all(se <= 0.2 * np.abs(tr))
    one = score(net, batches, method="hessian", probe_batch=1, min_probes=8, max_probes=8, seed=3)
    four = score(net, batches, method="hessian", probe_batch=4, min_probes=8, max_probes=8, seed=3)
    np.testing.assert_allclose(one.meta["trace"], four.meta["trace"], rtol=1e-5)


def test_unused_layer_is_reported_not_crashed(blocks_model, block_batches):
    t = score(blocks_model, block_batches, method="hessian", max_probes=8)
    i = t.names.index("unused")
    assert t.meta["no_grad_layers"] == ["unused"] and t.meta["trace"][i] == 0 and np.all(t.loss[i] == 0)


def test_output_probes_need_label_free_loss(net, labelled):
    with pytest.raises(ValueError, match="label-free"):
        score(net, labelled, method="hessian", loss_fn=ce_loss, probe="output")
    with pytest.raises(ValueError, match="backend"):
        score(net, labelled, method="hessian", loss_fn=ce_loss, backend="nope")


def test_row_sums_refuse_non_finite_and_survive_float32_overflow():
    """The probe sums check finiteness on the k row sums: a NaN/inf element is refused by name, and
    a finite row whose float32 sum overflows is summed again in float64 (not refused)."""
    from bitplan.sensitivity.hessian import _row_sums
    t = torch.ones(2, 3, 4)
    assert _row_sums(t, "x").tolist() == [12.0, 12.0]
    bad = t.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="gradient of fc1 is not finite"):
        _row_sums(bad, "gradient of fc1")
    big = torch.full((2, 2), 3e38)                       # finite; float32 row sum overflows to inf
    assert np.allclose(_row_sums(big, "x"), [6e38, 6e38])
