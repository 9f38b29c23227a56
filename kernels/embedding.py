"""Packed embedding tables, and LM heads that share one with an embedding (tied weights).

An ``nn.Embedding`` weight (V, D) is quantized like any layer seen as (N = V rows, K = D): codes per
row packed LSB-first (rows independent), scales/zeros per group along the embedding dimension —
the generic packed format of ``formats.weight_nbytes``. A lookup gathers the packed rows of the
requested tokens and dequantizes only those (no full-table dequantization per call).

A head tied to the embedding (``lm_head.weight is embed.weight``) is ONE quantization decision: the
:class:`TiedHead` registers the very same code/scale/zero tensors as the embedding, so the packed
model holds them once (``costmodels.size`` counts them once) and its matmul dequantizes the table.
``bits=16`` keeps one fp16 table for both.

Example:
    >>> emb = nn.Embedding(1000, 64)
    >>> m = EmbeddingLookup.from_module(emb, "embedding", emb.weight, QuantSpec(4, 32))
    >>> m(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import FP16_BITS, QuantSpec, weight_nbytes
from .lowbit import unpack_fast
from .packed import dense_forward, layer_geometry
from .quantizer import pack, quantize
from .registry import register

__all__ = ["EmbeddingLookup", "TiedHead"]


def _dequant_rows(codes, scales, zeros, bits: int, group_size: int | None, k: int, dtype) -> torch.Tensor:
    """(R, bytes) packed rows + (R, G) scales/zeros -> (R, K) weights in ``dtype``."""
    if bits == FP16_BITS:
        return codes.to(dtype)
    c = unpack_fast(codes, bits, k).to(dtype) - 2 ** (bits - 1)                 # (R, K)
    r = c.shape[0]
    g = k if group_size is None or group_size >= k else group_size
    ng = -(-k // g)
    pad = ng * g - k
    if pad:
        c = torch.cat([c, c.new_zeros(r, pad)], 1)
    w = c.reshape(r, ng, g) * scales.to(dtype).unsqueeze(-1)                  # (R, G, g)
    if zeros is not None:
        w = w + zeros.to(dtype).unsqueeze(-1)
    return w.reshape(r, ng * g)[:, :k]


@register("embedding")
class EmbeddingLookup(nn.Module):
    """A quantized (or fp16) embedding table in the generic packed format; lookups dequantize only
    the rows they read."""

    def __init__(self, num: int, dim: int, bits: int, group_size: int | None, padding_idx, dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.bits, self.group_size, self.padding_idx, self.dtype = bits, group_size, padding_idx, dtype

    @classmethod
    def supports(cls, spec: QuantSpec, n: int, k: int, device: str, kind: str) -> str | None:
        if kind != "embedding":
            return f"runs embedding tables only (layer kind {kind!r})"
        if spec.act_bits is not None:
            return "a lookup has no input activations to quantize"
        return None

    @classmethod
    def nbytes(cls, spec: QuantSpec, n: int, k: int) -> int:
        return weight_nbytes(n, k, spec.bits, spec.group_size, spec.symmetric)

    @classmethod
    def from_module(cls, module: nn.Module, kind: str, w2d: torch.Tensor, spec: QuantSpec, qt=None):
        n, k = w2d.shape
        m = cls(n, k, spec.bits, spec.group_size, getattr(module, "padding_idx", None), w2d.dtype)
        if spec.bits == FP16_BITS:
            m.register_buffer("codes", w2d.detach().to(torch.float16).contiguous())      # (V, D) fp16
            m.register_buffer("scales", None)
            m.register_buffer("zeros", None)
            return m
        qt = qt if qt is not None else quantize(w2d.detach(), spec.bits, spec.group_size, spec.symmetric)
        m.register_buffer("codes", pack(qt.codes, qt.bits))                  # (V, ceil(D*b/8)) uint8
        m.register_buffer("scales", qt.scales)                               # (V, G) fp16
        m.register_buffer("zeros", qt.zeros)                                 # (V, G) fp16 or None
        return m

    def weight_2d(self, dtype=None) -> torch.Tensor:
        """The whole dequantized (V, D) table."""
        return _dequant_rows(self.codes, self.scales, self.zeros, self.bits, self.group_size,
                             self.embedding_dim, dtype or self.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = _dequant_rows(self.codes[flat], None if self.scales is None else self.scales[flat],
                             None if self.zeros is None else self.zeros[flat], self.bits, self.group_size,
                             self.embedding_dim, self.dtype)                 # (T, D)
        return rows.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel=embedding")


class TiedHead(nn.Module):
    """A Linear / HF Conv1D head whose weight IS an embedding table: shares the table's tensors
    (registered as its own buffers, stored once) and runs dequantize + dense op."""
    kernel = "tied"

    def __init__(self, table: EmbeddingLookup, module: nn.Module, kind: str):
        super().__init__()
        self.geo = layer_geometry(module, kind)
        self.bits, self.group_size, self.dtype = table.bits, table.group_size, table.dtype
        self.shape2d = (table.num_embeddings, table.embedding_dim)
        self.register_buffer("codes", table.codes)
        self.register_buffer("scales", table.scales)
        self.register_buffer("zeros", table.zeros)
        b = getattr(module, "bias", None)
        self.bias = nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None

    def forward(self, x):
        w = _dequant_rows(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.shape2d[1],
                          x.dtype)                                            # (V, D)
        if self.geo["kind"] == "linear":
            return F.linear(x, w, self.bias)
        return dense_forward(x, w, self.bias, self.geo)

    def extra_repr(self):
        return f"shape={self.shape2d}, bits={self.bits}, group_size={self.group_size}, kernel=tied"
