"""GGUF names and quant types of a plan, and the per-tensor overrides llama.cpp's ``llama-quantize`` reads.

Names: HF module names -> GGUF tensor names with the ``gguf`` package's own map
(``gguf.get_tensor_name_map(arch, n_blocks)``: ``model.layers.0.self_attn.q_proj`` ->
``blk.0.attn_q.weight``, ``model.embed_tokens`` -> ``token_embd.weight``, ``lm_head`` ->
``output.weight``). The architecture is the ``gguf.MODEL_ARCH`` whose name is the HF config's
``model_type`` (``llama``, ``qwen2``, ``gpt2``, ...); the only aliases are the HF types that
llama.cpp's converter writes as another architecture (:data:`ARCH_ALIASES`). A tied ``lm_head`` is
the ``token_embd.weight`` tensor (llama.cpp reads the output from it).

Types: a layer planned at (bits, group, symmetric) on an (N, K) weight takes ``P`` bytes in bitplan's
packed format (codes + fp16 scales/zeros, ``kernels.formats.weight_nbytes``). Its GGUF type is the
smallest one, among :data:`CANDIDATES` whose block divides K, with ``N*K/block*type_size >= P``;
ties go to the earlier candidate (k-quants before the legacy types of equal size). Sizes come from
``gguf.GGML_QUANT_SIZES``. bits/weight of each type and what a plan maps to (K divisible by 256):

    Q2_K 2.625   w2 (except g32 asym)                     Q3_K 3.4375  w3 g>=64 / per-channel, w2 g32 asym
    Q4_K 4.5     w3 g32, w4 sym / g>=64 / per-channel     Q4_1 5.0     w4 g32 asym (the same format)
    Q5_K 5.5     w5 (except g32 asym)                     Q5_1 6.0     w5 g32 asym (the same format)
    Q6_K 6.5625  w6 (except g32 asym)                     Q8_0 8.5     w6 g32 asym, w7, w8 (except g32 asym)
    F16  16      w8 g32 asym, w16
With K % 256 != 0 the legacy types (block 32) are used: Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0,
Q8_0 8.5 (w2/w3/w4 sym -> Q4_0, ...); K % 32 != 0 -> F16 (as llama-quantize itself falls back).
:func:`writable_types` are the types the ``gguf`` package quantizes in Python (``gguf.quants``:
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 + F16/F32 in gguf 0.19, found by trying): the real ``.gguf`` writer
maps within those only (2- and 3-bit layers then take Q4_0 — larger than planned; said in a warning).

Overrides (``llama-quantize --tensor-type-file FILE``, llama.cpp tools/quantize): whitespace-separated
``pattern=type`` tokens, no comments; each pattern is lower-cased, compiled as a std::regex and
``regex_search``-ed against tensor names, the first match wins; type names are ggml's (case-insensitive).
We write one anchored, escaped pattern per 2-D weight (``^blk\\.0\\.attn_q\\.weight$=q4_k``); tensors the
plan does not quantize get ``f16``. Overrides apply only when the base type is quantized, so run
``llama-quantize --pure --tensor-type-file FILE model-f16.gguf out.gguf Q8_0`` (``--pure``: no k-quant
mixture for anything unlisted).

Example:
    >>> gguf_type(QuantSpec(4, 128), 4096, 4096)     # GGMLQuantizationType.Q4_K
"""
from __future__ import annotations

import re

from ..core.spec import QuantSpec, generic_nbytes as weight_nbytes

__all__ = ["CANDIDATES", "ARCH_ALIASES", "gguf_arch", "gguf_name_map", "gguf_type", "writable_types",
           "overrides_text", "parse_overrides", "bits_per_weight"]

# llama-quantize types a plan may map to, in tie-break order (k-quants first at equal size). IQ types
# are left out: the low ones need an importance matrix, and none is smaller than a k-quant of equal
# quality here; TQ (ternary), MXFP4/NVFP4 (float) are not integer grids.
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16")
ARCH_ALIASES = {"mistral": "llama"}       # HF model_type -> the GGUF architecture llama.cpp writes it as


