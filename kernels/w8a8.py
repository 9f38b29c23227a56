"""W8A8 packed Linear: 8-bit per-channel weights and 8-bit per-token activations (the ``w8a8`` kernel).

CPU: oneDNN ``qlinear_pointwise`` on uint8 activations with the weight prepacked; the activation range
comes from the CPU (``capability.w8a8_cpu_path``: 8-bit codes where VNNI/AMX make the u8 x s8 pair sums
exact, 7-bit codes (|code| <= 63) otherwise, exactly what the fake quantizer models). CUDA:
``torch._int_mm`` (int8 x int8 -> int32). Shared helpers with the weight-only kernels: ``qlinear``.
"""
from __future__ import annotations

import copy
import warnings

import torch

from .actquant import quantize_act, quantize_act_u8
from .capability import W8A8_CPU_IMPLS, onednn_qlinear_available, w8a8_cpu_path
from .qlinear import _KernelLinear, _common_checks, _finish
from .quantizer import n_groups, quantize
from .registry import has_op, register

__all__ = ["W8A8"]

_W8A8_WARNED = False


@register("w8a8")
class W8A8(_KernelLinear):
    """int8 per-channel symmetric weights x int8 per-token dynamic activations; integer-exact.

    ``impl`` (shown in the repr) says which path runs; CPU paths come from
    ``capability.w8a8_cpu_path()``, the same decision the activation fake quantizer reads:
    - ``onednn_u8``: oneDNN ``qlinear_pointwise`` on a prepacked weight, activations as uint8
      (code + 128, zero point 128; int8 activations fall to a ~1000x slower reference path),
      activation scale 1 so the kernel returns Σ q_x·q_w·s_w; the per-token scale multiplies after.
      Only on CPUs whose int8 dot product accumulates in int32 (VNNI/AMX), checked by a probe.
    - ``onednn_u7``: the same call with 7-bit codes (|code| ≤ 63, uint8 = code + 64): exact on every
      CPU, since a u8·s8 pair sum stays below the int16 limit. Chosen where 8-bit codes saturate.
    - ``int_mm`` (CUDA): ``torch._int_mm`` (needs M > 16: small batches are zero-padded to 17 rows).
    """

    @classmethod
    def supports(cls, spec, n, k, device, kind):
        why = _common_checks(spec, kind, 8)
        if why:
            return why
        if spec.act_bits != 8:
            return "needs act_bits=8"
        if not spec.symmetric:
            return "needs symmetric weights"
        if n_groups(k, spec.group_size) != 1:
            return f"needs one scale per output channel (group_size={spec.group_size}, K={k})"
        if device == "cpu":
            path = w8a8_cpu_path()
            if path.impl is None:
                return f"no exact W8A8 kernel on this CPU ({path.reason})"
        else:
            if k % 8 or n % 8:
                return f"torch._int_mm needs K % 8 == 0 and N % 8 == 0 (N={n}, K={k})"
            if not has_op("_int_mm", "cuda"):
                return "torch._int_mm has no CUDA kernel in this torch build"
        return None

    @classmethod
    def nbytes(cls, spec, n, k):
        return n * k + n * 2                                         # int8 + fp16 scale

    @classmethod
    def from_module(cls, module, kind, w2d, spec, qt=None, impl: str | None = None):
        """``impl=None``: this device's path. Forcing one (tests, benchmarks) is a ValueError when it
        cannot run here; a forced CPU impl may differ from what ``fake_quantize_act`` models."""
        m = cls()
        m._setup(module, kind, w2d, spec)
        m.impl, m.act_qmax = cls._choose_impl(m.device_type, impl)
        qt = qt if qt is not None else quantize(w2d, 8, spec.group_size, True)
        w8 = (qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous()                  # (N, K)
        m.register_buffer("scales", qt.scales.reshape(-1, 1).contiguous())                # (N, 1) fp16
        m._set_weight(w8)
        return m

    @staticmethod
    def _choose_impl(device_type: str, impl: str | None) -> tuple[str, int]:
        global _W8A8_WARNED
        if device_type != "cpu":
            if impl not in (None, "int_mm"):
                raise ValueError(f"impl={impl!r} is not a {device_type} W8A8 path; allowed: 'int_mm'")
            return "int_mm", 127
        path = w8a8_cpu_path()
        if impl is None:
            if path.impl is None:
                raise ValueError(f"no exact W8A8 kernel on this CPU ({path.reason}); "
                                 "select_kernel routes such layers to 'dequant'")
            if path.impl == "onednn_u7" and not _W8A8_WARNED:
                _W8A8_WARNED = True
                warnings.warn(f"W8A8 on this CPU quantizes activations to 7 bits (|code| <= 63): "
                              f"{path.reason}. Fake quantization (kernels.actquant) models the same; "
                              f"CPUs with VNNI/AMX run 8-bit activations.", RuntimeWarning, stacklevel=4)
            return path.impl, path.act_qmax
        if impl not in W8A8_CPU_IMPLS:
            raise ValueError(f"impl={impl!r} is not a CPU W8A8 path; allowed: {sorted(W8A8_CPU_IMPLS)}")
        if not onednn_qlinear_available():
            raise ValueError(f"impl={impl!r} needs oneDNN qlinear, missing in this torch build")
        return impl, W8A8_CPU_IMPLS[impl]

    def _set_weight(self, w8: torch.Tensor) -> None:
        if self.device_type == "cpu":   # the prepacked copy is the only copy; not a tensor with storage
            self.register_buffer("weight_packed", torch.ops.onednn.qlinear_prepack(w8, None),
                                 persistent=False)
        else:
            self.register_buffer("weight_int8", w8)

    def int8_weight(self) -> torch.Tensor:
        """The (N, K) int8 weight as a plain tensor."""
        if self.device_type == "cpu":
            return self.weight_packed.to_dense().t().contiguous()
        return self.weight_int8

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.device_type == "cpu":
            destination[prefix + "weight_int8"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight_int8"
        if self.device_type == "cpu" and key in state_dict:
            self._set_weight(state_dict[key].to(torch.int8).contiguous())
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __deepcopy__(self, memo):
        """oneDNN's opaque prepacked tensor cannot be deep-copied: copy via plain int8."""
        if self.device_type != "cpu":
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return new
        w8 = self.int8_weight()
        packed = self._buffers.pop("weight_packed")
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self._buffers["weight_packed"] = packed
        new._set_weight(w8)
        return new

    def forward(self, x):
        n, k = self.shape2d
        x2 = x.reshape(-1, k)                                                     # (M, K)
        sw = self.scales.reshape(-1).float()                                      # (N,)
        if self.device_type == "cpu":
            xu, sx = quantize_act_u8(x2, self.act_qmax)                           # uint8 (M, K), (M, 1)
            y = torch.ops.onednn.qlinear_pointwise(
                xu, 1.0, self.act_qmax + 1, self.weight_packed, sw, torch.zeros(1, dtype=torch.int64),
                None, 1.0, 0, torch.float32, "none", [], "")                      # (M, N) fp32
        else:
            xq, sx = quantize_act(x2, 8)                                          # int8 (M, K), (M, 1)
            m = xq.shape[0]
            if m <= 16:
                xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
            y = torch._int_mm(xq, self.weight_int8.t())[:m].float() * sw
        return _finish(y * sx, self.bias, x, n)
