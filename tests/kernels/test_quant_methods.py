"""Quantizer methods (rtn, clip, awq, gptq, awq_gptq): quality vs RTN on held-out inputs, exact formats,
guarantees, determinism, errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bitplan.kernels.calibstats import LayerStats
from bitplan.kernels.formats import weight_nbytes
from bitplan.kernels.quantizer import (METHODS, QTensor, _grouped, dequantize, encode, fake_quantize,
                                       method_extra_nbytes, pack, quantize, unpack)

N, K = 48, 64
STATS_METHODS = [m for m in METHODS if METHODS[m].needs_stats]


def correlated_inputs(m, seed, outliers=False):
    """(m, K) tokens: a fixed random mixing of independent sources (correlated channels, unequal
    variances, nonzero means); ``outliers`` makes 3 channels ~30x larger (LLM-style)."""
    g = torch.Generator().manual_seed(1234)                      # the distribution: fixed
    mix = torch.randn(K, K, generator=g) * torch.rand(K, generator=g).unsqueeze(0) * 2
    mean = torch.randn(K, generator=g) * 0.3
    z = torch.randn(m, K, generator=torch.Generator().manual_seed(seed))
    x = z @ mix / K ** 0.5 + mean
    if outliers:
        x[:, [3, 17, 40]] *= 30.0
    return x


def weight(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.1


def stats_of(x):
    return LayerStats.zeros(x.shape[1]).update(x)


def out_err(w, wq, x):
    return float(((x @ (wq - w).t()) ** 2).sum(1).mean())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("method", ["gptq", "awq_gptq"])
def test_gptq_lowers_heldout_output_error(bits, group_size, method):
    w = weight()
    calib, held = correlated_inputs(4096, seed=1), correlated_inputs(4096, seed=2)
    wq = fake_quantize(w, bits, group_size, method=method, stats=stats_of(calib))
    rtn = out_err(w, fake_quantize(w, bits, group_size), held)
    assert out_err(w, wq, held) < 0.8 * rtn                     # measured ~0.3-0.5 of RTN


@pytest.mark.parametrize("opts", [{"act_order": False, "clip": False}, {"act_order": False}, {"clip": False}])
def test_gptq_variants_lower_heldout_error(opts):
    w = weight(1)
    calib, held = correlated_inputs(4096, seed=3), correlated_inputs(4096, seed=4)
    for group_size in (None, 32):
        wq = fake_quantize(w, 3, group_size, method="gptq", stats=stats_of(calib), **opts)
        assert out_err(w, wq, held) < 0.8 * out_err(w, fake_quantize(w, 3, group_size), held)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lazy_blocks_equal_one_block(group_size, act_order):
    """Lazy batch updates are exact algebra: blocks of 16 columns give the single-block result
    (up to fp summation order: nearly every code equal, same output error)."""
    w = weight(10)
    s = stats_of(correlated_inputs(2048, 13))
    one = quantize(w, 3, group_size, method="gptq", stats=s, block_size=K, act_order=act_order)
    blk = quantize(w, 3, group_size, method="gptq", stats=s, block_size=16, act_order=act_order)
    assert float((one.codes == blk.codes).float().mean()) > 0.99
    e1, e2 = s.output_error(dequantize(one) - w), s.output_error(dequantize(blk) - w)
    assert abs(e1 - e2) <= 0.01 * e1


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_without_correlation_is_rtn(group_size, symmetric):
    """Uncorrelated inputs (diagonal Σxxᵀ): nothing to compensate, GPTQ must round exactly as RTN."""
    w = weight(2)
    st_ = LayerStats(torch.diag(torch.rand(K) + 0.5), torch.ones(K), 10)
    r = quantize(w, 3, group_size, symmetric)
    for act_order in (False, True):
        q = quantize(w, 3, group_size, symmetric, method="gptq", stats=st_, act_order=act_order, clip=False)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales), act_order
    q = quantize(w, 3, group_size, symmetric, method="gptq", stats=st_)          # clip: ranges differ
    r = quantize(w, 3, group_size, symmetric, method="clip")
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales)


def test_gptq_two_columns_matches_closed_form():
    """K=2: after rounding column 0, the optimal column 1 (given q0) is w1 + (w0 − q0)·H01/H11."""
    w = torch.tensor([[0.30, -0.20], [0.11, 0.52], [-0.43, 0.05]])
    h = torch.tensor([[2.0, 0.9], [0.9, 1.0]])
    st_ = LayerStats(h, torch.ones(2), 1)                        # hessian = 2·h
    q = quantize(w, 8, None, True, method="gptq", stats=st_, damp=1e-9, act_order=False, clip=False)
    scale = q.scales.float()[:, 0]
    q0 = (q.codes[:, 0].float() - 128) * scale
    w1 = w[:, 1] + (w[:, 0] - q0) * h[0, 1] / h[1, 1]
    assert torch.equal(q.codes[:, 0].float(), torch.round(w[:, 0] / scale) + 128)
    assert torch.equal(q.codes[:, 1].float(), torch.round(w1 / scale) + 128)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("bits,group_size,symmetric", [(3, None, True), (4, 32, True), (4, 16, False),
                                                       (2, 32, False), (8, None, True)])
def test_awq_never_worse_than_rtn_on_calibration(clip, outliers, bits, group_size, symmetric):
    w = weight(3)
    x = correlated_inputs(1024, seed=5, outliers=outliers)
    s = stats_of(x)
    wq = fake_quantize(w, bits, group_size, symmetric, method="awq", stats=s, clip=clip)
    rtn = fake_quantize(w, bits, group_size, symmetric)
    assert s.output_error(wq - w) <= s.output_error(rtn - w) * (1 + 1e-5)


def test_awq_alpha_zero_is_rtn():
    w, s = weight(4), stats_of(correlated_inputs(512, 6, outliers=True))
    q = quantize(w, 4, 32, method="awq", stats=s, alphas=(0.0,), clip=False)
    assert torch.equal(q.in_scale, torch.ones(K, dtype=torch.float16))
    assert torch.equal(dequantize(q), fake_quantize(w, 4, 32))


@pytest.mark.parametrize("group_size", [None, 32])
def test_awq_helps_with_outlier_channels_heldout(group_size):
    w = weight(5)
    calib, held = correlated_inputs(4096, 7, outliers=True), correlated_inputs(4096, 8, outliers=True)
    for clip in (False, True):
        wq = fake_quantize(w, 4, group_size, method="awq", stats=stats_of(calib), clip=clip)
        assert out_err(w, wq, held) < 0.7 * out_err(w, fake_quantize(w, 4, group_size), held)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 6, 8]), n=st.integers(1, 6), k=st.integers(1, 50),
       group_size=st.sampled_from([None, 8, 16, 13]), symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_clip_never_increases_weight_mse(bits, n, k, group_size, symmetric, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[0, 0] = 6.0                                                # an outlier to clip
    mse = lambda wq: float(((wq - w) ** 2).sum())
    assert mse(fake_quantize(w, bits, group_size, symmetric, method="clip")) <= \
        mse(fake_quantize(w, bits, group_size, symmetric)) * (1 + 1e-6)


def test_clip_lowers_weight_mse_on_heavy_tails():
    w = torch.distributions.StudentT(3.0).sample((64, 128))
    mse = lambda wq: float(((wq - w) ** 2).sum())
    assert mse(fake_quantize(w, 3, 32, method="clip")) < 0.9 * mse(fake_quantize(w, 3, 32))


def all_methods_q(w, bits, group_size, symmetric, stats):
    return {m: quantize(w, bits, group_size, symmetric, method=m, stats=stats) for m in METHODS}


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, None, True), (4, 24, False), (2, 16, True),
                                                       (8, 32, False)])
def test_formats_round_trips_and_bytes(bits, group_size, symmetric):
    """Every method: codes in range, pack/unpack exact, the stored grid re-encodes to the same codes,
    dequantize from the stored tensors == fake quantization, stored bytes == the size model."""
    w = weight(6)[:, :60].contiguous()                          # K=60: a partial last group
    s = stats_of(correlated_inputs(512, 9)[:, :60])
    for m, q in all_methods_q(w, bits, group_size, symmetric, s).items():
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** bits, m
        packed = pack(q.codes, bits)
        assert torch.equal(unpack(packed, bits, 60), q.codes), m
        grid = dequantize(q, apply_in_scale=False)               # (N, K) fp32, no in_scale
        zs = None if q.zeros is None else q.zeros.unsqueeze(-1)
        recoded = encode(_grouped(grid, group_size), q.scales.unsqueeze(-1), zs, bits)
        assert torch.equal(recoded.reshape(N, -1)[:, :60].to(torch.uint8), q.codes), m
        q2 = QTensor(unpack(packed, bits, 60), q.scales, q.zeros, bits, group_size, q.shape, q.dtype,
                     q.in_scale)
        assert torch.equal(dequantize(q2), fake_quantize(w, bits, group_size, symmetric, m, s)), m
        stored = packed.numel() + 2 * q.scales.numel() + (0 if q.zeros is None else 2 * q.zeros.numel()) \
            + (0 if q.in_scale is None else 2 * q.in_scale.numel())
        assert stored == weight_nbytes(N, 60, bits, group_size, symmetric) + method_extra_nbytes(m, N, 60), m
        assert (q.in_scale is not None) == METHODS[m].stores_in_scale, m
        if q.in_scale is not None:                               # packed path: kernel(x / s) == fake
            x = correlated_inputs(16, 10)[:, :60]
            fake = x @ dequantize(q).t()
            packed_out = (x / q.in_scale.float()) @ grid.t()
            assert torch.allclose(fake, packed_out, rtol=1e-4, atol=1e-5), m


def test_method_extra_nbytes():
    assert method_extra_nbytes("awq", 1536, 384) == 768
    assert method_extra_nbytes("awq_gptq", 10, 7) == 14
    assert method_extra_nbytes("gptq", 1536, 384) == method_extra_nbytes("rtn", 1, 1) == 0
    with pytest.raises(ValueError, match="allowed"):
        method_extra_nbytes("nope", 1, 1)


def test_deterministic_and_stats_untouched():
    w = weight(7)
    s = stats_of(correlated_inputs(512, 11, outliers=True))
    xtx, absum = s.xtx.clone(), s.abs_sum.clone()
    a = all_methods_q(w, 3, 16, False, s)
    b = all_methods_q(w.clone(), 3, 16, False, s)
    for m in METHODS:
        assert torch.equal(a[m].codes, b[m].codes) and torch.equal(a[m].scales, b[m].scales), m
    assert torch.equal(s.xtx, xtx) and torch.equal(s.abs_sum, absum)
    q = quantize(w, 3, 16, method="gptq", stats=s, act_order=True)
    assert torch.equal(q.codes, quantize(w, 3, 16, method="gptq", stats=s, act_order=True).codes)


def test_dtype_preserved_and_dead_channels():
    w = weight(8).to(torch.bfloat16)
    x = correlated_inputs(256, 12)
    x[:, 5] = 0.0                                                # a dead input channel
    s = stats_of(x)
    for m in METHODS:
        out = fake_quantize(w, 4, 32, method=m, stats=s)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all(), m


def test_bits16_passes_through_any_method():
    w = weight(9)
    assert torch.equal(fake_quantize(w, 16, method="gptq"), w.half().float())


def test_bad_inputs_named():
    w, s = weight(), stats_of(correlated_inputs(64, 0))
    with pytest.raises(ValueError, match=r"allowed: \[.*'gptq'.*'rtn'"):
        quantize(w, 4, method="optq")
    for m in STATS_METHODS:
        with pytest.raises(ValueError, match="needs calibration statistics"):
            quantize(w, 4, method=m)
    with pytest.raises(ValueError, match="K=32"):
        quantize(w, 4, method="gptq", stats=LayerStats.zeros(32).update(torch.randn(8, 32)))
    with pytest.raises(ValueError, match="n_tokens=0"):
        quantize(w, 4, method="awq", stats=LayerStats.zeros(K))
    with pytest.raises(TypeError, match="LayerStats"):
        quantize(w, 4, method="gptq", stats=torch.eye(K))
    with pytest.raises(TypeError, match="no option.*allowed"):
        quantize(w, 4, method="gptq", stats=s, percdamp=0.1)
    with pytest.raises(TypeError, match="no option"):
        quantize(w, 4, method="rtn", clip=True)
    with pytest.raises(ValueError, match="damp"):
        quantize(w, 4, method="gptq", stats=s, damp=0)
    with pytest.raises(ValueError, match="block_size"):
        quantize(w, 4, method="gptq", stats=s, block_size=0)
    with pytest.raises(TypeError, match="act_order"):
        quantize(w, 4, method="gptq", stats=s, act_order=1)
    with pytest.raises(ValueError, match="alphas"):
        quantize(w, 4, method="awq", stats=s, alphas=(0.5, 2.0))
    with pytest.raises(ValueError, match="n_grid"):
        quantize(w, 4, method="clip", n_grid=0)
    with pytest.raises(ValueError, match="min_ratio"):
        quantize(w, 4, method="clip", min_ratio=1.5)
    with pytest.raises(TypeError, match="symmetric"):
        quantize(w, 4, symmetric="yes")
    with pytest.raises(ValueError, match="bits"):
        quantize(w, 16, method="gptq", stats=s)
    bad = LayerStats(torch.full((K, K), float("nan")), torch.ones(K), 5)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w, 4, method="gptq", stats=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_stats_on_other_device_named():
    with pytest.raises(ValueError, match="never moves"):
        quantize(weight().cuda(), 4, method="gptq", stats=stats_of(correlated_inputs(64, 0)))
