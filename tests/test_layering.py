"""The layering is data: import-linter contracts in pyproject.toml, checked on the resolved `bitplan.*`
module names.

The package-dir map installs the top-level folders allocator/, sensitivity/, costmodels/ and kernels/
as `bitplan.allocator`, ... — tools that read folders do not see that, so the test lays the sources
out as one `bitplan` package in a temporary folder (copies, the way an installed wheel looks) and runs
import-linter there. A second test adds one forbidden import to that copy and checks the contracts
catch it, so this test can fail.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("allocator", "sensitivity", "costmodels", "kernels")

pytest.importorskip("importlinter")


def _layout(dst: str) -> str:
    """Copy the package as installed: dst/bitplan/{face, core, cli, ...} + dst/bitplan/<component>/."""
    pkg = os.path.join(dst, "bitplan")
    shutil.copytree(os.path.join(ROOT, "bitplan"), pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    for c in COMPONENTS:
        shutil.copytree(os.path.join(ROOT, c), os.path.join(pkg, c), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dst)
    return pkg


def _lint(dst: str) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    env = {**os.environ, "PYTHONPATH": dst}
    return subprocess.run([sys.executable, "-c", code], cwd=dst, env=env, capture_output=True, text=True,
                          timeout=300)


def test_contracts_hold(tmp_path):
    _layout(str(tmp_path))
    p = _lint(str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Contracts: 3 kept, 0 broken" in p.stdout, p.stdout


def test_every_module_of_the_face_is_in_a_layer():
    """A new module must take a place in the layering (a new arrow is a design decision)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["importlinter"]["contracts"][0]
    listed = {m.strip() for layer in cfg["layers"] for m in layer.replace("|", ":").split(":")}
    have = {n[:-3] if n.endswith(".py") else n for n in os.listdir(os.path.join(ROOT, "bitplan"))
            if (n.endswith(".py") and n != "__init__.py") or (os.path.isdir(os.path.join(ROOT, "bitplan", n))
                                                              and n not in ("__pycache__", "data"))}
    have |= set(COMPONENTS)
    assert have - listed == set(), f"modules missing from the layers contract: {sorted(have - listed)}"


@pytest.mark.parametrize("target, line", [
    ("allocator/problem.py", "from ..core import spec  # injected\n"),
    ("kernels/quantizer.py", "from .. import api  # injected\n"),
    ("core/graph.py", "from ..kernels import quantizer  # injected\n"),
    ("sensitivity/table.py", "from .. import plan  # injected\n"),
    ("plan.py", "import torch  # injected\n"),
])
def test_a_forbidden_import_is_caught(tmp_path, target, line):
    pkg = _layout(str(tmp_path))
    path = os.path.join(pkg, target)
    src = open(path).read()
    head, _, rest = src.partition("from __future__ import annotations\n")
    with open(path, "w") as f:
        f.write(head + "from __future__ import annotations\n" + line + rest)
    p = _lint(str(tmp_path))
    assert p.returncode != 0 and "BROKEN" in p.stdout, p.stdout
