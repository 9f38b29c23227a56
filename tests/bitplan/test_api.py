"""bitplan.allocate end to end: budgets respected, packed bytes == prediction, model untouched."""
import copy

import pytest
import torch

import bitplan
from bitplan.costmodels import MB, model_nbytes
from bitplan.demo import uniform_plan
from bitplan.graph import LayerGraph


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def sizes(model, bits):
    g = LayerGraph.build(model)
    from bitplan.costmodels import base_nbytes
    return uniform_plan(g, bits, base_bytes=base_nbytes(model, g.names)).predicted["size_bytes"] / MB


def test_allocate_digits_budget_and_exact_packed_size(digits_mlp):
    model, Xtr, ytr, Xte, yte = digits_mlp
    before, grads = state(model), [p.requires_grad for p in model.parameters()]
    budget = (sizes(model, 3) + sizes(model, 8)) / 2
    batches = [Xtr[i:i + 256] for i in range(0, 768, 256)]
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])   # noqa: E731
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=[(Xtr[:256], ytr[:256])], loss_fn=loss_fn,
                            bits=(2, 3, 4, 8), sensitivity_opts={"max_probes": 16})
    assert plan.predicted["size_bytes"] <= budget * MB
    assert plan.solver["status"] == "optimal" and plan.solver["bound"] == plan.solver["objective"]
    # the model is not mutated
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads and not model.training
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"]
    fake = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="fake")
    with torch.no_grad():                 # real kernels run bf16 activations: close to fake quant, not equal
        yp, yf = packed(Xte), fake(Xte)
    assert 20 * torch.log10(yf.norm() / (yp - yf).norm()) > 25                      # SQNR floor, dB
    acc = lambda m: (m(Xte).argmax(1) == yte).float().mean().item()   # noqa: E731
    assert min(acc(fake), acc(packed)) > acc(model) - 0.05            # a mid budget keeps accuracy
    # label-free default works on the same model
    plan2 = bitplan.allocate(model, budget_mb=budget, calib_data=batches, sensitivity_opts={"max_probes": 8})
    assert plan2.predicted["size_bytes"] <= budget * MB and plan2.estimator["loss"].startswith("label-free")


def test_more_budget_never_hurts_predicted_loss(digits_mlp):
    model, Xtr, *_ = digits_mlp
    from bitplan.sensitivity import score
    table = score(model, [Xtr[:256]], bits=(2, 4, 8), max_probes=8)
    objs = [bitplan.allocate(model, budget_mb=b, calib_data=[Xtr[:256]], bits=(2, 4, 8),
                             sensitivity_table=table).solver["objective"]
            for b in (sizes(model, 2) * 1.001, (sizes(model, 2) + sizes(model, 8)) / 2, sizes(model, 8))]
    assert objs[0] >= objs[1] >= objs[2] == pytest.approx(table.loss[:, 2].sum())


def test_infeasible_budget_states_smallest(digits_mlp):
    model, Xtr, *_ = digits_mlp
    small = sizes(model, 2)
    with pytest.raises(bitplan.InfeasibleBudgetError, match=f"{small:.6f} MB") as e:
        bitplan.allocate(model, budget_mb=small * 0.9, calib_data=[Xtr[:64]])
    assert e.value.smallest["size_mb"] == pytest.approx(small)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget_mb": -1}, "budget_mb=-1"),
    ({"budget_mb": 1.0, "bits": (1, 4)}, "bits=1"),
    ({"budget_mb": 1.0, "sensitivity": "nope"}, "unknown sensitivity method 'nope'"),
    ({"budget_mb": 1.0, "solver": "nope"}, "unknown solver 'nope'"),
    ({}, "at least one budget"),
    ({"budget_mb": 1.0, "calib_data": []}, "calib_data is empty"),
])
def test_bad_arguments_named(digits_mlp, kwargs, match):
    model, Xtr, *_ = digits_mlp
    kwargs = {"calib_data": [Xtr[:32]], **kwargs}
    with pytest.raises(ValueError, match=match):
        bitplan.allocate(model, sensitivity_opts={"max_probes": 2, "min_probes": 2}, **kwargs)


def test_plan_mismatch_names_layers(digits_mlp):
    model, Xtr, *_ = digits_mlp
    plan = uniform_plan(LayerGraph.build(model), 4)
    other = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    with pytest.raises(bitplan.PlanMismatchError, match="'4'") as e:
        bitplan.apply_plan_(other, plan)
    assert e.value.missing == ["4"] and e.value.shape == ["2"]
    with pytest.raises(ValueError, match="mode='int3'"):
        bitplan.apply_plan_(copy.deepcopy(model), plan, mode="int3")


@pytest.mark.slow
def test_allocate_minilm(minilm):
    model = minilm.model
    budget = (sizes(model, 4) + sizes(model, 8)) / 2
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=minilm.calib_data[:1],
                            sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert plan.predicted["size_bytes"] <= budget * MB and len(plan.layers) == 37
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(packed(**minilm.eval_data[0]), model(**minilm.eval_data[0]))
    assert cos.mean() > 0.9


def test_allocate_under_latency_budget():
    from bitplan.costmodels.latency import latency_table
    from bitplan.kernels.calibrate import calibrate, measure_fixed_cost
    from bitplan.kernels.formats import QuantSpec
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(8, 64)
    specs = [QuantSpec(4, 32), QuantSpec(8, 32)]
    g = LayerGraph.build(m, x[:1])
    prof = calibrate(g.layers, tokens=(1, 8), kernels=specs, quiet=True, reps=5, max_seconds=0.05)
    t = latency_table(g.layers, specs, prof)                       # (L, B) ms, measured here
    kw = dict(latency_profile=prof, calib_data=[x], bits=(4, 8), group_size=32,
              sensitivity_opts={"max_probes": 4, "min_probes": 4})
    with pytest.warns(UserWarning, match="no fixed cost"):
        plan = bitplan.allocate(m, max_latency_ms=float(t.min(1).sum()) * 1.0001, **kw)
    assert plan.predicted["latency_ms"] <= plan.budgets["latency_ms"] * (1 + 1e-12)   # float sums
    assert [plan.bits[n] for n in g.names] == [(4, 8)[j] for j in t.argmin(1)]   # only the fastest fits
    prof.fixed["tiny:b1"] = measure_fixed_cost(m, x[:1])
    budget = float(t.max(1).sum()) + prof.fixed["tiny:b1"]["median_ms"]
    plan = bitplan.allocate(m, max_latency_ms=budget, **kw)
    assert plan.predicted["latency_ms"] <= budget * (1 + 1e-12)
    assert plan.predicted["latency_fixed_ms"] == prof.fixed["tiny:b1"]["median_ms"]
    fixed = prof.fixed["tiny:b1"]["median_ms"]
    with pytest.raises(bitplan.InfeasibleBudgetError) as e:          # smallest total includes the fixed ms
        bitplan.allocate(m, max_latency_ms=float(t.min(1).sum()) * 0.5 + fixed, **kw)
    assert e.value.smallest["latency_ms"] == pytest.approx(float(t.min(1).sum()) + fixed)
    with pytest.raises(ValueError, match="latency_fixed='nope'"):
        bitplan.allocate(m, max_latency_ms=budget, latency_fixed="nope", **kw)
    with pytest.raises(ValueError, match="needs latency_profile"):
        bitplan.allocate(m, max_latency_ms=budget, calib_data=[x])
