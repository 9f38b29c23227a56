"""W8A8 on any CPU: the path this CPU selects is integer-exact, fake quantization models it, the
forced 7-bit path is exact everywhere, and the 8-bit path is chosen only where it is exact.

No test asserts what this particular CPU does: each checks the path it selects against an exact
int64 reference, and the selection logic against the capability flags and the exactness probe.
"""
import json
import warnings

import pytest
import torch
from torch import nn

from bitplan.kernels.actquant import act_qmax, fake_quantize_act, quantize_act, quantize_act_u8
from bitplan.kernels.capability import (INT8_DOT_FLAGS, W8A8_CPU_IMPLS, cpu_capability, cpu_flags,
                                        onednn_qlinear_available, probe_onednn_exact, w8a8_cpu_path)
from bitplan.kernels.formats import QuantSpec
from bitplan.kernels.packed import PackedLayer
from bitplan.kernels.registry import get_kernel, select_kernel

SPEC = QuantSpec(8, act_bits=8)
EXACT_DB = 100.0     # vs the int64 reference only fp32 rounding of the output (~130-150 dB) remains
FAKE_DB = 90.0       # fake = fp32 matmul on dequantized values: fp32 summation order differs too

needs_onednn = pytest.mark.skipif(not onednn_qlinear_available(), reason="no oneDNN qlinear in this torch")


def sqnr(ref, y):
    err = (ref.double() - y.double()).norm()
    return float("inf") if err == 0 else (20 * torch.log10(ref.double().norm() / err)).item()


