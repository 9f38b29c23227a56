"""Do the sensitivity tables predict the loss that quantization really causes?

For MiniLM-L6 (built-in ``minilm``: sentence embeddings, label-free MSE to the fp embeddings), a
small residual MLP trained here on sklearn digits (cached in benchmarks/out/digits_mlp.pt; label-free
KL to the fp logits) and ``tinyllama`` (a 4-block Llama-architecture HF folder trained briefly here on
the built-in calibration text, next-token KL; the only one the block-streaming estimator ``block``
applies to, since it streams HF decoder LMs), every registered estimator scores all (layer, bits)
pairs, and we report:

- rho_calib: Spearman rank correlation, over all (layer, bits) pairs, between the predicted table and
  the measured one-layer-at-a-time loss increase on the calibration data (the ``measured`` table; so
  1.0 for ``measured`` itself by construction);
- rho_held: the same against the measured increase on held-out data (no estimator saw it; MiniLM:
  2 x 16 held-out sentences, digits: 4 x 64 test images);
- additivity: N random mixed-precision configurations (k layers quantized together at random bits);
  true Δloss measured with all k layers quantized at once vs the table's sum over the chosen entries.
  rel_err = median |Σ pred − true| / true (only meaningful for tables in loss units: hessian, fisher,
  measured, decoupled); rel_err_fit = the same after the best single scale factor (median ratio),
  comparable for every estimator; rho_cfg = Spearman of Σ pred vs true over the configurations.
- wall s, CPU s (user+sys, all threads; less sensitive to other jobs than wall) and peak RSS (MiB,
  the whole process incl. the loaded model) of each estimator, each in its own subprocess.

Run:  python benchmarks/sensitivity_validity.py [--models minilm digits] [--fresh] [--threads 2]
Tables are cached in benchmarks/out/sens_<model>_<method>.json (with wall time and RSS); --fresh
recomputes them. The machine this runs on may be shared: say so when quoting wall times.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
METHODS = ("hessian", "fisher", "decoupled", "lim", "zd", "measured")    # + "block" on causal-LM folders
BITS = (2, 3, 4, 8)


# ---------------------------------------------------------------- models
class DigitsMLP(torch.nn.Module):
    """Residual MLP: 64 -> 64, 3 blocks (64 -> 128 -> 64, skip), head 64 -> 10."""

    def __init__(self, d: int = 64, hidden: int = 128, n_blocks: int = 3):
        super().__init__()
        self.inp = torch.nn.Linear(64, d)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d))
            for _ in range(n_blocks))
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for blk in self.layers:
            h = h + blk(h)
        return self.head(h)


def digits_spec():
    """(model, calib batches, held-out batches, loss_fn); trains once and caches the weights."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    xtr, xte, ytr, yte = train_test_split(x, torch.tensor(y), test_size=0.3, random_state=0)
    path = os.path.join(OUT, "digits_mlp.pt")
    torch.manual_seed(0)
    model = DigitsMLP()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for epoch in range(60):
            perm = torch.randperm(len(xtr))
            for i in range(0, len(xtr), 64):
                idx = perm[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        os.makedirs(OUT, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    calib = [xtr[i:i + 64] for i in range(0, 256, 64)]
    held = [xte[i:i + 64] for i in range(0, 256, 64)]
    return model, calib, held, "kl", {"test_accuracy": acc}


def tinyllama_spec():
    """A 4-block Llama-architecture HF folder (hidden 128, GQA 4/2 heads, SwiGLU 352, the 512-token BPE
    of tests/llm_fixtures.py) trained briefly here on bitplan's built-in calibration text (next-token
    CE; cached in benchmarks/out/tinyllama): HF-shaped, so the block-streaming estimator applies.
    Calib: 8 x 4 windows of 64 tokens of the calibration text; held-out: 4 x 4 windows of the
    held-out text (other sources). Label-free next-token KL."""
    sys.path.insert(0, os.path.join(os.path.dirname(OUT), "..", "tests"))
    from llm_fixtures import train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitplan.models import lm_batches, text
    tok = train_tokenizer(512)
    path = os.path.join(OUT, "tinyllama")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        cfg = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], hidden_size=128,
                                   intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=4, max_position_embeddings=256, vocab_size=len(tok),
                                   tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        ids = tok(text("calib"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        for step in range(600):
            starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
            x = torch.stack([ids[s:s + 65] for s in starts])
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(path)
        tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    calib = lm_batches(tok, text("calib"), 64, 32, 4)
    held = lm_batches(tok, text("heldout"), 64, 16, 4)
    with torch.no_grad():
        ppl = float(np.exp(np.mean([float(model(**b, labels=b["input_ids"]).loss) for b in held])))
    return model, calib, held, "kl", {"heldout_perplexity": ppl, "folder": os.path.relpath(path, os.path.dirname(OUT))}


def minilm_spec():
    from bitplan.models import load_model
    spec = load_model("minilm")
    return spec.model, spec.calib_data, spec.eval_data[:2], None, {}   # 2 x 16 held-out sentences


SPECS = {"minilm": minilm_spec, "digits": digits_spec, "tinyllama": tinyllama_spec}
# estimators that only apply to HF causal-LM folders; "name:key=value" runs a variant with that setting
STREAMED = {"tinyllama": ("block", "block:anchor_batches=2", "block:probes=0", "block:anchors=1,anchor_batches=2,probes=0", "block:measure=all")}


def _variant(method: str) -> tuple[str, dict]:
    """``"block:probes=0"`` -> ("block", {"probes": 0}) (int, float or str values)."""
    name, _, rest = method.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        for conv in (int, float, str):
            try:
                opts[k] = conv(v)
                break
            except ValueError:
                continue
    return name, opts


def _table_path(model_name: str, method: str) -> str:
    return os.path.join(OUT, f"sens_{model_name}_{method.replace(':', '_').replace('=', '').replace(',', '_')}.json")


# ---------------------------------------------------------------- worker (one estimator, own process)
def worker(model_name: str, method: str, threads: int) -> None:
    torch.set_num_threads(threads)
    from bitplan.sensitivity import score
    model, calib, _, loss_fn, _ = SPECS[model_name]()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    name, opts = _variant(method)
    t = score(model, calib, method=name, bits=BITS, loss_fn=loss_fn, seed=0, **opts)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru.ru_utime + ru.ru_stime) - (ru0.ru_utime + ru0.ru_stime)    # CPU seconds, all threads
    t.meta.update({"bench_wall_s": wall, "bench_cpu_s": cpu, "bench_peak_rss_mib": ru.ru_maxrss / 1024,
                   "bench_rss_before_mib": ru0.ru_maxrss / 1024, "bench_threads": threads})
    t.save(_table_path(model_name, method))


def table(model_name: str, method: str, threads: int, fresh: bool):
    from bitplan.sensitivity import load
    path = _table_path(model_name, method)
    if fresh or not os.path.exists(path):
        os.makedirs(OUT, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--worker", model_name, method, "--threads", str(threads)],
                       check=True)
    return load(path)


# ---------------------------------------------------------------- ground truth
@torch.no_grad()
def true_delta(model, batches, loss_fn, config: dict, bits=BITS) -> float:
    """Loss increase on ``batches`` with the layers in ``config`` {name: bits} quantized together."""
    from bitplan.core.graph import layer_kind, layer_weight_2d
    from bitplan.kernels.quantizer import fake_quantize
    from bitplan.sensitivity.losses import resolve_loss
    fn, _ = resolve_loss(loss_fn, model, batches)
    q = copy.deepcopy(model)
    for name, b in config.items():
        m = q.get_submodule(name)
        w2 = layer_weight_2d(m, layer_kind(m))
        qw = fake_quantize(w2.detach(), b)
        m.weight.copy_(qw.t() if layer_kind(m) == "hf_conv1d" else qw.reshape(m.weight.shape))
    # fn compares q's outputs with the fp references computed from ``model`` on the same batches
    return float(np.mean([float(fn(q, b)) - float(fn(model, b)) for b in batches]))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def ground_truth(model_name: str, names: list[str], fresh: bool, n_cfg: int, seed: int = 0, which=("held", "cfg")):
    """Cached measured ground truth: held-out one-at-a-time table (L, B) and mixed configurations."""
    model, calib, held, loss_fn, _ = SPECS[model_name]()
    held_path = os.path.join(OUT, f"heldout_{model_name}.json")
    if "held" in which and (fresh or not os.path.exists(held_path)):
        held_tab = np.array([[true_delta(model, held, loss_fn, {n: b}) for b in BITS] for n in names])
        with open(held_path, "w") as f:
            json.dump(held_tab.tolist(), f)
    rng = np.random.default_rng(seed)
    cfg_path = os.path.join(OUT, f"configs_{model_name}.json")
    if "cfg" in which and (fresh or not os.path.exists(cfg_path)):
        cfgs = []
        for _ in range(n_cfg):
            k = int(rng.choice([2, 4, 8, len(names) // 2]))
            chosen = rng.choice(len(names), size=min(k, len(names)), replace=False)
            cfg = {names[i]: int(rng.choice(BITS)) for i in chosen}
            cfgs.append({"config": cfg, "true": true_delta(model, calib, loss_fn, cfg)})
        with open(cfg_path, "w") as f:
            json.dump(cfgs, f)
    return held_path, cfg_path


def evaluate(model_name: str, threads: int, fresh: bool, n_cfg: int, seed: int = 0) -> list[dict]:
    _, _, _, _, info = SPECS[model_name]()
    tables = {m: table(model_name, m, threads, fresh) for m in METHODS + STREAMED.get(model_name, ())}
    names = tables["measured"].names
    meas = tables["measured"].loss
    held_path, cfg_path = ground_truth(model_name, names, fresh, n_cfg, seed)
    held_tab = np.array(json.load(open(held_path)))
    cfgs = json.load(open(cfg_path))
    true = np.array([c["true"] for c in cfgs])
    rows = []
    for m, t in tables.items():
        col = {b: j for j, b in enumerate(t.bits)}
        loss = t.loss[[t.names.index(n) for n in names]]          # rows in the measured table's order
        pred = np.array([sum(loss[names.index(n), col[b]] for n, b in c["config"].items()) for c in cfgs])
        ok = true > 0
        rel = np.abs(pred[ok] - true[ok]) / true[ok]
        scale = np.median(true[ok] / np.maximum(pred[ok], 1e-300))
        rel_fit = np.abs(scale * pred[ok] - true[ok]) / true[ok]
        rows.append({"model": model_name, "method": m, "rho_calib": spearman(loss, meas),
                     "rho_held": spearman(loss, held_tab), "rel_err": float(np.median(rel)),
                     "rel_err_fit": float(np.median(rel_fit)), "rho_cfg": spearman(pred, true),
                     "wall_s": t.meta["bench_wall_s"], "cpu_s": t.meta.get("bench_cpu_s", float("nan")),
                     "rss_mib": t.meta["bench_peak_rss_mib"],
                     "rss_before_mib": t.meta["bench_rss_before_mib"], "threads": t.meta["bench_threads"],
                     "layers": len(names), "configs": len(cfgs), **info})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "digits"], choices=sorted(SPECS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", type=int, default=24, help="random mixed-precision configurations")
    ap.add_argument("--fresh", action="store_true", help="recompute cached tables and ground truth")
    ap.add_argument("--results", metavar="FILE", help="also write the rows with provenance to FILE "
                    "(e.g. benchmarks/results/sensitivity_validity_tinyllama.json)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--truth", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.threads)
        return
    if a.truth:                         # precompute ground truth in parallel with the estimators
        from bitplan.core.graph import LayerGraph
        model, calib, *_ = SPECS[a.truth[0]]()
        torch.set_num_threads(a.threads)
        ground_truth(a.truth[0], LayerGraph.build(model, calib[0]).names, a.fresh, a.configs,
                     which=(a.truth[1],))
        return
    torch.set_num_threads(a.threads)
    rows = []
    for m in a.models:
        rows += evaluate(m, a.threads, a.fresh, a.configs)
    with open(os.path.join(OUT, "sensitivity_validity.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if a.results:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.provenance import provenance

        from bitplan.core.jsonio import atomic_write_json
        atomic_write_json(a.results, {**provenance(), "bits": list(BITS), "threads": a.threads,
                                      "loadavg": os.getloadavg(), "rows": rows})
    hdr = (f"{'model':7} {'method':9} {'rho_calib':>9} {'rho_held':>8} {'add_rel_err':>11} "
           f"{'add_err_fit':>11} {'rho_cfg':>7} {'wall_s':>7} {'cpu_s':>7} {'peakRSS_MiB':>11}")
    print(f"torch {torch.__version__}, {a.threads} threads (shared machine), bits {BITS}")
    for m in a.models:
        extra = {k: v for k, v in rows[[r['model'] for r in rows].index(m)].items() if k == "test_accuracy"}
        r0 = next(r for r in rows if r["model"] == m)
        print(f"\n{m}: {r0['layers']} layers x {len(BITS)} options, {r0['configs']} mixed configs "
              f"{'(test acc %.3f)' % extra['test_accuracy'] if extra else ''}")
        print(hdr)
        for r in rows:
            if r["model"] == m:
                print(f"{r['model']:7} {r['method']:9} {r['rho_calib']:9.3f} {r['rho_held']:8.3f} "
                      f"{r['rel_err']:11.3f} {r['rel_err_fit']:11.3f} {r['rho_cfg']:7.3f} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} "
                      f"{r['rss_mib']:11.0f}")


if __name__ == "__main__":
    main()
