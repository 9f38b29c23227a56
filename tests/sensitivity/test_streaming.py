"""The block-streaming estimator ("block") on tiny random HF causal-LM folders (tests/llm_fixtures.py).

Covers: the table has the rows / options / masks / fingerprint of the whole-model graph; at most ONE
decoder block's parameters are ever materialised (counted independently at every block forward);
a layer whose weights are scaled up is ranked most sensitive, and the ranking agrees with the
measured whole-model Δloss; `bitplan plan --method block` writes a plan without loading the model;
bad inputs raise ValueError. Random weights: plumbing and ranking on a forced case, not quality.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.llm_fixtures import make_causal_lm_folder, train_tokenizer


def _batches(seq=32, samples=8):
    from bitplan.models import lm_batches, text
    return lm_batches(train_tokenizer(512), text("calib"), seq, samples, 4)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_causal_lm_folder(tmp_path_factory.mktemp("qwen") / "m", "qwen2", layers=2, tie=True)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A 3-block Llama whose block-1 down_proj weights are scaled x6 (so it must rank first)."""
    from transformers import AutoModelForCausalLM
    path = make_causal_lm_folder(tmp_path_factory.mktemp("llama") / "m", "llama", layers=3)
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(6.0)
    m.save_pretrained(path)
    return path


def test_table_matches_whole_model_graph(qwen):
    from bitplan.core.graph import LayerGraph
    from bitplan.kernels.modules import option_mask
    from bitplan.models import load_model
    from bitplan.sensitivity import score
    from bitplan.core.spec import option_grid
    spec = load_model(qwen, seq_len=32, calib_samples=4)
    graph = LayerGraph.build(spec.model, spec.calib_data[0])
    specs = list(option_grid((2, 4, 8), (None, 32), None, "rtn", True))
    t = score(qwen, spec.calib_data, method="block", options=specs)
    assert sorted(t.names) == sorted(graph.names) and "model.embed_tokens" in t.names and "lm_head" not in t.names
    assert t.options == tuple(specs) and t.method == "block"
    assert t.model_fingerprint == graph.fingerprint
    want = np.asarray(option_mask([graph.layers[graph.index(n)] for n in t.names], specs)[0])
    assert (t.allowed == want).all()
    assert np.isfinite(t.loss).all() and (t.loss >= 0).all()
    assert t.loss[t.names.index("model.embed_tokens")].max() > 0      # tied: embedding + head terms
    # fewer bits, more loss (same group size), for every layer that moves the output at all
    b = {s: j for j, s in enumerate(specs)}
    for i in range(len(t.names)):
        lo, hi = t.loss[i, b[specs[0]]], t.loss[i, b[specs[4]]]
        assert lo >= hi


def test_one_block_materialised_at_a_time(llama3, monkeypatch):
    from bitplan.sensitivity import hf_stream, score
    seen = []
    real = hf_stream.StreamedLM.run_block

    def counting(self, i, h, kw):
        seen.append(sum(p.numel() for p in self.blocks.parameters() if not p.is_meta))
        return real(self, i, h, kw)
    monkeypatch.setattr(hf_stream.StreamedLM, "run_block", counting)
    t = score(llama3, _batches(samples=4), method="block", bits=(2, 4))
    block = t.meta["block_params"]
    assert seen and max(seen) == block and t.meta["peak_block_params"] == block
    assert t.meta["blocks"] == 3 and t.meta["bytes_read"] > 0


def test_scaled_layer_ranked_first_and_agrees_with_measured(llama3):
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM

    from bitplan.sensitivity import score
    batches = _batches(seq=32, samples=4)
    t = score(llama3, batches, method="block", bits=(2, 4))
    blocks = [i for i, n in enumerate(t.names) if ".layers." in n]
    top = max(blocks, key=lambda i: t.loss[i, 0])
    assert t.names[top] == "model.layers.1.mlp.down_proj"
    fp = AutoModelForCausalLM.from_pretrained(llama3, attn_implementation="eager").eval()
    m = score(fp, batches, method="measured", bits=(2, 4), loss_fn="kl")
    mrows = [m.names.index(t.names[i]) for i in blocks]
    assert m.names[mrows[int(np.argmax(m.loss[mrows, 0]))]] == "model.layers.1.mlp.down_proj"
    order = [m.names.index(n) for n in t.names]
    rho = spearmanr(t.loss[t.allowed], m.loss[order][t.allowed])[0]
    assert rho > 0.8, rho


