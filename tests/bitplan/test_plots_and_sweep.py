"""Plots write real PNGs headlessly; the sweep gives a monotone frontier from one scoring; budget
helpers (--avg-bits, --keep globs, sensitivity cache) behave as documented."""
from __future__ import annotations

import numpy as np
import pytest

from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec, option_grid
from bitplan.options import resolve_options
from bitplan.plan import Plan
from bitplan.sensitivity import Sensitivity
from tests.fixtures_models import tiny

GRID = dict(bits=(2, 3, 4, 8), group_size=None)


def setup():
    model, batches = tiny()
    graph = LayerGraph.build(model, batches[0])
    return model, batches, graph, resolve_options(graph, **GRID)

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    import struct
    data = open(path, "rb").read(24)
    assert data[:8] == PNG
    return struct.unpack(">II", data[16:24])                      # (width, height) pixels


@pytest.fixture(scope="module")
def table():
    from bitplan.scoring import scored_table
    model, batches, graph, opts = setup()
    return scored_table(model, batches, opts, graph, sensitivity_opts={"max_probes": 4, "min_probes": 4},
                        quiet=True)


def test_sweep_frontier_is_monotone_and_plots(table, tmp_path):
    from bitplan.frontier import sweep
    from bitplan.plots import plot_frontier
    model, batches, graph, opts = setup()
    front = sweep(model, batches, table, opts, graph, points=4, quiet=True)
    pts = front["points"]
    assert len(pts) == 4
    assert all(p["size_mb"] <= p["budget_mb"] + 1e-12 for p in pts)
    pred = [p["predicted_loss"] for p in pts]
    assert all(a >= b - 1e-15 for a, b in zip(pred, pred[1:]))    # more bytes never predicted worse
    assert pts[-1]["measured"] < pts[0]["measured"]
    assert [u["bits"] for u in front["uniform"]] == [2, 3, 4, 8]
    w, h = png_size(plot_frontier(front, tmp_path / "f.png"))
    assert w > 600 and h > 300


def test_bits_and_heatmap_plots(table, tmp_path):
    from bitplan.plots import plot_bits, plot_sensitivity
    names = [f"model.layers.{i}.mlp.proj" for i in range(40)]
    plan = Plan("f", {n: QuantSpec([2, 3, 4, 8][i % 4]) for i, n in enumerate(names)}, {"size_bytes": 1e6})
    w, h = png_size(plot_bits(plan, tmp_path / "bits.png"))
    assert w > h > 200
    png_size(plot_sensitivity(table, tmp_path / "heat.png"))
    big = Sensitivity(names, option_grid((2, 4, 8)), np.random.default_rng(0).random((40, 3)), "hessian")
    w, h = png_size(plot_sensitivity(big, tmp_path / "heat40.png"))
    assert h > w


def test_avg_bits_budget_and_keep_globs():
    from bitplan.budgets import avg_bits_budget_mb, resolve_keep
    model, _ = tiny()
    n = sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight"))
    bias = sum(p.numel() for name, p in model.named_parameters() if name.endswith("bias")) * 4
    assert avg_bits_budget_mb(model, 4) == pytest.approx((bias + n * 4 / 8) / 1e6)
    names = ["fc1", "fc2", "fc3", "head"]
    assert resolve_keep(names, ["fc*=4", "fc3=8"]) == {"fc1": 4, "fc2": 4, "fc3": 8}
    for bad in (["nomatch*=8"], ["fc1"], ["fc1=x"]):
        with pytest.raises(ValueError, match="--keep"):
            resolve_keep(names, bad)
    with pytest.raises(ValueError, match="avg_bits"):
        avg_bits_budget_mb(model, 0)


def test_sensitivity_cache_round_trip_and_mismatch(table, tmp_path):
    from bitplan.scoring import scored_table
    model, batches, graph, opts = setup()
    table.save(tmp_path / "s.json")
    again = scored_table(model, batches, opts, graph, cache=tmp_path / "s.json")
    assert np.array_equal(again.loss, table.loss) and again.options == table.options
    with pytest.raises(ValueError, match="options differ"):
        scored_table(model, batches, resolve_options(graph, bits=(4, 8), group_size=None), graph,
                     cache=tmp_path / "s.json")
    with pytest.raises(ValueError, match="not scored: \\['w2g16'"):
        scored_table(model, batches, resolve_options(graph, bits=(2, 3, 4, 8), group_size=16), graph,
                     cache=tmp_path / "s.json")


def test_report_tables(table):
    from bitplan.report import format_plan, format_sensitivity
    model, batches = tiny()
    import bitplan
    plan = bitplan.allocate(model, budget_mb=0.008, calib_data=batches, sensitivity_table=table, **GRID)
    text = format_plan(plan)
    assert "fc1" in text and "average weight bits" in text and "budget 0.008 MB" in text
    assert "most sensitive at w2" in format_sensitivity(table)


def test_import_bitplan_stays_light():
    import subprocess
    import sys
    code = ("import sys, bitplan, bitplan.cli; heavy = [m for m in ('matplotlib', 'tqdm', 'pulp', 'cvxpy', "
            "'transformers', 'torchao', 'safetensors') if m in sys.modules]; print(heavy); assert not heavy")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_block_structured_models_get_grids(tmp_path):
    from bitplan.plots import block_grid, plot_bits, plot_sensitivity
    projs = ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"]
    names = ["model.embed_tokens"] + [f"model.layers.{i}.{p}" for i in range(56) for p in projs]
    blocks, cols, pos, rest = block_grid(names)
    assert len(blocks) == 56 and cols == projs and rest == ["model.embed_tokens"]
    assert pos["model.layers.3.mlp.up_proj"] == (3, 2)
    opts = option_grid((2, 4, 8), (None, 128))
    plan = Plan("f", {n: opts[i % len(opts)] for i, n in enumerate(names)}, {"size_bytes": 1e6})
    w, h = png_size(plot_bits(plan, tmp_path / "bits.png"))
    assert 400 < w < 2600 and 400 < h < 2600                        # not a 2,871-px strip
    t = Sensitivity(names, opts, np.random.default_rng(0).random((len(names), len(opts))), "hessian")
    w, h = png_size(plot_sensitivity(t, tmp_path / "sens.png"))
    assert w < 3000 and h < 2600
    assert block_grid(["fc1", "fc2", "head"]) is None
