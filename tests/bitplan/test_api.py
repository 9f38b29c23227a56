"""bitplan.allocate end to end: budgets respected, packed bytes == prediction, model untouched."""
import copy

import numpy as np
import pytest
import torch

import bitplan
from bitplan.assemble import uniform_plan
from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec
from bitplan.costmodels import MB, base_nbytes, model_nbytes


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def sizes(model, bits, group=None):
    g = LayerGraph.build(model)
    return uniform_plan(g, QuantSpec(bits, group), base_nbytes(model, g.names)).predicted["size_bytes"] / MB


def test_allocate_digits_budget_and_exact_packed_size(digits_mlp):
    model, Xtr, ytr, Xte, yte = digits_mlp
    before, grads = state(model), [p.requires_grad for p in model.parameters()]
    budget = (sizes(model, 3) + sizes(model, 8)) / 2
    batches = [Xtr[i:i + 256] for i in range(0, 768, 256)]
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])   # noqa: E731
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=[(Xtr[:256], ytr[:256])], loss_fn=loss_fn,
                            bits=(2, 3, 4, 8), group_size=None, sensitivity_opts={"max_probes": 16})
    assert plan.predicted["size_bytes"] <= budget * MB
    assert plan.solver["status"] == "optimal"          # proven: bound == objective up to float round-off
    assert plan.solver["bound"] == pytest.approx(plan.solver["objective"], rel=1e-9)
    after = state(model)                                              # the model is not mutated
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == grads and not model.training
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"]
    assert sum(plan.meta["layer_bytes"].values()) + plan.meta["base_bytes"] == plan.predicted["size_bytes"]
    fake = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="fake")
    with torch.no_grad():                 # real kernels run bf16 activations: close to fake quant, not equal
        yp, yf = packed(Xte), fake(Xte)
    assert 20 * torch.log10(yf.norm() / (yp - yf).norm()) > 25                      # SQNR floor, dB
    acc = lambda m: (m(Xte).argmax(1) == yte).float().mean().item()   # noqa: E731
    assert min(acc(fake), acc(packed)) > acc(model) - 0.05            # a mid budget keeps accuracy
    plan2 = bitplan.allocate(model, budget_mb=budget, calib_data=batches, sensitivity_opts={"max_probes": 8})
    assert plan2.predicted["size_bytes"] <= budget * MB and plan2.estimator["loss"].startswith("label-free")


