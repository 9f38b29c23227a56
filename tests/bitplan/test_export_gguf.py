"""``--to gguf``: HF -> GGUF names from the gguf package's own map, bits -> the smallest GGUF type not
smaller than the plan (brute force over gguf.GGML_QUANT_SIZES), the llama-quantize overrides file
(parsed as llama-quantize parses it), and a real .gguf written from the fp weights, read back with
GGUFReader: every planned tensor at its type, dequantized values within one quantization step of
the fp weights. Models are tiny and randomly initialised (names, types and round trips, not quality)."""
from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from bitplan.export import export_plan, load_skeleton                          # noqa: E402
from bitplan.export.gguf_export import plan_gguf_types                         # noqa: E402
from bitplan.export.gguf_types import (CANDIDATES, bits_per_weight, gguf_type, overrides_text,  # noqa: E402
                                       parse_overrides, writable_types)
from bitplan.core.graph import find_layers                                          # noqa: E402
from bitplan.kernels.formats import QuantSpec, weight_nbytes                   # noqa: E402
from bitplan.plan import Plan                                                  # noqa: E402
from tests.fixtures_hf import save_tiny                                        # noqa: E402

SPECS = [QuantSpec(4, 32), QuantSpec(8), QuantSpec(2, 32, False), QuantSpec(4, 32, False), QuantSpec(5, 32),
         QuantSpec(3, 64), QuantSpec(16)]


