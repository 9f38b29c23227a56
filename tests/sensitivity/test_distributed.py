"""Scoring spread over a REAL 2-rank gloo process group (subprocesses, no mocks) and checkpoint/resume.

Each rank is ``dist_worker.py`` started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the
references are the same scorings in this process (no process group).
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bitplan.sensitivity import score
from sens_helpers import mlp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from dist_worker import BITS, batches, task_loss  # noqa: E402

JOBS = [{"method": "measured", "key": "measured"},
        {"method": "decoupled", "key": "decoupled"},
        {"method": "fisher", "key": "fisher", "opts": {"samples": 2}},
        {"method": "hessian", "key": "hessian", "opts": {"max_probes": 24, "min_probes": 4, "probe_batch": 2,
                                                        "tol": 1e-3}},
        {"method": "hessian", "key": "hessian_task", "task_loss": True,
         "opts": {"max_probes": 16, "min_probes": 4, "probe_batch": 2, "tol": 0.2}}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, cfg, world=2):
    cfg = {"out": str(tmp_path), **cfg}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, tmp_path, rank0_only=False, limit=90):
    try:
        procs[0].wait(limit)
        if not rank0_only:
            for p in procs[1:]:
                p.wait(limit)
    finally:
        for p in procs:                      # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    out = {}
    for r in range(len(procs)):
        f = tmp_path / f"rank{r}.json"
        if f.exists():
            out[r] = json.loads(f.read_text())
    assert 0 in out, procs[0].stderr.read()[-3000:]
    return out


def _reference(job, **kw):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score(mlp(), batches(), method=job["method"], bits=BITS, loss_fn=task_loss if job.get("task_loss")
                     else None, seed=job.get("seed", 0), **job.get("opts", {}), **kw)
    finally:
        torch.set_num_threads(n)


def test_two_ranks_give_the_one_process_tables_bit_for_bit(tmp_path):
    budget = 1.2e-4                                   # 120 bytes: a mixed plan (4 and 8 bits)
    res = _wait(_launch(tmp_path, {"jobs": JOBS + [{"method": "allocate", "key": "plan", "budget_mb": budget}]}),
                tmp_path)
    assert "error" not in res[0] and "error" not in res[1], res
    import bitplan
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_plan = bitplan.allocate(mlp(), budget_mb=budget, calib_data=batches(), bits=BITS, group_size=None,
                                    sensitivity="measured")
    finally:
        torch.set_num_threads(n)
    assert res[0]["tables"]["plan"]["layers"] == res[1]["tables"]["plan"]["layers"] == ref_plan.to_dict()["layers"]
    assert len({v["bits"] for v in ref_plan.to_dict()["layers"].values()}) > 1
    for job in JOBS:
        ref = _reference(job)
        for r in (0, 1):
            got = res[r]["tables"][job["key"]]
            assert got["world_size"] == 2
            assert np.array_equal(np.array(got["loss"]), ref.loss), (job["key"], r)   # exact, not close
            if job["method"] == "hessian":
                assert got["probes"] == ref.meta["probes"]
        assert ref.loss.max() > 0


def test_a_dead_rank_is_named_and_the_rerun_resumes_to_the_same_table(tmp_path):
    ck = tmp_path / "sens.partial.json"
    job = {"method": "measured", "key": "m", "task_loss": True}
    # rank 1 exits inside its 5th cell (3 base evaluations + 3 per cell): after the first round of
    # 8 cells (4 per rank) was gathered and checkpointed
    t0 = time.perf_counter()
    res = _wait(_launch(tmp_path, {"jobs": [job], "checkpoint": str(ck), "timeout": 20,
                                   "fail": {"rank": 1, "after": 3 + 3 * 4 + 1, "mode": "exit"}}), tmp_path)
    assert time.perf_counter() - t0 < 60
    assert 1 not in res                       # it died without writing anything
    assert "rank 1 of 2" in res[0]["error"] and "did not arrive" in res[0]["error"], res[0]
    saved = json.loads(ck.read_text())["state"]["cells"]
    assert 0 < len(saved) < 12
    (tmp_path / "rank0.json").unlink()
    res = _wait(_launch(tmp_path, {"jobs": [job], "checkpoint": str(ck), "timeout": 20}), tmp_path)
    got = res[0]["tables"]["m"]
    assert got["resumed"] == len(saved)
    assert np.array_equal(np.array(got["loss"]), _reference(job).loss)
    assert not ck.exists()                    # complete: the checkpoint is gone


def test_a_stalled_rank_is_named_within_the_timeout(tmp_path):
    job = {"method": "measured", "key": "m", "task_loss": True}
    res = _wait(_launch(tmp_path, {"jobs": [job], "timeout": 3,
                                   "fail": {"rank": 1, "after": 3, "mode": "sleep"}}), tmp_path, rank0_only=True)
    err = res[0]["error"]
    assert "rank 1 of 2" in err and "timeout of 3 s" in err, err
    # rank 0 scores its own 4 cells (well under a second) then waits at most the timeout
    assert res[0]["error_after_s"] < 3 + 15


class _Stop(Exception):
    pass


def _interrupting(after):
    """task_loss that raises after ``after`` calls: a run cut short in this process."""
    calls = [0]

    def fn(model, batch):
        calls[0] += 1
        if calls[0] > after:
            raise _Stop
        return task_loss(model, batch)
    fn.__name__ = "task_loss"        # the checkpoint records the loss by name: the same loss
    return fn


@pytest.mark.parametrize("method,opts,after", [
    ("measured", {}, 3 + 3 * 5),
    ("fisher", {}, 2),
    ("hessian", {"max_probes": 16, "min_probes": 4, "probe_batch": 2, "tol": 1e-3}, 3 * 3)])
def test_resume_in_one_process_gives_the_uninterrupted_table(tmp_path, method, opts, after):
    ck = tmp_path / "ck.json"
    full = score(mlp(), batches(), method=method, bits=BITS, loss_fn=task_loss, **opts)
    with pytest.raises(_Stop):
        score(mlp(), batches(), method=method, bits=BITS, loss_fn=_interrupting(after), checkpoint=ck, **opts)
    assert ck.exists()
    t = score(mlp(), batches(), method=method, bits=BITS, loss_fn=task_loss, checkpoint=ck, **opts)
    assert t.meta["resumed"] > 0
    assert np.array_equal(t.loss, full.loss)
    assert not ck.exists()


def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path):
    ck = tmp_path / "ck.json"
    with pytest.raises(_Stop):
        score(mlp(), batches(), method="measured", bits=BITS, loss_fn=_interrupting(3 + 3 * 5), checkpoint=ck)
    with pytest.raises(ValueError, match="options"):
        score(mlp(), batches(), method="measured", bits=(2, 4), loss_fn=task_loss, checkpoint=ck)
    with pytest.raises(ValueError, match="setting seed: 0 in the checkpoint, 1 now"):
        score(mlp(), batches(), method="measured", bits=BITS, loss_fn=task_loss, checkpoint=ck, seed=1)
    with pytest.raises(ValueError, match="content"):            # same shapes, other weights
        score(mlp(seed=5), batches(), method="measured", bits=BITS, loss_fn=task_loss, checkpoint=ck)
    with pytest.raises(ValueError, match="method"):
        score(mlp(), batches(), method="fisher", bits=BITS, loss_fn=task_loss, checkpoint=ck)
    assert ck.exists()                                           # refused, not overwritten
    with pytest.raises(ValueError, match="timeout=0"):
        score(mlp(), batches(), method="measured", bits=BITS, timeout=0)


def test_torchrun_cli_plan_rank0_writes_the_one_process_table(tmp_path):
    cache, plan = tmp_path / "sens.json", tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(_free_port()), "-m", "bitplan", "plan", "--model", "tests.fixtures_models:tiny",
                        "--sensitivity", "measured", "--bits", "2,4,8", "--avg-bits", "5",
                        "--sensitivity-cache", str(cache), "--timeout", "30", "--out", str(plan)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert plan.exists() and cache.exists() and not (tmp_path / "sens.partial.json").exists()
    assert p.stdout.count("wrote ") == 1                        # rank 0 only
    from bitplan.sensitivity import load
    from tests.fixtures_models import tiny
    t = load(cache)
    assert t.meta["world_size"] == 2
    model, calib = tiny()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = score(model, calib, method="measured", options=t.options)
    finally:
        torch.set_num_threads(n)
    assert np.array_equal(t.loss, ref.loss)


def test_block_streaming_on_two_ranks_and_a_killed_rank_resumed(tmp_path):
    """method="block" on 2 ranks (3 calibration batches: 2 on rank 0, 1 on rank 1; the 2 anchor
    batches on different ranks): both ranks get the same table, the one-process table up to float
    summation order — with rtn, gptq (full input statistics all-reduced) and W8A8 (measured) options.
    Then rank 1 dies entering block 1: rank 0 stops with an error naming rank 1; the checkpoint holds
    block 0's rows and each rank's hidden states; the rerun on 2 ranks resumes at block 1 and gives
    the uninterrupted 2-rank table, bit for bit."""
    from dist_worker import lm_calib, lm_options
    from tests.llm_fixtures import make_causal_lm_folder
    folder = str(make_causal_lm_folder(tmp_path / "llama", "llama", layers=2))
    jobs = [{"method": "block", "key": "block", "folder": folder, "opts": {"checkpoint_every": 0}},
            {"method": "block", "key": "block_all", "folder": folder, "opts": {"measure": "all"}}]
    (tmp_path / "full").mkdir()
    full = _wait(_launch(tmp_path / "full", {"jobs": jobs}), tmp_path / "full", limit=150)
    assert "error" not in full[0] and "error" not in full[1], full
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert len(lm_calib(folder)) == 3
        for job in jobs:
            opts = {k: v for k, v in job["opts"].items() if k != "checkpoint_every"}
            ref = score(folder, lm_calib(folder), method="block", options=lm_options(), **opts)
            a, b = (np.array(full[r]["tables"][job["key"]]["loss"]) for r in (0, 1))
            assert np.array_equal(a, b) and full[0]["tables"][job["key"]]["world_size"] == 2
            np.testing.assert_allclose(a, ref.loss, rtol=2e-4, atol=1e-9 * ref.loss.max())
            assert ref.loss.max() > 0 and (ref.loss[ref.allowed] > 0).mean() > 0.9
    finally:
        torch.set_num_threads(n)
    ck = tmp_path / "ck.json"
    (tmp_path / "a").mkdir()
    res = _wait(_launch(tmp_path / "a", {"jobs": jobs[:1], "checkpoint": str(ck), "timeout": 15,
                                         "fail": {"rank": 1, "block": 1}}), tmp_path / "a", rank0_only=True, limit=150)
    assert "rank 1 of 2" in res[0]["error"], res[0]
    assert json.loads(ck.read_text())["state"]["next_block"] == 1
    assert (tmp_path / "ck.json.rank0.safetensors").exists() and (tmp_path / "ck.json.rank1.safetensors").exists()
    (tmp_path / "b").mkdir()
    res = _wait(_launch(tmp_path / "b", {"jobs": jobs[:1], "checkpoint": str(ck)}), tmp_path / "b", limit=150)
    for r in (0, 1):
        assert "error" not in res[r], res[r]
        got = res[r]["tables"]["block"]
        assert got["resumed"] == 1 and got["loss"] == full[0]["tables"]["block"]["loss"]
    assert not ck.exists() and not (tmp_path / "ck.json.rank1.safetensors").exists()
