"""A Hugging Face causal LM run one decoder block at a time, weights read from its safetensors shards.

What the block-streaming estimator (``streaming.py``) stands on, in the way GPTQ-style tools stream:

- :func:`skeleton`: the model built from ``config.json`` on the meta device (shapes only, no memory),
  never with remote code; buffers that are computed, not stored (rotary ``inv_freq``), are rebuilt
  on the CPU.
- :class:`Shards`: per-tensor reads from ``model.safetensors`` or the shards named by
  ``model.safetensors.index.json`` (``safe_open``: only the tensor asked for is read).
- :class:`StreamedLM`: materialises a named submodule from the shards (``load_state_dict(assign=True)``)
  and sends it back to meta afterwards (``release``); captures each calibration batch's input to
  decoder block 0 and the keyword arguments the model passes to its blocks (masks, rotary cos/sin)
  by stopping the model's own forward there (no model-specific code); runs one block on carried
  hidden states; and runs the model's own head (final norm, lm_head, soft-capping, ...) on final
  hidden states by replacing every block with a pass-through for one forward.

Only the modules outside the blocks (embeddings, final norm, lm_head) and ONE block are ever real;
``peak_block_params`` counts the decoder-block parameters that were materialised at once.

Example:
    >>> lm = StreamedLM("path/to/llama")
    >>> h, kw = lm.block_inputs(batches)          # per batch: block-0 input and block kwargs
    >>> with lm.materialised(lm.block_names[0]):
    ...     h1 = [lm.run_block(0, x, k) for x, k in zip(h, kw)]
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

__all__ = ["skeleton", "Shards", "StreamedLM", "source_dir", "return_freed_memory", "run_uncached"]


def run_uncached(model, batch):
    """One batch through the model without a KV cache (blocks are replayed on the same inputs)."""
    from collections.abc import Mapping

    from ..core.batches import run_model
    if isinstance(batch, Mapping):
        return model(**batch, use_cache=False)
    return run_model(model, batch)


def return_freed_memory() -> None:
    """Hand heap memory freed by a block that went back to meta to the OS (glibc's ``malloc_trim``;
    nothing elsewhere). Without it a freed block's tensors can stay in malloc's arenas, fragmented
    between later allocations: measured on a 16-block Llama folder (hidden 1024), the packed save's
    peak RSS crept up by one to two weight matrices per block in some runs and not others (590-904
    MiB over runs); with it, 600-620 MiB in every run."""
    import ctypes
    import ctypes.util
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def source_dir(model) -> str:
    """The HF causal-LM folder behind ``model``: a path, or a model whose config names its folder."""
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else \
        getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"sensitivity method 'block' streams a Hugging Face causal-LM folder; got "
                         f"{type(model).__name__} {str(path or '')[:200]!r} (give the folder path, or a model "
                         "loaded from one: bitplan.models.load_model(DIR, lazy=True).model)")
    return path


def skeleton(path: str) -> nn.Module:
    """The causal LM of ``path/config.json`` with every parameter on the meta device (eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:      # transformers raises many kinds
        raise ValueError(f"{path}: the config does not load without remote code "
                         f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.config._name_or_path = path
    for name, mod in list(model.named_modules()):        # computed buffers (rotary inv_freq): rebuild
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if any(True for _ in mod.parameters(recurse=False)):
                raise ValueError(f"{path}: module {name} ({type(mod).__name__}) has computed buffers and "
                                 "parameters; block streaming does not support this architecture")
            try:
                new = type(mod)(config=model.config)
            except Exception as e:
                raise ValueError(f"{path}: cannot rebuild {name} ({type(mod).__name__}) outside the meta "
                                 f"device for block streaming ({type(e).__name__}: {e})") from None
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model.eval()


class Shards:
    """Per-tensor reads from a folder's safetensors file(s), as float32 CPU tensors."""

    def __init__(self, path: str):
        idx = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(idx):
            from ..core.jsonio import read_json
            d = read_json(idx, "safetensors index")
            wmap = d.get("weight_map") if isinstance(d, dict) else None
            if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
                raise ValueError(f"{idx}: 'weight_map' must map tensor names to shard file names")
            bad = sorted({v for v in wmap.values() if os.path.basename(v) != v or v in ("", ".", "..")})
            if bad:       # a shard is a file of this folder: never a path that leaves it
                raise ValueError(f"{idx}: shard names must be plain file names in the folder, got {bad[:3]}")
            self.where = {k: os.path.join(path, v) for k, v in wmap.items()}
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            from safetensors import safe_open
            file = os.path.join(path, "model.safetensors")
            with safe_open(file, "pt") as f:
                self.where = {k: file for k in f.keys()}
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json; block streaming "
                             "reads safetensors shards (re-save the model with save_pretrained)")
        self.bytes_read = 0

    def resolve(self, name: str, prefix: str) -> str | None:
        """The checkpoint key of parameter ``name`` (with or without the base-model prefix)."""
        for k in (name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}"):
            if k in self.where:
                return k
        return None

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.where[key], "pt") as f:
            t = f.get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t.float()


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a decoder block for one forward: returns ``out`` (or its input) unchanged."""

    def __init__(self, inner: nn.Module, out=None, as_tuple: bool = False):
        super().__init__()
        object.__setattr__(self, "_inner", inner)        # not a child: its meta weights stay invisible
        self.out, self.as_tuple = out, as_tuple

    def __getattr__(self, name):                        # attributes the model reads (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self.out is None else self.out
        return (h,) if self.as_tuple else h


def _decoder_blocks(model: nn.Module):
    """(fqn, ModuleList) of the decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: cannot find its {n} decoder blocks as one ModuleList "
                         f"(found {[f for f, _ in found]}); block streaming does not support this model")
    return found[0]


