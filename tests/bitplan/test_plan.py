"""Plan JSON: round trip, atomic save, strict load with clear errors."""
import json
import os

import pytest

from bitplan.plan import LayerPlan, Plan


def make_plan():
    return Plan("abc123", {"fc1": LayerPlan(4, 32, False), "fc2": LayerPlan(8), "head": LayerPlan(16)},
                {"size_bytes": 1234.0}, {"size_bytes": 2000.0}, {"name": "hessian", "probes": 8},
                {"name": "ilp", "status": "optimal", "objective": 0.5, "bound": 0.5, "seconds": 0.1},
                {"layer_shapes": {"fc1": [8, 64]}})


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
    (lambda d: d.update(schema_version=2), "schema_version=2"),
    (lambda d: d.pop("layers"), "missing: \\['layers'\\]"),
    (lambda d: d.update(extra=1), "unknown: \\['extra'\\]"),
    (lambda d: d["layers"]["fc1"].update(bits="4"), "bits='4'"),
    (lambda d: d["layers"]["fc1"].update(bits=5.0), "bits=5.0"),
    (lambda d: d["layers"]["fc1"].update(bits=1), "bits=1"),
    (lambda d: d["layers"]["fc1"].pop("symmetric"), "missing \\['symmetric'\\]"),
    (lambda d: d["predicted"].update(size_bytes="big"), "size_bytes"),
    (lambda d: d.update(model_fingerprint=3), "model_fingerprint"),
])
def test_strict_load_errors(tmp_path, mutate, match):
    d = make_plan().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


def test_corrupted_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(make_plan().to_json()[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(path)


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
