"""Vectorised unpacking of the generic LSB-first packed codes (any bits 2..8).

:func:`bitplan.kernels.quantizer.unpack` expands every bit into its own int32 (readable, slow: it is
the reference). Here every group of ``bits`` bytes holds exactly 8 codes (8·bits bits), so a row is
read as 64-bit words, each shifted 8 times: a handful of tensor ops, same result bit for bit
(tests/kernels/test_lowbit.py checks ``torch.equal`` against ``unpack`` for every bit-width).

Example:
    >>> torch.equal(unpack_fast(pack(codes, 3), 3, k), unpack(pack(codes, 3), 3, k))
    True
"""
from __future__ import annotations

import torch

from .quantizer import packed_row_bytes

__all__ = ["unpack_fast"]


def unpack_fast(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(N, ceil(k*bits/8)) uint8 -> (N, k) uint8 codes; same layout as ``quantizer.unpack``."""
    n, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows have {nbytes} bytes but {k} codes of {bits} bits need "
                         f"{packed_row_bytes(k, bits)}")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:                                   # 2, 4 bits: whole codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask                  # (N, nbytes, 8/bits)
        return codes.reshape(n, -1)[:, :k]
    words = -(-nbytes // bits)                          # groups of `bits` bytes = 8 codes each
    pad = words * bits - nbytes
    p = packed if not pad else torch.cat([packed, packed.new_zeros(n, pad)], dim=1)
    wdt = torch.int32 if 8 * bits <= 31 else torch.int64               # 3 bits: 24-bit words
    p = p.reshape(n, words, bits).to(wdt)
    word = p[..., 0]
    for i in range(1, bits):
        word = word | (p[..., i] << (8 * i))                           # (N, words)
    code_shift = torch.arange(0, 8 * bits, bits, dtype=wdt, device=packed.device)
    codes = (word.unsqueeze(-1) >> code_shift) & mask                  # (N, words, 8)
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)
