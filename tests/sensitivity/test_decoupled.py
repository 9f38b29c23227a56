"""decoupled (MixDQ): proportional metrics are detected and merged (no groups split by float noise),
the similarity-structure metric is distinct on L2-normalised outputs, groups reach per-group budgets."""
import numpy as np
import pytest

import bitplan
from bitplan.costmodels import MB
from bitplan.sensitivity import score
from tests.fixtures_models import tiny_embed

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def embed_table():
    model, batches = tiny_embed()
    return score(model, batches, method="decoupled", bits=BITS, metrics=("loss", "sqnr", "cos", "gram"))


def test_proportional_metrics_are_merged_not_split_by_noise(embed_table):
    t = embed_table
    pm = t.meta["per_metric"]
    # on unit-norm outputs with the label-free MSE: NSR = d x MSE, 1 - cos = d/2 x MSE (d = 16)
    np.testing.assert_allclose(pm["sqnr"], 16 * pm["loss"], rtol=1e-3)
    assert t.meta["proportional"] == {"sqnr": "loss", "cos": "loss"}
    assert t.meta["distinct_metrics"] == ["loss", "gram"] and set(t.meta["groups"]) == {"loss", "gram"}
    assert set(t.meta["group"]) <= {"loss", "gram"}
    assert sorted(sum(t.meta["groups"].values(), [])) == sorted(t.names)


def test_gram_metric_is_not_proportional_to_the_loss(embed_table):
    pm = embed_table.meta["per_metric"]
    ratio = pm["gram"].sum(1) / pm["loss"].sum(1)           # (L,) per-layer ratio of the two metrics
    assert ratio.max() / ratio.min() > 1.2, ratio             # (MiniLM: 36x across its layers)


def test_group_budgets_reach_the_solver(tmp_path):
    model, batches = tiny_embed()
    from bitplan.costmodels import model_nbytes
    budget = model_nbytes(model) / MB * 0.3
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=batches, bits=BITS, group_size=None,
                            sensitivity="decoupled", group_budgets="proportional")
    rec = plan.solver["group_budgets"]
    caps, groups = rec["caps_bytes"], rec["groups"]
    assert rec["rule"] == "proportional" and sorted(sum(groups.values(), [])) == sorted(plan.layers)
    net = budget * MB - plan.meta["base_bytes"]
    assert sum(caps.values()) == pytest.approx(net, rel=1e-9)
    for g, names in groups.items():                          # every group within its own cap
        assert sum(plan.meta["layer_bytes"][n] for n in names) <= caps[g] * (1 + 1e-9)
    with pytest.raises(ValueError, match="decoupled"):
        bitplan.allocate(model, budget_mb=budget, calib_data=batches, bits=BITS, group_size=None,
                         sensitivity="measured", group_budgets="proportional")
    with pytest.raises(ValueError, match="group_budgets"):
        bitplan.allocate(model, budget_mb=budget, calib_data=batches, bits=BITS, group_size=None,
                         sensitivity="decoupled", group_budgets="equal")