def test_cli_plan_method_block(qwen, tmp_path):
    from bitplan.cli import main
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", qwen, "--method", "block", "--avg-bits", "4", "--bits", "2,4,8",
                 "--calib-samples", "8", "--seq-len", "32", "--quiet", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["estimator"]["name"] == "block"
    assert "model.embed_tokens" in plan["layers"] and len(plan["layers"]) == 15
    assert plan["predicted"]["size_bytes"] <= plan["budgets"]["size_bytes"]


def test_bad_inputs(qwen):
    from bitplan.sensitivity import score
    with pytest.raises(ValueError, match="causal-LM folder"):
        score(torch.nn.Linear(4, 4), [torch.randn(2, 4)], method="block")
    with pytest.raises(ValueError, match="label-free"):
        score(qwen, _batches(samples=4), method="block", loss_fn=lambda m, b: m(**b).logits.sum())
    with pytest.raises(ValueError, match="measure="):
        score(qwen, _batches(samples=4), method="block", measure="some")


def test_allocate_on_lazy_model(qwen):
    """load_model(lazy=True) keeps every weight on the meta device; allocate + block still plan it."""
    import bitplan
    from bitplan.models import load_model
    spec = load_model(qwen, lazy=True, seq_len=32, calib_samples=8)
    assert all(p.is_meta for p in spec.model.parameters())
    plan = bitplan.allocate(spec.model, budget_mb=0.06, calib_data=spec.calib_data, sensitivity="block",
                            bits=(2, 4, 8))
    assert plan.estimator["name"] == "block" and "model.embed_tokens" in plan.layers
    assert plan.predicted["size_bytes"] <= 0.06 * 10 ** 6


