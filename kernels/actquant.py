"""Dynamic per-token activation quantization (the ``act_bits=8`` half of W8A8).

Each row of the (M, K) input (one token) gets its own symmetric scale ``s_x = absmax / 127``; codes
are ``round(x / s_x)`` clamped to [-127, 127]. The W8A8 kernels and the reference path both call
:func:`act_scales`, so they quantize activations identically. Pure functions, no device moves.

Example:
    >>> x = torch.randn(4, 384)
    >>> xq = fake_quantize_act(x, 8)             # (4, 384), what W8A8 kernels see
"""
from __future__ import annotations

import torch

__all__ = ["act_scales", "quantize_act", "quantize_act_u8", "fake_quantize_act", "ACT_TINY"]

ACT_TINY = 1e-8       # floor of a token's scale: an all-zero token stays zero, no division by 0


def act_scales(x2: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """(M, 1) fp32 per-token scales of a 2-D input."""
    qmax = 2 ** (bits - 1) - 1
    return x2.detach().float().abs().amax(-1, keepdim=True).clamp(min=ACT_TINY) / qmax


def quantize_act(x2: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (M, K), scales fp32 (M, 1)) of a 2-D input, symmetric per token."""
    if bits != 8:
        raise ValueError(f"act_bits={bits!r}: only 8-bit activations have a kernel")
    s = act_scales(x2, bits)
    q = torch.round(x2.float() / s).clamp_(-127, 127).to(torch.int8)
    return q, s


def quantize_act_u8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes shifted to uint8 (code + 128, what oneDNN wants) and fp32 (M, 1) scales; the same
    codes as :func:`quantize_act` in fewer ops (|x / s| <= 127 by construction, no clamp needed)."""
    s = act_scales(x2, 8)
    return torch.round(x2.float() / s).add_(128).to(torch.uint8), s


def fake_quantize_act(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Quantize-dequantize the last dim per token; ``bits`` None or 16 returns ``x`` unchanged."""
    if bits is None or bits == 16:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_act(x2, bits)
    return (q.float() * s).to(x.dtype).reshape(x.shape)
