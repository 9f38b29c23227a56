"""lim (block input/output cosine) and zd (z-score fraction) against direct computations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitplan.kernels.quantizer import fake_quantize
from bitplan.sensitivity import score


def rel(w, b):
    return float((fake_quantize(w.detach(), b) - w.detach()).pow(2).sum() / w.detach().pow(2).sum())


def test_zd_is_data_free_and_direct(net):
    t = score(net, None, method="zd", bits=(2, 4))
    for l, m in enumerate(m for m in net if isinstance(m, torch.nn.Linear)):
        w = m.weight.detach().double()
        z = (w - w.mean()) / w.std()
        assert t.meta["zd"][l] == pytest.approx(float((z.abs() > 1).double().mean()))
        np.testing.assert_allclose(t.loss[l], [t.meta["zd"][l] * rel(m.weight, b) for b in (2, 4)], rtol=1e-6)


def test_lim_is_minus_cosine_of_block_io(blocks_model, block_batches):
    t = score(blocks_model, block_batches, method="lim", bits=(2, 4))
    assert t.meta["blocks"] == ["layers.0", "layers.1", "layers.2"]
    for k, blk in enumerate(blocks_model.layers):
        cs = []
        for x in block_batches:
            h = blocks_model.inp(x)
            for blk2 in blocks_model.layers[:k]:
                h = h + blk2(h)
            cs.append(F.cosine_similarity(h, blk(h), dim=-1).detach())
        assert t.meta["lim"][k] == pytest.approx(-float(torch.cat(cs).mean()), rel=1e-5)
    i = t.names.index("layers.1.0")
    np.testing.assert_allclose(t.loss[i], [(1 + t.meta["lim"][1]) * rel(blocks_model.layers[1][0].weight, b)
                                           for b in (2, 4)], rtol=1e-6)
    assert set(t.meta["outside_blocks"]) == {"inp", "out", "unused"}


def test_lim_without_blocks_says_why(net, batches):
    with pytest.raises(ValueError, match="block-structured"):
        score(net, batches, method="lim")
