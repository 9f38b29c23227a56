"""Every ``bitplan`` name that a benchmark or example imports exists (scripts are not run by the
suite, so a moved module would otherwise surface only when someone reruns a benchmark)."""
from __future__ import annotations

import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "examples", "*.py")))


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "bitplan":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "bitplan":
                    yield node.lineno, a.name, []


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.relpath(p, ROOT) for p in SCRIPTS])
def test_script_imports_resolve(path):
    bad = []
    for line, mod, names in _imports(path):
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            bad.append(f"line {line}: {mod}: {e}")
            continue
        for n in names:
            if n != "*" and not hasattr(m, n):
                try:
                    importlib.import_module(f"{mod}.{n}")
                except ImportError:
                    bad.append(f"line {line}: {mod} has no {n}")
    assert not bad, "\n".join(bad)
