"""What this machine's CPU runs exactly: ISA flags, and which W8A8 path is exact here.

oneDNN's int8 matmul (``onednn.qlinear_pointwise``, uint8 activations x int8 weights) multiplies
with ``vpmaddubsw`` on x86 CPUs without a VNNI-class dot product: two u8·s8 products are summed into
a *saturating int16* before the int32 accumulation. With uint8 activations centred on 128 (8-bit
codes + 128, up to 255) a pair reaches 2·255·127 = 64,770 > 32,767, so results are silently wrong
(17.8 dB against an exact integer matmul on Gaussian data, measured on an AVX2-only AMD EPYC).
CPUs with AVX512-VNNI / AVX-VNNI / AMX-INT8 accumulate in int32 (``vpdpbusd``, AMX tiles): exact.
With 7-bit codes (|code| ≤ 63, zero point 64, uint8 ≤ 127) a pair is at most 2·127·128 = 32,512:
exact on every oneDNN int8 kernel — FBGEMM's ``reduce_range`` for the same reason.

``w8a8_cpu_path()`` picks, once per process, the fastest path that is exact here:

============ ======================================= ============================================
impl         when                                    activation codes
============ ======================================= ============================================
onednn_u8    VNNI-class int8 dot product (or non-x86)  8-bit, |code| ≤ 127 (uint8 = code + 128)
             AND an adversarial probe is exact
onednn_u7    otherwise, if its probe is exact          7-bit, |code| ≤ 63  (uint8 = code + 64)
None         no exact oneDNN path: W8A8 layers take    8-bit (the reference path's fake quant)
             the reference ``dequant`` path
============ ======================================= ============================================

The probe runs both activation ranges through oneDNN on small worst-case matrices (every uint8 at
its maximum against ±127 weights, and random signs) and compares with an int64 matmul; the ISA flag
alone is not trusted (``ONEDNN_MAX_CPU_ISA`` can cap what oneDNN uses). ``torch._int_mm`` is exact
too but is a scalar loop on CPUs without VNNI (7–160× slower than fp32 dense here; see
``benchmarks/kernels.py``), so it is not a CPU path. The activation fake quantizer
(``actquant.act_qmax``) reads the same decision, so fake quantization models exactly what runs.

Example:
    >>> cpu_capability()["w8a8_cpu"]          # 'onednn_u7' on an AVX2-only CPU
    >>> w8a8_cpu_path().act_qmax              # 63 there, 127 on a VNNI CPU
"""
from __future__ import annotations

import platform
from functools import lru_cache
from typing import NamedTuple

import torch

__all__ = ["cpu_flags", "cpu_capability", "w8a8_cpu_path", "W8A8Path", "INT8_DOT_FLAGS",
           "W8A8_CPU_IMPLS", "onednn_qlinear_available", "probe_onednn_exact"]

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")   # x86: u8·s8 dot products into int32
W8A8_CPU_IMPLS = {"onednn_u8": 127, "onednn_u7": 63}        # impl -> largest |activation code|
_REPORTED = INT8_DOT_FLAGS + ("avx2", "avx512_f", "avx512_bw", "avx512_bf16", "amx_tile", "amx_bf16")


class W8A8Path(NamedTuple):
    impl: str | None     # 'onednn_u8' | 'onednn_u7' | None (no exact CPU path: reference dequant)
    act_qmax: int        # largest |activation code| the activation quantizer uses on CPU
    reason: str          # why this path (names the flags and probe results)


@lru_cache(None)
def cpu_flags() -> dict:
    """ISA flags of this CPU: ``torch.cpu.get_capabilities()`` (cpuinfo) when this torch has it,
    else the ``flags`` line of /proc/cpuinfo (Linux), else {}. Cached."""
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            return {"source": "torch.cpu.get_capabilities", **dict(get())}
        except Exception:       # cpuinfo failed to initialise: fall through
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    names = set(line.split(":", 1)[1].split())
                    alias = {"avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
                             "avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_bf16": "avx512_bf16",
                             "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "avx2": "avx2"}
                    return {"source": "/proc/cpuinfo", **{k: v in names for k, v in alias.items()}}
    except OSError:
        pass
    return {"source": "none"}


def onednn_qlinear_available() -> bool:
    """Does this torch build have oneDNN's prepacked int8 linear (``onednn.qlinear_pointwise``)?"""
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
                    and hasattr(torch.ops.onednn, "qlinear_prepack"))
    except (AttributeError, RuntimeError):
        return False


# (M, K, N) of the probe: one row (gemv kernels), a few rows, and a brgemm-sized block; every K is
# a multiple of 4 and of 2 so the u8 pairs and quads of the dot-product kernels are all full.
_PROBE_SHAPES = ((1, 64, 16), (5, 96, 24), (33, 256, 48))


