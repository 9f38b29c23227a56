"""Default ``hessian`` vs ``measured`` on a small task-loss CNN (issue 16 item 11), before and after.

Case: :func:`estimator_models.residual_cnn_case` — a 112k-weight residual CNN (7 quantizable layers)
on 8x8 digits, 4 calibration batches of 100 (images, labels), cross-entropy task loss, bits
(2, 3, 4, 8). The hessian estimator takes the weight-space route (double backward).

Variants, each ``score(...)`` end to end, interleaved in every round (order rotated per round):
  measured     one-layer-at-a-time loss increase (L x B x batches forwards)
  hessian-old  the estimator as it was before this change: 64 probes, one Rademacher vector shared by
               all batches, no negligible-share rule (``hessian_before`` below, same code otherwise)
  hessian      the default now: independent probes per batch, negligible-share stopping rule,
               automatic probe cap (at most ~4x the forwards of measuring)
Then one long reference run (--ref-probes probes of the new estimator) and, for each short variant,
the per-layer z = (trace − reference) / sqrt(se² + se_ref²) — "within its standard error" means
|z| ≲ 2 for most layers.

Reported: median wall seconds per variant and the ratio of medians to ``measured``;
``os.getloadavg()`` before and after (the machine is shared). Results JSON with provenance.

Run: python benchmarks/estimator_speed.py [--rounds 5] [--threads 1] [--ref-probes 512]
     [--out benchmarks/results/estimator_speed.json]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BITS = (2, 3, 4, 8)


@contextlib.contextmanager
def hessian_before():
    """The pre-change Hutchinson loop: the same probe vector on every batch (generator per probe
    index only), relative-tolerance stopping on every layer, max_probes=64."""
    import bitplan.sensitivity.hessian as H
    saved = H._probe_gens
    H._probe_gens = lambda seed, start, k, batch: [torch.Generator().manual_seed(seed * 1_000_003 + j)
                                                   for j in range(start, start + k)]
    try:
        yield {"max_probes": 64, "negligible": 0.0}
    finally:
        H._probe_gens = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-probes", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "estimator_speed.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from estimator_models import ce_loss, residual_cnn_case
    from provenance import provenance

    from bitplan.core.jsonio import atomic_write_json
    from bitplan.sensitivity import score

    prov = provenance()                   # at the start: the code that ran, not what the tree became
    model, calib = residual_cnn_case()
    load_before = os.getloadavg()

    def run(name):
        if name == "measured":
            return score(model, calib, method="measured", bits=BITS, loss_fn=ce_loss)
        if name == "hessian-old":
            with hessian_before() as kw:
                return score(model, calib, method="hessian", bits=BITS, loss_fn=ce_loss, **kw)
        return score(model, calib, method="hessian", bits=BITS, loss_fn=ce_loss)

    names = ["measured", "hessian-old", "hessian"]
    walls = {n: [] for n in names}
    last = {}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            last[n] = run(n)
            walls[n].append(time.perf_counter() - t0)
            print(f"round {r} {n:12} {walls[n][-1]:7.2f} s", flush=True)
    t0 = time.perf_counter()
    ref = score(model, calib, method="hessian", bits=BITS, loss_fn=ce_loss, max_probes=a.ref_probes,
                min_probes=a.ref_probes)
    ref_s = time.perf_counter() - t0
    rtr, rse = np.asarray(ref.meta["trace"]), np.asarray(ref.meta["trace_stderr"])
    med = {n: float(np.median(v)) for n, v in walls.items()}
    out = {"case": "residual CNN (112,010 weights, 7 layers) on 8x8 digits, 4 batches x 100, cross-entropy, "
                   f"bits {list(BITS)}, {a.threads} thread(s)",
           "layers": ref.names, "rounds": a.rounds, "wall_s": walls, "median_s": med,
           "ratio_to_measured": {n: med[n] / med["measured"] for n in names},
           "reference": {"probes": int(ref.meta["probes"]), "seconds": ref_s, "trace": rtr.tolist(),
                         "trace_stderr": rse.tolist()},
           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    for n in ("hessian-old", "hessian"):
        tr, se = np.asarray(last[n].meta["trace"]), np.asarray(last[n].meta["trace_stderr"])
        z = (tr - rtr) / np.sqrt(se ** 2 + rse ** 2)
        out[n] = {"probes": int(last[n].meta["probes"]), "converged": bool(last[n].meta["converged"]),
                  "trace": tr.tolist(), "trace_stderr": se.tolist(), "rel_stderr": (se / np.abs(tr)).tolist(),
                  "z_vs_reference": z.tolist(), "max_abs_z": float(np.abs(z).max()),
                  "negligible_layers": last[n].meta.get("negligible_layers", [])}
    print(f"\nmedian wall s: " + ", ".join(f"{n} {med[n]:.2f}" for n in names))
    print("ratio to measured: " + ", ".join(f"{n} {out['ratio_to_measured'][n]:.2f}x" for n in names))
    for n in ("hessian-old", "hessian"):
        print(f"{n}: probes {out[n]['probes']}, median rel se {np.median(out[n]['rel_stderr']):.3f}, "
              f"|z| vs {ref.meta['probes']}-probe reference: {np.round(np.abs(out[n]['z_vs_reference']), 2).tolist()}")
    atomic_write_json(a.out, {**prov, **out})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
