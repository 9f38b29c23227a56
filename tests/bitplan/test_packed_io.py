"""save_packed / load_packed: the folder loads back with one call and computes exactly the same;
loading never runs code named by the folder, never reads outside it; saving never loses the old folder."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import bitplan
from bitplan.assemble import make_plan
from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec
from bitplan.costmodels import base_nbytes, model_nbytes
from bitplan.packed_io import MANIFEST_FILE, load_packed, read_manifest, save_packed
from bitplan.plan import Plan
from tests.fixtures_models import tiny, tiny_cnn


def mixed_plan(model, bits):
    g = LayerGraph.build(model)
    specs = {n: QuantSpec(b, 32 if b == 4 and l.in_features % 32 == 0 and l.in_features > 32 else None)
             for (n, l), b in zip(((l.name, l) for l in g.layers), bits)}
    return make_plan(g, specs, base_nbytes(model, g.names))


@pytest.mark.parametrize("factory, bits", [(tiny, (2, 3, 4, 8)), (tiny_cnn, (4, 8, 16))])
def test_round_trip_is_exact(factory, bits, tmp_path):
    model, batches = factory()
    plan = mixed_plan(model, bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # conv layers run the dequant path
        manifest = save_packed(model, plan, tmp_path / "m", model_spec=f"tests.fixtures_models:{factory.__name__}")
        ref = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
        for src in (factory, f"tests.fixtures_models:{factory.__name__}", factory()[0]):
            loaded = load_packed(tmp_path / "m", src)
            with torch.no_grad():
                for b in batches:
                    assert torch.equal(loaded(b), ref(b))
    assert manifest["size_bytes"] == model_nbytes(ref) == model_nbytes(loaded) == plan.predicted["size_bytes"]
    assert Plan.load(tmp_path / "m" / "plan.json").bits == plan.bits
    assert set(loaded.bitplan_plan.kernels) == set(plan.layers)              # kernels recorded
    mode = os.stat(tmp_path / "m" / "plan.json").st_mode & 0o777
    assert mode == 0o666 & ~_umask()                                        # not mkstemp's 0600


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_fp_model_is_not_modified_and_packed_model_is_saved_as_is(tmp_path):
    model, batches = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = mixed_plan(model, (4, 4, 8, 8))
    save_packed(model, plan, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    packed = bitplan.apply_plan_(copy.deepcopy(model), plan, mode="packed")
    save_packed(packed, plan, tmp_path / "b")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_folders_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a bitplan packed model folder"):
        load_packed(tmp_path, tiny)
    model, _ = tiny()
    save_packed(model, mixed_plan(model, (8, 8, 8, 8)), tmp_path / "m", model_spec="tests.fixtures_models:tiny")
    with pytest.raises(ValueError, match="pass the model factory"):          # never imports the recorded spec
        load_packed(tmp_path / "m")
    with pytest.raises(bitplan.PlanMismatchError):
        load_packed(tmp_path / "m", tiny_cnn)                    # another architecture
    man = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    (tmp_path / "m" / MANIFEST_FILE).write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version = 99"):
        read_manifest(tmp_path / "m")


@pytest.mark.parametrize("change", [
    {"skeleton": {"kind": "builtin", "name": "os:abort"}},
    {"skeleton": {"kind": "factory", "spec": "payload:run"}},
    {"skeleton": {"kind": "hf_config", "dir": "/etc"}},
    {"weights": "/etc/passwd"},
    {"model_spec": "payload:run", "extra": 1},
])
def test_a_folder_never_runs_code_or_reads_outside_itself(tmp_path, change):
    model, batches = tiny()
    folder = tmp_path / "m"
    save_packed(model, mixed_plan(model, (8, 8, 8, 8)), folder, model_spec="tests.fixtures_models:tiny")
    (folder / "payload.py").write_text("import pathlib; pathlib.Path('PWNED').write_text('x')\n"
                                       "def run():\n    raise SystemExit(3)\n")
    man = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**man, **change}))
    code = (f"import bitplan; bitplan.load_packed({str(folder)!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder, timeout=120)
    assert p.returncode == 1 and "ValueError" in p.stderr, p.stderr      # refused, not executed, not aborted
    assert not (folder / "PWNED").exists()


def test_a_failed_save_leaves_the_previous_folder_loadable(tmp_path, monkeypatch):
    model, batches = tiny()
    folder = tmp_path / "m"
    plan = mixed_plan(model, (8, 8, 8, 8))
    save_packed(model, plan, folder)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        save_packed(model, mixed_plan(model, (2, 2, 2, 2)), folder)
    monkeypatch.undo()
    assert Plan.load(folder / "plan.json").bits == plan.bits
    loaded = load_packed(folder, tiny)
    assert sorted(os.listdir(tmp_path)) == ["m"]                               # no temp folders left
    with torch.no_grad():
        assert loaded(batches[0]).shape == (8, 16)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a bitplan packed folder"):       # never overwrites user files
        save_packed(model, plan, other)
    assert (other / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------ sharded folders (format 3)
def to_sharded(folder, n: int = 2) -> dict:
    """Rewrite a single-file packed folder as ``n`` shards + index (what save_packed_streamed writes for
    a causal LM; here for any model, so the loader is tested on its own). Returns the index."""
    from safetensors.torch import load_file, save_file

    from bitplan.packed_io import INDEX_FILE, WEIGHTS_FILE, shard_name
    sd = load_file(folder / WEIGHTS_FILE)
    names, wmap = sorted(sd), {}
    for i in range(n):
        save_file({k: sd[k] for k in names[i::n]}, folder / shard_name(i + 1, n))
        wmap.update(dict.fromkeys(names[i::n], shard_name(i + 1, n)))
    (folder / WEIGHTS_FILE).unlink()
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())}, "weight_map": wmap}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    man = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**man, "weights": "sharded"}))
    return index


@pytest.fixture
def sharded(tmp_path):
    model, batches = tiny()
    folder = tmp_path / "m"
    save_packed(model, mixed_plan(model, (2, 4, 8, 8)), folder)
    ref = load_packed(folder, tiny)
    return folder, to_sharded(folder), ref, batches


def test_a_sharded_folder_loads_to_the_same_model(sharded):
    folder, index, ref, batches = sharded
    loaded = load_packed(folder, tiny)
    with torch.no_grad():
        assert all(torch.equal(loaded(b), ref(b)) for b in batches)
    assert model_nbytes(loaded) == read_manifest(folder)["size_bytes"]


def _edit_index(change):
    def edit(folder, index):
        from bitplan.packed_io import INDEX_FILE
        d = copy.deepcopy(index)
        change(d)
        (folder / INDEX_FILE).write_text(json.dumps(d))
    return edit


def _first(d):
    return sorted(d["weight_map"])[0]


def _move_tensor_into_other_shard(folder, index):
    """Shard 2 also holds a tensor the index gives shard 1 (a tensor stored twice)."""
    from safetensors.torch import load_file, save_file
    a, b = (load_file(folder / f"model-0000{i}-of-00002.safetensors") for i in (1, 2))
    k = sorted(a)[0]
    save_file({**b, k: a[k]}, folder / "model-00002-of-00002.safetensors")


def _symlink_shard(folder, index):
    real = folder.parent / "elsewhere.safetensors"
    os.replace(folder / "model-00002-of-00002.safetensors", real)
    os.symlink(real, folder / "model-00002-of-00002.safetensors")


def _symlink_index(folder, index):
    real = folder.parent / "index.json"
    os.replace(folder / "model.safetensors.index.json", real)
    os.symlink(real, folder / "model.safetensors.index.json")


def _wrong_shape(folder, index):
    from safetensors.torch import load_file, save_file
    a = load_file(folder / "model-00001-of-00002.safetensors")
    k = sorted(a)[0]
    save_file({**a, k: torch.zeros(3, dtype=a[k].dtype)}, folder / "model-00001-of-00002.safetensors")


def _huge_index(folder, index):
    from bitplan.packed_io import MAX_INDEX_BYTES
    with open(folder / "model.safetensors.index.json", "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)                       # sparse: no disk used


@pytest.mark.parametrize("edit, match", [
    (_edit_index(lambda d: d["weight_map"].update({_first(d): "../x"})), r"'\.\./x' is not a shard file name"),
    (_edit_index(lambda d: d["weight_map"].update({_first(d): "/etc/passwd"})), r"'/etc/passwd' is not a shard file"),
    (_edit_index(lambda d: d["weight_map"].update({_first(d): "model-00003-of-00002.safetensors"})),
     "is not a shard file name"),
    (_edit_index(lambda d: d["weight_map"].update({_first(d): "model-00001-of-00003.safetensors"})), "different counts"),
    (_edit_index(lambda d: d["weight_map"].pop(_first(d))), r"missing \['"),
    (_edit_index(lambda d: d["weight_map"].update({"extra.codes": "model-00001-of-00002.safetensors"})),
     r"unexpected \['extra.codes'\]"),
    (_edit_index(lambda d: d["metadata"].update(total_size=d["metadata"]["total_size"] + 1)), "total_size"),
    (_edit_index(lambda d: d.update(code="payload:run")), r"unknown field\(s\) \['code'\]"),
    (_edit_index(lambda d: d.update(weight_map={})), "weight_map"),
    (_move_tensor_into_other_shard, "holds tensors .* the index does not give it"),
    (_symlink_shard, "model-00002-of-00002.safetensors: the shard .*a link is never followed"),
    (_symlink_index, "index.json: the safetensors index is missing or not a regular file"),
    (lambda f, i: (f / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002.safetensors: the shard"),
    (lambda f, i: (f / "model-00002-of-00002.safetensors").write_bytes(b"\x08" + b"\0" * 20), "not a readable safetensors"),
    (lambda f, i: (f / "model.safetensors.index.json").write_text("{weight_map: 1"), "not a valid safetensors index"),
    (lambda f, i: (f / "model.safetensors.index.json").unlink(), "index.json: the safetensors index is missing"),
    (_huge_index, "larger than any safetensors index"),
    (_wrong_shape, "does not load into the rebuilt model"),
])
def test_bad_shard_indexes_raise_value_error(sharded, edit, match):
    folder, index, _, _ = sharded
    edit(folder, index)
    with pytest.raises(ValueError, match=match) as e:
        load_packed(folder, tiny)
    assert str(folder) in str(e.value)


def test_format_versions(sharded, tmp_path):
    folder, _, ref, batches = sharded
    man = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({k: v for k, v in man.items() if k != "weights"}))
    with pytest.raises(ValueError, match="needs 'weights'"):
        read_manifest(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({**man, "weights": "single"}))
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_packed(folder, tiny)
    model, _ = tiny()                         # a version-2 folder (bitplan before sharding) still loads
    save_packed(model, mixed_plan(model, (2, 4, 8, 8)), tmp_path / "v2")
    man = json.loads((tmp_path / "v2" / MANIFEST_FILE).read_text())
    assert man["format_version"] == 3 and man["weights"] == "single"
    man = {**{k: v for k, v in man.items() if k != "weights"}, "format_version": 2}
    (tmp_path / "v2" / MANIFEST_FILE).write_text(json.dumps(man))
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "v2", tiny)(batches[0]), ref(batches[0]))
    (tmp_path / "v2" / MANIFEST_FILE).write_text(json.dumps({**man, "weights": "sharded"}))
    with pytest.raises(ValueError, match="format_version 3 field"):
        read_manifest(tmp_path / "v2")
