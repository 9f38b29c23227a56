"""Calibration statistics: exact against the brute-force inputs, per submodule (streaming) == whole
model, padding masked, conv im2col matches the conv, model untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitplan.kernels.calibstats import LayerStats, StatsCollector, gather_stats, layer_input_2d


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 12)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for t in (5, 7):
        ids = torch.randint(0, 30, (3, t), generator=g)
        mask = torch.ones(3, t, dtype=torch.long)
        mask[0, t - 2:] = 0                                     # padded positions
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def brute_inputs(model, data, name, use_mask):
    rows = []
    mod = model.get_submodule(name)
    h = mod.register_forward_hook(lambda m, i, o: rows.append(i[0]))
    with torch.no_grad():
        for b in data:
            n0 = len(rows)
            model(**b)
            if use_mask:
                rows[n0] = rows[n0][b["attention_mask"].bool()]
    h.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])          # (M, K)


@pytest.mark.parametrize("mask", ["auto", None])
def test_gather_matches_brute_force(mask):
    model, data = Net().eval(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = gather_stats(model, data, mask=mask)
    assert sorted(stats) == sorted(["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"])
    for name, s in stats.items():
        x = brute_inputs(model, data, name, mask == "auto")
        assert s.n_tokens == x.shape[0] == (sum(int(b["attention_mask"].sum()) for b in data)
                                            if mask else 3 * 12)
        assert torch.allclose(s.xtx, x.t() @ x, rtol=1e-5, atol=1e-5)
        assert torch.allclose(s.abs_sum, x.abs().sum(0), rtol=1e-5, atol=1e-5)
        dw = torch.randn(3, s.k)
        assert s.output_error(dw) == pytest.approx(float(((x @ dw.t()) ** 2).sum(1).mean()), rel=1e-4)
        assert torch.allclose(s.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(s.mean_abs, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert all(not m._forward_pre_hooks for m in model.modules())       # hooks removed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_streaming_block_by_block_equals_whole_model():
    model, data = Net().eval(), batches()
    whole = gather_stats(model, data)
    streamed = {}
    with torch.no_grad():
        hs = [(model.emb(b["input_ids"]), b["attention_mask"]) for b in data]
        for i, block in enumerate(model.blocks):                        # one block at a time
            col = StatsCollector({f"blocks.{i}.fc1": block.fc1, f"blocks.{i}.fc2": block.fc2})
            with col:
                nxt = []
                for h, m in hs:
                    col.token_mask = m
                    nxt.append((block(h), m))
            streamed.update(col.stats)
            hs = nxt
    for name, s in streamed.items():
        assert s.n_tokens == whole[name].n_tokens
        assert torch.allclose(s.xtx, whole[name].xtx) and torch.allclose(s.abs_sum, whole[name].abs_sum)


def test_merge_of_halves_is_whole():
    model, data = Net().eval(), batches()
    a, b = gather_stats(model, data[:1]), gather_stats(model, data[1:])
    whole = gather_stats(model, data)
    m = a["head"].merge(b["head"])
    assert m.n_tokens == whole["head"].n_tokens and torch.allclose(m.xtx, whole["head"].xtx)


@pytest.mark.parametrize("conv,x_shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), (2, 3, 9, 8)),
    (nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), (2, 3, 7, 6)),
    (nn.Conv2d(2, 4, 3), (2, 6, 6)),                                    # unbatched
    (nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=1), (3, 4, 11)),
    (nn.Conv1d(4, 6, 3, padding="same", dilation=3), (3, 4, 11)),
])
def test_conv_im2col_reproduces_the_conv(conv, x_shape):
    """(M, K) @ W2dᵀ == the conv's output: the statistic's K axis is the weight's K axis."""
    torch.manual_seed(2)
    x = torch.randn(*x_shape)
    kind = "conv2d" if isinstance(conv, nn.Conv2d) else "conv1d"
    cols = layer_input_2d(conv, kind, x)                                 # (M, K)
    w2d = conv.weight.reshape(conv.weight.shape[0], -1)
    y = conv(x) - conv.bias.reshape(-1, *([1] * (conv.weight.dim() - 2)))
    y = y.unsqueeze(0) if x.dim() == conv.weight.dim() - 1 else y
    ref = y.movedim(1, -1).reshape(-1, w2d.shape[0])                     # (M, N)
    assert torch.allclose(cols @ w2d.t(), ref, atol=1e-5)


def test_conv_model_stats_and_grouped_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4))
    x = torch.randn(2, 3, 6, 6)
    stats = gather_stats(model, [x])
    assert sorted(stats) == ["0"]                                         # grouped conv: skipped
    assert stats["0"].n_tokens == 2 * 36 and stats["0"].k == 27
    with pytest.raises(ValueError, match="grouped conv"):
        gather_stats(model, [x], names=["2"])


def test_bad_inputs_named():
    model = Net()
    with pytest.raises(ValueError, match="not in Net"):
        gather_stats(model, batches(), names=["nope"])
    with pytest.raises(ValueError, match="mask"):
        gather_stats(model, batches(), mask="yes")
    with pytest.raises(ValueError, match="no input activations"):
        gather_stats(model, batches(), names=["emb"])
    model.extra = nn.Linear(4, 4)                                       # never called by forward
    with pytest.raises(ValueError, match=r"never ran.*\['extra'\]"):
        gather_stats(model, batches())
    with pytest.raises(ValueError, match="update expects"):
        LayerStats.zeros(4).update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="k=0"):
        LayerStats.zeros(0)
    with pytest.raises(ValueError, match="cannot merge"):
        LayerStats.zeros(3).merge(LayerStats.zeros(4))
    with pytest.raises(TypeError, match="Module"):
        gather_stats("model", batches())
