"""Run one HiGHS MILP in a separate process so a hard wall-clock limit can always be enforced.

HiGHS overran its ``time_limit`` here by 4x (50,000 rows, 3 budgets: 126 s on a 30 s limit) and
ignored the interrupt callback while doing so; a child process can be killed. The parent
(``highs.run``) pickles the CSC arrays to a file, runs ``python -m bitplan.allocator.highs_worker
IN OUT``, and kills it at the limit (plus grace). stdout is not used (HiGHS prints a banner there).

Example:
    >>> x, bound, res = solve_arrays(m, time_limit=10.0, x0=None)     # in-process, same code path
"""
from __future__ import annotations

import math
import pickle
import sys
import time

import numpy as np

from .common import new_highs

__all__ = ["solve_arrays", "set_options", "RENS_MIN_COLUMNS"]

# RENS sub-MIPs only for MILPs with at least this many columns (after reduced-cost fixing).
# Measured (benchmarks/solver_scaling.py tables, 3 budgets, HiGHS 1.16, 2 cores): without RENS,
# 1000 rows (1.5k-2.7k columns) solved faster on 7 of 8 seeds (seed 0: 0.76 s vs 1.54 s, total
# -17 %) and 500 rows on 3 of 4; 5000 rows (6k-8k columns) were slower on 3 of 4 seeds (up to 2x).
# The root reduced-cost sub-MIP heuristic must stay on either way (10x slower without it).
RENS_MIN_COLUMNS = 5000


def set_options(h, time_limit, threads, msg, rel_gap, rens: bool = True):
    # gap: half of OPT_RTOL, relative to the shifted objective (<= the true one), so HiGHS's
    # "optimal" also passes our own check; feasibility 1e-9 of a budget's free part <= Tables.tol
    opts = {"output_flag": bool(msg), "mip_rel_gap": rel_gap, "mip_abs_gap": 1e-6,
            "presolve_rule_off": 32768,              # probing overruns time limits (SOLVERS.md)
            # RINS sub-MIPs hung past time_limit (and past the interrupt callback) on a
            # 1000-row, 3-budget table here; without RINS the same hard cases proved faster
            "mip_heuristic_run_rins": False,
            "mip_heuristic_run_rens": rens,
            "mip_feasibility_tolerance": 1e-9, "primal_feasibility_tolerance": 1e-9,
            "random_seed": 0}
    if time_limit is not None:
        opts["time_limit"] = float(max(time_limit, 0.01))
    if threads is not None:
        opts["threads"] = int(threads)
    for k, v in opts.items():
        h.setOptionValue(k, v)


def solve_arrays(m: dict, time_limit: float | None, x0: np.ndarray | None, threads=None,
                 msg: bool = False, rel_gap: float = 5e-10):
    """Solve the MILP given as passModel arrays ``m``; returns (x (n,) or None, bound, res)."""
    import highspy

    t0 = time.perf_counter()
    h = new_highs()
    set_options(h, time_limit, threads, msg, rel_gap, rens=m["num_col"] >= RENS_MIN_COLUMNS)
    h.passModel(m["num_col"], m["num_row"], m["num_nz"], int(highspy.MatrixFormat.kColwise),
                int(highspy.ObjSense.kMinimize), 0.0, m["col_cost"], m["col_lower"], m["col_upper"],
                m["row_lower"], m["row_upper"], m["a_start"], m["a_index"], m["a_value"],
                m["integrality"])
    n = m["num_col"]
    if x0 is not None:                                               # warm start: a feasible plan
        h.setSolution(n, np.arange(n, dtype=np.int32), np.asarray(x0, dtype=np.float64))
    if time_limit is not None:              # HiGHS's own limit is not always checked (sub-MIPs)
        deadline = time.perf_counter() + float(time_limit)

        def _stop(e):
            if time.perf_counter() > deadline:
                e.interrupt()
        h.cbMipInterrupt += _stop
    pass_s = time.perf_counter() - t0
    h.run()
    info = h.getInfo()
    res = {"pass_s": pass_s, "highs_status": h.modelStatusToString(h.getModelStatus()),
           "nodes": int(info.mip_node_count)}
    if h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
        res["infeasible"] = True
        return None, math.inf, res
    bound = float(info.mip_dual_bound)
    bound = bound if math.isfinite(bound) else -math.inf
    if info.primal_solution_status != 2:                             # 2 = feasible point found
        return None, bound, res
    return np.asarray(h.getSolution().col_value, dtype=np.float64), bound, res


def main(argv):
    src, dst = argv
    with open(src, "rb") as f:
        job = pickle.load(f)
    out = solve_arrays(**job)
    with open(dst, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv[1:])
