"""Exports of causal-LM plans, loaded back into the model class they are for (tiny randomly initialised
HF models: Llama-style, Qwen2-style with tied embeddings, GPT-2-style with Conv1D).

- ``--check``: every exported name resolves in the skeleton built from config.json on the meta device,
  or the export refuses with the unmatched names and the prefix fix;
- torchao / HF: ``from_pretrained(quantization_config=TorchAoConfig)`` and bare ``quantize_`` give every
  exported layer its planned bits and groups, the layers torchao cannot load stay fp, the forward runs;
- compressed-tensors: the config validates with compressed_tensors' own ``QuantizationConfig``, every
  planned Linear is targeted with its bits / groups / symmetry / activations, and
  ``apply_quantization_config`` attaches exactly those schemes to the HF model."""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from bitplan.export import export_plan, load_skeleton, to_hf_quantization_config, to_torchao_dict  # noqa: E402
from bitplan.export.compressed import to_compressed_tensors_config                             # noqa: E402
from bitplan.export.torchao_config import torchao_skip_reason, torchao_version                 # noqa: E402
from bitplan.export.layers import export_layers, suggest_prefix                                # noqa: E402
from bitplan.core.graph import find_layers                                                          # noqa: E402
from bitplan.kernels.formats import QuantSpec                                                  # noqa: E402
from bitplan.plan import Plan                                                                  # noqa: E402
from tests.fixtures_hf import save_tiny                                                        # noqa: E402

SPECS = [QuantSpec(4, 32), QuantSpec(8), QuantSpec(2, 32, False), QuantSpec(4, 32, False), QuantSpec(5, 32),
         QuantSpec(3, 64), QuantSpec(16), QuantSpec(8, None, act_bits=8)]


