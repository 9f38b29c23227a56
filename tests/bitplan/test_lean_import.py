"""`import bitplan` stays light: no solver / plotting / HF imports, no CUDA initialisation."""
import subprocess
import sys


def test_import_bitplan_is_lean():
    code = ("import sys, bitplan, bitplan.plan, bitplan.kernels.quantizer; import torch; "
            "heavy = [m for m in ('pulp', 'cvxpy', 'highspy', 'matplotlib', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_plan_load_and_show_never_import_torch(tmp_path):
    from bitplan.core.spec import QuantSpec
    from bitplan.plan import Plan
    Plan("f", {"fc": QuantSpec(4, 32)}, meta={"layer_shapes": {"fc": [8, 64]},
                                               "layer_bytes": {"fc": 8 * 32 + 8 * 2 * 2}}).save(tmp_path / "p.json")
    code = (f"import sys, bitplan; bitplan.Plan.load({str(tmp_path / 'p.json')!r}); "
            "from bitplan.report import format_plan; format_plan(bitplan.Plan.load("
            f"{str(tmp_path / 'p.json')!r})); assert 'torch' not in sys.modules, 'torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = subprocess.run([sys.executable, "-m", "bitplan", "show", str(tmp_path / "p.json")],
                         capture_output=True, text=True, env={**__import__("os").environ,
                                                              "PYTHONWARNINGS": "error::ImportWarning"})
    assert out.returncode == 0 and "fc" in out.stdout, out.stderr


def test_component_folders_never_shadow_other_distributions():
    """From a source checkout the repository root is on sys.path: `import kernels` (HF's package name)
    must find nothing of bitplan's, and transformers' probe for HF kernels must not import bitplan."""
    code = ("import kernels, sensitivity, allocator, costmodels; "
            "assert kernels.__all__ == [] == sensitivity.__all__ == allocator.__all__ == costmodels.__all__; "
            "import bitplan.kernels; assert bitplan.kernels.__all__; print('ok')")
    root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
        __import__("os").path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