def mixed_plan(model) -> Plan:
    """Every quantizable layer of ``model`` at a cycling option (kinds and shapes recorded as allocate does)."""
    layers = find_layers(model)
    return Plan("f", {l.name: SPECS[i % len(SPECS)] for i, l in enumerate(layers)},
                meta={"layer_shapes": {l.name: list(l.weight_shape) for l in layers},
                      "layer_kinds": {l.name: l.kind for l in layers}})


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def folder(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model, batches = save_tiny(request.param, d)
    return request.param, d, model


# ---------------------------------------------------------------- types
@pytest.mark.parametrize("k", [96, 4096])
@pytest.mark.parametrize("spec", [QuantSpec(b, g, s) for b in (2, 3, 4, 5, 6, 8) for g in (None, 32, 128)
                                  for s in (True, False)])
def test_type_is_the_smallest_not_smaller_than_the_plan(spec, k):
    n = 128
    plan = weight_nbytes(n, k, spec.bits, spec.group_size, spec.symmetric)
    fits = []
    for name in CANDIDATES:
        blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        if k % blk == 0 and n * k // blk * size >= plan:
            fits.append((n * k // blk * size, CANDIDATES.index(name), name))
    want = min(fits)[2] if fits else "F16"
    assert gguf_type(spec, n, k) == want
    got = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]]
    assert want == "F16" or n * k // got[0] * got[1] >= plan


def test_type_examples_and_writable_set():
    assert gguf_type(QuantSpec(4, 128), 4096, 4096) == "Q4_K"
    assert gguf_type(QuantSpec(4, 32, False), 4096, 4096) == "Q4_1"          # the same format: 5.0 bpw
    assert gguf_type(QuantSpec(2, 128), 4096, 4096) == "Q2_K"
    assert gguf_type(QuantSpec(4, 128), 4096, 672) == "Q4_0"                 # 672 % 256 != 0: block-32 types
    assert gguf_type(QuantSpec(4, 128), 64, 100) == "F16"                    # 100 % 32 != 0
    assert gguf_type(QuantSpec(16), 64, 64) == "F16"
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("Q8_0") == 8.5
    w = writable_types()
    assert {"Q4_0", "Q8_0", "F16"} <= set(w) and "Q4_K" not in w             # gguf 0.19 has no k-quant encoder


# ---------------------------------------------------------------- names + overrides
def test_names_and_overrides(folder, tmp_path):
    arch, d, model = folder
    plan = mixed_plan(model)
    out = tmp_path / "types.txt"
    msg = export_plan(plan, "gguf", out, check=d)
    assert "tensor types for llama-quantize" in msg
    text = out.read_text()
    parsed = parse_overrides(text)                      # what llama-quantize reads: pattern=type tokens
    assert all(re.fullmatch(r"\^[a-z0-9_\\.]+\$", p) for p, _ in parsed)
    types = dict((p[1:-1].replace("\\.", "."), t) for p, t in parsed)
    assert text == overrides_text(plan_gguf_types(plan, load_skeleton(d)))
    expect = {"llama": "blk.1.attn_q.weight", "qwen2": "blk.0.ffn_down.weight", "gpt2": "blk.0.attn_qkv.weight"}
    assert expect[arch] in types and "token_embd.weight" in types
    sk = load_skeleton(d)
    nm = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    for name, spec in plan.layers.items():
        g = nm.get_name(name + ".weight", try_suffixes=(".weight",))
        tied = sk.get_submodule(name).weight is sk.get_input_embeddings().weight
        g = "token_embd.weight" if tied else g
        w = sk.get_submodule(name).weight
        n, k = (w.shape[1], w.shape[0]) if type(sk.get_submodule(name)).__name__ == "Conv1D" else tuple(w.shape)
        assert types[g] == gguf_type(spec, n, k), name
    for p, _ in parsed:                                 # every anchored pattern matches exactly one tensor
        assert sum(bool(re.search(p, g)) for g in types) == 1


def test_gguf_needs_the_model_folder():
    plan = Plan("f", {"fc": QuantSpec(4)}, meta={"layer_shapes": {"fc": [8, 32]}})
    with pytest.raises(ValueError, match="needs the model folder"):
        export_plan(plan, "gguf", "x.txt")


# ---------------------------------------------------------------- the .gguf file
def _step(typ: str, block: np.ndarray) -> np.ndarray:
    """One quantization step of each 32-block (the largest rounding error a type makes)."""
    bits = int(typ[1])
    if typ.endswith("_1"):                                              # affine: (max - min) / (2^b - 1)
        return (block.max(1) - block.min(1)) / (2 ** bits - 1)
    return np.abs(block).max(1) / 2 ** (bits - 1)                      # symmetric: absmax / 2^(b-1)


def test_real_gguf_reads_back(folder, tmp_path):
    arch, d, model = folder
    plan = mixed_plan(model)
    out = tmp_path / "m.gguf"
    msg = export_plan(plan, "gguf", out, check=d)
    assert "wrote" in msg and out.exists() and (tmp_path / "m.gguf.tensor-types.txt").exists()
    sk = load_skeleton(d)
    want = plan_gguf_types(plan, sk, allowed=writable_types())
    reader = gguf.GGUFReader(out)
    got = {t.name: t for t in reader.tensors}
    kv = {f.name: f for f in reader.fields.values()}
    assert kv["general.architecture"].contents() == arch
    assert kv[f"{arch}.block_count"].contents() == 2
    assert kv["tokenizer.ggml.model"].contents() == "gpt2" and len(kv["tokenizer.ggml.tokens"].contents()) == 320
    nm = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    heads, kvh = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
    from bitplan.export.gguf_export import _llama_permute
    checked = 0
    for name, spec in plan.layers.items():
        mod = model.get_submodule(name)
        g = nm.get_name(name + ".weight", try_suffixes=(".weight",))
        if mod.weight is model.get_input_embeddings().weight:
            g = "token_embd.weight"
        t = got[g]
        assert t.tensor_type.name == want[g], g                       # the planned (writable) type
        w = mod.weight.detach().float().numpy()
        w = w.T if type(mod).__name__ == "Conv1D" else w               # GGUF rows are (out, in)
        if arch == "llama" and name.endswith("q_proj"):
            w = _llama_permute(w, heads)
        if arch == "llama" and name.endswith("k_proj"):
            w = _llama_permute(w, kvh)
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if want[g] == "F16":
            np.testing.assert_allclose(deq, w.astype(np.float16).astype(np.float32), rtol=0, atol=0)
        else:
            blocks, err = w.reshape(-1, 32), np.abs(deq - w).reshape(-1, 32).max(1)
            assert (err <= 1.02 * _step(want[g], blocks) + 1e-6).all(), g
            assert (err > 0).any()                                       # really quantized, not copied
        checked += 1
    assert checked == len(plan.layers)
    norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.tensor_type.name == "F32" for t in norms)
