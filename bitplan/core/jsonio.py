"""Strict JSON files: one reader and one set of field checks for every file bitplan loads (plan,
sensitivity table, latency profile, packed-folder manifest), and atomic writers.

Reading (:func:`read_json`) refuses, with a ``ValueError`` that names the file: bytes that are not
UTF-8, invalid JSON, duplicate object keys, ``NaN`` / ``Infinity``, numbers that overflow a float or
integers beyond ±2**63, nesting deeper than ``MAX_DEPTH``, and files larger than ``max_bytes``.
Fields are then checked with the small validators below (:class:`Fields`): every required key
present, no unknown key, every value typed and range-checked, versions exact ints (``1.0`` and
``true`` are not ``1``). Nothing named inside a file is ever imported or executed.

Writing (:func:`atomic_write_text`, :func:`atomic_write_json`): a temp file in the same folder,
fsync, rename — a crash leaves the old file or the new one, never half of one. New files get the
usual permissions (0666 minus the umask), not ``mkstemp``'s 0600.

Example:
    >>> d = read_json("plan.json", "plan")
    >>> f = Fields(d, "plan.json", required={"schema_version": version({2})}, optional={})
    >>> f["schema_version"]
    2
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

__all__ = ["read_json", "atomic_write_text", "atomic_write_json", "json_dumps", "Fields", "version",
           "integer", "number", "string", "boolean", "optional", "list_of", "dict_of", "one_of",
           "MAX_DEPTH", "MAX_INT"]

MAX_DEPTH = 64                  # deepest nesting any bitplan file has is 5
MAX_INT = 2 ** 63               # no field counts more than an int64 holds
_MAX_BYTES = 2 * 1024 ** 3      # a sensitivity table of 10^6 layers x 32 options is ~0.7 GB


class _Reject(ValueError):
    pass


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Reject(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name):
    raise _Reject(f"{name} is not a number JSON allows (bitplan files hold finite numbers only)")


def _float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _Reject(f"number {s[:40]} overflows a 64-bit float")
    return v


def _int(s: str) -> int:
    if len(s) > 20:
        raise _Reject(f"integer {s[:40]}... is too large (beyond ±2**63)")
    v = int(s)
    if abs(v) > MAX_INT:
        raise _Reject(f"integer {s} is too large (beyond ±2**63)")
    return v


def _depth(obj, limit: int) -> int:
    """Nesting depth of a decoded value, iteratively (no recursion limit of its own)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def read_json(path, what: str, max_bytes: int = _MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one JSON file strictly; every failure is a ``ValueError`` naming ``path`` and ``what``.

    Example: ``d = read_json("sens.json", "sensitivity table")``
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes is larger than any {what} bitplan writes "
                             f"(limit {max_bytes})")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a {what}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float,
                         parse_int=_int)
    except _Reject as e:
        raise ValueError(f"{path}: not a valid {what}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid {what}: invalid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a valid {what}: nested deeper than {max_depth} levels") from None
    except ValueError as e:       # e.g. int() digit limits
        raise ValueError(f"{path}: not a valid {what}: {e}") from None
    if _depth(obj, max_depth) > max_depth:
        raise ValueError(f"{path}: not a valid {what}: nested deeper than {max_depth} levels")
    return obj


def json_dumps(obj, indent: int | None = 2) -> str:
    """Sorted keys, finite numbers only (``allow_nan=False``), numpy scalars/arrays as JSON values."""
    return json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False, default=_default)


def _default(o):
    """numpy scalars and arrays as JSON values, recognised without importing numpy."""
    if type(o).__module__ == "numpy":
        if hasattr(o, "tolist") and getattr(o, "ndim", 0) > 0:
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    Example: ``atomic_write_text("plan.json", plan.to_json() + "\\n")``
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj, indent: int | None = 2) -> None:
    """:func:`json_dumps` + :func:`atomic_write_text` (a trailing newline added)."""
    atomic_write_text(path, json_dumps(obj, indent) + "\n")


