"""One rank of a real gloo process group for tests/sensitivity/test_distributed.py (no mocks).

Run as ``python dist_worker.py CONFIG.json`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
CONFIG: {"jobs": [{"method", "opts", "key"}], "out": folder, "timeout": s, "checkpoint": path|null,
"fail": {"rank", "after", "mode": "exit"|"sleep"}|null}. Each rank writes OUT/rank{r}.json with the
tables it got (loss, meta pieces) or the error it raised and how long into scoring it came.
"""
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sens_helpers import mlp  # noqa: E402

BITS = (2, 3, 4, 8)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 6, generator=g) for _ in range(3)]


def task_loss(model, batch):
    """A loss with no labels that is not at a minimum (so every estimator has work)."""
    return model(batch).pow(2).mean()


def failing_loss(rank: int, fail):
    """``task_loss``, except that on rank ``fail['rank']`` the call after ``fail['after']`` exits the
    process (``mode='exit'``) or sleeps for a minute (``'sleep'``): a rank dying or stalling mid-run."""
    calls = [0]

    def fn(model, batch):
        calls[0] += 1
        if fail and rank == fail["rank"] and calls[0] > fail["after"]:
            if fail["mode"] == "exit":
                os._exit(3)
            time.sleep(60)
        return task_loss(model, batch)
    return fn


def lm_calib(folder):
    """Calibration batches of a causal-LM folder: 12 windows x 32 tokens of the built-in text, 4 per batch."""
    from bitplan.models import load_model
    return load_model(folder, lazy=True, seq_len=32, calib_samples=12).calib_data


def lm_options():
    """rtn, gptq (full input statistics) and W8A8 (measured) options for the block estimator."""
    from bitplan.core.spec import QuantSpec
    return [QuantSpec(2, None), QuantSpec(4, None), QuantSpec(8, None), QuantSpec(4, 32, method="gptq"),
            QuantSpec(8, None, act_bits=8)]


def main(cfg_path):
    cfg = json.load(open(cfg_path))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from bitplan.sensitivity import score
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    res = {"rank": rank, "tables": {}}
    t0 = time.perf_counter()
    try:
        for job in cfg["jobs"]:
            if job["method"] == "allocate":          # the whole public entry point on every rank
                import bitplan
                plan = bitplan.allocate(mlp(), budget_mb=job["budget_mb"], calib_data=batches(), bits=BITS,
                                        group_size=None, sensitivity="measured", sensitivity_opts={"timeout": 60})
                res["tables"][job["key"]] = {"layers": plan.to_dict()["layers"]}
                continue
            if job["method"] == "block":               # streamed causal-LM folder, batches sharded
                fail = cfg.get("fail")
                if fail and rank == fail["rank"]:          # this rank dies on entering block fail["block"]
                    from bitplan.sensitivity import hf_stream
                    real = hf_stream.StreamedLM.run_block
                    hf_stream.StreamedLM.run_block = lambda self, i, h, kw: (
                        os._exit(3) if i == fail["block"] else real(self, i, h, kw))
                t = score(job["folder"], lm_calib(job["folder"]), method="block", options=lm_options(),
                          timeout=cfg.get("timeout", 60), checkpoint=cfg.get("checkpoint"),
                          **job.get("opts", {}))
                res["tables"][job["key"]] = {"loss": t.loss.tolist(), "world_size": t.meta.get("world_size"),
                                             "alpha": t.meta["alpha"], "resumed": t.meta.get("resumed")}
                continue
            loss_fn = failing_loss(rank, cfg.get("fail")) if job.get("task_loss") else None
            t = score(mlp(), batches(), method=job["method"], bits=BITS, loss_fn=loss_fn, seed=job.get("seed", 0),
                      checkpoint=cfg.get("checkpoint"), timeout=cfg.get("timeout", 60), **job.get("opts", {}))
            res["tables"][job["key"]] = {"loss": t.loss.tolist(), "probes": t.meta.get("probes"),
                                         "world_size": t.meta.get("world_size"),
                                         "resumed": t.meta.get("resumed")}
    except (RuntimeError, ValueError) as e:
        res["error"] = str(e)
        res["error_after_s"] = time.perf_counter() - t0
    with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
