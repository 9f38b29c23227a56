"""LatencyProfile: JSON round trip, strict load, corrupted files, interpolation (exact for affine
data, bounded otherwise), clear errors for shapes out of range, device mismatch warning; calibrate()."""
import json
import warnings

import pytest
import torch

from bitplan.kernels.calibrate import calibrate, calibrate_model, layer_shapes, measure_fixed_cost
from bitplan.kernels.profile import LatencyProfile, device_fingerprint


def entry(ms):
    return {"median_ms": ms, "p25_ms": ms, "p75_ms": ms, "spread": 0.0, "batches": 9, "dropped": 0,
            "inner": 1, "retries": 0, "stable": True}


def synthetic(fn, shapes=((64, 64), (128, 64), (128, 128), (256, 128), (256, 256)), ms=(1, 16)):
    p = LatencyProfile(device_fingerprint("cpu"))
    for n, k in shapes:
        for m in ms:
            p.entries[("opt", n, k, m)] = entry(fn(n, k, m))
    return p


def test_interpolation_exact_for_affine_in_nk_and_m():
    f = lambda n, k, m: 0.01 + 2e-6 * n * k * (1 + 0.1 * m)        # noqa: E731  affine in N*K, in M
    p = synthetic(f)
    for n, k, m in [(96, 64, 1), (160, 128, 16), (200, 200, 7), (128, 128, 10)]:
        assert p.time_ms("opt", n, k, m) == pytest.approx(f(n, k, m), rel=1e-12)
    assert all(abs(e["rel_error"]) < 1e-9 for e in p.interpolation_errors())


def test_interpolation_error_bounded_for_convex_cost():
    # t = a + b (NK)^1.2: chords of a convex curve overestimate by at most the curvature over one
    # bracket; with brackets of ratio 2 that is < 5 % — the bound this method is stated with.
    f = lambda n, k, m: 0.005 + 1e-7 * (n * k) ** 1.2 * m          # noqa: E731
    p = synthetic(f)
    errs = p.interpolation_errors()
    assert errs and all(0 <= e["rel_error"] < 0.25 for e in errs)      # leave-one-out doubles brackets
    for n, k in [(96, 64), (128, 96), (192, 128), (256, 200)]:
        rel = p.time_ms("opt", n, k, 16) / f(n, k, 16) - 1
        assert 0 <= rel < 0.05


def test_missing_shape_and_option_errors_name_them():
    p = synthetic(lambda n, k, m: 1.0)
    with pytest.raises(ValueError, match=r"shape \(N=4096, K=4096\).*outside the measured"):
        p.time_ms("opt", 4096, 4096, 1)
    with pytest.raises(ValueError, match=r"at M=128; measured M: \[1, 16\]"):
        p.time_ms("opt", 64, 64, 128)
    with pytest.raises(ValueError, match="no option 'w4g32@int4_wo'; measured: \\['opt'\\]"):
        p.time_ms("w4g32@int4_wo", 64, 64, 1)


def test_round_trip_and_strict_load(tmp_path):
    p = synthetic(lambda n, k, m: n * k * m * 1e-6)
    p.fixed["m"] = {"median_ms": 1.5, "spread": 0.01}
    p.repeatability.append({"option": "opt", "n": 64, "k": 64, "m": 1, "first_ms": 1.0, "second_ms": 1.1,
                            "ratio": 1.1})
    path = tmp_path / "prof.json"
    p.save(path)
    q = LatencyProfile.load(path)
    assert q == p and json.loads(path.read_text())["schema_version"] == 1
    d = json.loads(path.read_text())
    for mutate, msg in [
        (lambda d: d.update(schema_version=2), "schema_version=2"),
        (lambda d: d.pop("device"), "missing: \\['device'\\]"),
        (lambda d: d.update(extra=1), "unknown: \\['extra'\\]"),
        (lambda d: d["entries"][0].update(median_ms="fast"), "median_ms='fast'"),
        (lambda d: d["entries"][0].update(median_ms=-1.0), "median_ms > 0"),
        (lambda d: d["entries"][0].pop("spread"), "expected fields"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), "duplicate"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            LatencyProfile.load(path)


def test_corrupted_file_is_a_clear_error(tmp_path):
    p = synthetic(lambda n, k, m: 1.0)
    path = tmp_path / "prof.json"
    p.save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])                             # truncated write
    with pytest.raises(ValueError, match=r"prof.json: latency profile is not valid JSON"):
        LatencyProfile.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="prof.json"):
        LatencyProfile.load(path)


def test_other_device_warns():
    p = synthetic(lambda n, k, m: 1.0)
    p.device = {**p.device, "cpu": "Some Other CPU", "threads": 64}
    with pytest.warns(RuntimeWarning, match="another device.*cpu: profile 'Some Other CPU'"):
        diff = p.check_device()
    assert len(diff) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synthetic(lambda n, k, m: 1.0).check_device()


def test_calibrate_small_shapes_end_to_end(tmp_path):
    prof = calibrate([(32, 64), (64, 64), (32, 64)], tokens=(1, 4), kernels=["int4_wo", "w8a8"],
                     quiet=True, reps=7, max_seconds=0.01, retries=1, repeat_check=1)
    # w4g128 needs K % 128 == 0: on K=64 it would run "dequant", which was not asked for
    assert set(prof.options) == {"fp32@dense", "w4g32@int4_wo", "w8a8@w8a8"}
    assert {(n, k) for _, n, k, _ in prof.entries} == {(32, 64), (64, 64)}
    assert all(e["median_ms"] > 0 and e["batches"] >= 1 for e in prof.entries.values())
    assert prof.repeatability and all(r["ratio"] > 0 for r in prof.repeatability)
    assert prof.device["threads"] == torch.get_num_threads() and prof.device["type"] == "cpu"
    prof.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json") == prof


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match="unknown kernel 'int5_wo'"):
        calibrate([(32, 32)], kernels=["int5_wo"], quiet=True)
    with pytest.raises(ValueError, match="device='tpu'"):
        calibrate([(32, 32)], device="tpu", quiet=True)
    with pytest.raises(ValueError, match="tokens"):
        calibrate([(32, 32)], tokens=(0,), quiet=True)
    with pytest.raises(ValueError, match="not a LayerInfo"):
        layer_shapes([(32, -1)])


def test_fixed_cost_restores_model():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 8))
    before = [type(m) for m in model]
    t = measure_fixed_cost(model, torch.randn(4, 16), reps=7, max_seconds=0.01, retries=0)
    assert t["median_ms"] > 0 and [type(m) for m in model] == before


def test_calibrate_model_in_context():
    from bitplan.costmodels import predict_latency_ms
    from bitplan.core.graph import LayerGraph
    from bitplan.kernels.formats import QuantSpec
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(8, 64)
    specs = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(3)]
    prof = calibrate_model(model, x, specs, reps=3, fixed_name="toy", quiet=True)
    assert {(n, k, m) for _, n, k, m in prof.entries} == {(128, 64, 8), (64, 128, 8)}
    assert set(prof.options) == {"fp32@dense", "w8@int8_wo", "w4g32@int4_wo", "w3@lowbit_unpack"}
    assert prof.fixed["toy"]["median_ms"] >= 0 and prof.fixed["toy"]["runs"] == 3 * 4
    g = LayerGraph.build(model, x)
    t = predict_latency_ms(g.layers, [QuantSpec(8), QuantSpec(4, 32)], prof, tokens=8, fixed="toy")
    assert t > prof.fixed["toy"]["median_ms"]
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]   # untouched
