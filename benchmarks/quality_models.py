"""Models and metrics of the quality benchmark (issue #6), all offline and reproducible.

Each ``load_*`` returns a :class:`Task`: the fp32 model, calibration batches, the label-free loss
the estimators use, and ``evaluate(model) -> {metric: value}`` on held-out data that is disjoint from
the calibration data.

- ``minilm``:    sentence-transformers all-MiniLM-L6-v2 (``bitplan.models.load_model``); metrics:
                 mean cosine of held-out sentence embeddings to fp32, top-5 retrieval agreement.
- ``digits_mlp`` / ``digits_cnn``: trained on sklearn ``load_digits`` (fixed split, fixed seed);
                 metrics: test accuracy and cross-entropy.
- ``charlm``:    a 2-block character-level transformer trained on docstrings of this Python's
                 standard library (real English, offline); metric: held-out perplexity.

Trained weights are cached under ``<work>/cache/`` (git-ignored ``benchmarks/out/``), keyed by a hash of
the training config, the torch version and (charlm) the corpus; nothing trained is committed.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "load_task", "TASKS", "DigitsMLP", "DigitsCNN", "CharLM", "stdlib_docstrings"]


@dataclass
class Task:
    name: str
    model: nn.Module                         # fp32 reference, eval mode; never modified
    calib: list                              # calibration batches (inputs only)
    loss_fn: object                          # what estimators differentiate: "kl" | None | callable
    evaluate: Callable[[nn.Module], dict]    # held-out metrics of a (quantized) model
    metrics: list[str]                       # metric names, primary first
    higher_better: dict[str, bool]
    units: str = "KB"                        # size unit of the tables: "KB" (1e3 B) or "MB" (1e6 B)
    info: dict = field(default_factory=dict)
    validate: Callable[[nn.Module], dict] | None = None   # same metrics on a validation split, disjoint
    #                                                       from calibration and test: selects bitplan_best


# ----------------------------------------------------------------------------- training cache
def _cache_path(work: str, name: str, cfg: dict) -> str:
    key = hashlib.sha256(json.dumps({**cfg, "torch": torch.__version__}, sort_keys=True).encode())
    os.makedirs(os.path.join(work, "cache"), exist_ok=True)
    return os.path.join(work, "cache", f"{name}-{key.hexdigest()[:12]}.pt")


def _train_cached(work: str, name: str, cfg: dict, build: Callable, train: Callable) -> tuple[nn.Module, dict]:
    """Build the model; load cached weights if the config matches, else train and cache them."""
    path = _cache_path(work, name, cfg)
    torch.manual_seed(cfg["seed"])
    model = build()
    if os.path.exists(path):
        blob = torch.load(path, weights_only=True)
        model.load_state_dict(blob["state"])
        return model.eval(), {**blob["info"], "cached": True}
    t0 = time.perf_counter()
    info = train(model)
    info["train_s"] = round(time.perf_counter() - t0, 2)
    torch.save({"state": model.state_dict(), "info": info}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval(), {**info, "cached": False}


# ----------------------------------------------------------------------------- digits (sklearn)
class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 MLP on flattened 8x8 digits (3 quantizable Linear layers)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):                                    # (n, 1, 8, 8) -> (n, 10) logits
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class DigitsCNN(nn.Module):
    """conv3x3(1->16) -> conv3x3(16->32) -> pool -> fc(512->64) -> fc(64->10): 4 quantizable layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):                                    # (n, 1, 8, 8) -> (n, 10) logits
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)           # (n, 32, 4, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8)   # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def _load_digits(work: str, arch: str, quick: bool) -> Task:
    Xtr, ytr, Xte, yte = _digits()
    cfg = {"arch": arch, "epochs": 15 if quick else 40, "lr": 3e-3, "batch": 64, "seed": 0,
           "split": "load_digits test_size=0.3 random_state=0 stratified"}

    def train(model):
        g = torch.Generator().manual_seed(cfg["seed"])
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        model.train()
        for _ in range(cfg["epochs"]):
            for idx in torch.randperm(len(Xtr), generator=g).split(cfg["batch"]):
                opt.zero_grad()
                F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                opt.step()
        return {"epochs": cfg["epochs"], "train_n": len(Xtr), "test_n": len(Xte)}
    build = DigitsMLP if arch == "mlp" else DigitsCNN
    model, info = _train_cached(work, f"digits_{arch}", cfg, build, train)
    for p in model.parameters():
        p.requires_grad_(False)
    # calibration: 4 batches of 64 training images (labels unused: label-free KL to the fp model)
    calib = [Xtr[i * 64:(i + 1) * 64] for i in range(4)]

    # held-out images: the first 180 validate (choose bitplan_best), the other 360 test
    n_val = 180

    def metrics(X, y):
        @torch.no_grad()
        def run(m):
            logits = m(X)
            return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                    "cross_entropy": float(F.cross_entropy(logits, y))}
        return run
    info = {**info, "test_n": len(Xte) - n_val, "val_n": n_val}
    return Task(f"digits_{arch}", model, calib, "kl", metrics(Xte[n_val:], yte[n_val:]), ["accuracy", "cross_entropy"],
                {"accuracy": True, "cross_entropy": False}, "KB", info, metrics(Xte[:n_val], yte[:n_val]))


