"""LatencyProfile: measured per-call latency of every (option, N, K, M) on one device — data, not code.

JSON layout (keys sorted, ``schema_version`` checked strictly on load; written atomically)::

    {"schema_version": 1,
     "device": {"type": "cpu", "cpu": "Intel(R) Xeon(R) Processor", "torch": "2.13.0+cpu",
                "threads": 2, "capability": "AVX512"},           # + "gpu", "cuda" on CUDA
     "entries": [{"option": "w4g32@int4_wo", "n": 1536, "k": 384, "m": 128, "median_ms": 0.85,
                  "p25_ms": ..., "p75_ms": ..., "spread": 0.03, "batches": 25, "dropped": 0,
                  "inner": 2, "retries": 0, "stable": true}, ...],
     "fixed": {"minilm:b1x128": {"median_ms": 1.9, ...}},        # non-quantized ops of a model
     "repeatability": [{"option": ..., "n": ..., "k": ..., "m": ..., "first_ms": ..., "second_ms": ...,
                        "ratio": 1.02}, ...],
     "meta": {"bitplan_version": ..., "created": ..., "method": ...}}

An option is ``"<spec label>@<kernel>"`` (``option_key``): the kernel that packed apply picks for the
spec on this device, or ``fp32@dense`` / ``bf16@dense`` for unquantized baselines.

Shapes that were not measured are interpolated, never invented (:meth:`LatencyProfile.time_ms`):
1. in M: piecewise-linear between the two measured token counts around M (same N, K);
2. in shape: piecewise-linear in N·K (the MACs per token) between the measured shapes of the same
   option just below and above (shapes with equal N·K are averaged). A matmul's time is close to
   affine in N·K at fixed M, and this is exact for affine data.
Outside the measured range either way: ``ValueError`` naming the shape and the measured range.
Its error on real data is what :meth:`LatencyProfile.interpolation_errors` reports (leave one shape
out, predict it from the others).

Example:
    >>> prof = LatencyProfile.load("prof.json")
    >>> prof.time_ms("w4g32@int4_wo", 1536, 384, 128)          # ms per call
"""
from __future__ import annotations

import json
import math
import os
import platform
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["LatencyProfile", "SCHEMA_VERSION", "option_key", "device_fingerprint", "DENSE_OPTIONS"]

SCHEMA_VERSION = 1
DENSE_OPTIONS = ("fp32@dense", "bf16@dense")      # unquantized baselines (nn.Linear in that dtype)
_TOP = {"schema_version", "device", "entries", "fixed", "repeatability", "meta"}
_ENTRY = {"option": str, "n": int, "k": int, "m": int, "median_ms": float, "p25_ms": float,
          "p75_ms": float, "spread": float, "batches": int, "dropped": int, "inner": int,
          "retries": int, "stable": bool}
_MATCH = ("type", "cpu", "gpu", "torch", "threads")   # fields that must agree to trust a profile


