"""`bitplan export` / `bitplan show` through ``bitplan.cli.main`` (in process): --check refuses with the
unmatched names, --strip-prefix / --add-prefix fix them, every target writes a file its consumer reads."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bitplan.cli import main                                   # noqa: E402
from tests.bitplan.test_export_lm import lm_plan               # noqa: E402
from tests.fixtures_hf import save_tiny                        # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    model, _ = save_tiny("qwen2", d / "model")
    plan = lm_plan(model, prefix="encoder.")                  # names as the CLI's encoder wrapper gives them
    plan.save(d / "plan.json")
    return d


def test_check_refuses_then_prefixes_fix(qwen, capsys):
    args = ["export", str(qwen / "plan.json"), "--to", "hf", "--out", str(qwen / "hf.json"),
            "--check", str(qwen / "model")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "are not modules with a weight in Qwen2ForCausalLM" in err and "--strip-prefix 'encoder.'" in err
    assert not (qwen / "hf.json").exists()
    assert main(args + ["--strip-prefix", "encoder."]) == 0
    assert "every name resolved in Qwen2ForCausalLM" in capsys.readouterr().out
    d = json.loads((qwen / "hf.json").read_text())
    assert all(k.startswith(("model.", "lm_head")) for k in d["quant_type"]["default"]["_data"]["fqn_to_config"])


def test_add_prefix(qwen, capsys):
    from bitplan.plan import Plan
    plan = Plan.load(qwen / "plan.json")            # the bare decoder's names (Qwen2Model): layers.0...
    keep = [n for n in plan.layers if n.startswith("encoder.model.")]
    bare = Plan("f", {n[len("encoder.model."):]: plan.layers[n] for n in keep},
                meta={k: {n[len("encoder.model."):]: plan.meta[k][n] for n in keep}
                      for k in ("layer_shapes", "layer_kinds")})
    bare.save(qwen / "bare.json")
    out = qwen / "torchao.json"
    assert main(["export", str(qwen / "bare.json"), "--to", "torchao", "--out", str(out), "--add-prefix", "model.",
                 "--check", str(qwen / "model")]) == 0
    assert "model.layers.0.self_attn.q_proj.weight" in json.loads(out.read_text())["_data"]["fqn_to_config"]


def test_gguf_needs_check(qwen, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(qwen / "plan.json"), "--to", "gguf", "--out", str(qwen / "m.gguf")])
    assert e.value.code == 2 and "--check DIR" in capsys.readouterr().err


def test_gguf_and_compressed_tensors(qwen, capsys):
    gguf = pytest.importorskip("gguf")
    ct = pytest.importorskip("compressed_tensors.quantization")
    common = ["--check", str(qwen / "model"), "--strip-prefix", "encoder."]
    assert main(["export", str(qwen / "plan.json"), "--to", "gguf", "--out", str(qwen / "m.gguf")] + common) == 0
    out = capsys.readouterr().out
    assert "llama-quantize --pure --tensor-type-file" in out and "m.gguf (" in out
    names = {t.name for t in gguf.GGUFReader(qwen / "m.gguf").tensors}
    assert {"token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert (qwen / "m.gguf.tensor-types.txt").read_text().startswith("^")
    assert main(["export", str(qwen / "plan.json"), "--to", "compressed-tensors", "--out",
                 str(qwen / "qc.json")] + common) == 0
    ct.QuantizationConfig.model_validate(json.loads((qwen / "qc.json").read_text()))


def test_keys_only_for_torchao(qwen, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(qwen / "plan.json"), "--to", "hf", "--keys", "module", "--out", str(qwen / "x.json")])
    assert e.value.code == 2 and "--keys is only for --to torchao" in capsys.readouterr().err
