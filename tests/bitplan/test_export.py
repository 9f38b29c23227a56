"""torchao / HF export: layout, skipped layers (one warning naming them), and (when torchao imports)
real round trips: ``config_from_dict`` + ``quantize_`` / ``from_pretrained(quantization_config=...)``
give every exported layer the plan's bits, group size and mapping, and the forward runs — for each
layer kind bitplan quantizes (Linear, HF Conv1D, Conv2d, Embedding / lm_head)."""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from bitplan.export import (default_key_style, exportable_layers, to_hf_quantization_config, to_torchao_dict,
                            torchao_version)
from bitplan.kernels.formats import QuantSpec
from bitplan.plan import Plan


def make_plan():
    """Linear layers of tests.fixtures_models.TinyMLP at mixed options + a conv and an fp16 layer."""
    layers = {"fc1": QuantSpec(3, 32), "fc2": QuantSpec(8, None, False), "fc3": QuantSpec(2, 32, False),
              "head": QuantSpec(4), "conv": QuantSpec(4), "keep16": QuantSpec(16)}
    shapes = {"fc1": [64, 32], "fc2": [64, 64], "fc3": [64, 64], "head": [16, 64], "conv": [8, 1, 3, 3],
              "keep16": [64, 64]}
    kinds = {k: "conv2d" if k == "conv" else "linear" for k in layers}
    return Plan("f", layers, {"size_bytes": 1.0}, meta={"layer_shapes": shapes, "layer_kinds": kinds})


def test_exportable_layers_skip_conv_and_fp16():
    layers, skipped = exportable_layers(make_plan())
    assert set(layers) == {"fc1.weight", "fc2.weight", "fc3.weight", "head.weight"}
    assert {n for n, _ in skipped} == {"conv", "keep16"}


def test_one_warning_names_every_skipped_layer(caplog):
    layers = {f"h.{i}.c_fc": QuantSpec(4, 32) for i in range(8)} | {"lm_head": QuantSpec(8)}
    plan = Plan("f", layers, meta={"layer_shapes": {n: [64, 256] for n in layers},
                                   "layer_kinds": {n: "linear" if n == "lm_head" else "hf_conv1d" for n in layers}})
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        d = to_torchao_dict(plan, use_torchao=False)
    assert set(d["_data"]["fqn_to_config"]) == {"lm_head.weight"}
    msgs = [r.getMessage() for r in caplog.records if r.name == "bitplan"]
    assert len(msgs) == 1 and "8 planned layer(s) left in floating point" in msgs[0]
    assert "Conv1D" in msgs[0] and "8 names: h.0.c_fc" in msgs[0] and "..." in msgs[0]   # counts + first few


def test_plan_without_kinds_warns(caplog):
    plan = make_plan()
    old = Plan("f", plan.layers, meta={"layer_shapes": plan.meta["layer_shapes"]})
    with caplog.at_level(logging.WARNING, logger="bitplan"):
        to_torchao_dict(old, use_torchao=False)
    assert any("does not record layer kinds" in r.getMessage() for r in caplog.records)


def test_hand_built_layout():
    d = to_torchao_dict(make_plan(), use_torchao=False, key_style="param")
    assert d["_type"] == "FqnToConfig" and d["_data"]["fqn_to_config"] == d["_data"]["module_fqn_to_config"]
    fc1 = d["_data"]["fqn_to_config"]["fc1.weight"]
    assert fc1["_type"] == "IntxWeightOnlyConfig"
    assert fc1["_data"]["weight_dtype"] == {"_type": "torch.dtype", "_data": "int3"}
    assert fc1["_data"]["granularity"]["_data"] == {"group_size": 32}
    fc2 = d["_data"]["fqn_to_config"]["fc2.weight"]["_data"]
    assert fc2["granularity"]["_type"] == "PerAxis" and fc2["mapping_type"]["_data"] == "ASYMMETRIC"
    json.dumps(d)                                              # JSON-ready