def test_a_shard_index_never_points_outside_its_folder(tmp_path):
    """model.safetensors.index.json names shard files; one naming a path out of the folder is refused."""
    import json

    from bitplan.sensitivity.hf_stream import Shards
    for bad in ("../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(ValueError, match="plain file names"):
            Shards(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(ValueError, match="weight_map"):
        Shards(str(tmp_path))


def test_checkpoint_resumes_at_the_next_block_to_the_same_table(llama3, tmp_path, monkeypatch):
    """A run that dies in block 2 leaves the rows of blocks 0-1 and the hidden states entering block 2;
    the rerun scores only block 2 and the head, and its table is the uninterrupted one, bit for bit."""
    from bitplan.sensitivity import hf_stream, score
    batches = _batches(samples=8)
    ref = score(llama3, batches, method="block", bits=(2, 4, 8))
    ck = tmp_path / "sens.partial.json"
    real = hf_stream.StreamedLM.run_block
    blocks_run = []

    def dies_in_block_2(self, i, h, kw):
        blocks_run.append(i)
        if i == 2:
            raise KeyboardInterrupt("killed")
        return real(self, i, h, kw)
    monkeypatch.setattr(hf_stream.StreamedLM, "run_block", dies_in_block_2)
    with pytest.raises(KeyboardInterrupt):
        score(llama3, batches, method="block", bits=(2, 4, 8), checkpoint=str(ck), checkpoint_every=0)
    assert ck.exists() and (tmp_path / "sens.partial.json.rank0.safetensors").exists()
    assert json.loads(ck.read_text())["state"]["next_block"] == 2
    blocks_run.clear()
    monkeypatch.setattr(hf_stream.StreamedLM, "run_block", real)
    monkeypatch.setattr(hf_stream.StreamedLM, "run_block",
                        lambda self, i, h, kw: blocks_run.append(i) or real(self, i, h, kw))
    t = score(llama3, batches, method="block", bits=(2, 4, 8), checkpoint=str(ck), checkpoint_every=0)
    assert set(blocks_run) == {2} and t.meta["resumed"] == 2
    assert np.array_equal(t.loss, ref.loss)
    assert not ck.exists() and not (tmp_path / "sens.partial.json.rank0.safetensors").exists()
    # a checkpoint of another run (other calibration data) is refused, naming the difference
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(hf_stream.StreamedLM, "run_block", dies_in_block_2)
        score(llama3, batches, method="block", bits=(2, 4, 8), checkpoint=str(ck), checkpoint_every=0)
    with pytest.raises(ValueError, match="content"):
        score(llama3, batches[:1], method="block", bits=(2, 4, 8), checkpoint=str(ck))
    # hidden states that do not fit (another rank's file, a truncated write) are refused
    (tmp_path / "sens.partial.json.rank0.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="does not read"):
        score(llama3, batches, method="block", bits=(2, 4, 8), checkpoint=str(ck))


def test_probe_gains_match_noise_carried_through_the_whole_model(llama3):
    """block_gain[k] is ‖Δ last-block output‖² / ‖noise‖² for isotropic noise added to block k's output
    (recomputed here on the whole HF model with forward hooks and the same noise); the last block's
    gain is 1; probes=0 means every gain is 1 and the loss is α·D + head KL."""
    from transformers import AutoModelForCausalLM

    from bitplan.sensitivity import score
    batches = _batches(samples=8)
    t = score(llama3, batches, method="block", bits=(2, 4), probes=3, probe_batches=1)
    assert t.meta["probe_blocks"] == [0, 1] and t.meta["block_gain"][2] == 1.0
    m = AutoModelForCausalLM.from_pretrained(llama3, attn_implementation="eager").eval()
    layers = m.model.layers
    b = batches[0]
    outs = {}
    hooks = [layers[-1].register_forward_hook(lambda mod, a, o: outs.__setitem__("last", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        m(**b, use_cache=False)
        clean = outs["last"].clone()
        for k in (0, 1):
            noise = {}

            def add(mod, a, o, k=k):
                y = o[0] if isinstance(o, tuple) else o
                gen = torch.Generator().manual_seed(0 * 1_000_003 + 7_919 * (k + 1) + 0)
                eps = torch.randn(y.shape, generator=gen, dtype=y.dtype) * (0.03 * float(y.float().pow(2).mean().sqrt()))
                noise["sq"] = float(eps.pow(2).sum())
                return ((y + eps,) + tuple(o[1:])) if isinstance(o, tuple) else y + eps
            h = layers[k].register_forward_hook(add)
            m(**b, use_cache=False)
            h.remove()
            want = float((outs["last"] - clean).pow(2).sum()) / noise["sq"]
            np.testing.assert_allclose(t.meta["block_gain"][k], want, rtol=1e-3)
    for hk in hooks:
        hk.remove()
    flat = score(llama3, batches, method="block", bits=(2, 4), probes=0)
    assert flat.meta["block_gain"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(flat.loss, np.where(flat.allowed, flat.meta["alpha"] * flat.meta["block_sq_err"]
                                                   + flat.meta["head_kl"], 0), rtol=1e-12)


def test_two_anchors_make_gamma_linear_in_bits_between_them():
    from bitplan.core.spec import QuantSpec
    from bitplan.sensitivity.streaming import _carry
    specs = [QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(8)]
    D, e, gamma = np.array([[8.0, 0.0, 2.0, 0.0]]), np.array([2.0, 1.0, 1.0, 0.5]), np.zeros(1)
    _carry(D, gamma, 0, [2, 0], [2, 0], e, [True] * 4, specs)      # γ(4 bits) = 2, γ(2 bits) = 4
    assert D.tolist() == [[8.0, 3.0, 2.0, 1.0]] and gamma[0] == 2.0  # γ(3) = 3; γ(8) = γ(4), the nearest