def lm_plan(model, prefix: str = "", embedding: bool = True) -> Plan:
    """Every quantizable layer at a cycling option (embedding tables — and a head tied to one, which is
    the same layer — at w4g32); ``embedding=False`` leaves the tables (and tied heads) out. Names carry
    ``prefix`` (e.g. "encoder." as the CLI's wrapper names them)."""
    infos = [l for l in find_layers(model) if embedding or "embedding" not in l.kinds]
    specs = {l.name: QuantSpec(4, 32) if "embedding" in l.kinds else SPECS[i % len(SPECS)]
             for i, l in enumerate(infos)}
    return Plan("f", {prefix + n: s for n, s in specs.items()},
                meta={"layer_shapes": {prefix + l.name: list(l.weight_shape) for l in infos},
                      "layer_kinds": {prefix + l.name: l.kind for l in infos},
                      "aliases": {prefix + l.name: [prefix + a for a in l.aliases] for l in infos if l.aliases}})


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def lm(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model, batches = save_tiny(request.param, d, tokenizer=False)
    return request.param, d, model, batches


# ---------------------------------------------------------------- --check
def test_check_refuses_unmatched_names_and_suggests_prefixes(lm):
    arch, d, model, _ = lm
    plan = lm_plan(model, prefix="encoder.")
    sk = load_skeleton(d)
    assert next(sk.parameters()).device.type == "meta"                # config only: no weights read
    with pytest.raises(ValueError) as e:
        export_layers(plan, skeleton=sk)
    msg = str(e.value)
    n = len(plan.layers)
    assert f"{n} of {n} exported layer names are not modules" in msg and f"{n} names: encoder." in msg
    assert "--strip-prefix 'encoder.' --add-prefix ''" in msg
    assert msg.count("encoder.") <= 7                                  # the first few, never all
    ok = export_layers(plan, strip_prefix="encoder.", skeleton=sk)
    assert [l.name for l in ok] == [n[len("encoder."):] for n in plan.layers]


def test_check_add_prefix_and_suggestion():
    assert suggest_prefix(["encoder.layers.0.q", "encoder.norm.w"], ["model.layers.0.q", "model.norm.w", "x"]) \
        == ("encoder.", "model.")
    assert suggest_prefix(["layers.0.q"], ["model.layers.0.q"]) == ("", "model.")
    assert suggest_prefix(["a.b"], ["c.d"]) is None


def test_check_refuses_other_shapes(lm, tmp_path):
    arch, d, model, _ = lm
    plan = lm_plan(model)
    name = next(iter(plan.layers))
    meta = json.loads(json.dumps(plan.meta))
    meta["layer_shapes"][name] = [7, 7]
    with pytest.raises(ValueError, match="another weight shape"):
        export_layers(Plan("f", plan.layers, meta=meta), skeleton=load_skeleton(d))


def test_check_needs_a_local_hf_folder_and_never_runs_its_code(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_skeleton(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_skeleton(tmp_path)
    (tmp_path / "evil.py").write_text("raise SystemExit('executed')\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                                      "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    with pytest.raises(ValueError):
        load_skeleton(tmp_path)


def test_cli_style_export_with_check(lm, tmp_path):
    arch, d, model, _ = lm
    plan = lm_plan(model, prefix="encoder.")
    with pytest.raises(ValueError, match="not modules with a weight"):
        export_plan(plan, "hf", tmp_path / "hf.json", check=d)
    assert not (tmp_path / "hf.json").exists()
    msg = export_plan(plan, "hf", tmp_path / "hf.json", check=d, strip_prefix="encoder.")
    assert "every name resolved" in msg and (tmp_path / "hf.json").exists()


# ---------------------------------------------------------------- torchao / transformers
def _torchao():
    if torchao_version() is None:
        pytest.skip("torchao is not importable here (optional; tested with torchao 0.18.0 on torch 2.13)")


def _assert_planned(model, layers):
    """Exported layers carry their planned torchao quantization; the others are plain fp tensors."""
    for l in layers:
        w = model.get_submodule(l.name).weight
        if torchao_skip_reason(l) is not None:
            assert type(w).__name__ == "Parameter", l.name
            continue
        assert w.target_dtype == getattr(torch, f"int{l.spec.bits}"), l.name
        assert tuple(w.block_size) == (1, l.spec.group_size or w.shape[1]), l.name
        act = getattr(w, "activation_quantization", None)
        assert (act is not None) == (l.spec.act_bits == 8), l.name


def test_hf_from_pretrained_loads_the_planned_bits(lm, caplog):
    _torchao()
    from transformers import AutoModelForCausalLM, TorchAoConfig
    arch, d, model, batches = lm
    plan = lm_plan(model)
    sk = load_skeleton(d)
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        hf = json.loads(json.dumps(to_hf_quantization_config(plan, skeleton=sk)))
    warned = [r.getMessage() for r in caplog.records if r.name == "bitplan"]
    layers = export_layers(plan, skeleton=sk)
    skipped = [l.name for l in layers if torchao_skip_reason(l) and l.spec.bits != 16]
    assert (len(warned) == 1 and all(n in warned[0] or "..." in warned[0] for n in skipped[:5])) if skipped \
        else not warned
    assert (arch == "gpt2") == bool(skipped)                            # only GPT-2's Conv1D are left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=TorchAoConfig.from_dict(hf)).eval()
    _assert_planned(q, layers)
    if arch != "llama":                                                 # tied: one shared quantized tensor
        assert q.lm_head.weight is q.get_input_embeddings().weight
        tied = next(n for n, a in plan.meta["aliases"].items() if "lm_head" in a)      # one decision
        assert (type(q.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor") == (plan.layers[tied].bits != 16)
    with torch.no_grad():
        y, ref = q(batches[0]).logits, model(batches[0]).logits
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.8   # same model, quantized


def test_torchao_quantize_on_the_model_class(lm):
    _torchao()
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_
    arch, d, model, batches = lm
    plan = lm_plan(model)
    sk = load_skeleton(d)
    cfg = config_from_dict(json.loads(json.dumps(to_torchao_dict(plan, skeleton=sk))))
    import copy
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(q, cfg, filter_fn=None)
    _assert_planned(q, export_layers(plan, skeleton=sk))
    with torch.no_grad():
        assert torch.isfinite(q(batches[0]).logits).all()


# ---------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_config_validates_and_targets_every_planned_linear(lm, caplog):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    arch, d, model, _ = lm
    plan = lm_plan(model)
    sk = load_skeleton(d)
    if arch == "gpt2":              # Conv1D blocks + a tied lm_head: no (out, in) Linear to target
        with pytest.raises(ValueError, match="nothing to export"):
            to_compressed_tensors_config(plan, skeleton=sk)
        return
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        cfg = json.loads(json.dumps(to_compressed_tensors_config(plan, skeleton=sk)))
    qc = QuantizationConfig.model_validate(cfg)                        # the package's own pydantic model
    assert qc.quant_method == "compressed-tensors" and ct is not None
    targets = {t: g for g in qc.config_groups.values() for t in g.targets}
    layers = export_layers(plan, skeleton=sk)
    linear = [l for l in layers if l.kind == "linear" and not l.tied and l.name != "lm_head" and l.spec.bits != 16]
    assert set(targets) == {l.name for l in linear}                   # every planned Linear, nothing else
    for l in linear:
        w, a = targets[l.name].weights, targets[l.name].input_activations
        assert (w.num_bits, w.group_size, w.symmetric) == (l.spec.bits, l.spec.group_size, l.spec.symmetric)
        assert w.strategy == ("channel" if l.spec.group_size is None else "group")
        assert (a is not None and a.num_bits == 8 and a.dynamic and a.strategy == "token") == (l.spec.act_bits == 8)
    ignored = set(qc.ignore)
    assert {l.name for l in layers if l.name not in targets} <= ignored
    every_linear = {n for n, m in sk.named_modules() if isinstance(m, torch.nn.Linear)}
    assert every_linear <= set(targets) | ignored                     # vLLM: each Linear targeted or ignored
    emb = [l for l in layers if (l.kind == "embedding" or l.tied or l.name == "lm_head") and l.spec.bits != 16]
    assert any("embedding / lm_head" in r.getMessage() for r in caplog.records if r.name == "bitplan") == bool(emb)
    import copy
    m = copy.deepcopy(model)
    apply_quantization_config(m, qc, show_progress=False)
    for name, mod in m.named_modules():
        s = getattr(mod, "quantization_scheme", None)
        assert (s is not None) == (name in targets), name
        if s is not None:
            assert s.weights.num_bits == plan.layers[name].bits


def test_compressed_tensors_warns_on_unequal_vllm_fused_shards(caplog):
    layers = {"m.layers.0.self_attn.q_proj": QuantSpec(4, 128), "m.layers.0.self_attn.k_proj": QuantSpec(8),
              "m.layers.0.self_attn.v_proj": QuantSpec(4, 128), "m.layers.0.mlp.gate_proj": QuantSpec(4, 128),
              "m.layers.0.mlp.up_proj": QuantSpec(4, 128)}
    plan = Plan("f", layers, meta={"layer_shapes": {n: [64, 64] for n in layers},
                                   "layer_kinds": {n: "linear" for n in layers}})
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        cfg = to_compressed_tensors_config(plan)
    msgs = [r.getMessage() for r in caplog.records if r.name == "bitplan"]
    assert len(msgs) == 1 and "m.layers.0.self_attn.{q_proj,k_proj,v_proj}" in msgs[0] and "gate_proj" not in msgs[0]
    assert cfg["format"] == "pack-quantized" and len(cfg["config_groups"]) == 2
