"""save_packed / load_packed: the folder loads back with one call and computes exactly the same."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import bitplan
from bitplan.costmodels import model_nbytes
from bitplan.kernels.formats import QuantSpec
from bitplan.packed_io import MANIFEST_FILE, load_packed, read_manifest, save_packed
from bitplan.plan import Plan
from tests.fixtures_models import tiny, tiny_cnn


def mixed_plan(model, bits):
    from bitplan.demo import uniform_plan
    from bitplan.core.graph import LayerGraph
    g = LayerGraph.build(model)
    base = uniform_plan(g, 8)
    layers = {n: QuantSpec(b, 32 if b == 4 else None) for n, b in zip(base.layers, bits)}
    return Plan(base.model_fingerprint, layers, {}, meta=base.meta)


@pytest.mark.parametrize("factory, bits", [(tiny, (2, 3, 4, 8)), (tiny_cnn, (4, 8, 16))])
def test_round_trip_is_exact(factory, bits, tmp_path):
    model, batches = factory()
    plan = mixed_plan(model, bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # conv layers run the dequant path
        manifest = save_packed(model, plan, tmp_path / "m", model_spec=f"tests.fixtures_models:{factory.__name__}")
        ref = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
        for src in (None, factory, f"tests.fixtures_models:{factory.__name__}", factory()[0]):
            loaded = load_packed(tmp_path / "m", src)
            with torch.no_grad():
                for b in batches:
                    assert torch.equal(loaded(b), ref(b))
    assert manifest["size_bytes"] == model_nbytes(ref) == model_nbytes(loaded)
    assert Plan.load(tmp_path / "m" / "plan.json").bits == plan.bits
    assert all(s.kernel for s in loaded.bitplan_plan.layers.values())      # kernels recorded


def test_fp_model_is_not_modified_and_packed_model_is_saved_as_is(tmp_path):
    model, batches = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = mixed_plan(model, (4, 4, 8, 8))
    save_packed(model, plan, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    save_packed(packed, plan, tmp_path / "b")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_folders_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a bitplan packed model folder"):
        load_packed(tmp_path, tiny)
    model, _ = tiny()
    save_packed(model, mixed_plan(model, (8, 8, 8, 8)), tmp_path / "m")
    with pytest.raises(ValueError, match="records no model_spec"):
        load_packed(tmp_path / "m")
    with pytest.raises(bitplan.PlanMismatchError):
        load_packed(tmp_path / "m", tiny_cnn)                    # another architecture
    man = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    (tmp_path / "m" / MANIFEST_FILE).write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_manifest(tmp_path / "m")
