"""Tiny randomly initialised Hugging Face causal-LM folders for tests (no download, seconds to build).

A byte-level BPE tokenizer is trained with ``tokenizers`` on bitplan's shipped calibration text, and a
model of the requested architecture is built with ``AutoModelForCausalLM.from_config`` and saved with
``save_pretrained``. Random weights: these folders measure plumbing, sizes and memory, never quality.

Example:
    >>> path = make_causal_lm_folder(tmp_path / "qwen", "qwen2", tie=True)
"""
from __future__ import annotations

import functools
import os

__all__ = ["make_causal_lm_folder", "train_tokenizer"]

_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_head=4, n_positions=256),
}


@functools.lru_cache(maxsize=4)
def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE PreTrainedTokenizerFast trained on bitplan's calibration text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bitplan.models import text
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = text("calib")[:120_000]
    tok.train_from_iterator([corpus[i:i + 2000] for i in range(0, len(corpus), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_causal_lm_folder(path, arch: str = "llama", layers: int = 2, tie: bool = False, vocab_size: int = 512,
                          seed: int = 0) -> str:
    """Write a random ``arch`` causal LM (+ tokenizer) to ``path``; returns the path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    path = os.fspath(path)
    tok = train_tokenizer(vocab_size)
    cfg = dict(_CONFIGS[arch])
    model_type = cfg.pop("model_type")
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    cfg.update({key: layers, "vocab_size": len(tok), "tie_word_embeddings": tie,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
