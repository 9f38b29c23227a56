"""Plan: the frozen, versioned, JSON-serialisable answer of bitplan.

JSON layout (keys sorted, ``schema_version`` checked strictly on load)::

    {"schema_version": 1,
     "model_fingerprint": "9f2c...",                # sha256 of layer names + weight shapes
     "layers": {"encoder.layer.0.attention.self.query":
                   {"bits": 4, "group_size": 128, "symmetric": true}, ...},
     "predicted": {"size_bytes": 4212345, ...},     # costs of the plan (bytes, ms, BOPs)
     "budgets": {"size_bytes": 5000000},
     "estimator": {"name": "hessian", "seconds": 12.1, ...},
     "solver": {"name": "ilp", "status": "optimal", "objective": ..., "bound": ..., "seconds": ...},
     "meta": {"bitplan_version": "0.1.0", "torch_version": "2.13.0", ...}}

Example:
    >>> plan.save("plan.json"); Plan.load("plan.json") == plan
    True
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

from .kernels.formats import QuantSpec as LayerPlan

__all__ = ["Plan", "LayerPlan", "SCHEMA_VERSION", "atomic_write_text"]

SCHEMA_VERSION = 1
_TOP_KEYS = {"schema_version", "model_fingerprint", "layers", "predicted", "budgets", "estimator",
             "solver", "meta"}
_LAYER_REQUIRED = {"bits": int, "group_size": (int, type(None)), "symmetric": bool}
_LAYER_OPTIONAL = {"act_bits": (int, type(None)), "kernel": (str, type(None))}


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite_numbers(name: str, d) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"plan field {name!r} must be an object, got {type(d).__name__}")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"plan field {name}[{k!r}] = {v!r} must be a finite number")
    return dict(d)


@dataclass(frozen=True)
class Plan:
    """Per-layer quantization choices plus the record of how they were chosen."""
    model_fingerprint: str
    layers: dict[str, LayerPlan]                         # fqn -> LayerPlan, network order
    predicted: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    estimator: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def bits(self) -> dict[str, int]:
        """fqn -> weight bits."""
        return {k: v.bits for k, v in self.layers.items()}

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "model_fingerprint": self.model_fingerprint,
                "layers": {k: v.to_dict() for k, v in self.layers.items()},
                "predicted": dict(self.predicted), "budgets": dict(self.budgets),
                "estimator": dict(self.estimator), "solver": dict(self.solver),
                # JSON keys are sorted, so the network order of the layers travels in meta
                "meta": {**self.meta, "layer_order": list(self.layers)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False,
                          default=_json_default)

    def save(self, path) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_text(path, self.to_json() + "\n")

    def with_kernels(self, kernels: dict[str, str]) -> "Plan":
        """A copy recording which kernel each layer runs (filled in by packed apply)."""
        layers = {k: LayerPlan(v.bits, v.group_size, v.symmetric, v.act_bits, kernels.get(k, v.kernel))
                  for k, v in self.layers.items()}
        return Plan(self.model_fingerprint, layers, self.predicted, self.budgets, self.estimator,
                    self.solver, self.meta, self.schema_version)

    @classmethod
    def from_dict(cls, d) -> "Plan":
        """Strict: unknown schema version, missing or unknown fields, wrong types -> ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if ver != SCHEMA_VERSION or isinstance(ver, bool):
            raise ValueError(f"plan schema_version={ver!r} is not supported; this bitplan reads "
                             f"schema_version {SCHEMA_VERSION}")
        missing, unknown = _TOP_KEYS - set(d), set(d) - _TOP_KEYS
        if missing or unknown:
            raise ValueError(f"plan fields missing: {sorted(missing)}; unknown: {sorted(unknown)}")
        if not isinstance(d["model_fingerprint"], str):
            raise ValueError("plan field 'model_fingerprint' must be a string")
        if not isinstance(d["layers"], dict) or not d["layers"]:
            raise ValueError("plan field 'layers' must be a non-empty object fqn -> {bits, group_size, symmetric}")
        layers = {}
        for name, e in d["layers"].items():
            if not isinstance(e, dict):
                raise ValueError(f"plan layer {name!r} must be an object, got {type(e).__name__}")
            miss = set(_LAYER_REQUIRED) - set(e)
            extra = set(e) - set(_LAYER_REQUIRED) - set(_LAYER_OPTIONAL)
            if miss or extra:
                raise ValueError(f"plan layer {name!r}: missing {sorted(miss)}, unknown {sorted(extra)}")
            for k, typ in {**_LAYER_REQUIRED, **_LAYER_OPTIONAL}.items():
                v = e.get(k)
                if k in e and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
                    raise ValueError(f"plan layer {name!r}: {k}={v!r} has the wrong type")
            layers[name] = LayerPlan(**e)
        for k in ("estimator", "solver", "meta"):
            if not isinstance(d[k], dict):
                raise ValueError(f"plan field {k!r} must be an object")
        meta = dict(d["meta"])
        order = meta.pop("layer_order", None)
        if order is not None:
            if not isinstance(order, list) or sorted(order) != sorted(layers):
                raise ValueError("plan meta 'layer_order' must list exactly the plan's layers")
            layers = {n: layers[n] for n in order}
        return cls(d["model_fingerprint"], layers, _finite_numbers("predicted", d["predicted"]),
                   _finite_numbers("budgets", d["budgets"]), dict(d["estimator"]), dict(d["solver"]),
                   meta, ver)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan saved by :meth:`save`; any corruption raises ``ValueError`` naming the file."""
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