class StreamedLM:
    """One causal-LM folder, materialised a module at a time (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.model = skeleton(path)
        self.shards = Shards(path)
        self.prefix = self.model.base_model_prefix
        self.blocks_fqn, self.blocks = _decoder_blocks(self.model)
        self.block_names = [f"{self.blocks_fqn}.{i}" for i in range(len(self.blocks))]
        self.as_tuple = False
        self.peak_block_params = 0
        # everything outside the blocks: embeddings, final norm, lm_head (materialised once, kept)
        self.outer = [n for n, p in self.model.named_parameters(remove_duplicate=False)
                      if not n.startswith(self.blocks_fqn + ".")]

    # ------------------------------------------------------------- weights
    def _load(self, names: list[str]) -> None:
        sd = {}
        for n in names:
            key = self.shards.resolve(n, self.prefix)
            if key is None:          # a tied lm_head is not stored: the embedding is
                emb = self.model.get_input_embeddings()
                out = self.model.get_output_embeddings()
                if out is not None and n.endswith("weight") and self.model.get_submodule(n.rsplit(".", 1)[0]) is out:
                    emb_name = next(k for k, m in self.model.named_modules() if m is emb) + ".weight"
                    key = self.shards.resolve(emb_name, self.prefix)
            if key is None:
                raise ValueError(f"{self.path}: parameter {n} is not in the safetensors files")
            sd[n] = self.shards.get(key)
        self.model.load_state_dict(sd, strict=False, assign=True)
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if out is not None and getattr(self.model.config, "tie_word_embeddings", False) and emb.weight.is_meta is False:
            out.weight = emb.weight                          # keep the tie after assign=True
        self._count()

    def _count(self) -> None:
        live = sum(p.numel() for p in self.blocks.parameters() if not p.is_meta)
        self.peak_block_params = max(self.peak_block_params, live)

    def load_outer(self) -> None:
        """Materialise every parameter outside the decoder blocks (embeddings, norms, lm_head)."""
        self._load(self.outer)

    @contextlib.contextmanager
    def materialised(self, fqn: str):
        """Block ``fqn``'s parameters real (read from the shards) inside the context, meta after."""
        mod = self.model.get_submodule(fqn)
        self._load([f"{fqn}.{n}" for n, _ in mod.named_parameters()])
        try:
            yield mod
        finally:
            mod.to("meta")
            return_freed_memory()

    # ------------------------------------------------------------- running
    @torch.no_grad()
    def block_inputs(self, batches: list, run) -> tuple[list, list]:
        """Per batch: the hidden states entering block 0 and the (args, kwargs) the model gives its
        blocks. ``run(model, batch)`` runs one batch (the embeddings must be materialised)."""
        hs, kws = [], []

        def grab(mod, args, kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            hs.append(h.detach())
            kw = {k: (None if k in ("past_key_value", "past_key_values", "layer_past") else v)
                  for k, v in kwargs.items() if k != "hidden_states"}
            kws.append((tuple(args[1:]), kw))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for b in batches:
                try:
                    run(self.model, b)
                except _Stop:
                    continue
                raise ValueError(f"{type(self.model).__name__} never called its decoder block 0")
        finally:
            handle.remove()
        return hs, kws

    def run_block(self, i: int, h: torch.Tensor, kw) -> torch.Tensor:
        """Decoder block ``i`` (materialised) on hidden states ``h`` with the captured arguments."""
        args, kwargs = kw
        out = self.blocks[i](h, *args, **kwargs)
        if isinstance(out, tuple):
            self.as_tuple = True
            out = out[0]
        return out

    @contextlib.contextmanager
    def head_only(self):
        """Inside: ``set_final(h)`` then ``run(model, batch)`` computes the model's output from final
        hidden states ``h`` (every block a pass-through, the last one returning ``h``)."""
        saved = list(self.blocks)
        n = len(saved)
        stand = [_PassThrough(m, None, self.as_tuple) for m in saved]
        for i, m in enumerate(stand):
            self.blocks[i] = m
        try:
            yield lambda h: setattr(stand[n - 1], "out", h)
        finally:
            for i, m in enumerate(saved):
                self.blocks[i] = m
