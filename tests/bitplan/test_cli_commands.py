"""Every CLI command through a real subprocess on the tiny model: exit 0 and the files it promises;
wrong arguments exit 2 with a message naming the argument.

One module-scoped workspace scores the tiny model once (``plan`` writes the sensitivity cache); the
other commands reuse that cache so the whole file stays a few subprocess starts long.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "tests.fixtures_models:tiny"


def run(*args, cwd=ROOT, timeout=240):
    """``python -m bitplan ARGS`` from the repo root (so ``tests.fixtures_models`` imports)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}      # one thread: on a shared, oversubscribed box 2 spinning threads are 10-70x slower
    return subprocess.run([sys.executable, "-m", "bitplan", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Workspace after `bitplan plan` (scores once, writes plan.json + sens.json + plots)."""
    d = tmp_path_factory.mktemp("cli")
    p = ok(run("plan", "--model", TINY, "--avg-bits", "5", "--max-probes", "4", "--keep", "head=8",
               "--sensitivity-cache", d / "sens.json", "--plot-dir", d / "plots", "--quiet",
               "--out", d / "plan.json"))
    assert "wrote" in p.stdout and "tqdm" not in p.stderr
    return d


def test_plan_writes_plan_cache_and_plots(work):
    from bitplan import Plan
    from bitplan.sensitivity import load
    plan = Plan.load(work / "plan.json")
    assert plan.bits["head"] == 8                                   # --keep head=8
    assert plan.predicted["size_bytes"] <= plan.budgets["size_bytes"]
    assert load(work / "sens.json").names == list(plan.layers)
    assert is_png(work / "plots" / "bits.png") and is_png(work / "plots" / "sensitivity.png")


def test_plan_resolves_from_cache_without_rescoring(work):
    before = os.path.getmtime(work / "sens.json")
    p = ok(run("plan", "--model", TINY, "--budget-mb", "0.0075", "--sensitivity-cache", work / "sens.json",
               "--keep", "fc*=4", "--out", work / "plan_small.json"))
    assert "loaded sensitivity table" in p.stderr and "scoring hessian" not in p.stderr
    assert os.path.getmtime(work / "sens.json") == before
    plan = json.loads((work / "plan_small.json").read_text())
    assert {plan["layers"][n]["bits"] for n in ("fc1", "fc2", "fc3")} == {4}
    assert plan["predicted"]["size_bytes"] <= 7500


def test_show_plan_and_sensitivity(work):
    p = ok(run("show", work / "plan.json", "--plot", work / "show_bits.png"))
    for word in ("fc1", "head", "average weight bits", "predicted size_bytes", "solver: ilp"):
        assert word in p.stdout
    assert is_png(work / "show_bits.png")
    p = ok(run("show", work / "sens.json", "--plot", work / "heat.png"))
    assert "w8" in p.stdout and "most sensitive" in p.stdout
    assert is_png(work / "heat.png")


def test_apply_writes_folder_that_loads_back(work):
    import torch

    from bitplan import Plan, apply_plan_
    from bitplan.packed_io import load_packed
    from tests.fixtures_models import tiny
    ok(run("apply", "--model", TINY, "--plan", work / "plan.json", "--out", work / "packed"))
    assert sorted(os.listdir(work / "packed")) == ["bitplan_packed.json", "model.safetensors", "plan.json"]
    model, batches = tiny()
    with pytest.raises(ValueError, match="pass the model factory"):      # a folder never names code
        load_packed(work / "packed")
    loaded = load_packed(work / "packed", tiny)
    ref = apply_plan_(model, Plan.load(work / "plan.json"), mode="packed")
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]), ref(batches[0]))


def test_frontier_writes_png_and_json(work):
    p = ok(run("frontier", "--model", TINY, "--points", "3", "--sensitivity-cache", work / "sens.json",
               "--out", work / "front.png"))
    assert "loaded sensitivity table" in p.stderr
    front = json.loads((work / "front.json").read_text())
    sizes = [q["size_mb"] for q in front["points"]]
    assert len(sizes) == 3 and sizes == sorted(sizes)
    assert all(q["measured"] is not None for q in front["points"])
    assert [u["bits"] for u in front["uniform"]] == [2, 3, 4, 5, 6, 8]
    assert is_png(work / "front.png")


def test_plan_mixes_group_sizes_and_w8a8_options(work):
    from bitplan import Plan
    ok(run("plan", "--model", TINY, "--avg-bits", "5", "--bits", "2,4,8", "--group-size", "channel,32",
           "--act-bits", "none,8", "--max-probes", "4", "--quiet", "--out", work / "mixed.json"))
    plan = Plan.load(work / "mixed.json")
    assert len(plan.estimator["options"]) == 3 * 2 * 2
    p = ok(run("show", work / "mixed.json"))
    assert "kernel" in p.stdout and "predicted size_bytes" in p.stdout
    p = run("plan", "--model", TINY, "--avg-bits", "5", "--group-size", "channel,abc", "--out", work / "x.json")
    assert p.returncode == 2 and "--group-size" in p.stderr


def test_export_torchao_and_hf(work):
    ok(run("export", work / "plan.json", "--to", "torchao", "--out", work / "torchao.json"))
    d = json.loads((work / "torchao.json").read_text())
    assert d["_type"] == "FqnToConfig"
    assert set(d["_data"]["fqn_to_config"]) == {"fc1.weight", "fc2.weight", "fc3.weight", "head.weight"}
    ok(run("export", work / "plan.json", "--to", "hf", "--out", work / "hf.json"))
    hf = json.loads((work / "hf.json").read_text())
    assert hf["quant_method"] == "torchao" and hf["quant_type"]["default"] == d


def test_calibrate_writes_profile_that_plan_uses(work):
    p = ok(run("calibrate", "--model", TINY, "--tokens", "1,8", "--reps", "3",
               "--max-seconds", "0.02", "--quiet", "--out", work / "prof.json"))
    from bitplan.kernels.profile import LatencyProfile
    prof = LatencyProfile.load(work / "prof.json")
    assert {n for (_, n, _, _) in prof.entries} == {64, 16}            # the tiny model's N values
    assert {o.split("@")[0] for o in prof.options} >= {"w2", "w3", "w4", "w8"}
    assert list(prof.fixed) == [TINY] and prof.fixed[TINY]["method"] == "anchored"     # the default
    anchor = prof.meta["anchor"]
    assert anchor["scale"] > 0 and {r["plan"] for r in anchor["anchors"]} >= {"fp32", "w4", "w8"}
    # the printed feasible range (fastest .. slowest plan): a budget at its top is always feasible
    m = re.search(r"feasible latency on this device: ([0-9.e+-]+) ms \(fastest plan\) to ([0-9.e+-]+) ms", p.stdout)
    lo, hi = float(m.group(1)), float(m.group(2))
    assert 0 < lo <= hi
    ok(run("plan", "--model", TINY, "--avg-bits", "6", "--max-latency-ms", f"{hi * 1.001:.6f}", "--profile",
           work / "prof.json", "--sensitivity-cache", work / "sens.json", "--out", work / "lat.json"))
    plan = json.loads((work / "lat.json").read_text())
    assert lo * 0.999 <= plan["predicted"]["latency_ms"] <= hi * 1.001
    assert plan["predicted"]["latency_fixed_ms"] == prof.fixed[TINY]["median_ms"]


def test_calibrate_in_model_profile_drives_a_latency_plan(work):
    ok(run("calibrate", "--model", TINY, "--in-model", "--reps", "3", "--clock", "cpu", "--quiet",
           "--out", work / "inm.json"))
    from bitplan.kernels.profile import LatencyProfile
    prof = LatencyProfile.load(work / "inm.json")
    assert list(prof.fixed) == [TINY] and prof.entries and prof.meta["anchor"]["clock"] == "cpu"
    assert prof.device["threads"] == 1                       # --clock cpu times one thread
    budget = 2 * sum(e["median_ms"] for e in prof.entries.values()) + prof.fixed[TINY]["median_ms"]
    ok(run("plan", "--model", TINY, "--avg-bits", "6", "--max-latency-ms", f"{budget:.6f}", "--profile",
           work / "inm.json", "--sensitivity-cache", work / "sens.json", "--out", work / "inm_plan.json"))
    plan = json.loads((work / "inm_plan.json").read_text())
    assert plan["predicted"]["latency_ms"] <= budget * (1 + 1e-9)
    assert plan["predicted"]["latency_fixed_ms"] == prof.fixed[TINY]["median_ms"]


def test_demo_on_a_model_spec(tmp_path):
    p = ok(run("demo", "--model", TINY, "--max-probes", "2", "--quiet", "--out", tmp_path / "demo.json"))
    assert "uniform int8" in p.stdout and "bitplan" in p.stdout
    assert (tmp_path / "demo.json").exists()


def test_console_script_help():
    exe = shutil.which("bitplan")
    if exe is None:
        pytest.skip("the `bitplan` console script is not on PATH (package not installed)")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for cmd in ("plan", "calibrate", "apply", "frontier", "show", "export", "demo"):
        assert cmd in p.stdout


def test_every_option_has_help_with_units():
    """--help explains every option (in-process: argparse only)."""
    from bitplan.cli import build_parser
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert set(sub) == {"plan", "calibrate", "apply", "frontier", "show", "export", "eval", "demo"}
    for name, sp in sub.items():
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = sub["plan"].format_help()
    for unit in ("MB (10**6 bytes)", "milliseconds", "bits per quantized weight", "MACs"):
        assert unit in text


@pytest.mark.parametrize("args, named", [
    (["plan", "--model", TINY, "--budget-mb", "-3", "--out", "x.json"], "--budget-mb"),
    (["plan", "--model", TINY, "--budget-mb", "1", "--avg-bits", "4", "--out", "x.json"], "--avg-bits"),
    (["plan", "--model", TINY, "--out", "x.json"], "--budget-mb"),
    (["plan", "--model", TINY, "--budget-mb", "1", "--bits", "2,x", "--out", "x.json"], "--bits"),
    (["plan", "--model", TINY, "--budget-mb", "1", "--keep", "fc1", "--out", "x.json"], "--keep"),
    (["plan", "--model", TINY, "--max-latency-ms", "3", "--out", "x.json"], "--profile"),
    (["plan", "--budget-mb", "1", "--out", "x.json"], "--model"),
    (["apply", "--model", TINY, "--plan", "missing.json", "--out", "d"], "--plan"),
    (["export", "missing.json", "--to", "torchao", "--out", "x.json"], "PLAN"),
    (["export", os.path.join(ROOT, "pyproject.toml"), "--to", "onnx", "--out", "x.json"], "--to"),
    (["frontier", "--model", TINY, "--points", "0", "--out", "f"], "--points"),
    (["calibrate", "--model", TINY, "--device", "tpu", "--out", "p.json"], "--device"),
    (["nonsense"], "command"),
])
def test_wrong_arguments_exit_2_naming_the_argument(args, named, tmp_path):
    p = run(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert named.lower() in p.stderr.lower(), p.stderr


def test_infeasible_budget_exits_2_with_the_smallest_size(work):
    p = run("plan", "--model", TINY, "--budget-mb", "0.0065", "--keep", "fc*=4", "--sensitivity-cache",
            work / "sens.json", "--out", work / "never.json")
    assert p.returncode == 2 and "--budget-mb 0.0065" in p.stderr and "smallest feasible" in p.stderr
    assert not (work / "never.json").exists()


@pytest.mark.parametrize("extra, named", [
    (["--solver", "nope"], "--solver"),
    (["--sensitivity", "nope"], "--sensitivity"),
    (["--keep", "zz*=8"], "--keep"),
    (["--keep", "fc1=7"], "--keep"),
])
def test_bad_values_exit_2_before_scoring(extra, named, tmp_path):
    p = run("plan", "--model", TINY, "--budget-mb", "1", *extra, "--out", tmp_path / "x.json")
    assert p.returncode == 2 and named in p.stderr and "scoring hessian" not in p.stderr, p.stderr
    assert not (tmp_path / "x.json").exists()


def test_plan_convex_fits_real_bits_and_records_the_solver(work):
    ok(run("plan", "--model", TINY, "--avg-bits", "5", "--sensitivity-cache", work / "sens.json",
           "--keep", "head=8", "--solver", "convex", "--quiet", "--out", work / "plan_convex.json"))
    plan = json.loads((work / "plan_convex.json").read_text())
    solver, options = plan["solver"], plan["estimator"]["options"]
    assert solver["name"] == "convex"
    info = solver["info"]                                  # each option's bits, not indices 0..B-1
    assert info["bits"] == [float(o["bits"]) for o in options] and info["bits_source"] == "problem.bits"
    assert len(set(info["bits"])) > 2 and max(info["bits"]) >= 8     # real bit-widths, unevenly spaced
    assert info["solver_fallback"] is None and info["cvxpy_solver"] == "CLARABEL"


def test_plan_decoupled_group_budgets(work):
    ok(run("plan", "--model", "tests.fixtures_models:tiny_embed", "--avg-bits", "4", "--sensitivity", "decoupled",
           "--group-budgets", "proportional", "--quiet", "--out", work / "plan_groups.json"))
    plan = json.loads((work / "plan_groups.json").read_text())
    rec = plan["solver"]["group_budgets"]
    assert rec["rule"] == "proportional" and set(rec["groups"]) <= {"loss", "gram"}
    for g, names in rec["groups"].items():
        assert sum(plan["meta"]["layer_bytes"][n] for n in names) <= rec["caps_bytes"][g] * (1 + 1e-9)
