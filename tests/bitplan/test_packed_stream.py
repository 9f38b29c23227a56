"""save_packed_streamed / `bitplan apply` streaming, on tiny random HF causal-LM folders (tests/llm_fixtures.py).

The streamed folder (one decoder block at a time, sharded safetensors) must hold exactly the tensors
the whole-model ``save_packed`` writes for the same plan — round-to-nearest, W8A8 and calibrated
methods (GPTQ, AWQ: the per-layer statistics come from fp hidden states carried block to block) —
under the same names (a tied embedding / lm_head stored once), with the plan's predicted bytes, and
load back to the same logits; at most one decoder block is ever real; a failed save keeps the old
folder. Random weights: plumbing and bytes, not quality.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from tests.llm_fixtures import make_causal_lm_folder, train_tokenizer


def _batches(seq=32, samples=8):
    from bitplan.models import lm_batches, text
    return lm_batches(train_tokenizer(512), text("calib"), seq, samples, 4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_causal_lm_folder(tmp_path_factory.mktemp("llama") / "m", "llama", layers=2)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_causal_lm_folder(tmp_path_factory.mktemp("qwen") / "m", "qwen2", layers=2, tie=True)


def fp_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def make_llm_plan(model, methods=("rtn",)):
    """A mixed plan: int4/int2/int3 grouped, int8, W8A8, fp16, each method of ``methods`` in turn."""
    from bitplan.assemble import make_plan
    from bitplan.core.graph import LayerGraph
    from bitplan.core.spec import QuantSpec
    from bitplan.costmodels import base_nbytes
    g = LayerGraph.build(model)
    cycle = [QuantSpec(4, 32), QuantSpec(8, act_bits=8), QuantSpec(2, 32), QuantSpec(3), QuantSpec(8), QuantSpec(16)]
    specs = {}
    for i, l in enumerate(g.layers):
        if "embedding" in l.kinds:
            specs[l.name] = QuantSpec(4, 32)
        else:
            s = cycle[i % len(cycle)]
            m = methods[i % len(methods)]
            specs[l.name] = s if s.bits == 16 or s.act_bits is not None else QuantSpec(s.bits, s.group_size, method=m)
    return make_plan(g, specs, base_nbytes(model, g.names))


def tensors(folder) -> dict:
    """Every tensor of a packed folder's safetensors file(s); a name in two files fails."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            part = load_file(os.path.join(folder, f))
            assert not set(part) & set(out), f
            out.update(part)
    return out


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)       # W8A8 at 7 bits / reference-path notices
    return w


@pytest.mark.parametrize("arch, methods", [("llama", ("rtn",)), ("qwen", ("rtn",)), ("llama", ("gptq", "rtn", "awq"))])
def test_streamed_folder_equals_the_whole_model_save(arch, methods, llama, qwen, tmp_path):
    import bitplan
    from bitplan.costmodels import model_nbytes
    from bitplan.packed_io import INDEX_FILE, load_packed, read_manifest, save_packed
    from bitplan.packed_stream import save_packed_streamed
    path = {"llama": llama, "qwen": qwen}[arch]
    model, batches = fp_model(path), _batches(samples=4)
    batches[0] = {**batches[0], "attention_mask": batches[0]["attention_mask"].clone()}
    batches[0]["attention_mask"][0, -5:] = 0          # padding: left out of the calibration statistics
    plan = make_llm_plan(model, methods)
    assert any(s.method != "rtn" for s in plan.layers.values()) == (methods != ("rtn",))
    w = _quiet()
    try:
        whole = save_packed(model, plan, tmp_path / "whole", source_dir=path, model_class="causal_lm", calib_data=batches)
        man = save_packed_streamed(path, plan, tmp_path / "streamed", calib_data=batches)
        ref = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed", calib_data=batches)
        loaded = load_packed(tmp_path / "streamed")
    finally:
        w.__exit__(None, None, None)
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    assert man["size_bytes"] == whole["size_bytes"] == plan.predicted["size_bytes"] == model_nbytes(loaded)
    assert read_manifest(tmp_path / "streamed")["weights"] == "sharded" and man["format_version"] == 3
    assert man["streamed"]["shards"] == 3 == sum(f.startswith("model-0") for f in os.listdir(tmp_path / "streamed"))
    assert (tmp_path / "streamed" / "plan.json").read_text() == (tmp_path / "whole" / "plan.json").read_text()
    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    assert set(index["weight_map"]) == set(b)
    if arch == "qwen":                                    # tied: stored once, one table at load
        assert not any(k.startswith("model.embed_tokens.") for k in b)
        assert loaded.lm_head.codes is loaded.model.embed_tokens.codes
    with torch.no_grad():
        for x in batches:
            assert torch.equal(loaded(**x).logits, ref(**x).logits)


