"""One quantization option (:class:`QuantSpec`) and the option grid — torch-free.

An option is ``QuantSpec(bits, group_size, symmetric, act_bits, method)``: weight bits (2..8, or 16 =
keep the weight in fp16), the group size along the input dimension (None = one scale per output
channel), symmetric or with zero points, the input-activation bits (None = activations stay in
floating point; 8 = dynamic per-token int8, W8A8) and the rounding method of the shared quantizer
(``"rtn"`` round-to-nearest, ``"awq"``, ``"gptq"``, ... — the names the kernels registry knows).

The option set of a run is the product of the values given for each field (:func:`option_grid`);
which options a given layer can take is decided per layer by the quantizer's rules
(``bitplan.kernels.option_reason``), giving per-layer masks rather than a global failure.

Example:
    >>> option_grid(bits=(4, 8), group_size=(None, 128), act_bits=(None, 8))[:2]
    (QuantSpec(bits=4, group_size=None, ...), QuantSpec(bits=4, group_size=None, ..., act_bits=8))
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

__all__ = ["QuantSpec", "FP16_BITS", "WEIGHT_BITS", "ALLOWED_BITS", "ACT_BITS", "MAX_GROUP",
           "DEFAULT_METHOD", "check_bits", "check_group_size", "check_act_bits", "check_method",
           "check_symmetric",
           "option_grid", "as_tuple", "spec_from_dict", "SPEC_KEYS", "n_groups", "packed_row_bytes",
           "generic_nbytes"]

FP16_BITS = 16                                   # the "leave it in fp16" option
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)              # integer weight codes
ALLOWED_BITS = WEIGHT_BITS + (FP16_BITS,)
ACT_BITS = (8,)                                  # quantized activations (None = floating point)
MAX_GROUP = 1 << 20                              # no layer has an input dimension beyond this
DEFAULT_METHOD = "rtn"
_METHOD_RE = re.compile(r"^[a-z][a-z0-9_+]{0,31}$")
SPEC_KEYS = ("bits", "group_size", "symmetric", "act_bits", "method")


def check_bits(bits) -> int:
    """Validate one weight bit-width option; returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not a weight option; allowed: {list(ALLOWED_BITS)} "
                         f"(16 = keep the weight in fp16)")
    return int(bits)


def check_group_size(group_size) -> int | None:
    """None (one scale per output channel) or an int in [1, 2**20]."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP:
        raise ValueError(f"group_size={group_size!r} must be None (per output channel) or an integer in "
                         f"[1, {MAX_GROUP}]")
    return int(group_size)


def check_act_bits(act_bits) -> int | None:
    if act_bits is None:
        return None
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or act_bits not in ACT_BITS:
        raise ValueError(f"act_bits={act_bits!r} is not supported; allowed: None (floating-point "
                         f"activations) or {list(ACT_BITS)}")
    return int(act_bits)


def check_symmetric(symmetric) -> bool:
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric={symmetric!r} must be True or False")
    return symmetric


def check_method(method) -> str:
    if not isinstance(method, str) or not _METHOD_RE.match(method):
        raise ValueError(f"method={method!r} must be a quantizer method name such as 'rtn', 'awq' or 'gptq'")
    return method


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized: a column of the loss/cost tables, an entry of a plan."""
    bits: int                       # weight bits: 2..8, or 16 = keep fp16
    group_size: int | None = None   # weights per scale along the input dim; None = per output channel
    symmetric: bool = True          # False: an fp16 zero point per group as well
    act_bits: int | None = None     # input activation bits; None = floating point
    method: str = DEFAULT_METHOD    # how the shared quantizer rounds: rtn | awq | gptq | ...

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_symmetric(self.symmetric)
        check_act_bits(self.act_bits)
        check_method(self.method)
        if self.bits == FP16_BITS and (self.group_size is not None or self.act_bits is not None
                                       or self.method != DEFAULT_METHOD or not self.symmetric):
            raise ValueError(f"{self!r}: bits=16 keeps the weight in fp16; group_size, act_bits, method "
                             "and symmetric do not apply (use QuantSpec(16))")

    @property
    def label(self) -> str:
        """Short name: ``w4g128``, ``w8a8``, ``w4g128z`` (zero points), ``w3g64-gptq``, ``w16``."""
        s = f"w{self.bits}"
        if self.bits != FP16_BITS and self.group_size is not None:
            s += f"g{self.group_size}"
        if self.bits != FP16_BITS and not self.symmetric:
            s += "z"
        if self.act_bits is not None:
            s += f"a{self.act_bits}"
        if self.method != DEFAULT_METHOD:
            s += f"-{self.method}"
        return s

    @property
    def weight_only(self) -> bool:
        return self.act_bits is None

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "act_bits": self.act_bits, "method": self.method}