def inputs(k):
    """(M, K) inputs that saturate int16 pair sums when 8-bit codes meet an int16 multiplier:
    Gaussian, ReLU'd Gaussian (all codes >= 0) and constant rows (every code at +qmax)."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g)
    return {"gauss": x, "relu": x.relu(), "const": torch.ones(4, k) * 0.3}


def exact_w8a8(m, x, lin):
    """The module's arithmetic in int64: per-token codes with the module's own range, its int8
    weight, then the scales and bias in float64."""
    q, sx = quantize_act(x, 8, m.act_qmax)                                       # (M, K), (M, 1)
    acc = q.to(torch.int64) @ m.int8_weight().to(torch.int64).t()                # (M, N) exact
    return acc.double() * sx.double() * m.scales.double().reshape(1, -1) + lin.bias.double()


def build(lin, impl=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # the once-per-process 7-bit note
        return get_kernel("w8a8").from_module(lin, "linear", lin.weight, SPEC, impl=impl)


@needs_onednn
@pytest.mark.parametrize("n,k", [(1536, 384), (384, 1536), (17, 100)])
def test_selected_path_is_integer_exact_and_fake_models_it(n, k):
    """Fails on the code before the capability check: oneDNN with 8-bit activations on an AVX2-only
    CPU gave 17.8 dB (gauss) / 9.8 dB (const) against this reference."""
    path = w8a8_cpu_path()
    if path.impl is None:
        pytest.skip(f"no exact W8A8 path on this CPU: {path.reason}")
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    m = build(lin)
    assert m.impl == path.impl and m.act_qmax == path.act_qmax == act_qmax(8, "cpu")
    assert f"kernel=w8a8/{path.impl}" in repr(m)
    ref_layer = PackedLayer.from_module(lin, "linear", lin.weight, SPEC)        # the reference path
    for name, x in inputs(k).items():
        y = m(x)
        assert sqnr(exact_w8a8(m, x, lin), y) >= EXACT_DB, (name, sqnr(exact_w8a8(m, x, lin), y))
        assert sqnr(ref_layer(x), y) >= FAKE_DB, (name, sqnr(ref_layer(x), y))


@needs_onednn
@pytest.mark.parametrize("n,k", [(64, 96), (7, 33)])
def test_forced_7bit_path_is_exact_on_every_cpu(n, k):
    torch.manual_seed(1)
    lin = nn.Linear(k, n)
    m = build(lin, impl="onednn_u7")
    assert m.act_qmax == 63 and m.impl == "onednn_u7"
    for name, x in inputs(k).items():
        assert sqnr(exact_w8a8(m, x, lin), m(x)) >= EXACT_DB, name
        assert sqnr(nn.functional.linear(fake_quantize_act(x, 8, qmax=63),
                                         PackedLayer.from_module(lin, "linear", lin.weight, SPEC).weight_2d(),
                                         lin.bias), m(x)) >= FAKE_DB, name


@needs_onednn
def test_8bit_path_only_where_exact():
    """The 8-bit oneDNN path is chosen only when the CPU has an int8 dot product (x86) and the probe
    is exact; where it is chosen, forcing it is exact; the probe agrees with the selection."""
    path = w8a8_cpu_path()
    flags = cpu_flags()
    if path.impl == "onednn_u8":
        assert probe_onednn_exact(127)
        lin = nn.Linear(128, 48)
        m = build(lin, impl="onednn_u8")
        for x in inputs(128).values():
            assert sqnr(exact_w8a8(m, x, lin), m(x)) >= EXACT_DB
    else:
        assert path.impl in ("onednn_u7", None)
        assert (path.impl == "onednn_u7") == probe_onednn_exact(63)
        assert path.act_qmax == (63 if path.impl else 127)
        import platform
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        assert (x86 and not any(flags.get(f) for f in INT8_DOT_FLAGS)) or not probe_onednn_exact(127)


def test_capability_record_is_json_and_consistent():
    cap = cpu_capability()
    assert json.loads(json.dumps(cap)) == cap
    assert {"cpu", "arch", "torch_isa", "int8_dot", "flags", "w8a8_cpu", "w8a8_act_qmax", "w8a8_reason"} <= set(cap)
    path = w8a8_cpu_path()
    assert (cap["w8a8_cpu"], cap["w8a8_act_qmax"]) == (path.impl, path.act_qmax)
    assert cap["w8a8_cpu"] in (None, *W8A8_CPU_IMPLS)
    assert cap["int8_dot"] == any(cpu_flags().get(f) for f in INT8_DOT_FLAGS)
    # the registry agrees: W8A8 runs exactly when a path exists
    name, why = select_kernel(SPEC, 64, 64, "cpu")
    assert (name == "w8a8") == (path.impl is not None), why


def test_activation_quantizer_ranges():
    x = torch.randn(5, 40) * torch.tensor([[1.0], [50.0], [1e-3], [0.0], [3.0]])
    for qmax in (63, 127):
        q, s = quantize_act(x, 8, qmax)
        assert q.abs().amax(1)[[0, 1, 2, 4]].eq(qmax).all() and q[3].eq(0).all()
        u, s2 = quantize_act_u8(x, qmax)
        assert torch.equal(u.to(torch.int16) - (qmax + 1), q.to(torch.int16)) and torch.equal(s, s2)
        assert int(u.max()) <= 2 * qmax + 1
    assert act_qmax(8, "cuda") == 127 and act_qmax(8, "cpu") == w8a8_cpu_path().act_qmax
    for bad in (0, 128, 2.0, True):
        with pytest.raises(ValueError, match="qmax"):
            quantize_act(x, 8, bad)
    with pytest.raises(ValueError, match="act_bits=4"):
        act_qmax(4, "cpu")


@needs_onednn
def test_forced_impl_errors():
    lin = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="impl='int_mm' is not a CPU W8A8 path"):
        build(lin, impl="int_mm")
    with pytest.raises(ValueError, match="impl='fast' is not a CPU W8A8 path"):
        build(lin, impl="fast")


@needs_onednn
def test_7bit_note_is_one_warning():
    import bitplan.kernels.w8a8 as w8
    if w8a8_cpu_path().impl != "onednn_u7":
        pytest.skip("this CPU runs 8-bit activations (no note)")
    w8._W8A8_WARNED = False
    with pytest.warns(RuntimeWarning, match="7 bits") as rec:
        for _ in range(3):
            get_kernel("w8a8").from_module(nn.Linear(16, 16), "linear", torch.randn(16, 16), SPEC)
    assert sum("7 bits" in str(r.message) for r in rec) == 1