def test_at_most_one_block_is_real_at_a_time(tmp_path, monkeypatch):
    """Counted independently of StreamedLM.peak_block_params: at every weight read and every shard
    write, how many decoder blocks hold a real (not meta) parameter or buffer, fp or packed."""
    import safetensors.torch

    from bitplan.packed_stream import save_packed_streamed
    from bitplan.sensitivity import hf_stream
    path = make_causal_lm_folder(tmp_path / "m", "llama", layers=3)
    plan = make_llm_plan(fp_model(path), ("gptq", "rtn"))     # calibrated: hidden states carried too
    live, seen = [], []

    def real_blocks(lm):
        return sum(any(not t.is_meta for t in list(b.parameters()) + list(b.buffers())) for b in lm.blocks)
    real_count, real_save = hf_stream.StreamedLM._count, safetensors.torch.save_file

    def count(self):
        live[:] = [self]
        seen.append(real_blocks(self))
        return real_count(self)

    def save(tensors, filename, metadata=None):
        seen.append(real_blocks(live[0]))
        return real_save(tensors, filename, metadata=metadata)
    monkeypatch.setattr(hf_stream.StreamedLM, "_count", count)
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        man = save_packed_streamed(path, plan, tmp_path / "out", calib_data=_batches(samples=4))
    st = man["streamed"]
    assert len(seen) == 1 + 3 + 4 and max(seen) == 1             # outer load, 3 block loads, 4 shard writes
    assert st["blocks"] == 3 and st["peak_block_params"] == st["block_params"] > 0
    assert 0 < st["bytes_read"] <= sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                                       if f.endswith(".safetensors"))


def test_a_failed_streamed_save_keeps_the_old_folder(llama, tmp_path, monkeypatch):
    import safetensors.torch

    from bitplan.packed_io import load_packed
    from bitplan.packed_stream import save_packed_streamed
    plan = make_llm_plan(fp_model(llama))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        save_packed_streamed(llama, plan, tmp_path / "out")
        calls, real = [], safetensors.torch.save_file

        def boom(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return real(*a, **k)
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
        with pytest.raises(OSError, match="disk full"):
            save_packed_streamed(llama, plan, tmp_path / "out")
        monkeypatch.undo()
        assert sorted(os.listdir(tmp_path)) == ["out"]                     # no temp folder left
        load_packed(tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a bitplan packed folder"):
        save_packed_streamed(llama, plan, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_inputs_raise_value_error(llama, qwen, tmp_path):
    import bitplan
    from bitplan.packed_stream import save_packed_streamed, streamable
    plan = make_llm_plan(fp_model(llama), ("gptq",))
    with pytest.raises(ValueError, match="calib_data"):
        save_packed_streamed(llama, plan, tmp_path / "a")
    with pytest.raises(bitplan.PlanMismatchError):
        save_packed_streamed(qwen, plan, tmp_path / "b", calib_data=_batches(samples=4))
    with pytest.raises(TypeError, match="bitplan.Plan"):
        save_packed_streamed(llama, plan.to_dict(), tmp_path / "c")
    for folder, why in ((tmp_path / "nope", "not a folder"), (tmp_path, "no config.json")):
        assert why in streamable(folder)
        with pytest.raises(ValueError, match=why):
            save_packed_streamed(folder, plan, tmp_path / "d")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert "no causal-LM architecture" in streamable(tmp_path / "enc")
    assert streamable(llama) is None
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_cli_apply_streams_a_causal_lm_folder(llama, tmp_path, capsys):
    from bitplan.cli import main
    from bitplan.packed_io import INDEX_FILE, WEIGHTS_FILE
    make_llm_plan(fp_model(llama)).save(tmp_path / "plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(["apply", "--model", llama, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "s"), "-q"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("streamed 2 decoder blocks one at a time") and "3 safetensors shards" in out
        assert main(["apply", "--model", llama, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "w"),
                     "--no-stream", "-q"]) == 0
    assert "streamed" not in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "s" / INDEX_FILE) and not os.path.exists(tmp_path / "s" / WEIGHTS_FILE)
    assert os.path.isfile(tmp_path / "w" / WEIGHTS_FILE) and not os.path.exists(tmp_path / "w" / INDEX_FILE)
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "w")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tied_tensor_stored_under_both_names_is_refused(qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    from bitplan.packed_io import INDEX_FILE, load_packed
    from bitplan.packed_stream import save_packed_streamed
    folder = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        save_packed_streamed(qwen, make_llm_plan(fp_model(qwen)), folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = index["weight_map"]["lm_head.codes"]                # the tied table, kept under one name
    sd = load_file(folder / shard)
    save_file({**sd, "model.embed_tokens.codes": sd["lm_head.codes"].clone()}, folder / shard)
    index["weight_map"]["model.embed_tokens.codes"] = shard
    index["metadata"]["total_size"] += sd["lm_head.codes"].numel()
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"stored twice \(tied names\) \[\('lm_head.codes', 'model.embed_tokens.codes'\)"):
        load_packed(folder)


def test_a_reference_path_fallback_is_reported_once_not_per_block(tmp_path):
    from bitplan.assemble import make_plan
    from bitplan.core.graph import LayerGraph
    from bitplan.core.spec import QuantSpec
    from bitplan.costmodels import base_nbytes
    from bitplan.packed_stream import save_packed_streamed
    path = make_causal_lm_folder(tmp_path / "m", "llama", layers=3)
    model = fp_model(path)
    g = LayerGraph.build(model)                 # int8 per group of 32: no real kernel, the 'dequant' path
    plan = make_plan(g, {l.name: QuantSpec(8, 32) for l in g.layers}, base_nbytes(model, g.names))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_packed_streamed(path, plan, tmp_path / "out")
    msgs = [str(w.message) for w in caught if "'dequant' path" in str(w.message)]
    assert len(msgs) == 1 and "as in the first of 3 decoder blocks that warned" in msgs[0], msgs
