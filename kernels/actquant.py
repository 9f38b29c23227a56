"""Dynamic per-token activation quantization (the ``act_bits=8`` half of W8A8).

Each row of the (M, K) input (one token) gets its own symmetric scale ``s_x = absmax / qmax``;
codes are ``round(x / s_x)`` clamped to [-qmax, qmax]. ``qmax`` is what the W8A8 kernel on the
input's device really uses (:func:`act_qmax`): 127 on CUDA and on CPUs with a VNNI-class int8 dot
product, 63 on CPUs without one (oneDNN's u8 x s8 pair sums saturate int16 there with 8-bit codes;
``kernels/capability.py``). The W8A8 kernels and the reference path (:func:`fake_quantize_act`)
both go through :func:`act_scales`, so fake quantization models exactly what runs.

Example:
    >>> x = torch.randn(4, 384)
    >>> xq = fake_quantize_act(x, 8)             # (4, 384), what this machine's W8A8 kernel sees
    >>> q, s = quantize_act(x, 8, qmax=63)        # int8 codes in [-63, 63], (4, 1) fp32 scales
"""
from __future__ import annotations

import torch

__all__ = ["act_qmax", "act_scales", "quantize_act", "quantize_act_u8", "fake_quantize_act", "ACT_TINY"]

ACT_TINY = 1e-8       # floor of a token's scale: an all-zero token stays zero, no division by 0


def act_qmax(bits: int, device) -> int:
    """Largest |code| the ``bits``-bit activation quantizer uses on ``device`` (see module doc).

    Example: ``act_qmax(8, "cuda") == 127``; on an AVX2-only CPU ``act_qmax(8, "cpu") == 63``.
    """
    if bits != 8:
        raise ValueError(f"act_bits={bits!r}: only 8-bit activations have a kernel")
    if torch.device(device).type == "cpu":
        from .capability import w8a8_cpu_path
        return w8a8_cpu_path().act_qmax
    return 127


def _check_qmax(bits: int, qmax: int | None) -> int:
    if bits != 8:
        raise ValueError(f"act_bits={bits!r}: only 8-bit activations have a kernel")
    if qmax is None:
        return 127
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= 127:
        raise ValueError(f"qmax={qmax!r} must be an int in 1..127")
    return qmax


def act_scales(x2: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """(M, 1) fp32 per-token scales of a 2-D input: absmax / qmax (floored at ``ACT_TINY``)."""
    return x2.detach().float().abs().amax(-1, keepdim=True).clamp(min=ACT_TINY) / qmax


def quantize_act(x2: torch.Tensor, bits: int = 8, qmax: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (M, K) in [-qmax, qmax], scales fp32 (M, 1)) of a 2-D input, symmetric per token.
    ``qmax=None`` is the full 8-bit range 127 (device-independent); pass ``act_qmax(8, device)``
    for what the device's kernel uses."""
    qmax = _check_qmax(bits, qmax)
    s = act_scales(x2, qmax)
    q = torch.round(x2.float() / s).clamp_(-qmax, qmax).to(torch.int8)
    return q, s


def quantize_act_u8(x2: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes shifted to uint8 (code + qmax + 1, what oneDNN wants; zero point qmax + 1) and fp32 (M, 1)
    scales; the same codes as :func:`quantize_act` in fewer ops (|x / s| <= qmax by construction)."""
    qmax = _check_qmax(8, qmax)
    s = act_scales(x2, qmax)
    return torch.round(x2.float() / s).add_(qmax + 1).to(torch.uint8), s


def fake_quantize_act(x: torch.Tensor, bits: int | None, qmax: int | None = None) -> torch.Tensor:
    """Quantize-dequantize the last dim per token, with the range the W8A8 kernel on ``x``'s device
    uses (``qmax=None``: :func:`act_qmax`); ``bits`` None or 16 returns ``x`` unchanged."""
    if bits is None or bits == 16:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_act(x2, bits, act_qmax(bits, x.device) if qmax is None else qmax)
    return (q.float() * s).to(x.dtype).reshape(x.shape)
