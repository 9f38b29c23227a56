"""Sensitivity: the (L, B) table of predicted loss increases every estimator returns.

Columns are options (``QuantSpec``: bits x group size x activation bits x method); ``allowed`` (L, B)
marks the options each layer can take (a layer whose K is not a multiple of 32 has no g32 options).
Saved as JSON (atomic write, strict load) with the options it was scored for and the model
fingerprint, so a table can be re-solved at new budgets without re-scoring — and
:meth:`Sensitivity.check_matches` refuses a table scored for other options or another model,
naming the difference.

Example:
    >>> t = score(model, batches, method="hessian"); t.save("sens.json")
    >>> t2 = load("sens.json"); (t2.loss == t.loss).all()
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..core.jsonio import (Fields, anything, atomic_write_text, boolean, integer, json_dumps, list_of,
                           number, read_json, string, version)
from ..core.spec import FP16_BITS, QuantSpec, check_bits, spec_from_dict

__all__ = ["Sensitivity", "load", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
_READS = frozenset({1, 2})
_MAX_LAYERS, _MAX_OPTIONS = 1_000_000, 4096


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


@dataclass(frozen=True)
class Sensitivity:
    """Predicted loss increase ``loss[l, b]`` of quantizing only layer ``names[l]`` to ``options[b]``."""
    names: list[str]                 # (L,) layer fqns, the allocator's row order
    options: tuple[QuantSpec, ...]   # (B,) the options the table was scored for
    loss: np.ndarray                 # (L, B) finite, >= 0 (0 where not allowed)
    method: str
    allowed: np.ndarray | None = None   # (L, B) bool; None = every option allowed
    model_fingerprint: str = ""
    meta: dict = field(default_factory=dict)   # estimator details (traces, stderr, probes, seconds)

    def __post_init__(self):
        opts = tuple(self.options)
        if not opts or not all(isinstance(o, QuantSpec) for o in opts):
            raise ValueError("options must be a non-empty sequence of QuantSpec")
        if len(set(opts)) != len(opts):
            raise ValueError(f"options has duplicates: {[o.label for o in opts]}")
        loss = np.asarray(self.loss, dtype=np.float64)
        if loss.shape != (len(self.names), len(opts)):
            raise ValueError(f"loss table has shape {loss.shape}; expected (layers, options) = "
                             f"{(len(self.names), len(opts))}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("layer names must be distinct")
        allowed = np.ones(loss.shape, bool) if self.allowed is None else np.asarray(self.allowed, bool)
        if allowed.shape != loss.shape:
            raise ValueError(f"allowed has shape {allowed.shape}; expected {loss.shape}")
        if not allowed.any(1).all():
            raise ValueError(f"layer {self.names[int(np.argmin(allowed.any(1)))]} has no allowed option")
        if not np.all(np.isfinite(loss)) or (loss < 0).any():
            bad = np.argwhere(~np.isfinite(loss) | (loss < 0))[0]
            raise ValueError(f"sensitivity of {self.names[bad[0]]} at option {opts[bad[1]].label} is "
                             f"{loss[tuple(bad)]}; must be finite and >= 0")
        object.__setattr__(self, "loss", np.where(allowed, loss, 0.0))
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "names", list(self.names))
        object.__setattr__(self, "options", opts)

    @property
    def bits(self) -> tuple[int, ...]:
        """(B,) weight bits of each option."""
        return tuple(o.bits for o in self.options)

    def check_matches(self, names, options, fingerprint: str | None = None, where: str = "sensitivity table"):
        """Refuse (ValueError naming the difference) a table scored for other layers, options or model.

        Example: ``table.check_matches(graph.names, specs, graph.fingerprint)``
        """
        diffs = []
        names, options = list(names), tuple(options)
        if self.names != names:
            if set(self.names) != set(names):
                miss = sorted(set(names) - set(self.names))
                extra = sorted(set(self.names) - set(names))
                diffs.append(f"layers differ ({len(self.names)} in the table, {len(names)} in the model; "
                             f"missing e.g. {miss[:3]}, unknown e.g. {extra[:3]})")
            else:
                diffs.append("layer order differs from the model's")
        elif fingerprint and self.model_fingerprint and self.model_fingerprint != fingerprint:
            diffs.append(f"model fingerprint {self.model_fingerprint} vs {fingerprint} (weight shapes differ)")
        if self.options != options:
            have, want = [o.label for o in self.options], [o.label for o in options]
            diffs.append(f"options differ: scored for {have}, asked for {want}"
                         + (f" (not scored: {[w for w in want if w not in have][:6]})"
                            if set(want) - set(have) else ""))
        if diffs:
            raise ValueError(f"{where} does not match this run: " + "; ".join(diffs)
                             + ". Re-score (delete the cache file or give another one)")

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "method": self.method, "names": self.names,
                "options": [o.to_dict() for o in self.options], "loss": self.loss.tolist(),
                "allowed": self.allowed.tolist(), "model_fingerprint": self.model_fingerprint,
                "meta": _jsonable(self.meta)}

    def save(self, path) -> None:
        """Write as JSON, atomically (floats round-trip exactly)."""
        atomic_write_text(path, json_dumps(self.to_dict(), indent=None) + "\n")

    @classmethod
    def from_dict(cls, d, where: str = "sensitivity table") -> "Sensitivity":
        """Strict: exact version, every field typed and range-checked, no unknown or missing field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        ver = version(_READS)(d.get("schema_version"), f"{where}: schema_version")
        names_c = list_of(string(1024, nonempty=True), 1, _MAX_LAYERS, unique=True)
        row = list_of(number(0), 1, _MAX_OPTIONS)
        if ver == 1:
            f = Fields(d, where, {"schema_version": anything(), "method": string(64, True), "names": names_c,
                                  "bits": list_of(lambda v, w: _bits1(v, w), 1, 64, unique=True),
                                  "loss": list_of(row, 1, _MAX_LAYERS),
                                  "group_size": lambda v, w: _group1(v, w), "symmetric": boolean(),
                                  "model_fingerprint": string(128), "meta": anything()})
            options = tuple(QuantSpec(FP16_BITS) if b == FP16_BITS else
                            QuantSpec(b, f["group_size"], f["symmetric"]) for b in f["bits"])
            allowed = None
        else:
            f = Fields(d, where, {"schema_version": anything(), "method": string(64, True), "names": names_c,
                                  "options": list_of(lambda v, w: spec_from_dict(v, w), 1, _MAX_OPTIONS),
                                  "loss": list_of(row, 1, _MAX_LAYERS),
                                  "allowed": list_of(list_of(boolean(), 1, _MAX_OPTIONS), 1, _MAX_LAYERS),
                                  "model_fingerprint": string(128), "meta": anything()})
            options, allowed = tuple(f["options"]), f["allowed"]
        if not isinstance(f["meta"], dict):
            raise ValueError(f"{where}: meta must be an object")
        L, B = len(f["names"]), len(options)
        if len(f["loss"]) != L or any(len(r) != B for r in f["loss"]):
            raise ValueError(f"{where}: loss must be {L} rows (one per name) of {B} numbers (one per option)")
        if allowed is not None and (len(allowed) != L or any(len(r) != B for r in allowed)):
            raise ValueError(f"{where}: allowed must be {L} rows of {B} booleans")
        try:
            return cls(f["names"], options, np.array(f["loss"], dtype=np.float64), f["method"],
                       None if allowed is None else np.array(allowed, dtype=bool), f["model_fingerprint"],
                       dict(f["meta"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _bits1(v, where):
    try:
        return check_bits(v)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _group1(v, where):
    if v is None:
        return None
    return integer(1, 1 << 20)(v, where)


def load(path) -> Sensitivity:
    """Load a table saved by :meth:`Sensitivity.save`; corruption raises ``ValueError`` naming the file.

    Example: ``t = bitplan.sensitivity.load("sens.json")``
    """
    return Sensitivity.from_dict(read_json(path, "bitplan sensitivity table"), str(path))
