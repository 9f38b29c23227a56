"""`bitplan show` tables: per-layer bytes come from the plan's own size model, so the rows plus the
non-quantized bytes add up to the predicted size exactly — also for GPT-2's Conv1D (weight stored
(in, out)), whose rows show the (out, in) matrix that is quantized."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bitplan
from bitplan.costmodels import model_nbytes
from bitplan.core.graph import find_layers
from bitplan.plan import Plan
from bitplan.report import format_plan, layer_nk, layer_rows


@pytest.fixture(scope="module")
def gpt2_plan():
    pytest.importorskip("transformers")
    from tests.fixtures_hf import logits_loss, tiny_causal_lm
    model, batches = tiny_causal_lm("gpt2")
    plan = bitplan.allocate(model, budget_mb=model_nbytes(model) * 0.4 / 1e6, calib_data=batches,
                            loss_fn=logits_loss, bits=(2, 4, 8), group_size=None, sensitivity="zd")
    return model, plan      # per-channel scales: bytes differ between (out, in) and (in, out)


def test_layer_nk():
    assert layer_nk([64, 256], "hf_conv1d") == (256, 64)
    assert layer_nk([64, 256], "linear") == layer_nk([64, 256]) == (64, 256)
    assert layer_nk([8, 4, 3, 3], "conv2d") == (8, 36)
    with pytest.raises(ValueError, match="2 dimensions"):
        layer_nk([5])


def test_gpt2_rows_add_up_to_predicted_size(gpt2_plan):
    model, plan = gpt2_plan
    rows = layer_rows(plan)
    kinds = {l.name: l for l in find_layers(model)}
    assert any(r["kind"] == "hf_conv1d" for r in rows)
    for r in rows:                                      # (out, in) of the quantized matrix, not the stored shape
        assert r["nk"] == (kinds[r["name"]].out_features, kinds[r["name"]].in_features), r["name"]
    assert sum(r["bytes"] for r in rows) + plan.meta["base_bytes"] == plan.predicted["size_bytes"]
    text = format_plan(plan)
    assert "(= predicted size)" in text and "not recorded" not in text
    c_fc = next(r for r in rows if r["name"].endswith("h.0.mlp.c_fc"))
    assert f"{c_fc['nk'][0]}x{c_fc['nk'][1]}" == "256x64"          # out x in; stored as 64 x 256


def test_gpt2_rows_equal_packed_layer_bytes(gpt2_plan):
    """Each row's bytes are the bytes its packed module really holds (its bias excluded)."""
    model, plan = gpt2_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # reference-path notices for small layers
        q = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    for r in layer_rows(plan):
        m = q.get_submodule(r["name"])
        bias = getattr(m, "bias", None)
        assert model_nbytes(m) - (bias.numel() * bias.element_size() if bias is not None else 0) == r["bytes"], \
            r["name"]


def test_plan_without_kinds_says_so(gpt2_plan):
    _, plan = gpt2_plan
    meta = {k: v for k, v in plan.meta.items() if k not in ("layer_kinds", "layer_bytes")}
    old = Plan(plan.model_fingerprint, plan.layers, plan.predicted, plan.budgets, plan.estimator, plan.solver,
               meta)
    text = format_plan(old)
    assert "layer kinds not recorded" in text
    assert "differs by" in text             # per-channel bytes of a transposed view are not the plan's


def test_linear_and_conv_rows_add_up():
    from tests.fixtures_models import tiny_cnn
    model, batches = tiny_cnn()
    plan = bitplan.allocate(model, budget_mb=model_nbytes(model) * 0.5 / 1e6, calib_data=batches,
                            bits=(2, 4, 8), sensitivity="zd")
    rows = layer_rows(plan)
    assert {r["kind"] for r in rows} >= {"conv2d", "linear"}
    assert sum(r["bytes"] for r in rows) + plan.meta["base_bytes"] == plan.predicted["size_bytes"]
    assert torch.is_tensor(batches[0])


def test_recorded_layer_bytes_are_used(gpt2_plan):
    """A plan that records ``meta["layer_bytes"]`` (made on another device) shows those bytes."""
    _, plan = gpt2_plan
    per = {r["name"]: r["bytes"] + 2 for r in layer_rows(plan)}
    rec = Plan(plan.model_fingerprint, plan.layers, {"size_bytes": plan.predicted["size_bytes"] + 2 * len(per)},
               plan.budgets, plan.estimator, plan.solver, {**plan.meta, "layer_bytes": per})
    assert [r["bytes"] for r in layer_rows(rec)] == list(per.values())
    assert "(= predicted size)" in format_plan(rec)
