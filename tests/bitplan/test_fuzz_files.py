"""Fuzzed files are refused at load with a ValueError, or they load AND work.

For each file type bitplan reads (plan, sensitivity table, packed-folder manifest, safetensors shard
index; the latency profile has its own in tests/kernels), hypothesis mutates a valid file — values replaced by other
JSON values (wrong types, huge / negative / fractional numbers, NaN-free but absurd), keys dropped or
added, lists truncated — and also feeds raw byte garbage. Loading must raise ``ValueError`` (naming
the file) or succeed; what loads must then apply (plans), solve (tables) or load its folder without
any other exception.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitplan
from bitplan.assemble import make_plan
from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec
from bitplan.costmodels import base_nbytes
from bitplan.plan import Plan
from tests.fixtures_models import tiny

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                        st.floats(allow_nan=False, allow_infinity=False, width=64), st.text(max_size=8),
                        st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 32, 64, 1.0, 2.0, "4", "true", 1e308]))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), c, max_size=3)),
                          max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path) to a value inside a JSON object."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: dict):
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add", "truncate"]))
        key = path[-1]
        if op == "replace":
            parent[key] = draw(json_value)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(json_value)
        elif op == "truncate" and isinstance(parent[key], (list, str)):
            parent[key] = parent[key][:draw(st.integers(0, max(0, len(parent[key]) - 1)))]
    return d


@pytest.fixture(scope="module")
def world():
    model, batches = tiny()
    g = LayerGraph.build(model, batches[0])
    specs = {"fc1": QuantSpec(4, 32), "fc2": QuantSpec(8, act_bits=8), "fc3": QuantSpec(2), "head": QuantSpec(16)}
    plan = make_plan(g, specs, base_nbytes(model, g.names), budgets={"size_bytes": 1e5},
                     estimator={"name": "hessian"}, solver={"name": "ilp", "status": "optimal"})
    from bitplan.sensitivity import score
    table = score(model, batches[:1], bits=(2, 4, 8), group_size=(None, 32), max_probes=2, min_probes=2)
    return model, batches, plan, table


def _write(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@SETTINGS
@given(data=st.data())
def test_fuzzed_plans_are_refused_or_apply(world, tmp_path_factory, data):
    model, batches, plan, _ = world
    d = data.draw(mutated(plan.to_dict()))
    path = _write(tmp_path_factory.mktemp("p"), "plan.json", d)
    try:
        loaded = Plan.load(path)
    except ValueError as e:
        assert path in str(e)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = bitplan.apply_plan_(copy.deepcopy(model), loaded, mode="fake")
            with torch.no_grad():
                m(batches[0])
    except bitplan.PlanMismatchError:
        return
    from bitplan.report import format_plan
    format_plan(loaded)
    loaded.save(path)                                           # what loads can be saved again
    assert Plan.load(path) == loaded


@SETTINGS
@given(data=st.data())
def test_fuzzed_sensitivity_tables_are_refused_or_solve(world, tmp_path_factory, data):
    model, batches, _, table = world
    from bitplan.sensitivity import load
    d = data.draw(mutated(table.to_dict()))
    path = _write(tmp_path_factory.mktemp("s"), "sens.json", d)
    try:
        loaded = load(path)
    except ValueError as e:
        assert path in str(e)
        return
    try:
        plan = bitplan.allocate(model, budget_mb=1.0, calib_data=batches[:1], bits=(2, 4, 8), group_size=(None, 32),
                                sensitivity_table=loaded)
    except ValueError as e:            # another model / other options: refused with the difference named
        assert "does not match" in str(e) or "option" in str(e), e
        return
    assert plan.predicted["size_bytes"] <= 1e6


@SETTINGS
@given(data=st.data())
def test_fuzzed_manifests_are_refused_or_load(world, tmp_path_factory, data):
    model, batches, plan, _ = world
    from bitplan.packed_io import MANIFEST_FILE, load_packed, read_manifest, save_packed
    folder = tmp_path_factory.mktemp("m") / "packed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        manifest = save_packed(model, plan, folder)
    d = data.draw(mutated(manifest))
    (folder / MANIFEST_FILE).write_text(json.dumps(d))
    try:
        read_manifest(folder)
    except ValueError as e:
        assert str(folder) in str(e)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = load_packed(folder, tiny)
    except ValueError:
        return
    with torch.no_grad():
        m(batches[0])


@pytest.fixture(scope="module")
def sharded_folder(world, tmp_path_factory):
    """The world's plan saved as a 2-shard folder: (folder, index)."""
    from bitplan.packed_io import save_packed
    from tests.bitplan.test_packed_io import to_sharded
    model, _, plan, _ = world
    folder = tmp_path_factory.mktemp("sharded") / "packed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        save_packed(model, plan, folder)
    return folder, to_sharded(folder, 2)


SHARD_NAMES = st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                               "model-00003-of-00002.safetensors", "model-00001-of-00001.safetensors",
                               "../model-00001-of-00002.safetensors", "/tmp/model-00001-of-00002.safetensors",
                               "model-00001-of-00002.safetensors/", "bitplan_packed.json", "", ".", ".."])


@SETTINGS
@given(data=st.data())
def test_fuzzed_shard_indexes_are_refused_or_load(world, sharded_folder, tmp_path_factory, data):
    from bitplan.packed_io import INDEX_FILE, load_packed
    _, batches, _, _ = world
    base, index = sharded_folder
    folder = tmp_path_factory.mktemp("i") / "packed"
    shutil.copytree(base, folder)
    d = data.draw(mutated(index))
    wmap = d.get("weight_map")
    if isinstance(wmap, dict) and wmap and data.draw(st.booleans()):     # a shard name: other, odd or a path
        wmap[data.draw(st.sampled_from(sorted(wmap)))] = data.draw(SHARD_NAMES)
    (folder / INDEX_FILE).write_text(json.dumps(d))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = load_packed(folder, tiny)
    except ValueError as e:
        assert str(folder) in str(e)
        return
    assert d == index                        # only the unchanged index loads
    with torch.no_grad():
        m(batches[0])


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_raw_garbage_is_a_value_error_naming_the_file(tmp_path_factory, raw):
    from bitplan.packed_io import read_manifest
    from bitplan.sensitivity import load
    d = tmp_path_factory.mktemp("g")
    for name, fn in (("plan.json", Plan.load), ("sens.json", load)):
        (d / name).write_bytes(raw)
        with pytest.raises(ValueError, match=str(d / name).replace("\\", "\\\\")):
            fn(d / name)
    (d / "bitplan_packed.json").write_bytes(raw)
    with pytest.raises(ValueError):
        read_manifest(d)


def test_truncations_of_a_real_plan(world, tmp_path):
    _, _, plan, _ = world
    text = plan.to_json()
    for cut in range(0, len(text), max(1, len(text) // 60)):
        path = _write(tmp_path, "t.json", text[:cut])
        with pytest.raises(ValueError):
            Plan.load(path)
    assert os.path.exists(path)