def probe_onednn_exact(qmax: int) -> bool:
    """Is oneDNN's u8 x s8 linear bit-exact on this CPU for activation codes |c| ≤ ``qmax``?
    Worst cases: every code at +qmax (uint8 at its maximum) against all +127 weights,
    and random ±qmax codes against random ±127 weights; outputs compared with an int64 matmul
    (all sums < 2^24, so exact in the fp32 output)."""
    if not onednn_qlinear_available():
        return False
    g = torch.Generator().manual_seed(0)
    zp = qmax + 1
    try:
        for m, k, n in _PROBE_SHAPES:
            sign = lambda *s: torch.randint(0, 2, s, generator=g, dtype=torch.int16) * 2 - 1  # noqa: E731
            xs = [torch.full((m, k), qmax, dtype=torch.int16), sign(m, k) * qmax]
            ws = [torch.full((n, k), 127, dtype=torch.int16), sign(n, k) * 127]
            for w in ws:
                packed = torch.ops.onednn.qlinear_prepack(w.to(torch.int8), None)
                for x in xs:
                    y = torch.ops.onednn.qlinear_pointwise(
                        (x + zp).to(torch.uint8), 1.0, zp, packed, torch.ones(n),
                        torch.zeros(1, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
                    if not torch.equal(y.double(), (x.double() @ w.double().t())):
                        return False
    except RuntimeError:
        return False
    return True


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@lru_cache(None)
def w8a8_cpu_path() -> W8A8Path:
    """The W8A8 path CPU layers run in this process (see the module doc). Cached."""
    if not onednn_qlinear_available():
        return W8A8Path(None, 127, "oneDNN qlinear is missing in this torch build")
    flags = cpu_flags()
    dot = [f for f in INT8_DOT_FLAGS if flags.get(f)]
    wide_ok = bool(dot) or not _is_x86()
    if wide_ok and probe_onednn_exact(127):
        return W8A8Path("onednn_u8", 127, f"int8 dot product ({', '.join(dot) or platform.machine()}): "
                                           "8-bit activations exact")
    why8 = ("no AVX512-VNNI / AVX-VNNI / AMX-INT8: oneDNN u8 x s8 pair sums saturate int16"
            if not wide_ok else "oneDNN u8 x s8 with 8-bit activations failed the exactness probe")
    if probe_onednn_exact(63):
        return W8A8Path("onednn_u7", 63, f"{why8}; 7-bit activations (|code| <= 63) are exact")
    return W8A8Path(None, 127, f"{why8}; 7-bit activations also failed the exactness probe")


@lru_cache(None)
def int8pack_k_multiple() -> int:
    """The K multiple ``torch._weight_int8pack_mm`` reads safely on this CPU.

    Its x86 kernels load activations with ALIGNED vector loads, row by row: the AVX512 kernel 16 bf16
    values (32 bytes) per step, the AVX2 kernel 8 (16 bytes); a row length K that is not a multiple
    makes the next row's loads misaligned (SIGSEGV for M > 1) or read past the row (wrong numbers for
    M = 1). Measured with torch 2.13: K = 8, 24, 40 ... crash on an AVX512 CPU and pass on an AVX2 one
    (benchmarks/kernel_constraints.py). The ISA is the one torch dispatches to
    (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``); anything
    not AVX2-class is given the AVX512 rule, the stricter one.
    """
    try:
        isa = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        isa = "unknown"
    return 8 if isa in ("AVX2", "DEFAULT") or isa.startswith("SVE") or isa == "NEON" else 16


def cpu_capability() -> dict:
    """JSON-able summary for results files and reports: CPU name, architecture, torch's ISA level,
    the ISA flags that decide int8 kernels, and the W8A8 path chosen here.

    Example: ``{"cpu": "AMD EPYC", "arch": "x86_64", "torch_isa": "AVX2", "int8_dot": False,
    "flags": ["avx2"], "flags_source": "torch.cpu.get_capabilities", "w8a8_cpu": "onednn_u7",
    "w8a8_act_qmax": 63, "w8a8_reason": "..."}``
    """
    flags = cpu_flags()
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:
        isa = "unknown"
    path = w8a8_cpu_path()
    return {"cpu": str(flags.get("cpu_name") or platform.processor() or "unknown"),
            "arch": platform.machine(), "torch_isa": isa, "torch_version": torch.__version__,
            "int8_dot": any(flags.get(f) for f in INT8_DOT_FLAGS),
            "flags": [f for f in _REPORTED if flags.get(f)], "flags_source": flags.get("source", "none"),
            "w8a8_cpu": path.impl, "w8a8_act_qmax": path.act_qmax, "w8a8_reason": path.reason,
            "int8pack_k_multiple": int8pack_k_multiple()}