# ------------------------------------------------------------------------------ field validators
# A validator is ``check(value, where) -> value`` raising ValueError(f"{where} = {value!r} must be ...").
Check = Callable[[Any, str], Any]


def _fail(where: str, value, allowed: str):
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ValueError(f"{where} = {shown} must be {allowed}")


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An int (not a bool, not a float) in [lo, hi]."""
    rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"

    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) \
                or (hi is not None and v > hi):
            _fail(where, v, "an integer" + rng)
        return v
    return check


def number(lo: float | None = None, hi: float | None = None) -> Check:
    """A finite int or float in [lo, hi], returned as float."""
    rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"

    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(where, v, "a finite number" + rng)
        f = float(v)
        if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
            _fail(where, v, "a finite number" + rng)
        return f
    return check


def string(max_len: int = 4096, nonempty: bool = False) -> Check:
    def check(v, where):
        if not isinstance(v, str) or len(v) > max_len or (nonempty and not v):
            _fail(where, v, f"a {'non-empty ' if nonempty else ''}string of at most {max_len} characters")
        return v
    return check


def boolean() -> Check:
    def check(v, where):
        if not isinstance(v, bool):
            _fail(where, v, "true or false")
        return v
    return check


def one_of(*values) -> Check:
    def check(v, where):
        if isinstance(v, bool) and not any(isinstance(a, bool) for a in values):
            _fail(where, v, f"one of {list(values)}")
        if v not in values or type(v) not in {type(a) for a in values}:
            _fail(where, v, f"one of {list(values)}")
        return v
    return check


def optional(inner: Check) -> Check:
    """``None`` or what ``inner`` accepts."""
    def check(v, where):
        return None if v is None else inner(v, where)
    return check


def list_of(inner: Check, min_len: int = 0, max_len: int | None = None, unique: bool = False) -> Check:
    def check(v, where):
        if not isinstance(v, list) or len(v) < min_len or (max_len is not None and len(v) > max_len):
            _fail(where, v, f"a list of {min_len}..{max_len if max_len is not None else 'any'} items")
        out = [inner(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if unique:
            seen = set()
            for i, x in enumerate(out):
                key = json.dumps(x, sort_keys=True)
                if key in seen:
                    raise ValueError(f"{where}[{i}] = {x!r} is a duplicate; items must be distinct")
                seen.add(key)
        return out
    return check


def dict_of(inner: Check, key: Check | None = None, min_len: int = 0) -> Check:
    def check(v, where):
        if not isinstance(v, dict) or len(v) < min_len:
            _fail(where, v, f"an object{' with at least %d entries' % min_len if min_len else ''}")
        return {(key(k, f"{where} key") if key else k): inner(x, f"{where}[{k!r}]") for k, x in v.items()}
    return check


def version(supported: set[int] | frozenset[int]) -> Check:
    """A format version: an exact int among ``supported`` (``1.0``, ``true``, ``"1"`` are refused)."""
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or v not in supported:
            _fail(where, v, f"one of the versions this bitplan reads: {sorted(supported)}")
        return v
    return check


def anything() -> Check:
    """Free-form metadata (already strictly decoded: finite numbers, no duplicate keys)."""
    return lambda v, where: v


class Fields(dict):
    """A JSON object checked against ``required`` and ``optional`` validators; unknown keys refused.

    Example: ``f = Fields(d, "plan.json", {"bits": integer(2, 16)}, {"note": string()})``
    """

    def __init__(self, d, where: str, required: dict[str, Check], optional: dict[str, Check] | None = None):
        optional = optional or {}
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        missing = [k for k in required if k not in d]
        unknown = [k for k in d if k not in required and k not in optional]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing field(s) {missing}")
            if unknown:
                parts.append(f"unknown field(s) {sorted(unknown)[:10]}; allowed: {sorted({**required, **optional})}")
            raise ValueError(f"{where}: " + "; ".join(parts))
        super().__init__()
        for k, check in {**required, **optional}.items():
            if k in d:
                self[k] = check(d[k], f"{where}: {k}")
