"""``--to gguf``: llama.cpp tensor types for a plan, and a real ``.gguf`` file written from the fp weights.

Always written: the overrides file for ``llama-quantize --tensor-type-file`` (names, type mapping and
format in :mod:`.gguf_types`). When ``out`` ends in ``.gguf`` also a model file, written with the
``gguf`` package from the folder's safetensors (read one tensor at a time):

- planned tensors at the nearest type the ``gguf`` package quantizes itself (``gguf.quants``:
  Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / F16; 2- and 3-bit layers take Q4_0, one warning says so and the
  overrides file still names the llama-quantize type), other 2-D weights F16, 1-D tensors F32 (as
  llama.cpp's converter does);
- the converter's layout changes: HF Conv1D weights (GPT-2) transposed to (out, in); Llama q/k
  rows permuted to llama.cpp's rope layout (a row permutation: per-row quantization is unchanged);
- metadata: architecture hyper-parameters from the HF config (block count, context, widths, heads,
  KV heads, rope base and dimensions, norm epsilon, vocab size) — enough for llama.cpp to build the
  graph of the llama / qwen2 / gpt2 families; other architectures may need keys not written here;
- tokenizer: a byte-level BPE ``tokenizer.json`` (GPT-2, Llama-3, Qwen2 style) through the gguf
  package's ``BpeVocab`` + ``SpecialVocab`` (merges, special ids) with pre-tokenizer "default" (llama.cpp's
  converter identifies the pre-tokenizer by hashing a test string: not reproduced here); other
  tokenizers or none: ``tokenizer.ggml.model = "none"`` (token ids in, logits out) and a warning.

Checked with llama.cpp itself (tests/bitplan/test_export_gguf_llamacpp.py, when llama-cpp-python is
installed): the files load, tokenize as HF does, and give the HF model's logits.

Example:
    >>> export_gguf(plan, "model.gguf", "qwen2-folder", skeleton=load_skeleton("qwen2-folder"))
"""
from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..core.jsonio import atomic_write_text
from .gguf_types import _n_blocks, gguf_arch, gguf_name_map, gguf_type, overrides_text, writable_types
from .layers import export_layers, few

__all__ = ["export_gguf", "plan_gguf_types", "write_gguf_file"]

log = logging.getLogger("bitplan")


def _tensor_names(layers, nm):
    """{gguf tensor name: ExportLayer}; a tied group maps to the tensor llama.cpp reads (token_embd)."""
    out, unmapped = {}, []
    for l in layers:
        names = [nm.get_name(n + ".weight", try_suffixes=(".weight",)) for n in (l.name,) + l.tied]
        names = [n for n in names if n]
        if not names:
            unmapped.append(l.name)
            continue
        out["token_embd.weight" if "token_embd.weight" in names else names[0]] = l
    if unmapped:
        raise ValueError(f"{len(unmapped)} planned layers have no GGUF tensor name in gguf's map for this "
                         f"architecture ({few(unmapped)})")
    return out


def plan_gguf_types(plan, skeleton, strip_prefix: str = "", add_prefix: str = "", allowed=None) -> dict[str, str]:
    """{gguf tensor name: GGUF type} for every 2-D weight of the model: planned ones at their mapped
    type (``gguf_type``; ``allowed`` restricts the candidates), the others F16."""
    layers = export_layers(plan, strip_prefix, add_prefix, skeleton)
    nm = gguf_name_map(skeleton.config)
    planned = _tensor_names(layers, nm)
    types = {}
    out_emb, in_emb = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    for n, m in skeleton.named_modules():
        w = getattr(m, "weight", None)
        g = nm.get_name(n + ".weight", try_suffixes=(".weight",)) if w is not None and w.dim() == 2 else None
        if g is not None and not (tied and g == "output.weight"):     # tied: the file has token_embd only
            types[g] = "F16"
    for g, l in planned.items():
        n, k = l.nk              # (out, in): the GGUF row is K long
        types[g] = gguf_type(l.spec, n, k) if allowed is None else gguf_type(l.spec, n, k, allowed)
    return types


# ---------------------------------------------------------------- the .gguf file
def _cfg(config, *keys, default=None):
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return default


def _rope_theta(config):
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rp, dict) and rp.get("rope_theta") is not None:
        return float(rp["rope_theta"])
    v = getattr(config, "rope_theta", None)
    return float(v) if v is not None else None


