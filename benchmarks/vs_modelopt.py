"""Side by side with NVIDIA ModelOpt 0.47 ``mtq.auto_quantize`` on MiniLM (issue 15), at equal REAL bytes.

Setting (one run, CPU, 1 torch thread): all-MiniLM-L6-v2 (built-in ``minilm``), the first ``--n-calib``
shipped calibration sentences (default 64, batches of 16) for BOTH tools, the 128 held-out sentences,
metric = mean cosine of the sentence embeddings to the fp32 model's.

Quantizable layers = the 37 ``nn.Linear`` layers (36 encoder + pooler) that ModelOpt quantizes; the
three embedding tables stay unquantized in every plan (bitplan: pinned to its fp16 option).
Option set = {4-bit g128, 8-bit per channel (weight-only), unquantized (fp16)}:
- ModelOpt: ``auto_quantize(quantization_formats=[INT4 g128, INT8_WEIGHT_ONLY_CFG])`` plus its implicit
  "do not quantize"; INT4 = ``INT4_AWQ_CFG`` (awq_lite) or ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` (max
  calibration = round to nearest). Budget = ``constraints={"effective_bits": b}`` (ModelOpt's own
  accounting: Σ n_l·bits_l / Σ n_l over the quantizable weights, 16 for unquantized, no scale bytes).
  Its gradient score needs a loss with a non-zero gradient at the fp weights; the label-free MSE to
  the fp32 embeddings has none, so ``loss_func`` is the sampled-label form of that MSE,
  ``sqrt(2/numel)·⟨out, u⟩`` with a fixed Rademacher u per (batch, probe) — E[g²] is the diagonal of
  the MSE's output Hessian, as sampled labels give the Fisher for a classifier. ``--probes`` (4)
  copies of each calibration batch with different u are the score steps; calibration sees each
  batch once.
- ModelOpt plan bytes: its per-layer choices written as a bitplan plan (INT4 g128 -> QuantSpec(4, 128,
  method="awq" for the AWQ variant, so the K fp16 AWQ input scales are counted; "rtn" otherwise),
  INT8 per channel -> QuantSpec(8), none -> QuantSpec(16)), applied with bitplan's packed kernels
  and measured with ``costmodels.model_nbytes`` — the same arithmetic as bitplan's own plans.
- bitplan: ``allocate(options=..., keep={embeddings: 16}, budget_mb=target, sensitivity_table=...)``,
  target = the smaller of the two ModelOpt plans' real bytes at that budget. ONE hessian scoring
  (HAWQ-V3 traces, up to 24 probes) covers every option below; each configuration is solved on its
  columns of that table: each method alone on the option set, the methods as one more option
  dimension, and the full default grid (``options.DEFAULTS`` bits x groups) x ``--grid-methods``
  (rtn, gptq). Because calibrated methods are among the options, every column — RTN's too — is
  scored with the input-aware weight error (``ScoreContext.delta_sq``), so ``bitplan_rtn`` is
  bitplan's RTN allocation with that error measure (a plain ``quant_method="rtn"`` run scores
  ‖ΔW‖² instead). Every bitplan plan's real packed bytes are <= the target.
- Cross checks: ModelOpt's allocation through bitplan's quantizer; bitplan's RTN allocation
  quantized by ModelOpt's AWQ (``mtq.quantize`` with a per-layer config).
- Calibration cost: CPU time (``time.thread_time``) and peak extra resident memory of quantizing each
  layer with each method, for both option formats (the peak read like benchmarks/quantizer_methods.py).

Evaluation shortcut, checked once per run: each (layer, option) is quantized once and reused
(``kernels.modules.quantize_layer`` memoised; calibration statistics gathered once from the fp32
model on the same batches ``apply_plan_`` would use); the first calibrated plan is also applied
with the public ``apply_plan_`` and both cosines are recorded (``apply_plan_check``).

    python benchmarks/vs_modelopt.py                      # MiniLM, ~25-40 min on a loaded 2-core machine
    python benchmarks/vs_modelopt.py --no-modelopt        # bitplan side against the stored ModelOpt plans
    python benchmarks/vs_modelopt.py --quick --no-modelopt --out /tmp/v.json   # tiny stand-in (CI)

Writes benchmarks/results/vs_modelopt.json (provenance: commit, dirty, command; load average).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import warnings
import weakref

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    # fixed mmap threshold so freed tensors leave the resident set (peak MB per layer); re-exec
    # before the heavy imports
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from provenance import provenance  # noqa: E402

from bitplan import allocate  # noqa: E402
from bitplan.assemble import make_plan  # noqa: E402
from bitplan.core.graph import LayerGraph  # noqa: E402
from bitplan.core.jsonio import atomic_write_json, read_json  # noqa: E402
from bitplan.core.spec import QuantSpec  # noqa: E402
from bitplan.costmodels import MB, base_nbytes, model_nbytes  # noqa: E402
from bitplan.evaluate import embed, fidelity  # noqa: E402
from bitplan.kernels import modules as kmod  # noqa: E402
from bitplan.kernels.calibstats import gather_stats  # noqa: E402
from bitplan.options import DEFAULTS  # noqa: E402
from bitplan.sensitivity import Sensitivity, score  # noqa: E402

METHODS = ("rtn", "awq", "gptq", "awq_gptq")
FP16 = QuantSpec(16)
OUT = os.path.join(HERE, "results", "vs_modelopt.json")
ISSUE_QUOTED = {"note": "numbers quoted in issue 15 (the issue author's run), not measured here",
                "modelopt_awq": {"4.5": 0.97405, "5.0": 0.97852, "6.0": 0.98860},
                "bitplan_rtn": {"4.5": 0.96738, "5.0": 0.97658, "6.0": 0.98873},
                "bitplan_plan_modelopt_awq": {"4.5": 0.97697, "5.0": 0.98180, "6.0": 0.99119}}


def option_set(methods) -> list[QuantSpec]:
    return [QuantSpec(4, 128, method=m) for m in methods] + [QuantSpec(8, None, method=m) for m in methods] + [FP16]


def full_grid(methods) -> list[QuantSpec]:
    g = [QuantSpec(b, gs, method=m) for m in methods for b in DEFAULTS["bits"] for gs in DEFAULTS["group_size"]]
    return g + [FP16]


# ---------------------------------------------------------------------------------------------- task
def load_task(quick: bool, n_calib: int):
    """(name, model, calib batches, held-out batches)."""
    if not quick:
        from bitplan.models import load_model
        spec = load_model("minilm", n_calib=n_calib)
        return "minilm", spec.model.eval(), spec.calib_data, spec.eval_data
    from transformers import BertConfig, BertModel          # tiny random BERT, K = 256 / 512 (g128 != per channel)
    from bitplan.models import SentenceEncoder
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=32)
    model = SentenceEncoder(BertModel(cfg, add_pooling_layer=False)).eval()

    def batches(n, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1, 256, (8, 12), generator=g)
            am = torch.ones_like(ids)
            am[:4, 9:] = 0
            out.append({"input_ids": ids, "attention_mask": am, "token_type_ids": torch.zeros_like(ids)})
        return out
    return "tiny_bert", model, batches(2, 1), batches(2, 2)


# ------------------------------------------------------------------------------ memoised quantizer
class Memo:
    """Quantize each (layer, option) once: ``kernels.modules.quantize_layer`` memoised by (layer name,
    spec), names resolved from the module object (the fp32 model and each copy are registered, weakly:
    a freed copy leaves no entry that a later module could collide with). Records
    the CPU time and peak extra RSS of each first quantization."""

    def __init__(self, model, names):
        self.names, self.cache, self.cost = set(names), {}, {}
        self.ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # module -> layer name
        self.register(model)
        self._orig = kmod.quantize_layer

    def register(self, model):
        for n, m in model.named_modules():
            if n in self.names:
                self.ids[m] = n
        return model

    def __call__(self, module, kind, spec, stats=None):
        name = self.ids.get(module)
        if name is None or spec.bits == 16:
            return self._orig(module, kind, spec, stats)
        key = (name, spec)
        if key not in self.cache:
            base = reset_peak()
            t0 = time.thread_time()
            self.cache[key] = self._orig(module, kind, spec, stats)
            self.cost[key] = (time.thread_time() - t0, peak_mb_since(base))
        return self.cache[key]

    @contextlib.contextmanager
    def active(self):
        kmod.quantize_layer = self
        try:
            yield self
        finally:
            kmod.quantize_layer = self._orig


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> int:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _kb("VmRSS")


def peak_mb_since(base_kb: int) -> float:
    return max(0, _kb("VmHWM") - base_kb) / 1024


# ---------------------------------------------------------------------------------------- bitplan
class Bench:
    def __init__(self, model, calib, held, graph, memo, stats, emb):
        self.model, self.calib, self.held, self.graph, self.memo, self.stats = model, calib, held, graph, memo, stats
        self.ref = embed(model, held)
        self.base = base_nbytes(model, graph.names)
        self.keep = {n: 16 for n in emb}
        self.emb = list(emb)
        self.checked = None

    def evaluate(self, plan) -> dict:
        """Held-out cosine (fake) and real packed bytes of ``plan``."""
        specs = dict(plan.layers)
        with self.memo.active():
            m = self.memo.register(copy.deepcopy(self.model))
            kmod.quantize_modules_(m, specs, "fake", stats=self.stats)
            cos = fidelity(m, self.ref, self.held)
            m = self.memo.register(copy.deepcopy(self.model))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kmod.quantize_modules_(m, specs, "packed", stats=self.stats)
            nbytes = model_nbytes(m)
        if self.checked is None and any(kmod.needs_stats(s) for s in specs.values()):
            from bitplan import apply_plan_
            m = apply_plan_(copy.deepcopy(self.model), plan, "fake", calib_data=self.calib)
            self.checked = {"cos_memo": cos, "cos_apply_plan": fidelity(m, self.ref, self.held)}
        return {"cosine": cos, "bytes": int(nbytes), "predicted_bytes": int(plan.predicted["size_bytes"])}

    def plan_from(self, specs: dict):
        full = {n: specs.get(n, FP16) for n in self.graph.names}
        return make_plan(self.graph, full, self.base)

    def table(self, specs, probes: int):
        t0 = time.time()
        with self.memo.active():        # the estimator perturbs each layer with the same quantized weights
            t = score(self.model, self.calib, method="hessian", options=specs, graph=self.graph,
                      max_probes=probes, min_probes=min(8, probes))
        return t, time.time() - t0

    def solve(self, table, cols, target_bytes):
        sub = Sensitivity(table.names, [table.options[c] for c in cols], table.loss[:, cols], table.method,
                          table.allowed[:, cols], table.model_fingerprint, dict(table.meta))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return allocate(self.model, budget_mb=target_bytes / MB, calib_data=self.calib, options=sub.options,
                            keep=self.keep, sensitivity_table=sub)


def describe_plan(plan, names) -> dict:
    counts: dict[str, int] = {}
    for n in names:
        lab = plan.layers[n].label
        counts[lab] = counts.get(lab, 0) + 1
    return counts


def nominal_target(graph, base: int, emb, bits: float) -> int:
    """Bytes when no ModelOpt plan exists (quick mode without ModelOpt): embeddings fp16, the
    quantizable weights at ``bits`` per weight plus 4 bytes of scale/zero per 128 weights."""
    n_q = sum(l.n_params for l in graph.layers if l.name not in emb)
    n_e = sum(l.n_params for l in graph.layers if l.name in emb)
    return int(base + 2 * n_e + n_q * (bits / 8 + 4 / 128))


# --------------------------------------------------------------------------------------- modelopt
def modelopt_available():
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            import modelopt
            import modelopt.torch.quantization as mtq
        return mtq, getattr(modelopt, "__version__", "?"), None
    except Exception as e:                      # ImportError, or a broken install
        return None, None, f"{type(e).__name__}: {e}"


class ModelOptSide:
    def __init__(self, mtq, model, calib, held, ref, probes: int, seed: int = 0):
        self.mtq, self.model, self.held, self.ref = mtq, model, held, ref
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            outs = [model(**b) for b in calib]
        self.data = []
        for p in range(probes):                 # calibration uses the first len(calib) = each batch once
            for i, b in enumerate(calib):
                u = torch.randint(0, 2, outs[i].shape, generator=g).float() * 2 - 1
                self.data.append(dict(b, _u=u * (2.0 / outs[i].numel()) ** 0.5))
        self.n_calib = len(calib)

    @staticmethod
    def fwd(m, b):
        return m(**{k: v for k, v in b.items() if k != "_u"})

    @staticmethod
    def loss(out, b):
        return (out * b["_u"]).sum()

    def formats(self, variant):
        mtq = self.mtq
        return [mtq.INT4_AWQ_CFG if variant == "awq" else mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, mtq.INT8_WEIGHT_ONLY_CFG]

    def auto_quantize(self, variant: str, bits: float) -> dict:
        m = copy.deepcopy(self.model)
        t0, c0 = time.time(), time.process_time()
        with contextlib.redirect_stdout(open(os.devnull, "w")), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, st = self.mtq.auto_quantize(m, constraints={"effective_bits": bits},
                                           quantization_formats=self.formats(variant), data_loader=self.data,
                                           forward_step=self.fwd, loss_func=self.loss,
                                           num_calib_steps=self.n_calib, num_score_steps=len(self.data))
        secs, cpu = time.time() - t0, time.process_time() - c0
        choice = {k.removesuffix(".quant_recipe"): str(v).split("(")[0] for k, v in st["best"]["recipe"].items()}
        return {"variant": variant, "effective_bits_target": bits,
                "effective_bits_chosen": float(st["best"]["constraints"]["effective_bits"]),
                "choices": choice, "cosine": fidelity(m, self.ref, self.held), "wall_s": secs, "cpu_s": cpu}

    def quantize_plan(self, plan, names) -> float:
        """bitplan's per-layer choices quantized by ModelOpt's AWQ (awq_lite): 4-bit g128 and 8-bit per
        channel weight quantizers; fp16 layers left unquantized."""
        cfg = [{"quantizer_name": "*", "enable": False}]
        for n in names:
            s = plan.layers[n]
            if s.bits == 4:
                cfg.append({"quantizer_name": f"{n}.weight_quantizer",
                            "cfg": {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}})
            elif s.bits == 8:
                cfg.append({"quantizer_name": f"{n}.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}})
        config = {"quant_cfg": cfg, "algorithm": {"method": "awq_lite", "alpha_step": 0.1}}
        m = copy.deepcopy(self.model)
        loop = lambda mm: [self.fwd(mm, b) for b in self.data[:self.n_calib]]      # noqa: E731
        with contextlib.redirect_stdout(open(os.devnull, "w")), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = self.mtq.quantize(m, config, forward_loop=loop)
        return fidelity(m, self.ref, self.held)


def specs_from_modelopt(choices: dict, variant: str, names) -> dict:
    to = {"INT4_AWQ_CFG": QuantSpec(4, 128, method="awq"), "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": QuantSpec(4, 128),
          "INT8_WEIGHT_ONLY_CFG": QuantSpec(8)}
    out = {}
    for n in names:
        c = choices.get(n, "NONE")
        out[n] = to.get(c, FP16)
    return out


# ------------------------------------------------------------------------------------------- main
def calibration_cost(bench, qnames, methods) -> dict:
    """Per method and format: CPU seconds and peak extra MB of quantizing each layer (fills the memo)."""
    out = {}
    for fmt, mk in (("w4g128", lambda m: QuantSpec(4, 128, method=m)), ("w8ch", lambda m: QuantSpec(8, method=m))):
        out[fmt] = {}
        for meth in methods:
            spec, rows = mk(meth), []
            for n in qnames:
                layer = bench.graph.layers[bench.graph.index(n)]
                mod = bench.model.get_submodule(n)
                with bench.memo.active():
                    kmod.quantize_layer(mod, layer.kind, spec, bench.stats[n])
                t, mb = bench.memo.cost[(n, spec)]
                rows.append({"layer": n, "n": layer.out_features, "k": layer.in_features, "time_s": t, "peak_mb": mb})
            out[fmt][meth] = {"time_s_total": sum(r["time_s"] for r in rows),
                              "time_s_max_layer": max(r["time_s"] for r in rows),
                              "peak_mb_max_layer": max(r["peak_mb"] for r in rows), "layers": rows}
            print(f"  calib cost {fmt} {meth:9s} total {out[fmt][meth]['time_s_total']:.2f} s, "
                  f"max layer {out[fmt][meth]['time_s_max_layer']:.2f} s / {out[fmt][meth]['peak_mb_max_layer']:.1f} MB",
                  flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="4.5,5.0,6.0", help="ModelOpt effective bits")
    ap.add_argument("--n-calib", type=int, default=64, help="calibration sentences (both tools)")
    ap.add_argument("--probes", type=int, default=4, help="ModelOpt score steps per calibration batch")
    ap.add_argument("--hessian-probes", type=int, default=24)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--grid-methods", default="rtn,gptq",
                    help="methods crossed with the full default grid (gptq: within 0.0004 cosine of awq_gptq "
                         "at w4g128 in quantizer_methods.json, at 60%% of its calibration time)")
    ap.add_argument("--no-modelopt", action="store_true", help="use the stored ModelOpt plans (--stored)")
    ap.add_argument("--stored", default=OUT, help="results file whose ModelOpt plans to reuse")
    ap.add_argument("--quick", action="store_true", help="tiny random BERT stand-in (CI smoke test)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start, load0, prov = time.time(), os.getloadavg(), provenance()     # the commit that runs, not a later one
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if "rtn" not in methods:
        methods.insert(0, "rtn")
    probes = 4 if args.quick else args.hessian_probes

    name, model, calib, held = load_task(args.quick, args.n_calib)
    graph = LayerGraph.build(model, calib[0])
    emb = [l.name for l in graph.layers if "embedding" in l.kinds]
    qnames = [l.name for l in graph.layers if l.name not in emb]
    t0 = time.thread_time()
    stats = gather_stats(model, calib, names=qnames)
    gather_s = time.thread_time() - t0
    bench = Bench(model, calib, held, graph, Memo(model, qnames), stats, emb)
    tokens = next(iter(stats.values())).n_tokens
    print(f"[{name}] {len(qnames)} quantizable layers (+{len(emb)} embeddings kept fp16), "
          f"{sum(b['input_ids'].shape[0] for b in calib)} calibration sentences ({tokens} tokens), "
          f"{sum(b['input_ids'].shape[0] for b in held)} held-out", flush=True)

    print("calibration cost per method:", flush=True)
    cost = calibration_cost(bench, qnames, methods)
    cost["gather_stats_s"] = gather_s

    # --- ModelOpt (or its stored plans) -> target bytes per budget
    mtq, mo_version, mo_error = (None, None, "skipped (--no-modelopt)") if args.no_modelopt else modelopt_available()
    mo_rows, source = {}, "nominal"
    if mtq is not None:
        source = "modelopt"
        side = ModelOptSide(mtq, model, calib, held, bench.ref, 1 if args.quick else args.probes)
        for b in budgets:
            for variant in ("awq", "max"):
                r = side.auto_quantize(variant, b)
                r["specs"] = {n: s.label for n, s in specs_from_modelopt(r["choices"], variant, qnames).items()}
                mo_rows[f"{b}/{variant}"] = r
                print(f"  ModelOpt {variant:3s} @ {b}: cosine {r['cosine']:.5f}, eff bits "
                      f"{r['effective_bits_chosen']:.3f}, {r['wall_s']:.0f} s", flush=True)
    elif not args.quick and os.path.exists(args.stored):
        stored = read_json(args.stored, "stored vs_modelopt results")
        mo_rows = stored.get("modelopt", {}).get("runs", {})
        source = "stored" if mo_rows else "nominal"
        print(f"ModelOpt not run ({mo_error}); using {len(mo_rows)} stored ModelOpt plans from {args.stored} "
              f"(commit {stored.get('commit', {}).get('sha')})", flush=True)
    else:
        print(f"ModelOpt not run ({mo_error}); targets are nominal bytes", flush=True)

    rows, targets = [], {}
    best, score_s, grid_methods = None, {}, sorted(set(args.grid_methods.split(",")) | {"rtn"})

    def snapshot(partial: bool) -> dict:
        """Write the results so far (a cut run still leaves its numbers, marked partial)."""
        out = {"benchmark": "vs_modelopt", **prov, "task": name, "quick": args.quick,
               "threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "seconds": time.time() - t_start,
               "setup": {"calib_sentences": sum(b["input_ids"].shape[0] for b in calib), "calib_tokens": tokens,
                         "heldout_sentences": sum(b["input_ids"].shape[0] for b in held),
                         "quantizable_layers": qnames, "embeddings_fp16": emb, "base_bytes": bench.base,
                         "option_set": [s.label for s in option_set(methods)], "estimator": "hessian",
                         "hessian_probes": probes, "modelopt_score_probes": args.probes,
                         "grid_methods": grid_methods},
               "modelopt": {"version": mo_version, "error": mo_error, "source": source, "runs": mo_rows,
                            "formats": {"awq": ["INT4_AWQ_CFG", "INT8_WEIGHT_ONLY_CFG"],
                                        "max": ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_WEIGHT_ONLY_CFG"]}},
               "targets": {str(b): v for b, v in targets.items()}, "best_method": best,
               "score_seconds": score_s, "apply_plan_check": bench.checked, "calibration_cost": cost,
               "rows": rows, "issue_quoted": ISSUE_QUOTED}
        out["partial"] = partial
        atomic_write_json(args.out, out)
        return out

    def add(budget, label, plan, metrics, **extra):
        row = {"budget_bits": budget, "label": label, **metrics, **extra,
               "layers": describe_plan(plan, qnames) if plan is not None else None}
        rows.append(row)
        tb = targets.get(budget)
        print(f"  {budget:4.1f} {label:34s} cos {metrics['cosine']:.5f}  bytes {metrics.get('bytes', '-')}"
              + (f"  (target {tb})" if tb else ""), flush=True)
        return row

    for b in budgets:
        mine = []
        for variant in ("awq", "max"):
            r = mo_rows.get(f"{b}/{variant}")
            if r is None:
                continue
            plan = bench.plan_from(specs_from_modelopt(r["choices"], variant, qnames))
            ev = bench.evaluate(plan)
            mine.append(ev["bytes"])
            label = f"modelopt_{variant}"
            add(b, label, plan, {"cosine": r["cosine"], "bytes": ev["bytes"],
                                 "predicted_bytes": ev["predicted_bytes"]},
                quantizer="modelopt", allocation="modelopt", bitplan_quantizer_cosine=ev["cosine"],
                source=source)
        targets[b] = min(mine) if mine else nominal_target(graph, bench.base, emb, b)
    snapshot(True)

    # --- bitplan: ONE hessian scoring over every option used below (one trace estimate), each
    # configuration solved on its columns of that table at every budget
    union = list(dict.fromkeys(option_set(methods) + full_grid(grid_methods)))
    table, table_s = bench.table(union, probes)
    print(f"scored {len(union)} options in {table_s:.0f} s ({table.meta.get('probes')} probes)", flush=True)
    in_set = set(option_set(methods))
    configs = [("bitplan_rtn", lambda s: s in in_set and s.method == "rtn")] \
        + [(f"bitplan_{m}", (lambda m: lambda s: s in in_set and s.method == m)(m)) for m in methods if m != "rtn"] \
        + [("bitplan_methods", lambda s: s in in_set),
           ("bitplan_full_grid", lambda s: s in set(full_grid(grid_methods)))]
    plans = {}
    for b in budgets:
        for label, keep_col in configs:
            cols = [j for j, s in enumerate(table.options) if keep_col(s) or s.bits == 16]
            plan = bench.solve(table, cols, targets[b])
            plans[(label, b)] = plan
            add(b, label, plan, bench.evaluate(plan), quantizer="bitplan", allocation="bitplan",
                target_bytes=targets[b], options=len(cols))
        snapshot(True)
    singles = [m for m in methods if m != "rtn"]
    best = max(singles, key=lambda m: np.mean([r["cosine"] for r in rows if r["label"] == f"bitplan_{m}"])) \
        if singles else "rtn"
    score_s = {"union_table": table_s, "options": len(union), "probes": table.meta.get("probes")}

    # --- cross checks: each tool's allocation through the other's quantizer
    for b in budgets:
        r = mo_rows.get(f"{b}/max")
        if r is not None and best != "rtn":
            specs = {n: (QuantSpec(s.bits, s.group_size, method=best) if s.bits != 16 else s)
                     for n, s in specs_from_modelopt(r["choices"], "max", qnames).items()}
            plan = bench.plan_from(specs)
            add(b, f"modelopt_alloc+bitplan_{best}", plan, bench.evaluate(plan), quantizer="bitplan",
                allocation="modelopt")
        if mtq is not None:
            plan = plans[("bitplan_rtn", b)]
            add(b, "bitplan_rtn_alloc+modelopt_awq", plan, {"cosine": side.quantize_plan(plan, qnames),
                                                            "bytes": None}, quantizer="modelopt",
                allocation="bitplan")

    out = snapshot(False)
    print_table(out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")
    return 0


def print_table(out) -> None:
    labels = list(dict.fromkeys(r["label"] for r in out["rows"]))
    budgets = sorted({r["budget_bits"] for r in out["rows"]})
    print("\n| configuration | " + " | ".join(f"{b} bits: cosine / bytes" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for lab in labels:
        cells = []
        for b in budgets:
            r = next((r for r in out["rows"] if r["label"] == lab and r["budget_bits"] == b), None)
            cells.append("-" if r is None else f"{r['cosine']:.5f} / {r['bytes'] if r['bytes'] else '-'}")
        print(f"| {lab} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
