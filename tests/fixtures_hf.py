"""Tiny randomly initialised Hugging Face causal LMs for the export tests (random weights: they
test names, shapes, types and round trips, never quality).

``llama`` (Linear, GQA, untied lm_head), ``qwen2`` (Linear with q/k/v biases, tied embeddings),
``gpt2`` (transformers ``Conv1D`` layers, weights stored (in, out); tied lm_head).
"""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "gpt2")
VOCAB = 320          # = the byte-level BPE tokenizer below: 256 bytes + 64 merges


def tiny_config(arch: str):
    """A small config of ``arch``: hidden 64, 2 layers, vocab 320 (row lengths divisible by 32, so every
    legacy GGUF block fits; the MLP is 256 wide, so k-quants (256-blocks) fit ffn_down)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    raise ValueError(f"arch={arch!r}; allowed: {ARCHS}")


def tiny_causal_lm(arch: str, seed: int = 0):
    """(model in eval mode, calibration batches: a list of one (2, 16) input_ids tensor)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, [ids]


def logits_loss(model, batch):
    """Label-free stand-in loss for allocate on a causal LM (mean square of the logits)."""
    return model(batch).logits.float().pow(2).mean()


def byte_bpe_tokenizer(folder) -> None:
    """Save a byte-level BPE tokenizer (GPT-2 style, VOCAB tokens, trained on the shipped sentences)
    as ``tokenizer.json`` + ``tokenizer_config.json`` in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bitplan.models import sentences
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sentences("calib"), trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def save_tiny(arch: str, folder, tokenizer: bool = True, seed: int = 0, sharp: bool = False):
    """Save the tiny ``arch`` model (safetensors) and, optionally, the BPE tokenizer to ``folder``;
    returns (model, batches). ``sharp``: query/key weights x20, so attention depends on positions
    (at init scale it is near uniform, and a wrong q/k layout or rope would go unnoticed)."""
    model, batches = tiny_causal_lm(arch, seed)
    if sharp:
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.endswith(("q_proj", "k_proj", "c_attn")):
                    m.weight.mul_(20)
    model.save_pretrained(folder)
    if tokenizer:
        byte_bpe_tokenizer(folder)
    return model, batches
