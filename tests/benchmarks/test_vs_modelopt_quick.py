"""Smoke test of the ModelOpt side-by-side (issue 15): ``benchmarks/vs_modelopt.py --quick``.

Runs the script as CI would (subprocess, tiny random BERT stand-in) and checks properties, not
numbers: the results file is written with provenance, every bitplan configuration has a plan at
every budget whose REAL packed bytes equal the cost model's prediction and stay within the target,
and the calibration cost of every method is reported. Without ModelOpt installed (CI) the script
must say so and fall back to nominal targets; with it, a second test checks ModelOpt's side too.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_modelopt.py")
METHODS = ["rtn", "awq", "gptq", "awq_gptq"]
BITPLAN = ["bitplan_rtn", "bitplan_awq", "bitplan_gptq", "bitplan_awq_gptq", "bitplan_methods", "bitplan_full_grid"]


def run(tmp_path, *extra):
    out = tmp_path / "vs_modelopt.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def check_bitplan_side(res, budgets):
    assert res["quick"] is True and res["threads"] == 1
    assert res["commit"]["sha"] and "vs_modelopt.py" in res["command"] and len(res["loadavg_start"]) == 3
    for b in budgets:
        target = res["targets"][str(b)]
        for label in BITPLAN:
            rows = [r for r in res["rows"] if r["label"] == label and r["budget_bits"] == b]
            assert len(rows) == 1, (label, b)
            r = rows[0]
            assert r["bytes"] == r["predicted_bytes"], r          # real packed bytes == size model
            assert r["bytes"] <= target, (label, b, r["bytes"], target)
            assert 0.0 < r["cosine"] <= 1.0 + 1e-6
            assert sum(r["layers"].values()) == len(res["setup"]["quantizable_layers"])
    assert res["targets"][str(budgets[0])] <= res["targets"][str(budgets[-1])]
    for fmt in ("w4g128", "w8ch"):
        for m in METHODS:
            c = res["calibration_cost"][fmt][m]
            assert len(c["layers"]) == len(res["setup"]["quantizable_layers"])
            assert c["time_s_total"] >= c["time_s_max_layer"] >= 0


def test_quick_without_modelopt(tmp_path):
    res, stdout = run(tmp_path, "--no-modelopt", "--budgets", "4.5,6.0")
    assert res["modelopt"]["source"] == "nominal" and res["modelopt"]["runs"] == {}
    assert "ModelOpt not run" in stdout
    check_bitplan_side(res, [4.5, 6.0])


def test_quick_with_modelopt(tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    res, _ = run(tmp_path, "--budgets", "5.0")
    assert res["modelopt"]["source"] == "modelopt"
    check_bitplan_side(res, [5.0])
    mo = [r for r in res["rows"] if r["label"].startswith("modelopt_") and "alloc" not in r["label"]]
    assert {r["label"] for r in mo} == {"modelopt_awq", "modelopt_max"}
    assert res["targets"]["5.0"] == min(r["bytes"] for r in mo)     # bitplan gets the smaller ModelOpt size
    for r in mo:
        assert r["bytes"] == r["predicted_bytes"]
        run_ = res["modelopt"]["runs"][f"5.0/{r['label'].split('_')[1]}"]
        assert run_["effective_bits_chosen"] <= 5.0 + 1e-6
        assert set(run_["choices"]) == set(res["setup"]["quantizable_layers"])
