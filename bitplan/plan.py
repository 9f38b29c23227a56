"""Plan: the frozen, versioned, JSON-serialisable answer of bitplan — torch-free.

JSON layout (keys sorted; read strictly: exact version, every field typed and range-checked, unknown
or missing keys refused, file name in every message)::

    {"schema_version": 2,
     "model_fingerprint": "9f2c...",                # sha256 of layer names + weight shapes
     "layers": {"encoder.layer.0.attention.self.query":
                   {"bits": 4, "group_size": 128, "symmetric": true, "act_bits": null, "method": "rtn"}},
     "predicted": {"size_bytes": 4212345, ...},     # costs of the plan (bytes, ms, BOPs)
     "budgets": {"size_bytes": 5000000},
     "estimator": {"name": "hessian", "seconds": 12.1, ...},
     "solver": {"name": "ilp", "status": "optimal", "objective": ..., "bound": ..., "seconds": ...},
     "kernels": {"encoder.layer.0.attention.self.query": "int4_wo"},   # what ran, after packed apply
     "meta": {"bitplan_version": "0.2.0", "layer_order": [...], "layer_shapes": {...},
              "layer_kinds": {...}, "layer_bytes": {...}, ...}}

``kernels`` is a record of what ran where the plan was applied, never an order: applying the plan
elsewhere picks the kernels of that device. Version 1 files (bitplan 0.1) are read and upgraded.

Example:
    >>> plan.save("plan.json"); Plan.load("plan.json") == plan
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .core.jsonio import (Fields, anything, atomic_write_text, boolean, dict_of, integer, json_dumps,
                          list_of, number, optional, read_json, string, version)
from .core.spec import FP16_BITS, QuantSpec, check_act_bits, check_bits, check_group_size, spec_from_dict

__all__ = ["Plan", "SCHEMA_VERSION", "layer_k"]

SCHEMA_VERSION = 2
_READS = frozenset({1, 2})
_NAME = string(1024, nonempty=True)
_KINDS = ("linear", "conv1d", "conv2d", "hf_conv1d", "embedding")
_DIM = integer(1, 1 << 40)
_MAX_LAYERS = 1_000_000


def layer_k(shape, kind: str | None) -> int | None:
    """K (input dim of the (N, K) view) of a stored weight shape; None when the kind is unknown."""
    if kind is None:
        return None
    if kind == "hf_conv1d":
        return int(shape[0])
    return int(math.prod(shape[1:])) if len(shape) > 1 else 1


def _kind(v, where):
    if v not in _KINDS:
        raise ValueError(f"{where} = {v!r} must be one of {list(_KINDS)}")
    return v


_ESTIMATOR = {"name": string(64)}
_SOLVER = {"name": string(64)}


def _record(required: dict, where_name: str):
    """A free-form record (estimator / solver): required keys typed, other keys JSON values."""
    def check(v, where):
        if not isinstance(v, dict):
            raise ValueError(f"{where} must be an object, got {type(v).__name__}")
        if v:                                    # {} is allowed (a hand-made plan records nothing)
            Fields({k: v[k] for k in required if k in v}, where, {k: c for k, c in required.items() if k in v})
        for k in v:
            if not isinstance(k, str):
                raise ValueError(f"{where} keys must be strings")
        return dict(v)
    return check


def _meta_check(layer_names: list[str], ver: int):
    def check(v, where):
        req = {"layer_order": list_of(_NAME, 1, _MAX_LAYERS, unique=True)}
        opt = {"layer_shapes": dict_of(list_of(_DIM, 1, 5), _NAME, 1), "layer_kinds": dict_of(_kind, _NAME), "layer_bytes": dict_of(integer(0, 1 << 50), _NAME),
               "aliases": dict_of(list_of(_NAME, 1, 16), _NAME), "skipped": dict_of(string(512), _NAME),
               "base_bytes": integer(0, 1 << 50), "bitplan_version": string(64), "torch_version": string(64),
               "python": string(64), "created": string(64), "tie": optional(string(64)),
               "seed": optional(integer(-(1 << 63), 1 << 63)), "options": list_of(anything(), 0, 4096),
               "notes": anything(), "model": optional(string(4096)),
               "kernels_here": dict_of(string(64, nonempty=True), _NAME)}
        if ver == 1:                             # 0.1 plans: order and shapes were optional
            req, opt = {}, {**opt, **req}
        f = Fields(v, where, req, opt)
        if "layer_order" in f and sorted(f["layer_order"]) != sorted(layer_names):
            raise ValueError(f"{where}: layer_order must list exactly the plan's layers")
        for key in ("layer_shapes", "layer_kinds", "layer_bytes"):
            if key in f and set(f[key]) != set(layer_names):
                miss = sorted(set(layer_names) - set(f[key]))[:3]
                extra = sorted(set(f[key]) - set(layer_names))[:3]
                raise ValueError(f"{where}: {key} must cover exactly the plan's layers "
                                 f"(missing e.g. {miss}, unknown e.g. {extra})")
        return dict(f)
    return check


def _layer_v1(d, where) -> QuantSpec:
    f = Fields(d, where, {"bits": lambda v, w: check_bits(v), "group_size": lambda v, w: check_group_size(v),
                          "symmetric": boolean()},
               {"act_bits": lambda v, w: check_act_bits(v), "kernel": optional(string(64))})
    try:
        if f["bits"] == FP16_BITS:
            return QuantSpec(FP16_BITS)
        return QuantSpec(f["bits"], f["group_size"], f["symmetric"], f.get("act_bits"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Plan:
    """Per-layer quantization choices plus the record of how they were chosen."""
    model_fingerprint: str
    layers: dict[str, QuantSpec]                        # layer fqn -> option, network order
    predicted: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    estimator: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)   # module fqn -> kernel that ran (a record)
    schema_version: int = SCHEMA_VERSION

    @property
    def bits(self) -> dict[str, int]:
        """fqn -> weight bits."""
        return {k: v.bits for k, v in self.layers.items()}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "model_fingerprint": self.model_fingerprint,
                "layers": {k: v.to_dict() for k, v in self.layers.items()},
                "predicted": dict(self.predicted), "budgets": dict(self.budgets),
                "estimator": dict(self.estimator), "solver": dict(self.solver), "kernels": dict(self.kernels),
                # JSON keys are sorted, so the network order of the layers travels in meta
                "meta": {**self.meta, "layer_order": list(self.layers)}}

    def to_json(self) -> str:
        return json_dumps(self.to_dict())

    def save(self, path) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_text(path, self.to_json() + "\n")

    def with_kernels(self, kernels: dict[str, str]) -> "Plan":
        """A copy recording which kernel each module ran (filled in by packed apply)."""
        return Plan(self.model_fingerprint, dict(self.layers), self.predicted, self.budgets, self.estimator,
                    self.solver, self.meta, dict(kernels))

    def replace(self, **changes) -> "Plan":
        """A copy with some fields replaced (``Plan`` is frozen)."""
        d = {k: getattr(self, k) for k in ("model_fingerprint", "layers", "predicted", "budgets",
                                           "estimator", "solver", "meta", "kernels")}
        d.update(changes)
        return Plan(**d)

    @classmethod
    def from_dict(cls, d, where: str = "plan") -> "Plan":
        """Strict: unsupported version, missing or unknown fields, wrong types or ranges -> ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        ver = version(_READS)(d.get("schema_version"), f"{where}: schema_version")
        top_req = {"schema_version": anything(), "model_fingerprint": string(128, nonempty=True),
                   "layers": dict_of(anything(), _NAME, 1), "predicted": dict_of(number(0), string(64)),
                   "budgets": dict_of(number(0), string(64)),
                   "estimator": _record(_ESTIMATOR, "estimator"), "solver": _record(_SOLVER, "solver"),
                   "meta": anything()}
        top_opt = {"kernels": dict_of(string(64, nonempty=True), _NAME)} if ver >= 2 else {}
        f = Fields(d, where, top_req, top_opt)
        if len(f["layers"]) > _MAX_LAYERS:
            raise ValueError(f"{where}: {len(f['layers'])} layers is more than {_MAX_LAYERS}")
        names = list(f["layers"])
        layers, kernels = {}, dict(f.get("kernels", {}))
        for name, e in f["layers"].items():
            at = f"{where}: layers[{name!r}]"
            if ver == 1:
                layers[name] = _layer_v1(e, at)
                if isinstance(e, dict) and e.get("kernel") not in (None, "fake"):
                    kernels[name] = e["kernel"]
            else:
                layers[name] = spec_from_dict(e, at)
        meta = _meta_check(names, ver)(f["meta"], f"{where}: meta")
        shapes, kinds = meta.get("layer_shapes", {}), meta.get("layer_kinds", {})
        for name, s in layers.items():       # a partial group is never an option bitplan makes
            k = layer_k(shapes[name], kinds.get(name)) if name in shapes else None
            g = s.group_size
            if g is not None and k is not None and g < k and k % g:
                raise ValueError(f"{where}: layers[{name!r}] group_size={g} does not divide the layer's "
                                 f"input dimension K={k}")
        order = meta.pop("layer_order", None)
        if order is not None:
            layers = {n: layers[n] for n in order}
        return cls(f["model_fingerprint"], layers, f["predicted"], f["budgets"], f["estimator"], f["solver"],
                   meta, kernels)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan saved by :meth:`save`; any corruption raises ``ValueError`` naming the file.

        Example: ``plan = Plan.load("plan.json")``
        """
        return cls.from_dict(read_json(path, "bitplan plan"), str(path))