def test_option_product_mixes_group_sizes_and_act_bits(digits_mlp):
    """bits x group_size x act_bits: a plan may mix them per layer; bytes stay exact; the options a
    layer cannot take (K=64 has no g128) are masked, not a failure."""
    model, Xtr, *_ = digits_mlp
    budget = (sizes(model, 3) + sizes(model, 8)) / 2
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=[Xtr[:256]], bits=(2, 3, 4, 8),
                            group_size=(None, 32, 128), act_bits=(None, 8),
                            sensitivity_opts={"max_probes": 8})
    opts = [QuantSpec(**o) for o in plan.estimator["options"]]
    assert len(opts) == 4 * 3 * 2
    assert plan.layers["4"].group_size != 128                          # K = 64: g128 is not an option
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"] <= budget * MB
    forced = bitplan.allocate(model, budget_mb=sizes(model, 8) * 1.01, calib_data=[Xtr[:256]], bits=(4, 8),
                              group_size=(None, 32), act_bits=(None, 8),
                              keep={"0": QuantSpec(8, None, True, 8), "2": QuantSpec(4, 32)},
                              sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert forced.layers["0"] == QuantSpec(8, act_bits=8) and forced.layers["2"] == QuantSpec(4, 32)
    fake = bitplan.apply_plan_(copy.deepcopy(model), forced, mode="fake")
    packed = bitplan.apply_plan_(copy.deepcopy(model), forced, mode="packed")
    with torch.no_grad():
        yp, yf = packed(Xtr[:64]), fake(Xtr[:64])
    assert 20 * torch.log10(yf.norm() / (yp - yf).norm()) > 25        # fake models the int8 activations too


def test_more_budget_never_hurts_predicted_loss(digits_mlp):
    model, Xtr, *_ = digits_mlp
    from bitplan.sensitivity import score
    table = score(model, [Xtr[:256]], bits=(2, 4, 8), max_probes=8)
    objs = [bitplan.allocate(model, budget_mb=b, calib_data=[Xtr[:256]], bits=(2, 4, 8), group_size=None,
                             sensitivity_table=table).solver["objective"]
            for b in (sizes(model, 2) * 1.001, (sizes(model, 2) + sizes(model, 8)) / 2, sizes(model, 8))]
    assert objs[0] >= objs[1] >= objs[2] == pytest.approx(table.loss[:, 2].sum())


def test_cached_table_for_other_options_is_refused(digits_mlp):
    model, Xtr, *_ = digits_mlp
    from bitplan.sensitivity import score
    table = score(model, [Xtr[:64]], bits=(2, 4, 8), group_size=32, symmetric=False, max_probes=4, min_probes=4)
    with pytest.raises(ValueError, match="options differ.*w2g32z"):
        bitplan.allocate(model, budget_mb=sizes(model, 8), calib_data=[Xtr[:64]], bits=(2, 4, 8),
                         group_size=None, sensitivity_table=table)


def test_infeasible_budget_states_smallest_and_the_smallest_itself_is_feasible(digits_mlp):
    model, Xtr, *_ = digits_mlp
    small = sizes(model, 2)
    kw = dict(calib_data=[Xtr[:64]], bits=(2, 4), group_size=None, sensitivity_opts={"max_probes": 2, "min_probes": 2})
    with pytest.raises(bitplan.InfeasibleBudgetError, match=f"{small:.6f} MB") as e:
        bitplan.allocate(model, budget_mb=small * 0.9, **kw)
    assert e.value.smallest["size_mb"] == pytest.approx(small)
    plan = bitplan.allocate(model, budget_mb=e.value.smallest["size_mb"], **kw)      # exactly the smallest
    assert set(plan.bits.values()) == {2}


@pytest.mark.parametrize("kwargs, err, match", [
    ({"budget_mb": -1}, ValueError, "budget_mb=-1"),
    ({"budget_mb": 1.0, "bits": (1, 4)}, ValueError, "bits=1"),
    ({"budget_mb": 1.0, "group_size": 0}, ValueError, "group_size=0"),
    ({"budget_mb": 1.0, "group_size": 2 ** 64}, ValueError, "group_size=18446744073709551616"),
    ({"budget_mb": 1.0, "act_bits": 4}, ValueError, "act_bits=4"),
    ({"budget_mb": 1.0, "sensitivity": "nope"}, ValueError, "unknown sensitivity method 'nope'"),
    ({"budget_mb": 1.0, "solver": "nope"}, ValueError, "unknown solver 'nope'"),
    ({}, ValueError, "at least one budget"),
    ({"budget_mb": 1.0, "calib_data": []}, ValueError, "calib_data is empty"),
    ({"budget_mb": 1.0, "keep": ["2"]}, TypeError, "keep=\\['2'\\] must be a dict"),
    ({"budget_mb": 1.0, "keep": {"2": "8"}}, TypeError, "give the bits as an int"),
    ({"budget_mb": 1.0, "keep": {"nope": 8}}, ValueError, "no quantizable layer of that name"),
    ({"budget_mb": 1.0, "keep": {"2": 7}}, ValueError, "not among the options"),
])
def test_bad_arguments_named(digits_mlp, kwargs, err, match):
    model, Xtr, *_ = digits_mlp
    kwargs = {"calib_data": [Xtr[:32]], **kwargs}
    with pytest.raises(err, match=match):
        bitplan.allocate(model, sensitivity_opts={"max_probes": 2, "min_probes": 2}, **kwargs)


@pytest.mark.parametrize("budget", [np.float32, np.int64, np.float64])
def test_numpy_budgets_accepted(digits_mlp, budget):
    model, Xtr, *_ = digits_mlp
    b = budget(np.ceil(sizes(model, 8) * 1e3) / 1e3) if budget is not np.int64 else budget(1)
    plan = bitplan.allocate(model, budget_mb=b, calib_data=[Xtr[:32]], bits=(4, 8), group_size=None,
                            sensitivity_opts={"max_probes": 2, "min_probes": 2})
    assert plan.predicted["size_bytes"] <= float(b) * MB


def test_plan_mismatch_names_layers(digits_mlp):
    model, Xtr, *_ = digits_mlp
    plan = uniform_plan(LayerGraph.build(model), QuantSpec(4), 0)
    other = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    with pytest.raises(bitplan.PlanMismatchError, match="1 plan layer\\(s\\) not in the model: 4") as e:
        bitplan.apply_plan_(other, plan)
    assert e.value.missing == ["4"] and e.value.shape == ["2"]
    with pytest.raises(ValueError, match="mode='int3'"):
        bitplan.apply_plan_(copy.deepcopy(model), plan, mode="int3")
    with pytest.raises(TypeError, match="must be a bitplan.Plan"):
        bitplan.apply_plan_(copy.deepcopy(model), plan.to_dict())
    partial = plan.replace(layers={k: v for k, v in plan.layers.items() if k != "2"})
    with pytest.raises(bitplan.PlanMismatchError, match="not in the plan: 2"):   # same fingerprint or not
        bitplan.apply_plan_(copy.deepcopy(model), partial)


def test_allocate_never_touches_batchnorm_stats_or_global_rng():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).train()
    x = torch.randn(16, 1, 8, 8)
    before = state(model)
    torch.manual_seed(1)
    expect = torch.rand(3)
    torch.manual_seed(1)
    bitplan.allocate(model, budget_mb=1.0, calib_data=[x], bits=(4, 8), group_size=None,
                     sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert torch.equal(torch.rand(3), expect)                         # the global RNG stream is untouched
    assert all(torch.equal(before[k], v) for k, v in state(model).items())   # BN stats, num_batches_tracked
    assert model.training


class TiedLM(torch.nn.Module):
    def __init__(self, vocab=200, d=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.body = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight                          # tied

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_tied_embedding_and_head_are_one_decision_counted_once():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 200, (4, 16))
    g = LayerGraph.build(model, ids)
    assert g.names == ["embed", "body"] and g.layers[0].aliases == ("head",)
    plan = bitplan.allocate(model, budget_mb=0.02, calib_data=[ids], bits=(4, 8), group_size=(None, 32),
                            sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert set(plan.layers) == {"embed", "body"} and plan.layers["embed"].act_bits is None
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"]        # the shared table is stored once
    assert packed.head.codes is packed.embed.codes
    fake = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="fake")
    with torch.no_grad():
        assert torch.allclose(packed(ids), fake(ids), atol=1e-4, rtol=1e-3)
    for bits in (16, 2):
        p = uniform_plan(g, QuantSpec(bits), base_nbytes(model, g.names))
        assert model_nbytes(bitplan.apply_plan_(copy.deepcopy(model), p, mode="packed")) == p.predicted["size_bytes"]


def test_layers_whose_parent_reads_weight_are_left_out_with_a_reason():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32),
                                torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
                                torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 5, 16)
    g = LayerGraph.build(model, x)
    assert g.names == ["0", "2"]
    assert "reads out_proj.weight" in g.skipped["1.self_attn.out_proj"] and "fast path" in g.skipped["1.linear1"]
    plan = bitplan.allocate(model, budget_mb=1.0, calib_data=[x], bits=(4, 8), group_size=None,
                            sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert "1.self_attn.out_proj" in plan.meta["skipped"]
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    with torch.no_grad():
        assert packed(x).shape == (2, 5, 8)
    assert model_nbytes(packed) == plan.predicted["size_bytes"]


@pytest.mark.slow
def test_allocate_minilm(minilm):
    model = minilm.model
    budget = (sizes(model, 4) + sizes(model, 8)) / 2
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=minilm.calib_data[:1],
                            sensitivity_opts={"max_probes": 4, "min_probes": 4})
    assert plan.predicted["size_bytes"] <= budget * MB and len(plan.layers) == 40      # 37 + 3 embeddings
    assert {s.group_size for s in plan.layers.values()} == {None, 128}                # mixed group sizes
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    assert model_nbytes(packed) == plan.predicted["size_bytes"]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(packed(**minilm.eval_data[0]), model(**minilm.eval_data[0]))
    assert cos.mean() > 0.9