def test_strip_add_prefix_and_hf_layout():
    plan = make_plan()
    wrapped = Plan(plan.model_fingerprint, {"encoder." + k: v for k, v in plan.layers.items()}, plan.predicted,
                   meta={k: {"encoder." + n: v for n, v in plan.meta[k].items()}
                         for k in ("layer_shapes", "layer_kinds")})
    hf = to_hf_quantization_config(wrapped, strip_prefix="encoder.", add_prefix="model.", use_torchao=False)
    assert hf["quant_method"] == "torchao" and list(hf["quant_type"]) == ["default"]
    assert set(hf["quant_type"]["default"]["_data"]["fqn_to_config"]) == {
        "model.fc1.weight", "model.fc2.weight", "model.fc3.weight", "model.head.weight"}
    assert hf["modules_to_not_convert"] == ["model.keep16"]
    assert hf["include_input_output_embeddings"] is False


def test_nothing_to_export_is_an_error():
    plan = Plan("f", {"c": QuantSpec(4)}, meta={"layer_shapes": {"c": [8, 1, 3, 3]}})
    with pytest.raises(ValueError, match="nothing to export"):
        to_torchao_dict(plan, use_torchao=False)


def test_module_keys():
    d = to_torchao_dict(make_plan(), use_torchao=False, key_style="module")
    assert set(d["_data"]["fqn_to_config"]) == {"fc1", "fc2", "fc3", "head"}
    with pytest.raises(ValueError, match="key_style"):
        exportable_layers(make_plan(), key_style="weights")


# ---------------------------------------------------------------- with torchao (skipped without it)
def _torchao():
    if torchao_version() is None:
        pytest.skip("torchao is not importable here (optional; tested with torchao 0.18.0 on torch 2.13)")
    import torchao
    return torchao


@pytest.mark.parametrize("keys", ["param", "module"])
def test_hand_built_equals_torchao_config_to_dict(keys):
    tao = _torchao()
    if not tao.__version__.startswith("0.18."):
        pytest.skip(f"the hand-built layout mirrors torchao 0.18; installed {tao.__version__}")
    plan = make_plan()
    assert to_torchao_dict(plan, use_torchao=True, key_style=keys) == \
        to_torchao_dict(plan, use_torchao=False, key_style=keys)


def _check_quantized(model, plan_layers, names=None):
    """Every exported layer's weight is a torchao Intx tensor with the planned bits / groups / codes."""
    for name, spec in plan_layers.items():
        w = model.get_submodule(name).weight
        assert w.target_dtype == getattr(torch, f"int{spec.bits}"), name
        k = w.shape[1] if w.dim() == 2 else w.shape[1]
        want = (1, spec.group_size or k) + ((1, 1) if w.dim() == 4 else ())
        assert tuple(w.block_size) == want, name
        lo, hi = int(w.qdata.min()), int(w.qdata.max())
        assert -(2 ** (spec.bits - 1)) <= lo and hi <= 2 ** (spec.bits - 1) - 1, name   # signed b-bit codes


@pytest.mark.parametrize("use_torchao", [True, False])
def test_torchao_quantize_applies_the_same_bits(use_torchao):
    _torchao()
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    from tests.fixtures_models import tiny
    plan = make_plan()
    plan = Plan("f", {k: v for k, v in plan.layers.items() if k in ("fc1", "fc2", "fc3", "head")},
                meta={k: plan.meta[k] for k in ("layer_shapes", "layer_kinds")})
    cfg = config_from_dict(json.loads(json.dumps(to_torchao_dict(plan, use_torchao=use_torchao))))
    model, batches = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, cfg, filter_fn=None)
    _check_quantized(model, plan.layers)
    with torch.no_grad():
        assert torch.isfinite(model(batches[0])).all()