def _g():
    import gguf
    return gguf


def bits_per_weight(name: str) -> float:
    """Bits per weight of a GGUF type from ``gguf.GGML_QUANT_SIZES`` (Q4_K -> 4.5)."""
    g = _g()
    blk, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[name]]
    return size * 8 / blk


def gguf_arch(config):
    """The ``gguf.MODEL_ARCH`` of an HF config (its ``model_type``; ``ValueError`` when gguf has none)."""
    g = _g()
    mt = getattr(config, "model_type", None)
    mt = ARCH_ALIASES.get(mt, mt)
    by_name = {v: k for k, v in g.MODEL_ARCH_NAMES.items()}
    if mt not in by_name:
        raise ValueError(f"model_type={getattr(config, 'model_type', None)!r} has no GGUF architecture in gguf "
                         f"{_version()} (known: {len(by_name)} names, e.g. llama, qwen2, gpt2)")
    return by_name[mt]


def _version() -> str:
    from importlib.metadata import version
    try:
        return version("gguf")
    except Exception:
        return "?"


def _n_blocks(config) -> int:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, k, None), int):
            return getattr(config, k)
    raise ValueError(f"{type(config).__name__} names no layer count (num_hidden_layers / n_layer)")


def gguf_name_map(config):
    """``gguf.TensorNameMap`` for the config's architecture and depth."""
    g = _g()
    return g.get_tensor_name_map(gguf_arch(config), _n_blocks(config))


def writable_types() -> tuple[str, ...]:
    """The CANDIDATES the installed ``gguf`` package can quantize itself (found by trying)."""
    import numpy as np
    g = _g()
    out = []
    for name in CANDIDATES:
        t = g.GGMLQuantizationType[name]
        blk = g.GGML_QUANT_SIZES[t][0]
        try:
            g.quants.quantize(np.zeros((1, max(blk, 256)), dtype=np.float32), t)
        except NotImplementedError:
            continue
        out.append(name)
    return tuple(out)


def gguf_type(spec: QuantSpec, n: int, k: int, allowed=CANDIDATES) -> str:
    """Name of the smallest GGUF type in ``allowed`` storing an (n, k) weight in no fewer bytes than
    ``spec`` does in bitplan's packed format (block must divide k); "F16" when none fits."""
    g = _g()
    if spec.bits == 16:
        return "F16"
    plan = weight_nbytes(n, k, spec.bits, spec.group_size, spec.symmetric)          # bytes
    best = None
    for name in allowed:
        blk, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[name]]
        if k % blk:
            continue
        nbytes = n * (k // blk) * size
        if nbytes >= plan and (best is None or nbytes < best[0]):
            best = (nbytes, name)
    return best[1] if best else "F16"


def overrides_text(types: dict[str, str]) -> str:
    """``llama-quantize --tensor-type-file`` content: one ``^escaped$=type`` token per line, no comments."""
    return "".join(f"^{re.escape(n)}$={t.lower()}\n" for n, t in types.items())


def parse_overrides(text: str) -> list[tuple[str, str]]:
    """[(pattern, TYPE)] the way llama-quantize reads a tensor-type file (whitespace tokens, split at
    the first '=', pattern lower-cased); ``ValueError`` on a malformed token or an unknown type."""
    g = _g()
    out = []
    for tok in text.split():
        pat, sep, typ = tok.partition("=")
        if not sep or not pat or not typ:
            raise ValueError(f"malformed tensor type {tok!r} (need pattern=type)")
        names = {t.name.lower(): t.name for t in g.GGMLQuantizationType}
        if typ.lower() not in names:
            raise ValueError(f"invalid ggml type {typ!r} in {tok!r}")
        out.append((pat.lower(), names[typ.lower()]))
    return out
