"""Causal LMs end to end through the CLI, on a tiny random Qwen2-style folder with tied embeddings:
`plan` (no calibration flags: built-in text, next-token KL) -> `apply` (streamed: sharded) -> `eval`;
the plan covers the embedding / lm_head as ONE tied layer, packed bytes equal the prediction, the
packed folder rebuilds by itself and generates. Random weights: plumbing and bytes, not quality."""
from __future__ import annotations

import os

import pytest
import torch

from tests.bitplan.test_cli_commands import ok, run
from tests.llm_fixtures import make_causal_lm_folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_causal_lm_folder(tmp_path_factory.mktemp("qwen") / "model", "qwen2", tie=True)


def test_plan_apply_eval(qwen, tmp_path):
    from bitplan import Plan, load_packed
    from bitplan.costmodels import model_nbytes
    p = ok(run("plan", "--model", qwen, "--avg-bits", "4.5", "--max-probes", "4", "--calib-samples", "8",
               "--out", tmp_path / "plan.json"))
    assert "causal_lm" in p.stderr and "--sensitivity auto: block" in p.stderr
    assert "--max-probes 4: the block estimator draws no Hutchinson probes; ignored" in p.stderr
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.estimator["name"] == "block"                  # the default for a causal-LM folder: streamed
    assert "model.embed_tokens" in plan.layers and "lm_head" not in plan.layers       # tied: one decision
    assert plan.meta["aliases"] == {"model.embed_tokens": ["lm_head"]}
    assert plan.estimator["loss"].startswith("label-free kl")
    p = ok(run("apply", "--model", qwen, "--plan", tmp_path / "plan.json", "--out", tmp_path / "packed"))
    assert p.stdout.startswith("streamed 2 decoder blocks one at a time")       # a causal-LM folder streams
    assert os.path.isfile(tmp_path / "packed" / "model.safetensors.index.json")
    assert os.path.isfile(tmp_path / "packed" / "skeleton" / "config.json")
    assert os.path.isfile(tmp_path / "packed" / "skeleton" / "tokenizer.json")
    m = load_packed(tmp_path / "packed")                       # rebuilds from its own config, no code
    assert model_nbytes(m) == plan.predicted["size_bytes"]
    assert m.lm_head.codes is m.model.embed_tokens.codes
    ids = torch.tensor([[1, 2, 3, 4]])
    out = m.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    p = ok(run("eval", "--model", qwen, "--plan", tmp_path / "plan.json", "--baselines"))
    lines = p.stdout.splitlines()
    assert "perplexity" in lines[0] and lines[1].startswith("fp32") and lines[2].startswith("plan")
    assert any(l.startswith("uniform int4") for l in lines)
    ppl = {l.split()[0]: float(l.split()[-1]) for l in lines[1:3]}
    assert ppl["fp32"] > 1 and ppl["plan"] > 1


def test_ce_loss_and_custom_text(qwen, tmp_path):
    from bitplan import Plan
    txt = tmp_path / "text.txt"
    txt.write_text("def add(a, b):\n    return a + b\n" * 200)
    ok(run("plan", "--model", qwen, "--avg-bits", "6", "--max-probes", "2", "--loss", "ce", "--calib-text", txt,
           "--seq-len", "32", "--calib-samples", "4", "--out", tmp_path / "ce.json"))
    plan = Plan.load(tmp_path / "ce.json")
    assert plan.estimator["loss"] == "next_token_ce" and plan.estimator["name"] == "hessian"   # auto: block needs kl
    p = run("plan", "--model", qwen, "--avg-bits", "6", "--calib-text", tmp_path / "nope.txt", "--out", tmp_path / "x.json")
    assert p.returncode == 2 and "--calib-text" in p.stderr


def test_missing_tokenizer_is_one_clear_sentence(qwen, tmp_path):
    import shutil
    d = tmp_path / "notok"
    shutil.copytree(qwen, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    p = run("plan", "--model", d, "--avg-bits", "4", "--out", tmp_path / "x.json")
    assert p.returncode == 2 and "no usable tokenizer files" in p.stderr
    # one sentence from bitplan; other libraries' import chatter (e.g. torchao's optional .so probes on
    # some machines) is not ours to count, but transformers' tokenizer dumps and tracebacks must not show
    assert "Traceback" not in p.stderr and "sentencepiece" not in p.stderr.lower(), p.stderr
    assert sum("error:" in line for line in p.stderr.splitlines()) == 1, p.stderr
    p = run("plan", "--model", tmp_path / "does_not_exist", "--avg-bits", "4", "--out", tmp_path / "x.json")
    assert p.returncode == 2 and "no such folder" in p.stderr
