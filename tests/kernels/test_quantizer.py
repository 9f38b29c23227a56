"""The shared quantizer: exact pack/unpack, idempotent quantize/dequantize, SQNR floors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bitplan.kernels.quantizer import (SUPPORTED_BITS, dequantize, fake_quantize, pack, packed_row_bytes,
                                       quantize, unpack)


def sqnr_db(x, y):
    return float(20 * torch.log10(x.norm() / (x - y).norm()))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 9), k=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_exact(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_row_bytes(k, bits))
    assert torch.equal(unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [None, 16, 24])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_round_trip(bits, group_size, symmetric):
    w = torch.randn(12, 50, generator=torch.Generator().manual_seed(bits))
    q = quantize(w, bits, group_size, symmetric)
    assert int(q.codes.max()) < 2 ** bits                      # uint8 codes, 0 .. 2**bits - 1
    w_r = dequantize(q)
    q2 = quantize(w_r, bits, group_size, symmetric)          # quantizing a quantized weight is exact
    assert torch.equal(q2.codes, q.codes)
    assert torch.equal(dequantize(q2), w_r)
    assert torch.equal(fake_quantize(w, bits, group_size, symmetric), w_r)


def test_sqnr_floors():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(w, fake_quantize(w, 8)) > 35                       # int8 per-channel
    assert sqnr_db(w, fake_quantize(w, 4, 32, symmetric=False)) > 20  # int4 g32 asymmetric
    errs = [sqnr_db(w, fake_quantize(w, b)) for b in SUPPORTED_BITS]
    assert errs == sorted(errs)                                       # more bits, less error


def test_zero_rows_and_dtype():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    w[1] = 1.5
    out = fake_quantize(w, 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.equal(out[0], w[0]) and torch.allclose(out[1].float(), w[1].float())


@pytest.mark.parametrize("bad", [1, 9, 16, 4.0, True])
def test_bad_bits_named(bad):
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(2, 2), bad)


def test_bad_shapes_named():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 2, 2), 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(2, 2), 4, group_size=0)
