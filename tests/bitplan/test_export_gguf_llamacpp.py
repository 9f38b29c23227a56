"""The GGUF export run by llama.cpp itself (skipped unless ``llama_cpp`` — llama-cpp-python, built from
source — imports; it is not a dependency): the written .gguf loads, its tokenizer splits text as the
HF tokenizer does, and its logits match the HF model carrying the same dequantized weights; an all-Q8_0
file of a model with position-sensitive attention matches the fp HF model (a wrong Conv1D transpose or
q/k rope permutation gives errors ~ the logits themselves); llama.cpp's own quantizer, given the
overrides as ``llama-quantize --tensor-type-file`` parses them, puts every planned tensor at its type."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (built from source)")
gguf = pytest.importorskip("gguf")

from bitplan.export import export_plan, load_skeleton                     # noqa: E402
from bitplan.export.gguf_export import plan_gguf_types                    # noqa: E402
from bitplan.export.gguf_types import overrides_text, parse_overrides     # noqa: E402
from bitplan.kernels.formats import QuantSpec                             # noqa: E402
from bitplan.plan import Plan                                             # noqa: E402
from tests.bitplan.test_export_gguf import mixed_plan                     # noqa: E402
from tests.fixtures_hf import save_tiny                                   # noqa: E402


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def folder(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model, batches = save_tiny(request.param, d)
    return request.param, d, model, batches


def _unpermute(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the converter's q/k row permutation (``_llama_permute``)."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _dequantized_hf(model, reader, arch):
    """A copy of ``model`` whose 2-D weights are the GGUF file's dequantized tensors (layout undone)."""
    import copy
    nm = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    m = copy.deepcopy(model)
    heads, kvh = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
    for name, mod in m.named_modules():
        w = getattr(mod, "weight", None)
        g = nm.get_name(name + ".weight", try_suffixes=(".weight",)) if w is not None and w.dim() == 2 else None
        if g not in tensors:
            continue
        t = tensors[g]
        x = gguf.quants.dequantize(t.data, t.tensor_type)                      # (N out, K in)
        if arch == "llama" and name.endswith("q_proj"):
            x = _unpermute(x, heads)
        if arch == "llama" and name.endswith("k_proj"):
            x = _unpermute(x, kvh)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            w.copy_(x.T if type(mod).__name__ == "Conv1D" else x)
    return m


def test_llama_cpp_runs_the_exported_file(folder, tmp_path):
    arch, d, model, batches = folder
    out = tmp_path / "m.gguf"
    export_plan(mixed_plan(model), "gguf", out, check=d)
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    assert llm.n_vocab() == model.config.vocab_size
    ids = batches[0][0].tolist()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])                                       # (T, vocab) logits
    ref_model = _dequantized_hf(model, gguf.GGUFReader(out), arch)
    with torch.no_grad():
        ref = ref_model(batches[0][:1]).logits[0].numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 0.05, err                        # llama.cpp rounds activations to 8 bits for quantized matmuls
    from transformers import AutoTokenizer
    text = "The quick brown fox jumps over the lazy dog."
    assert llm.tokenize(text.encode(), add_bos=False) == AutoTokenizer.from_pretrained(d)(text)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_llama_cpp_matches_fp_hf_at_q8(arch, tmp_path):
    model, batches = save_tiny(arch, tmp_path, sharp=True)
    plan = mixed_plan(model)
    plan = Plan("f", {n: QuantSpec(8) for n in plan.layers}, meta=plan.meta)               # -> Q8_0
    export_plan(plan, "gguf", tmp_path / "m.gguf", check=tmp_path)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = batches[0][0].tolist()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ref = model(batches[0][:1]).logits[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.25     # measured 0.02-0.08; a wrong layout: ~1.0


def test_llama_quantize_applies_the_overrides(folder, tmp_path):
    arch, d, model, _ = folder
    plan = mixed_plan(model)
    f16 = Plan("f", {n: QuantSpec(16) for n in plan.layers}, meta=plan.meta)
    export_plan(f16, "gguf", tmp_path / "f16.gguf", check=d)                    # the converter's F16 file
    want = plan_gguf_types(plan, load_skeleton(d))
    pairs = parse_overrides(overrides_text(want))                               # as llama-quantize reads them
    TO = llama_cpp.llama_model_tensor_override if hasattr(llama_cpp, "llama_model_tensor_override") else None
    if TO is None or not hasattr(llama_cpp.llama_model_quantize_params, "tt_overrides"):
        pytest.skip("this llama-cpp-python exposes no tensor-type overrides")
    keep = [p.encode() for p, _ in pairs]
    arr = (TO * (len(pairs) + 1))()
    for i, (p, t) in enumerate(pairs):
        arr[i].pattern = keep[i]
        arr[i].type = int(gguf.GGMLQuantizationType[t])
    arr[len(pairs)].pattern = None                                              # terminator: pattern NULL
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.pure = True
    params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(TO))
    rc = llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(), str(tmp_path / "q.gguf").encode(),
                                        ctypes.byref(params))
    assert rc == 0
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert {g: got[g] for g in want} == want
