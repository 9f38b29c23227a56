"""The README works as printed: every CLI line and every Python block runs, on tiny stand-ins.

Runs in one temporary folder, in README order: first every ``bitplan ...`` line of the ```bash
blocks (in-process, ``bitplan.cli.main``), then every ```python block in one namespace. Substitutions
(the only differences from the printed text, all listed in ``SUBSTITUTE``):

- ``minilm`` → a tiny randomly initialised BERT folder with a trained tokenizer (MiniLM would take
  minutes per command on CI);
- ``./my-llama`` / ``hf_dir`` → a tiny random Llama folder; the Exports block's ``plan.json`` is that
  model's ``llm_plan.json`` (its lines export a causal LM);
- budgets in MB and ms → values inside this model's feasible range (computed, printed on failure);
- ``--refine 60`` → ``--refine 5``; lines with ``--device cuda`` run only where CUDA is available;
- fewer Hutchinson probes (``--max-probes 4``) and, for the causal LM, 4 samples of 32 tokens;
- the Python blocks get ``model`` / ``batches`` = the tiny BERT and two of its calibration batches.

The install lines (``python3 -m venv ...``) are what ``.ci/run`` itself does and are not re-run.
Also: every ``<!-- numbers:NAME -->`` block equals what ``benchmarks/readme_numbers.py`` renders from
the committed results file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(section title, code) of every ```lang block, in order."""
    text = open(README, encoding="utf-8").read()
    out, section = [], ""
    for m in re.finditer(r"^(## [^\n]*)$|^```" + lang + r"\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            section = m.group(1)
        else:
            out.append((section, m.group(2)))
    return out


def _cli_lines() -> list[tuple[str, str]]:
    lines = []
    for section, code in _blocks("bash"):
        joined = code.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("bitplan "):
                lines.append((section, line))
    return lines


def _encoder_folder(path) -> str:
    """A tiny random BERT (hidden 128, 2 layers) + byte-level BPE tokenizer, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.llm_fixtures import train_tokenizer
    tok = train_tokenizer(512)
    tok.pad_token = tok.eos_token
    cfg = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=160, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return os.fspath(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tests.llm_fixtures import make_causal_lm_folder
    d = tmp_path_factory.mktemp("readme")
    enc = _encoder_folder(d / "tiny-bert")
    llama = make_causal_lm_folder(d / "tiny-llama", "llama", layers=2)
    (d / "my.txt").write_text(open(os.path.join(ROOT, "bitplan", "data", "calib_text.txt"), encoding="utf-8").read()[:20000])
    return d, enc, llama


def _substitute(section: str, line: str, enc: str, llama: str, sizes: dict) -> str | None:
    """The README line as the test runs it (None: skip here)."""
    if "--device cuda" in line:
        import torch
        if not torch.cuda.is_available():
            return None
    if section.startswith("## Exports"):
        line = line.replace(" plan.json ", " llm_plan.json ")
    llm = "./my-llama" in line
    subs = [("--model minilm", f"--model {enc}"), ("./my-llama", llama), ("hf_dir", llama),
            ("--refine 60", "--refine 5"), ("--budget-mb 30", f"--budget-mb {sizes['mb']:.6f}"),
            ("--max-latency-ms 40", f"--max-latency-ms {sizes.get('ms', 1e6):.6f}"),
            ("--max-probes 16", "--max-probes 4"), ("--calib-samples 32", "--calib-samples 4"),
            ("--seq-len 128", "--seq-len 32")]
    for a, b in subs:
        line = line.replace(a, b)
    cmd = line.split()[1]
    if cmd in ("plan", "frontier") and "--max-probes" not in line:
        line += " --max-probes 4"                 # fewer Hutchinson probes (the tiny model converges anyway)
    if llm and cmd in ("plan", "eval") and "--seq-len" not in line:
        line += " --seq-len 32" + (" --calib-samples 4" if cmd == "plan" else "")
    return line


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """``bitplan.cli.main(argv)`` in this process (no interpreter start per line); the CLI's logging
    and warning display are put back afterwards so later tests see pytest's own."""
    import logging
    import warnings
    from bitplan.cli import main
    log = logging.getLogger("bitplan")
    saved = (list(log.handlers), log.propagate, log.level, warnings.showwarning)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        log.handlers[:], log.propagate, log.level, warnings.showwarning = saved
    return rc or 0, out.getvalue()


def test_readme_cli_lines_and_python_blocks_run(workdir, monkeypatch):
    import bitplan
    from bitplan.models import load_model
    d, enc, llama = workdir
    monkeypatch.chdir(d)
    spec = load_model(enc)
    sizes = {"mb": bitplan.budgets.avg_bits_budget_mb(spec.model, 5.0)}
    lines = _cli_lines()
    assert len(lines) >= 15, lines          # the README's recipes are all here
    ran = []
    for section, line in lines:
        if "--max-latency-ms" in line and "ms" not in sizes:
            sizes["ms"] = _latency_budget(d / "prof.json", spec)
        cmd = _substitute(section, line, enc, llama, sizes)
        if cmd is None:
            continue
        rc, out = _run_cli(shlex.split(cmd)[1:])
        assert rc == 0, f"README line failed ({section}):\n  {line}\nran as:\n  {cmd}\n{out[-3000:]}"
        ran.append(cmd)
    ns = {"model": spec.model, "batches": spec.calib_data[:2]}
    for section, code in _blocks("python"):
        # "minilm_packed" is the folder the README's `bitplan apply` line wrote above (same cwd)
        try:
            exec(compile(code, f"README.md {section}", "exec"), ns)
        except Exception as e:                                           # noqa: BLE001
            raise AssertionError(f"README Python block in {section} failed: {type(e).__name__}: {e}\n{code}") from e
    assert "plan" in ns and ns["plan"].predicted["size_bytes"] > 0


def _latency_budget(profile, spec) -> float:
    """The top of the feasible latency range `bitplan calibrate` printed (from the profile it wrote just
    before): the README line's 40 ms is this CPU's number."""
    from bitplan.costmodels.latency import latency_range
    from bitplan.core.graph import LayerGraph
    from bitplan.options import resolve_options
    graph = LayerGraph.build(spec.model, spec.calib_data[0])
    r = latency_range(str(profile), graph, resolve_options(graph))
    return float(r["max_ms"])          # the slowest plan: feasible at any size budget the line sets


def test_readme_numbers_are_the_results_files():
    spec = importlib.util.spec_from_file_location("readme_numbers", os.path.join(ROOT, "benchmarks", "readme_numbers.py"))
    rn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rn)
    text = open(README, encoding="utf-8").read()
    names = rn.BLOCK.findall(text)
    assert names, "README has no generated numbers blocks"
    for m in rn.BLOCK.finditer(text):
        want = rn.SECTIONS[m.group("name")]()
        assert m.group("body") == want, (f"README block numbers:{m.group('name')} differs from its results file; "
                                         f"run python benchmarks/readme_numbers.py")