def option_key(spec, kernel: str) -> str:
    """``"w4g32@int4_wo"``: a spec's label and the kernel that runs it."""
    return f"{spec.label}@{kernel}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device="cpu") -> dict:
    """What the timings depend on: device type and model, torch version, CPU threads.

    Example: ``device_fingerprint("cpu")["threads"]``
    """
    dev = torch.device(device).type
    d = {"type": dev, "cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "capability": torch.backends.cpu.get_cpu_capability()}
    if dev == "cuda":
        d["gpu"] = torch.cuda.get_device_name(torch.device(device))
        d["cuda"] = torch.version.cuda
    return d


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) on sorted xs; caller guarantees xs[0] <= x <= xs[-1]."""
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            if xs[i + 1] == xs[i]:
                return ys[i]
            w = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] * (1 - w) + ys[i + 1] * w
    return ys[0]


@dataclass
class LatencyProfile:
    """Per-call latency (ms) of each (option, N, K, M) on one device, plus fixed model costs."""
    device: dict
    entries: dict = field(default_factory=dict)       # (option, n, k, m) -> entry dict
    fixed: dict = field(default_factory=dict)         # name -> {"median_ms", "spread", ...}
    repeatability: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ---- queries -------------------------------------------------------------------------
    @property
    def options(self) -> list[str]:
        return sorted({o for o, *_ in self.entries})

    def shapes(self, option: str) -> list[tuple[int, int]]:
        return sorted({(n, k) for o, n, k, _ in self.entries if o == option})

    def tokens(self, option: str, n: int, k: int) -> list[int]:
        return sorted(m for o, nn, kk, m in self.entries if (o, nn, kk) == (option, n, k))

    def _at_m(self, option: str, n: int, k: int, m: int) -> float:
        ms = self.tokens(option, n, k)
        if m in ms:
            return self.entries[(option, n, k, m)]["median_ms"]
        if not ms or m < ms[0] or m > ms[-1]:
            raise ValueError(f"profile has no timing of {option} for shape (N={n}, K={k}) at M={m}; "
                             f"measured M: {ms}; calibrate with tokens including {m}")
        return _interp(m, ms, [self.entries[(option, n, k, x)]["median_ms"] for x in ms])

    def time_ms(self, option: str, n: int, k: int, m: int) -> float:
        """Per-call ms of ``option`` on an (n, k) weight with m input rows (see interpolation above).

        Example: ``prof.time_ms("w8a8@w8a8", 384, 384, 16)``
        """
        if option not in self.options:
            raise ValueError(f"profile has no option {option!r}; measured: {self.options}")
        shapes = self.shapes(option)
        if (n, k) in shapes:
            return self._at_m(option, n, k, m)
        pts: dict[int, list[float]] = {}
        for nn_, kk in shapes:
            try:
                pts.setdefault(nn_ * kk, []).append(self._at_m(option, nn_, kk, m))
            except ValueError:
                continue
        xs = sorted(pts)
        if not xs or not xs[0] <= n * k <= xs[-1]:
            raise ValueError(f"profile cannot cover shape (N={n}, K={k}) for {option} at M={m}: N*K={n * k} "
                             f"is outside the measured N*K range {xs[:1] + xs[-1:]} (shapes {shapes}); "
                             "calibrate this shape")
        return _interp(n * k, xs, [sum(pts[x]) / len(pts[x]) for x in xs])

    def interpolation_errors(self, option: str | None = None) -> list[dict]:
        """Leave-one-out: each measured shape strictly inside the N·K range, predicted from the
        others; relative error ``pred / measured − 1`` per (option, N, K, M)."""
        out = []
        for opt in [option] if option else self.options:
            shapes = self.shapes(opt)
            for n, k in shapes:
                others = {key: e for key, e in self.entries.items() if key[0] != opt or key[1:3] != (n, k)}
                sub = LatencyProfile(self.device, others)
                for m in self.tokens(opt, n, k):
                    try:
                        pred = sub.time_ms(opt, n, k, m)
                    except ValueError:
                        continue              # on the edge of the range: not interpolable
                    meas = self.entries[(opt, n, k, m)]["median_ms"]
                    out.append({"option": opt, "n": n, "k": k, "m": m, "measured_ms": meas,
                                "predicted_ms": pred, "rel_error": pred / meas - 1})
        return out

    def check_device(self, device=None, warn: bool = True) -> list[str]:
        """Fields where this profile's device differs from the current one; warns when any do."""
        cur = device_fingerprint(device or self.device.get("type", "cpu"))
        diff = [f"{f}: profile {self.device.get(f)!r} vs here {cur.get(f)!r}" for f in _MATCH
                if self.device.get(f) != cur.get(f)]
        if diff and warn:
            warnings.warn("latency profile was measured on another device; predictions may be off "
                          "(" + "; ".join(diff) + ")", RuntimeWarning, stacklevel=3)
        return diff

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        ents = [{"option": o, "n": n, "k": k, "m": m, **{kk: v for kk, v in e.items()
                                                         if kk not in ("option", "n", "k", "m")}}
                for (o, n, k, m), e in sorted(self.entries.items())]
        return {"schema_version": self.schema_version, "device": dict(self.device), "entries": ents,
                "fixed": dict(self.fixed), "repeatability": list(self.repeatability), "meta": dict(self.meta)}

    def save(self, path) -> None:
        """Write the profile as JSON, atomically (temp file + fsync + rename).

        Example: ``calibrate([(384, 384)]).save("prof.json")``
        """
        from ..core.jsonio import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d) -> "LatencyProfile":
        """Strict: wrong schema version, missing/unknown fields, wrong types -> ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a latency profile must be a JSON object, got {type(d).__name__}")
        ver = d.get("schema_version")
        if isinstance(ver, bool) or ver != SCHEMA_VERSION:
            raise ValueError(f"latency profile schema_version={ver!r} is not supported; this bitplan reads "
                             f"schema_version {SCHEMA_VERSION}")
        missing, unknown = _TOP - set(d), set(d) - _TOP
        if missing or unknown:
            raise ValueError(f"latency profile fields missing: {sorted(missing)}; unknown: {sorted(unknown)}")
        if not isinstance(d["device"], dict) or "type" not in d["device"]:
            raise ValueError("latency profile field 'device' must be an object with a 'type'")
        if not isinstance(d["entries"], list):
            raise ValueError("latency profile field 'entries' must be a list")
        entries = {}
        for i, e in enumerate(d["entries"]):
            if not isinstance(e, dict) or set(e) != set(_ENTRY):
                got = sorted(e) if isinstance(e, dict) else type(e).__name__
                raise ValueError(f"latency profile entry {i}: expected fields {sorted(_ENTRY)}, got {got}")
            for key, typ in _ENTRY.items():
                v = e[key]
                ok = isinstance(v, bool) if typ is bool else (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    if typ is float else isinstance(v, typ) and not isinstance(v, bool))
                if not ok:
                    raise ValueError(f"latency profile entry {i}: {key}={v!r} must be {typ.__name__}")
            if e["median_ms"] <= 0 or min(e["n"], e["k"], e["m"]) < 1:
                raise ValueError(f"latency profile entry {i}: needs median_ms > 0 and n, k, m >= 1")
            key = (e["option"], e["n"], e["k"], e["m"])
            if key in entries:
                raise ValueError(f"latency profile entry {i}: duplicate {key}")
            entries[key] = {k: v for k, v in e.items() if k not in ("option", "n", "k", "m")}
        for name in ("fixed", "meta"):
            if not isinstance(d[name], dict):
                raise ValueError(f"latency profile field {name!r} must be an object")
        if not isinstance(d["repeatability"], list):
            raise ValueError("latency profile field 'repeatability' must be a list")
        for name, f in d["fixed"].items():
            if not isinstance(f, dict) or not isinstance(f.get("median_ms"), (int, float)) \
                    or isinstance(f.get("median_ms"), bool) or not f["median_ms"] >= 0:
                raise ValueError(f"latency profile fixed cost {name!r} needs a median_ms >= 0")
        return cls(dict(d["device"]), entries, dict(d["fixed"]), list(d["repeatability"]), dict(d["meta"]), ver)

    @classmethod
    def load(cls, path) -> "LatencyProfile":
        """Read a profile saved by :meth:`save`; any corruption raises ``ValueError`` naming the file.

        Example: ``LatencyProfile.load("prof.json").options``
        """
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: latency profile is not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: latency profile is not a text file ({e})") from e
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e
