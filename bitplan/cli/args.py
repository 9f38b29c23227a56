"""Argument types and shared option groups of the CLI (each error names the value and what is allowed)."""
from __future__ import annotations

import argparse
import os

from ..options import DEFAULTS

__all__ = ["bits_list", "positive", "positive_int", "group_list", "act_list", "method_list", "ints",
           "floats", "existing_file", "keep_arg", "common", "model_args", "quant_args", "score_args",
           "lm_args", "MODEL_HELP", "UsageError"]

MODEL_HELP = ("model spec: 'minilm' (built-in all-MiniLM-L6-v2, offline), a local Hugging Face model "
              "folder (causal LMs load with their lm_head and built-in calibration text; other models as "
              "sentence encoders), or 'pkg.module:function' returning a model or (model, calib_batches); "
              "the current directory is importable")


class UsageError(Exception):
    """A combination of arguments argparse cannot check by itself (exit 2 with the usage line)."""


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def bits_list(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in _split(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated integers, e.g. 2,3,4,8") from None
    if not out or len(set(out)) != len(out) or any(b not in (2, 3, 4, 5, 6, 7, 8, 16) for b in out):
        raise argparse.ArgumentTypeError(f"{s!r}: distinct bit-widths from 2..8 or 16 (fp16), e.g. 2,3,4,8")
    return out


def _positive_number(cast, what: str):
    """An argparse type: ``cast(s)`` that must be > 0 and finite; the error names the value."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            v = None
        if v is None or not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError(f"{s!r}: must be a positive {what}")
        return v
    return parse


positive = _positive_number(float, "finite number")
positive_int = _positive_number(int, "integer")


def group_list(s: str) -> tuple:
    out = []
    for x in _split(s):
        if x in ("none", "channel", "per-channel"):
            out.append(None)
            continue
        try:
            v = int(x)
        except ValueError:
            v = 0
        if not 1 <= v <= 1 << 20:
            raise argparse.ArgumentTypeError(f"{s!r}: each entry is 'channel' (one scale per output channel) "
                                             "or a group size in 1..1048576, e.g. channel,128")
        out.append(v)
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{s!r}: give distinct group sizes, e.g. channel,128,32")
    return tuple(out)


def act_list(s: str) -> tuple:
    out = []
    for x in _split(s):
        if x in ("none", "fp", "16"):
            out.append(None)
        elif x == "8":
            out.append(8)
        else:
            raise argparse.ArgumentTypeError(f"{s!r}: each entry is 'none' (floating-point activations) or 8, "
                                             "e.g. none,8")
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{s!r}: give distinct activation options, e.g. none,8")
    return tuple(out)


def method_list(s: str) -> tuple:
    out = tuple(_split(s))
    if not out or len(set(out)) != len(out) or not all(x.replace("_", "").isalnum() for x in out):
        raise argparse.ArgumentTypeError(f"{s!r}: give distinct quantizer method names, e.g. rtn,gptq")
    return out


def ints(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in _split(s))
    except ValueError:
        out = ()
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated positive integers, e.g. 1,16,128")
    return out


def floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in _split(s)]
    except ValueError:
        out = []
    if not out or any(not 0 < v < float("inf") for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated positive numbers, e.g. 20,30,40")
    return out


def existing_file(s: str) -> str:
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s!r}: no such file")
    return s


def keep_arg(s: str) -> str:
    pat, sep, b = s.rpartition("=")
    if not sep or not pat or not b.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected LAYER_GLOB=BITS, e.g. 'encoder.*.dense=8'")
    return s


def common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging (on stderr)")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and only warnings/errors on stderr (bars are also off when "
                        "stderr is not a terminal)")
    return c


def model_args(p, calib=True):
    p.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    if calib:
        p.add_argument("--calib-batches", type=positive_int, default=None, metavar="N",
                       help="use only the first N calibration batches the model spec provides "
                            "(default: all; fewer = faster, noisier sensitivity)")
        lm_args(p)


def lm_args(p):
    g = p.add_argument_group("causal LMs (Hugging Face folders with a …ForCausalLM architecture)")
    g.add_argument("--calib-text", type=existing_file, metavar="FILE",
                   help="UTF-8 text to calibrate on instead of the built-in prose-and-code text")
    g.add_argument("--seq-len", type=positive_int, default=None, metavar="T",
                   help="tokens per calibration sequence (default 128)")
    g.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                   help="calibration sequences drawn evenly from the text (default 32)")
    g.add_argument("--loss", choices=["kl", "ce"], default="kl",
                   help="kl (default): label-free KL to the fp model's next-token distribution; "
                        "ce: next-token cross-entropy on the calibration text")


def _fmt(vals, none):
    return ",".join(none if v is None else str(v) for v in vals)


def quant_args(p):
    p.add_argument("--bits", type=bits_list, default=DEFAULTS["bits"], metavar="B,B,...",
                   help=f"weight bit-width options per layer (default {_fmt(DEFAULTS['bits'], '')}; "
                        "16 = keep in fp16)")
    p.add_argument("--group-size", type=group_list, default=DEFAULTS["group_size"], metavar="G,G,...",
                   help="group-size options: weights per scale along the input dimension, or 'channel' = one "
                        f"scale per output channel (default {_fmt(DEFAULTS['group_size'], 'channel')}); a "
                        "layer whose input dim is not a multiple of G lacks that option")
    p.add_argument("--act-bits", type=act_list, default=(None,), metavar="A,A,...",
                   help="activation options: 'none' (floating point, default) and/or 8 (dynamic per-token "
                        "int8, W8A8)")
    p.add_argument("--quant-method", type=method_list, default=(DEFAULTS["quant_method"],), metavar="M,M,...",
                   help="how the shared quantizer rounds, per option: rtn (round to nearest, default), "
                        "clip (MSE-optimal clipping), awq (activation-aware scales, stored), gptq "
                        "(error-compensating rounding), awq_gptq; several = more options per layer")
    p.add_argument("--asymmetric", action="store_true",
                   help="store an fp16 zero point per group as well as the scale (default symmetric)")


def score_args(p):
    p.add_argument("--sensitivity", "--method", dest="sensitivity", default="auto", metavar="NAME",
                   help="sensitivity estimator: auto (default: block for a causal-LM folder with safetensors "
                        "weights and --loss kl, else hessian), hessian (HAWQ-V3 Hutchinson traces), fisher, "
                        "measured, decoupled (MixDQ: output fidelity vs similarity-structure metrics, layer "
                        "groups for plan --group-budgets), lim, zd, block (causal-LM folders: streamed one decoder "
                        "block at a time, memory flat in depth) ... (an unknown name lists the installed ones)")
    p.add_argument("--max-probes", type=positive_int, default=None, metavar="N",
                   help="hessian only: cap on Hutchinson probes (one Hessian-vector product per "
                        "calibration batch each; default automatic: at most ~4x the forwards of measured, "
                        "never over 64)")
    p.add_argument("--solver", default="ilp", metavar="NAME",
                   help="allocation solver: ilp (default, PuLP + CBC), highs, dp, lagrange, auto, ... "
                        "(an unknown name lists the installed ones)")
    p.add_argument("--seed", type=int, default=0, help="random seed for probes and sampling (default 0)")
    p.add_argument("--sensitivity-cache", metavar="FILE",
                   help="sensitivity table JSON: loaded if FILE exists (no re-scoring; it must have been "
                        "scored for the same options), else scored and saved there")
    p.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="partially scored table, written after every round of work and read back by a "
                        "rerun, which resumes (removed when the table is complete); default: next to "
                        "--sensitivity-cache (sens.json -> sens.partial.json), else none")
    p.add_argument("--timeout", type=positive, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long one rank may lag the others at a sync point before "
                        "rank 0 stops with an error naming it (default 1800)")