def test_allocate_under_latency_budget():
    from bitplan.costmodels.latency import latency_table
    from bitplan.kernels.calibrate import calibrate, measure_fixed_cost
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
    assert "latency" in str(e.value) and "size_bytes" not in str(e.value)     # totals, said once
    with pytest.raises(ValueError, match="latency_fixed='nope'"):
        bitplan.allocate(m, max_latency_ms=budget, latency_fixed="nope", **kw)
    with pytest.raises(ValueError, match="needs latency_profile"):
        bitplan.allocate(m, max_latency_ms=budget, calib_data=[x])


def test_quantizer_methods_are_options_scored_with_the_method_applied(digits_mlp):
    """rtn / gptq / awq per layer: each option scored with the method that will run (GPTQ's options
    come out cheaper), AWQ's stored input scales counted to the byte, fake == packed."""
    model, Xtr, *_ = digits_mlp
    calib = [Xtr[:256], Xtr[256:512]]
    from bitplan.sensitivity import score
    t = score(model, calib, bits=(2, 3), group_size=None, quant_method=("rtn", "gptq", "awq"),
              max_probes=8)
    lab = [o.label for o in t.options]
    for b in (2, 3):
        rtn, gptq, awq = (t.loss[:, lab.index(f"w{b}" + s)] for s in ("", "-gptq", "-awq"))
        assert gptq.sum() < rtn.sum() and awq.sum() <= rtn.sum() * 1.0001
    budget = (sizes(model, 3) + sizes(model, 4)) / 2
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=calib, bits=(2, 3, 4), group_size=None,
                            quant_method=("rtn", "gptq", "awq"),
                            sensitivity_opts={"max_probes": 8})
    assert {s.method for s in plan.layers.values()} - {"rtn"}, plan.layers      # calibrated methods chosen
    with pytest.raises(ValueError, match="calib_data"):
        bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed", calib_data=calib)
    assert model_nbytes(packed) == plan.predicted["size_bytes"] <= budget * MB
    fake = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="fake", calib_data=calib)
    with torch.no_grad():
        yp, yf = packed(Xtr[:64]), fake(Xtr[:64])
    assert 20 * torch.log10(yf.norm() / (yp - yf).norm()) > 25
    awq = QuantSpec(3, None, True, None, "awq")
    p = uniform_plan(LayerGraph.build(model), awq, base_nbytes(model, LayerGraph.build(model).names))
    packed = bitplan.apply_plan_(copy.deepcopy(model), p, mode="packed", calib_data=calib)
    assert model_nbytes(packed) == p.predicted["size_bytes"]                  # + 2 K bytes of input scales


def test_allocate_convex_fits_option_bits_and_records_it(digits_mlp, tmp_path):
    model, Xtr, *_ = digits_mlp
    budget = (sizes(model, 2) + sizes(model, 8)) / 2
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=[Xtr[:128]], bits=(2, 4, 8), group_size=None,
                            solver="convex", sensitivity="measured")
    info = plan.solver["info"]
    assert info["bits"] == [2.0, 4.0, 8.0] and info["bits_source"] == "problem.bits"   # not 0, 1, 2
    assert "solver_fallback" in info and "cvxpy_solver" in info
    assert plan.predicted["size_bytes"] <= budget * MB
    plan.save(tmp_path / "p.json")
    assert bitplan.Plan.load(tmp_path / "p.json").solver["info"] == info
