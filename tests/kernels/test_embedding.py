"""Packed embedding tables and tied heads: lookups equal fake quantization exactly, on odd shapes,
every bit-width, per channel and grouped, symmetric or not; a tied head shares the very tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bitplan.core.spec import QuantSpec
from bitplan.costmodels import model_nbytes
from bitplan.kernels.embedding import EmbeddingLookup, TiedHead
from bitplan.kernels.modules import fake_weight
from bitplan.kernels.registry import kernel_nbytes


@pytest.mark.parametrize("v,d", [(1, 1), (7, 5), (33, 24), (100, 64)])
@pytest.mark.parametrize("spec", [QuantSpec(2), QuantSpec(3, 8), QuantSpec(4, 8, False), QuantSpec(5),
                                  QuantSpec(8, 4), QuantSpec(16)], ids=lambda s: s.label)
def test_lookup_equals_fake_quantization(v, d, spec):
    if spec.group_size is not None and spec.group_size < d and d % spec.group_size:
        pytest.skip("partial groups are not an option")
    g = torch.Generator().manual_seed(v * 100 + d)
    emb = nn.Embedding(v, d)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(v, d, generator=g))
    m = EmbeddingLookup.from_module(emb, "embedding", emb.weight, spec)
    ref = fake_weight(emb, "embedding", spec)                                   # (V, D)
    idx = torch.randint(0, v, (3, 11), generator=g)
    assert torch.equal(m(idx), ref[idx])                                        # exact, not approximately
    assert torch.equal(m.weight_2d(), ref)
    assert model_nbytes(m) == kernel_nbytes(spec, v, d, "cpu", "embedding")
    head = nn.Linear(d, v, bias=False)
    head.weight = emb.weight
    t = TiedHead(m, head, "linear")
    assert t.codes is m.codes
    x = torch.randn(4, d, generator=g)
    assert torch.allclose(t(x), x @ ref.t(), rtol=1e-5, atol=1e-5)


def test_embedding_rejects_activation_options():
    assert EmbeddingLookup.supports(QuantSpec(8, act_bits=8), 10, 8, "cpu", "embedding")
    assert EmbeddingLookup.supports(QuantSpec(4), 10, 8, "cpu", "linear")
    assert EmbeddingLookup.supports(QuantSpec(4), 10, 8, "cpu", "embedding") is None