# ----------------------------------------------------------------------------- char LM
def stdlib_docstrings(max_chars: int) -> tuple[str, str]:
    """(train, held-out) text: ASCII docstrings of this Python's top-level stdlib modules.

    Files are taken in sorted order; every 10th file's docstrings are held out, so the two splits
    share no docstring.
    """
    root = sysconfig.get_paths()["stdlib"]
    train, held = [], []
    for i, path in enumerate(sorted(glob.glob(os.path.join(root, "*.py")))):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 40 and d.isascii():
                    docs.append(d.strip())
        (held if i % 10 == 0 else train).extend(docs)
    return "\n\n".join(train)[:max_chars], "\n\n".join(held)[:max_chars // 8]


VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]          # 96 symbols; anything else -> " "
_STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_STOI.get(c, 0) for c in text], dtype=torch.long)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):                                     # (n, T, d)
        n, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)            # (n, h, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """Character transformer: embeddings + ``n_layer`` pre-LN blocks + LM head (plain attention math,
    so double backward works everywhere)."""

    def __init__(self, d: int = 128, n_layer: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(len(VOCAB), d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(n_layer)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, len(VOCAB))

    def forward(self, idx):                                   # (n, T) long -> (n, T, V) logits
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def _windows(data: torch.Tensor, ctx: int, n: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.randint(0, len(data) - ctx - 1, (n,), generator=gen)
    x = torch.stack([data[j:j + ctx] for j in i.tolist()])
    y = torch.stack([data[j + 1:j + 1 + ctx] for j in i.tolist()])
    return x, y


def _load_charlm(work: str, quick: bool) -> Task:
    ctx = 64
    cfg = {"arch": "charlm", "d": 96 if quick else 128, "n_layer": 2, "heads": 4, "ctx": ctx,
           "steps": 150 if quick else 700, "batch": 32, "lr": 3e-3, "seed": 0,
           "max_chars": 2_000_000, "python": sysconfig.get_python_version()}
    text_tr, text_ho = stdlib_docstrings(cfg["max_chars"])
    cfg["corpus_sha"] = hashlib.sha256((text_tr + text_ho).encode()).hexdigest()[:12]
    tr, ho = encode(text_tr), encode(text_ho)

    def train(model):
        g = torch.Generator().manual_seed(cfg["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=cfg["steps"], pct_start=0.1)
        model.train()
        for _ in range(cfg["steps"]):
            x, y = _windows(tr, ctx, cfg["batch"], g)
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        return {"steps": cfg["steps"], "train_chars": len(tr), "heldout_chars": len(ho)}
    model, info = _train_cached(work, "charlm", cfg, lambda: CharLM(cfg["d"], cfg["n_layer"], cfg["heads"], ctx),
                                train)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    calib = [_windows(tr, ctx, 16, g)[0] for _ in range(4)]          # 4 x (16, 64) training windows
    n_eval = 64 if quick else 256
    # held-out: non-overlapping consecutive windows from the start of the held-out text
    # validation (chooses bitplan_best): the next n_eval // 2 windows after the test windows
    n_val = n_eval // 2
    n_eval = min(n_eval, (len(ho) - 1) // ctx - n_val)

    def perplexity(start, n):
        xe = ho[start * ctx:(start + n) * ctx].view(n, ctx)
        ye = ho[start * ctx + 1:(start + n) * ctx + 1].view(n, ctx)

        @torch.no_grad()
        def run(m):
            ce = sum(float(F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum"))
                     for x, y in zip(xe.split(64), ye.split(64))) / ye.numel()
            return {"perplexity": math.exp(ce)}
        return run
    info = {**info, "eval_chars": n_eval * ctx, "val_chars": n_val * ctx}
    return Task("charlm", model, calib, "kl", perplexity(0, n_eval), ["perplexity"], {"perplexity": False}, "KB",
                info, perplexity(n_eval, n_val))


# ----------------------------------------------------------------------------- MiniLM
def _load_minilm(work: str, quick: bool) -> Task:
    from bitplan.models import load_model, sentences, text_batches
    spec = load_model("minilm", n_calib=32 if quick else 64, batch_size=16)
    tok = spec.extra["tokenizer"]
    held = sentences("heldout")
    if quick:
        held = held[:48]
    # batches of similar length (less padding = faster; pooling masks padding, so results are equal)
    n_calib = sum(len(b["input_ids"]) for b in spec.calib_data)
    # validation (chooses bitplan_best): the shipped calibration sentences that calibration did not use
    val = sentences("calib")[n_calib:]
    model = spec.model
    for p in model.parameters():
        p.requires_grad_(False)

    def metrics(texts):
        # batches of similar length (less padding = faster; pooling masks padding, so results are equal)
        order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i])["input_ids"]))
        batches = text_batches(tok, [texts[i] for i in order], batch_size=32)

        @torch.no_grad()
        def embed(m):
            return torch.cat([m(**b) for b in batches])       # (n, 384) unit vectors

        ref = embed(model)
        k = 5
        ref_top = (ref @ ref.T).fill_diagonal_(-2).topk(k, dim=1).indices        # (n, 5)

        @torch.no_grad()
        def run(m):
            e = embed(m)
            top = (e @ e.T).fill_diagonal_(-2).topk(k, dim=1).indices
            agree = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, ref_top)) / (k * len(e))
            return {"cosine": float(F.cosine_similarity(e, ref, dim=-1).mean()), "top5_agreement": agree}
        return run
    return Task("minilm", model, spec.calib_data, None, metrics(held), ["cosine", "top5_agreement"],
                {"cosine": True, "top5_agreement": True}, "MB",
                {"heldout_sentences": len(held), "calib_sentences": n_calib, "val_sentences": len(val)},
                metrics(val) if len(val) >= 16 else None)


TASKS = {"minilm": _load_minilm, "digits_cnn": lambda w, q: _load_digits(w, "cnn", q),
         "digits_mlp": lambda w, q: _load_digits(w, "mlp", q), "charlm": _load_charlm}


def load_task(name: str, work: str, quick: bool = False) -> Task:
    """Build (or load from cache) one benchmark task."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](work, quick)
