"""Sensitivity: the (L, B) table of predicted loss increases every estimator returns.

Saved as JSON (atomic write, strict load with ``schema_version``) together with the model
fingerprint, so a table can be re-solved at new budgets without re-scoring.

Example:
    >>> t = score(model, batches, method="hessian"); t.save("sens.json")
    >>> t2 = load("sens.json"); (t2.loss == t.loss).all()
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from bitplan.plan import atomic_write_text

__all__ = ["Sensitivity", "load", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_KEYS = {"schema_version", "method", "names", "bits", "loss", "group_size", "symmetric",
         "model_fingerprint", "meta"}


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


@dataclass(frozen=True)
class Sensitivity:
    """Predicted loss increase ``loss[l, b]`` of quantizing only layer ``names[l]`` to ``bits[b]``."""
    names: list[str]                 # (L,) layer fqns, the allocator's row order
    bits: tuple[int, ...]            # (B,) weight bit options (16 = fp16)
    loss: np.ndarray                 # (L, B) finite, >= 0
    method: str
    group_size: int | None = None    # quantizer settings the table was scored with
    symmetric: bool = True
    model_fingerprint: str = ""
    meta: dict = field(default_factory=dict)   # estimator details (traces, stderr, probes, seconds)

    def __post_init__(self):
        loss = np.asarray(self.loss, dtype=np.float64)
        if loss.shape != (len(self.names), len(self.bits)):
            raise ValueError(f"loss table has shape {loss.shape}; expected (layers, options) = "
                             f"{(len(self.names), len(self.bits))}")
        if not np.all(np.isfinite(loss)) or (loss < 0).any():
            bad = np.argwhere(~np.isfinite(loss) | (loss < 0))[0]
            raise ValueError(f"sensitivity of {self.names[bad[0]]} at {self.bits[bad[1]]} bits is "
                             f"{loss[tuple(bad)]}; must be finite and >= 0")
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "names", list(self.names))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "method": self.method, "names": self.names,
                "bits": list(self.bits), "loss": self.loss.tolist(), "group_size": self.group_size,
                "symmetric": self.symmetric, "model_fingerprint": self.model_fingerprint,
                "meta": _jsonable(self.meta)}

    def save(self, path) -> None:
        """Write as JSON, atomically (floats round-trip exactly)."""
        atomic_write_text(path, json.dumps(self.to_dict(), sort_keys=True, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d) -> "Sensitivity":
        if not isinstance(d, dict):
            raise ValueError(f"a sensitivity table must be a JSON object, got {type(d).__name__}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"sensitivity schema_version={d.get('schema_version')!r} is not supported; "
                             f"this bitplan reads {SCHEMA_VERSION}")
        missing, unknown = _KEYS - set(d), set(d) - _KEYS
        if missing or unknown:
            raise ValueError(f"sensitivity fields missing: {sorted(missing)}; unknown: {sorted(unknown)}")
        if not isinstance(d["names"], list) or not all(isinstance(n, str) for n in d["names"]):
            raise ValueError("sensitivity field 'names' must be a list of strings")
        try:
            loss = np.array(d["loss"], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sensitivity field 'loss' is not a numeric table: {e}") from e
        return cls(d["names"], tuple(d["bits"]), loss, str(d["method"]), d["group_size"],
                   bool(d["symmetric"]), str(d["model_fingerprint"]), dict(d["meta"] or {}))


def load(path) -> Sensitivity:
    """Load a table saved by :meth:`Sensitivity.save`; corruption raises ``ValueError`` naming the file."""
    try:
        with open(path) as f:
            d = json.load(f)
        return Sensitivity.from_dict(d)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid bitplan sensitivity table ({e})") from e
