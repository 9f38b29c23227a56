"""`import bitplan` stays light: no solver / plotting / HF imports, no CUDA initialisation."""
import subprocess
import sys


def test_import_bitplan_is_lean():
    code = ("import sys, bitplan, bitplan.plan, bitplan.kernels.quantizer; import torch; "
            "heavy = [m for m in ('pulp', 'cvxpy', 'highspy', 'matplotlib', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