def _write_hparams(w, config, n_blocks: int) -> None:
    """Architecture keys llama.cpp reads for the llama / qwen2 / gpt2 families, from the HF config."""
    hidden = _cfg(config, "hidden_size", "n_embd")
    heads = _cfg(config, "num_attention_heads", "n_head")
    w.add_block_count(n_blocks)
    w.add_context_length(int(_cfg(config, "max_position_embeddings", "n_positions", "n_ctx")))
    w.add_embedding_length(int(hidden))
    w.add_feed_forward_length(int(_cfg(config, "intermediate_size", "n_inner", default=4 * hidden)))
    w.add_head_count(int(heads))
    kv = _cfg(config, "num_key_value_heads")
    if kv is not None:
        w.add_head_count_kv(int(kv))
    if (theta := _rope_theta(config)) is not None:
        w.add_rope_freq_base(theta)
    if (eps := _cfg(config, "rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (eps := _cfg(config, "layer_norm_epsilon", "layer_norm_eps")) is not None:
        w.add_layer_norm_eps(float(eps))
    w.add_vocab_size(int(config.vocab_size))
    if kv is not None:                               # rotary models
        w.add_rope_dimension_count(int(_cfg(config, "head_dim", default=hidden // heads)))


def _write_vocab(w, folder: str, n_vocab: int) -> str:
    """Tokenizer metadata from a byte-level BPE tokenizer.json; returns what was written."""
    import gguf
    try:
        vocab = gguf.vocab.BpeVocab(Path(folder))
    except (FileNotFoundError, ValueError, KeyError) as e:
        w.add_tokenizer_model("none")
        log.warning("gguf export: no byte-level BPE tokenizer.json in %s (%s): tokenizer.ggml.model='none' "
                    "(the file takes token ids, it cannot tokenize text)", folder, e)
        return "no tokenizer"
    tokens, types = [], []
    for text, _score, typ in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else str(text).encode())
        types.append(typ)
    for i in range(len(tokens), n_vocab):              # the converter pads the vocab to the model's size
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[:n_vocab])
    w.add_token_types(types[:n_vocab])
    gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    return f"BPE tokenizer ({len(tokens[:n_vocab])} tokens)"


def _checkpoint(folder: str):
    """Yield (name, fp32 numpy array) from the folder's safetensors, one tensor at a time."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"{folder!r} has no *.safetensors weights (the gguf file is written from them; "
                         "pickled .bin checkpoints are not read)")
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name).float().numpy()


def _llama_permute(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows from HF's rotate-half layout to interleaved pairs."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_gguf_file(plan, folder: str, out: str, skeleton, strip_prefix: str = "", add_prefix: str = "") -> dict:
    """Write ``out`` (.gguf) from the fp safetensors of ``folder``; returns {gguf name: written type}."""
    import gguf
    config = skeleton.config
    arch = gguf_arch(config)
    nm = gguf_name_map(config)
    allowed = writable_types()
    planned = plan_gguf_types(plan, skeleton, strip_prefix, add_prefix, allowed)
    layers = _tensor_names(export_layers(plan, strip_prefix, add_prefix, skeleton), nm)
    planned = {g: t for g, t in planned.items() if g in layers}
    kinds = {n: type(m).__name__ for n, m in skeleton.named_modules()}
    heads, kv = _cfg(config, "num_attention_heads", "n_head"), _cfg(config, "num_key_value_heads")
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)    # tensors spill to disk
    w.add_name(os.path.basename(os.path.abspath(folder)))
    _write_hparams(w, config, _n_blocks(config))
    w.add_file_type(gguf.LlamaFileType.GUESSED)          # a mixture: no single file type
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = _write_vocab(w, folder, int(config.vocab_size))
    out_emb, in_emb = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    written, skipped = {}, []
    for name, x in _checkpoint(folder):
        g = nm.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None or g in written or (tied and g == "output.weight"):   # tied: llama.cpp reads token_embd
            skipped.append(name)               # buffers the runtime recomputes (GPT-2 attn.bias masks, ...)
            continue
        module = name.rsplit(".", 1)[0]
        if kinds.get(module) == "Conv1D" and x.ndim == 2:
            x = x.T                            # HF Conv1D stores (in, out); GGUF wants (out, in)
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
            x = _llama_permute(x, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
            x = _llama_permute(x, kv or heads)
        x = np.ascontiguousarray(x, dtype=np.float32)
        typ = planned.get(g, "F16" if x.ndim >= 2 else "F32")
        qt = gguf.GGMLQuantizationType[typ]
        if typ in ("F16", "F32"):
            w.add_tensor(g, x.astype(np.float16 if typ == "F16" else np.float32))
        else:
            w.add_tensor(g, gguf.quants.quantize(x, qt), raw_dtype=qt)
        written[g] = typ
    missing = sorted(set(planned) - set(written))
    if missing:
        w.close()
        os.unlink(tmp)
        raise ValueError(f"{len(missing)} planned tensors are not in {folder}'s safetensors ({few(missing)})")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    log.debug("gguf export: %s; skipped checkpoint tensors: %s", vocab, few(skipped))
    return written


def export_gguf(plan, out, folder, strip_prefix: str = "", add_prefix: str = "", skeleton=None) -> str:
    """Write the llama-quantize overrides (``out`` or ``out + ".tensor-types.txt"``) and, when ``out``
    ends in ``.gguf``, the model file. Returns a one-line summary."""
    from .layers import load_skeleton
    out = os.fspath(out)
    skeleton = skeleton if skeleton is not None else load_skeleton(folder)
    types = plan_gguf_types(plan, skeleton, strip_prefix, add_prefix)
    txt = out + ".tensor-types.txt" if out.endswith(".gguf") else out
    atomic_write_text(txt, overrides_text(types))
    n_planned = sum(1 for l in export_layers(plan, strip_prefix, add_prefix, skeleton))
    hist = json.dumps(dict(sorted({t: list(types.values()).count(t) for t in set(types.values())}.items())))
    msg = (f"wrote {txt} ({len(types)} tensor types for llama-quantize, {n_planned} planned: {hist}; run "
           f"llama-quantize --pure --tensor-type-file {txt} model-f16.gguf out.gguf Q8_0)")
    if not out.endswith(".gguf"):
        return msg
    written = write_gguf_file(plan, folder, out, skeleton, strip_prefix, add_prefix)
    larger = [g for g, t in written.items() if g in types and types[g] != t and types[g] != "F16"]
    if larger:
        log.warning("gguf export: %d planned tensors are written at a larger type than llama-quantize would use "
                    "(the gguf package cannot quantize k-quants in Python): %s — requantize from F16 with the "
                    "overrides file for the planned sizes", len(larger),
                    few(f"{g} {written[g]} (plan {types[g]})" for g in larger))
    whist = json.dumps(dict(sorted({t: list(written.values()).count(t) for t in set(written.values())}.items())))
    return msg + f"; wrote {out} ({len(written)} tensors: {whist})"
