"""Rebuild ``calib_text.txt`` and ``heldout_text.txt`` (not imported by bitplan; run by hand).

The built-in calibration text for causal LMs is real prose and code: whole source files of the
Python 3.11 standard library (docstrings, comments and code), licensed under the PSF License
Version 2, which permits redistribution (see README.md in this folder). Two DISJOINT sets of modules
give the calibration and the held-out text.

    python bitplan/data/make_text.py /usr/lib/python3.11
"""
import os
import sys

CALIB = ["textwrap", "string", "fractions", "heapq", "bisect", "shlex", "statistics", "glob", "fnmatch",
         "copy", "pprint", "reprlib", "numbers", "queue", "sched", "contextlib", "graphlib", "abc",
         "operator", "random", "csv", "base64"]
HELDOUT = ["calendar", "colorsys", "dis", "filecmp", "gettext", "imghdr", "keyword", "linecache",
           "mimetypes", "netrc", "nturl2path", "opcode", "quopri", "stringprep", "tabnanny", "this",
           "token", "tokenize", "weakref", "zipapp"]


def build(lib: str, names: list[str]) -> str:
    parts = []
    for n in names:
        with open(os.path.join(lib, n + ".py"), encoding="utf-8") as f:
            parts.append(f"# ---- Lib/{n}.py (Python 3.11, PSF License 2.0)\n" + f.read())
    return "\n".join(parts)


if __name__ == "__main__":
    lib = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, mods in (("calib_text.txt", CALIB), ("heldout_text.txt", HELDOUT)):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            f.write(build(lib, mods))
        print(name, os.path.getsize(os.path.join(here, name)), "bytes")
