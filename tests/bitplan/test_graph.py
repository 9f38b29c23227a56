"""LayerGraph: layer discovery, shapes, MACs, data flow, shared-input ties."""
import pytest
import torch
from torch import nn

from bitplan.core.graph import LayerGraph, find_layers


class Attn(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Linear(d, 2 * d)

    def forward(self, x):                               # x (n, T, d)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1) @ self.v(x)
        return self.ff(x + self.o(a))


def test_layers_shapes_macs_and_ties():
    m = Attn()
    g = LayerGraph.build(m, torch.randn(3, 5, 16))
    assert g.names == ["q", "k", "v", "o", "ff"]
    ff = g.layers[4]
    assert (ff.out_features, ff.in_features, ff.n_params) == (32, 16, 512)
    assert ff.macs_per_sample == 5 * 16 * 32 and ff.input_shape == (3, 5, 16)
    assert g.shared_input == [["q", "k", "v"]]
    assert g.tie_groups("shared_input") == [[0, 1, 2]] and g.tie_groups(None) == []
    assert g.source == "fx" and g.graph.has_edge("v", "o") and not g.graph.has_edge("q", "k")
    with pytest.raises(ValueError, match="tie='x'"):
        g.tie_groups("x")


def test_hook_fallback_when_fx_fails():
    class Dyn(Attn):
        def forward(self, x):
            if x.sum() > -1e9:                           # data-dependent control flow: fx cannot trace
                return super().forward(x)
    g = LayerGraph.build(Dyn(), torch.randn(2, 4, 16))
    assert g.source == "hooks" and g.shared_input == [["q", "k", "v"]]
    assert all(g.graph.has_edge(a, "o") for a in "qkv")


def test_conv_and_hf_conv1d():
    from transformers.pytorch_utils import Conv1D
    m = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.Flatten(), Conv1D(10, 8 * 6 * 6))
    g = LayerGraph.build(m, torch.randn(2, 3, 8, 8))
    conv, c1d = g.layers
    assert (conv.kind, conv.out_features, conv.in_features) == ("conv2d", 8, 27)
    assert conv.macs_per_sample == 8 * 36 * 27
    assert (c1d.kind, c1d.out_features, c1d.in_features) == ("hf_conv1d", 10, 288)


def test_errors_name_cause():
    with pytest.raises(ValueError, match="no quantizable layers"):
        LayerGraph.build(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="does not run"):
        LayerGraph.build(nn.Linear(4, 2), torch.randn(3, 5))
    with pytest.raises(TypeError, match="nn.Module"):
        find_layers("model")