def test_torchao_conv_1x1_exported_kxk_skipped():
    """A CNN: the 1x1 conv (same grouping as bitplan) and the Linear load at their bits and run; the
    3x3 conv stays fp (named in the warning)."""
    _torchao()
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Conv2d(16, 32, 1), torch.nn.Flatten(),
                                torch.nn.Linear(32 * 6 * 6, 10)).eval()
    specs = {"0": QuantSpec(4, 8), "1": QuantSpec(4, 16), "3": QuantSpec(8)}
    plan = Plan("f", specs, meta={"layer_shapes": {n: list(model.get_submodule(n).weight.shape) for n in specs},
                                  "layer_kinds": {"0": "conv2d", "1": "conv2d", "3": "linear"}})
    d = to_torchao_dict(plan)
    assert set(d["_data"]["fqn_to_config"]) == {"1.weight", "3.weight"}
    x = torch.randn(2, 8, 8, 8)
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config_from_dict(d), filter_fn=None)
    _check_quantized(model, {"1": specs["1"], "3": specs["3"]})
    assert type(model[0].weight).__name__ == "Parameter"
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), 0) > 0.9


def test_hf_config_round_trips_through_transformers():
    _torchao()
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig
    plan = make_plan()
    hf = json.loads(json.dumps(to_hf_quantization_config(plan)))
    cfg = TorchAoConfig.from_dict(hf)
    assert isinstance(cfg.quant_type, FqnToConfig)
    got = {k: v.weight_dtype for k, v in cfg.quant_type.fqn_to_config.items()}
    assert got == {f"{k}.weight": getattr(torch, f"int{plan.layers[k].bits}") for k in ("fc1", "fc2", "fc3", "head")}
    assert cfg.to_dict()["quant_type"] == hf["quant_type"]


def test_hf_from_pretrained_quantizes_each_linear_to_its_bits(tmp_path):
    """An fp HF checkpoint loaded with the exported quantization_config gets the planned bits."""
    _torchao()
    from transformers import AutoModel, BertConfig, BertModel, TorchAoConfig
    torch.manual_seed(0)
    fp = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=128)).eval()
    fp.save_pretrained(tmp_path)
    names = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)]
    bits = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    plan = Plan("f", {"encoder." + n: QuantSpec(b, 32) for n, b in bits.items()},       # SentenceEncoder names
                meta={"layer_shapes": {"encoder." + n: list(fp.get_submodule(n).weight.shape) for n in names}})
    hf = json.loads(json.dumps(to_hf_quantization_config(plan, strip_prefix="encoder.")))
    if default_key_style() == "module":
        pytest.skip("torchao < 0.17 cannot quantize by parameter name, which transformers' loader needs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModel.from_pretrained(tmp_path, quantization_config=TorchAoConfig.from_dict(hf))
    assert {n: q.get_submodule(n).weight.target_dtype for n in names} == \
        {n: getattr(torch, f"int{b}") for n, b in bits.items()}
    with torch.no_grad():
        assert torch.isfinite(q(torch.tensor([[1, 2, 3]])).last_hidden_state).all()


def test_tied_aliases_recorded_in_the_plan_are_exported_together():
    """Without a skeleton, ``meta["aliases"]`` (tied modules sharing a layer's weight) gives the ties."""
    from bitplan.export.compressed import to_compressed_tensors_config
    layers = {"lm_head": QuantSpec(4, 32), "model.layers.0.mlp.up_proj": QuantSpec(4, 32)}
    plan = Plan("f", layers, meta={"layer_shapes": {n: [64, 64] for n in layers},
                                   "layer_kinds": {n: "linear" for n in layers},
                                   "aliases": {"lm_head": ["model.embed_tokens"]}})
    d = to_torchao_dict(plan, use_torchao=False)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(d["_data"]["fqn_to_config"])
    ct = to_compressed_tensors_config(plan)
    assert {"lm_head", "model.embed_tokens"} <= set(ct["ignore"])
    assert [g["targets"] for g in ct["config_groups"].values()] == [["model.layers.0.mlp.up_proj"]]
