"""Command line: ``bitplan plan | calibrate | apply | frontier | show | export | eval | demo`` (also
``python -m bitplan``). Each command is one module that parses, calls the library and writes files.

Exit codes: 0 success; 2 bad arguments (argparse names the argument) or bad values / infeasible
budgets / mismatched plans (the message names the value); 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from . import (apply_cmd, calibrate_cmd, demo_cmd, eval_cmd, export_cmd, frontier_cmd, plan_cmd,
               show_cmd)
from .args import UsageError, common

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = {"plan": plan_cmd, "calibrate": calibrate_cmd, "apply": apply_cmd, "frontier": frontier_cmd,
            "show": show_cmd, "export": export_cmd, "eval": eval_cmd, "demo": demo_cmd}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitplan", description="Mixed-precision bit allocation for PyTorch "
                                "models: score layers, solve under budgets, apply, export.")
    p.add_argument("-v", "--verbose", dest="verbose_all", action="store_true", help="debug logging (on stderr)")
    p.add_argument("-q", "--quiet", dest="quiet_all", action="store_true",
                   help="no progress bars, only warnings/errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = common()
    for mod in COMMANDS.values():
        mod.add(sub, c)
    return p


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """bitplan's own logger only (other libraries' messages are never relabelled as bitplan's);
    warnings print as one plain line, without the Python source line."""
    log = logging.getLogger("bitplan")
    log.handlers[:] = []
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "bitplan: %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"bitplan: {category.__name__}: {message}", file=file or sys.stderr)
    warnings.showwarning = show


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or args.verbose_all        # `bitplan -v plan ...` == `bitplan plan -v ...`
    args.quiet = args.quiet or args.quiet_all
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        parser._subparsers._group_actions[0].choices[args.command].error(str(e))   # usage + exit 2
    except (ValueError, TypeError) as e:       # bad values, infeasible budgets, mismatched plans
        print(f"bitplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"bitplan {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.command in ("plan", "frontier"):
            from .common import close_distributed
            close_distributed()


if __name__ == "__main__":
    sys.exit(main())