def spec_from_dict(d, where: str = "option") -> QuantSpec:
    """Strict inverse of :meth:`QuantSpec.to_dict` (every key required, no other key, exact types).

    Example: ``spec_from_dict({"bits": 4, "group_size": 128, "symmetric": True, "act_bits": None,
    "method": "rtn"})``
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object with keys {list(SPEC_KEYS)}, got {type(d).__name__}")
    missing = [k for k in SPEC_KEYS if k not in d]
    unknown = sorted(k for k in d if k not in SPEC_KEYS)
    if missing or unknown:
        raise ValueError(f"{where}: missing {missing}, unknown {unknown}; an option has exactly "
                         f"{list(SPEC_KEYS)}")
    try:
        return QuantSpec(d["bits"], d["group_size"], d["symmetric"], d["act_bits"], d["method"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def as_tuple(name: str, value, check) -> tuple:
    """A value or a tuple/list of values -> a non-empty tuple of distinct checked values."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not vals:
        raise ValueError(f"{name}={value!r} must be a value or a non-empty tuple of values")
    out = tuple(check(v) for v in vals)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={value!r} has duplicates; give distinct values")
    return out


def option_grid(bits=(2, 3, 4, 8), group_size=None, act_bits=None, method=DEFAULT_METHOD,
                symmetric=True) -> tuple[QuantSpec, ...]:
    """The product of the options given for each field, as an ordered tuple of distinct specs.

    Each argument is a value or a tuple of values. ``bits=16`` contributes one ``QuantSpec(16)``
    (group size, activation bits and method do not apply to an fp16 weight). Order: by bits, then
    group size (per channel first, then larger groups first), activation bits, symmetry, method.

    Example: ``option_grid((2, 4, 8), group_size=(None, 128), act_bits=(None, 8))`` -> 12 specs
    """
    B = as_tuple("bits", bits, check_bits)
    G = as_tuple("group_size", group_size, check_group_size)
    A = as_tuple("act_bits", act_bits, check_act_bits)
    M = as_tuple("method", method, check_method)
    S = as_tuple("symmetric", symmetric, check_symmetric)
    out = []
    for b, g, a, s, m in itertools.product(sorted(B), sorted(G, key=lambda g: -1 if g is None else -g),
                                           sorted(A, key=lambda a: -1 if a is None else a),
                                           sorted(S, reverse=True), M):
        spec = QuantSpec(FP16_BITS) if b == FP16_BITS else QuantSpec(b, g, s, a, m)
        if spec not in out:
            out.append(spec)
    return tuple(out)


def n_groups(k: int, group_size: int | None) -> int:
    """Groups per row for a row of ``k`` weights (a group as large as the row is one group)."""
    return 1 if group_size is None else -(-k // group_size)


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes one row of ``k`` codes occupies when packed LSB-first (``ceil(k*bits/8)``)."""
    return -(-k * bits // 8)


def generic_nbytes(n: int, k: int, bits: int, group_size: int | None = None, symmetric: bool = True) -> int:
    """Exact bytes of an (n, k) weight in the generic packed format: codes packed per row + one fp16
    scale (and one fp16 zero when asymmetric) per group; ``bits=16`` is the fp16 weight itself.

    Example: ``generic_nbytes(1536, 384, 4, 128)`` == 1536*192 + 1536*3*2 == 304128
    """
    check_bits(bits)
    if bits == FP16_BITS:
        return n * k * 2
    return n * packed_row_bytes(k, bits) + n * n_groups(k, group_size) * 2 * (1 if symmetric else 2)
