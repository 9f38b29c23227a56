"""Plan JSON: round trip, atomic save, strict load with clear errors."""
import json
import os

import pytest

from bitplan.core.spec import QuantSpec as LayerPlan
from bitplan.plan import Plan


def make_plan():
    return Plan("abc123", {"fc1": LayerPlan(4, 32, False), "fc2": LayerPlan(8, act_bits=8), "head": LayerPlan(16)},
                {"size_bytes": 1234.0}, {"size_bytes": 2000.0}, {"name": "hessian", "probes": 8},
                {"name": "ilp", "status": "optimal", "objective": 0.5, "bound": 0.5, "seconds": 0.1},
                {"layer_shapes": {"fc1": [8, 64], "fc2": [8, 8], "head": [2, 8]},
                 "layer_kinds": {"fc1": "linear", "fc2": "linear", "head": "linear"}})


def test_round_trip(tmp_path):
    p = make_plan()
    path = tmp_path / "plan.json"
    p.save(path)
    q = Plan.load(path)
    assert q == p and q.bits == {"fc1": 4, "fc2": 8, "head": 16}
    text = path.read_text()
    assert text == p.to_json() + "\n"
    assert list(json.loads(text)) == sorted(json.loads(text))        # keys sorted
    assert os.listdir(tmp_path) == ["plan.json"]                     # no temp file left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    make_plan().save(path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        Plan("x", {"a": LayerPlan(2)}).save(path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["plan.json"]


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(schema_version=3), "schema_version = 3 must be one of the versions"),
    (lambda d: d.update(schema_version=2.0), "schema_version = 2.0"),
    (lambda d: d.update(schema_version=True), "schema_version = True"),
    (lambda d: d.pop("layers"), "missing field\\(s\\) \\['layers'\\]"),
    (lambda d: d.update(extra=1), "unknown field\\(s\\) \\['extra'\\]"),
    (lambda d: d["layers"]["fc1"].update(bits="4"), "bits='4'"),
    (lambda d: d["layers"]["fc1"].update(bits=5.0), "bits=5.0"),
    (lambda d: d["layers"]["fc1"].update(bits=1), "bits=1"),
    (lambda d: d["layers"]["fc1"].update(group_size=2 ** 64), "integer 18446744073709551616 is too large"),
    (lambda d: d["layers"]["fc1"].update(group_size=2 ** 40), "group_size=1099511627776"),
    (lambda d: d["layers"]["fc1"].update(group_size=48), "does not divide the layer.s input dimension K=64"),
    (lambda d: d["layers"]["fc1"].update(symmetric="false"), "symmetric='false'"),
    (lambda d: d["layers"]["fc1"].pop("symmetric"), "missing \\['symmetric'\\]"),
    (lambda d: d["layers"]["fc1"].update(method="x" * 40), "method="),
    (lambda d: d["predicted"].update(size_bytes="big"), "size_bytes"),
    (lambda d: d["predicted"].update(size_bytes=-1), "size_bytes"),
    (lambda d: d.update(model_fingerprint=3), "model_fingerprint"),
    (lambda d: d["meta"]["layer_shapes"].update(fc1="8x64"), "layer_shapes"),
    (lambda d: d["meta"]["layer_shapes"].update(fc1=[0, 64]), "layer_shapes"),
    (lambda d: d["meta"]["layer_shapes"].pop("fc2"), "layer_shapes must cover exactly"),
    (lambda d: d["meta"].update(surprise=1), "unknown field"),
    (lambda d: d["meta"].update(layer_kinds={"fc1": "rnn", "fc2": "linear", "head": "linear"}), "rnn"),
])
def test_strict_load_errors(tmp_path, mutate, match):
    d = make_plan().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


@pytest.mark.parametrize("text, match", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "NaN is not a number"),
    ('{"a": Infinity}', "Infinity"),
    ('{"a": 1e400}', "overflows"),
    ('{"a": ' + "1" * 400 + '}', "too large"),
    ("[" * 100000 + "]" * 100000, "nested deeper"),
])
def test_strict_json(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        Plan.load(path)
    assert str(path) in str(e.value)


def test_corrupted_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(make_plan().to_json()[:-20])
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"{path}: not a bitplan plan: not UTF-8"):
        Plan.load(path)


def test_version_1_plans_are_read(tmp_path):
    v1 = {"schema_version": 1, "model_fingerprint": "f", "budgets": {}, "predicted": {}, "estimator": {},
          "solver": {}, "meta": {"layer_order": ["b", "a"]},
          "layers": {"a": {"bits": 4, "group_size": 32, "symmetric": True, "kernel": "int4_wo"},
                     "b": {"bits": 8, "group_size": None, "symmetric": True, "act_bits": 8}}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    p = Plan.load(tmp_path / "v1.json")
    assert list(p.layers) == ["b", "a"] and p.layers["b"] == LayerPlan(8, act_bits=8)
    assert p.kernels == {"a": "int4_wo"} and p.schema_version == 2


def test_network_order_survives_sorted_json(tmp_path):
    names = [f"layer.{i}.fc" for i in (0, 2, 10, 1)]
    p = Plan("f", {n: LayerPlan(4) for n in names})
    p.save(tmp_path / "p.json")
    assert list(Plan.load(tmp_path / "p.json").layers) == names
    d = p.to_dict()
    d["meta"]["layer_order"] = names[:-1]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="layer_order"):
        Plan.load(tmp_path / "bad.json")
