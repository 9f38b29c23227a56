"""What a results file records about the run that made it: git commit (and whether the tree had
uncommitted changes), the exact command, the time, torch and Python versions.

Example:
    >>> record = {**provenance(), "numbers": ...}
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone

__all__ = ["provenance"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """{"commit": {"sha", "dirty"}, "command", "created", "torch", "python"} for a results file."""
    import torch
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": {"sha": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version()}
