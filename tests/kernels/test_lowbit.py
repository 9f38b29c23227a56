"""unpack_fast == the reference unpack for every bit-width; per-token activation quantization."""
import pytest
import torch

from bitplan.kernels.actquant import act_qmax, fake_quantize_act, quantize_act, quantize_act_u8
from bitplan.kernels.lowbit import unpack_fast
from bitplan.kernels.quantizer import pack, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 61, 128])
def test_unpack_fast_equals_reference(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (5, k), generator=g).to(torch.uint8)
    p = pack(codes, bits)
    assert torch.equal(unpack_fast(p, bits, k), unpack(p, bits, k))
    assert torch.equal(unpack_fast(p, bits, k), codes)


def test_unpack_fast_rejects_wrong_row_bytes():
    with pytest.raises(ValueError, match="need 3"):
        unpack_fast(torch.zeros(2, 4, dtype=torch.uint8), 3, 8)


def test_act_quant_per_token():
    x = torch.randn(4, 32) * torch.tensor([[1.0], [100.0], [1e-3], [0.0]])
    q, s = quantize_act(x)
    assert q.dtype == torch.int8 and s.shape == (4, 1)
    assert q.abs().amax(1)[:3].eq(127).all() and q[3].eq(0).all()          # each token uses its range
    xr = fake_quantize_act(x, 8)                     # this device's W8A8 range (7-bit on CPUs without VNNI)
    qd, sd = quantize_act(x, 8, act_qmax(8, x.device))
    assert torch.equal(xr, qd.float() * sd) and ((xr - x).abs() <= sd / 2 + 1e-12).all()
    assert fake_quantize_act(x, None) is x and fake_quantize_act(x, 16) is x
    u, s2 = quantize_act_u8(x)
    assert torch.equal(u.to(torch.int16) - 128, q.to(torch.int16)) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="act_bits=4"):
        quantize_act(x, 4)
