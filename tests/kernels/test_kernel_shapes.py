"""Odd shapes through every registered kernel, in a subprocess: a crash fails the test, not pytest.

Every kernel in ``KERNELS`` is forced (``select_kernel(..., prefer=name)``) on odd K / N / batch shapes; the layer
runs what ``select_kernel`` picks (the kernel, or the ``dequant`` reference when ``supports()``
refuses the shape) and its output is compared with an exact reference computed in float64:
- weight-only / reference / fp16 kernels: fake-quantized weight (``fake_quantize``) and dense op;
  int8_wo / int4_wo take bf16 activations, so their reference rounds x to bf16 first;
- w8a8: the integer matmul in int64 of the module's own activation codes and int8 weight.
Accuracy = −20·log10 of the worst |y − ref| / Σ_k|x_k·w_nk| + |b_n| (each output's error relative to
the size of its terms, so cancellation in one output cannot fail a correct kernel nor hide a wrong
one). Floors hold on any CPU: bf16 rounding of outputs / scales is ≤ 2^-8 (48 dB) → floor 40 dB;
fp32 arithmetic on K ≤ 128 terms stays far above 100 dB; W8A8 sums integers exactly.
Before K % 8 was encoded in ``int8_wo.supports()``, K = 20 / 36 / 100 with M > 1 killed the worker
(SIGSEGV) and M = 1 returned wrong numbers; before the W8A8 path was chosen from the CPU,
w8a8 gave ~18 dB on CPUs without VNNI.
"""
import json
import os
import subprocess
import sys

import pytest

SHAPES_M = (1, 2, 3, 17)
SHAPES_K = (3, 8, 20, 64, 100, 128)
SHAPES_N = (1, 7, 16, 17, 48)
FLOOR_DB = {"int8_wo": 40.0, "int4_wo": 40.0, "w8a8": 100.0, "lowbit_unpack": 100.0, "dequant": 100.0,
            "fp16": 100.0}
FLOOR_BF16_IN = 40.0     # bf16 model and input: bf16 output (and bf16 weights on the reference path)


def _specs():
    from bitplan.kernels.formats import QuantSpec
    return {"int8_wo": [QuantSpec(8), QuantSpec(8, symmetric=False)],
            "int4_wo": [QuantSpec(4, 32), QuantSpec(4), QuantSpec(4, 64, symmetric=False)],
            "w8a8": [QuantSpec(8, act_bits=8)],
            "lowbit_unpack": [QuantSpec(3, 32), QuantSpec(2, symmetric=False), QuantSpec(5, 20)],
            "dequant": [QuantSpec(4, 32), QuantSpec(8, act_bits=8), QuantSpec(6)],
            "fp16": [QuantSpec(16)]}


def _reference(name, mod, spec, lin, x):
    """(float64 exact reference of what module ``mod`` (kernel ``name``) computes, the magnitude
    Σ_k |x_k·w_nk| + |b_n| each output's rounding error is relative to); both (..., N)."""
    import torch
    from bitplan.kernels.actquant import fake_quantize_act, quantize_act
    from bitplan.kernels.quantizer import fake_quantize, quantize
    x2 = x.reshape(-1, x.shape[-1]).float()                                       # (M, K)
    b = lin.bias.double()
    wt = lin.weight.detach().float()
    if name == "w8a8":
        q, sx = quantize_act(x2, 8, mod.act_qmax)
        w8 = mod.int8_weight().to(torch.int64)
        scale = sx.double() * mod.scales.double().reshape(1, -1)                  # (M, N)
        y = (q.to(torch.int64) @ w8.t()).double() * scale + b
        mag = (q.to(torch.int64).abs() @ w8.abs().t()).double() * scale + b.abs()
    else:
        w = (wt.half() if spec.bits == 16 else
             fake_quantize(wt, spec.bits, spec.group_size, spec.symmetric)).double()
        if name in ("int8_wo", "int4_wo"):
            x2 = x2.to(torch.bfloat16)
        elif spec.act_bits == 8:
            x2 = fake_quantize_act(x2, 8)
        y = x2.double() @ w.t() + b
        mag = x2.double().abs() @ w.abs().t() + b.abs()
        if name in ("int8_wo", "int4_wo") and not spec.symmetric:
            # these kernels compute (code − mid)·scale and the zero term separately: the bf16 rounding
            # is relative to the size of each part, which can exceed |w| when they cancel
            qt = quantize(wt, spec.bits, spec.group_size, spec.symmetric)
            k = wt.shape[1]
            per_col = lambda t: t.double().repeat_interleave(k if spec.group_size is None else spec.group_size, 1)[:, :k]  # noqa: E731
            part = (qt.codes.double() - 2 ** (spec.bits - 1)).abs() * per_col(qt.scales)
            mag = mag + x2.double().abs() @ (part + per_col(qt.zeros).abs()).t()
    shape = (*x.shape[:-1], -1)
    return y.reshape(shape), mag.reshape(shape)


def _accuracy_db(ref, mag, y):
    """-20·log10 of the worst |y − ref| / magnitude: the digits every output gets right, measured
    against the size of its terms (an SQNR that cancellation in a single output cannot fool)."""
    import torch
    rel = ((y.double() - ref).abs() / mag.clamp(min=1e-30)).max()
    return 999.0 if rel == 0 else float(-20 * torch.log10(rel))


def worker():
    """Run every case. Per built module: 'S <case>' (flushed) before it runs, then 'R <results>'
    after all its inputs; a crash leaves the case that died as the last 'S' line."""
    import copy
    import warnings
    import torch
    from torch import nn
    from bitplan.kernels.registry import KERNELS, get_kernel, select_kernel
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    specs = _specs()
    # the lookup kernel reads tables, not matmuls: tests/kernels/test_embedding.py sweeps it
    print("R " + json.dumps({"missing_specs": sorted(set(KERNELS) - set(specs) - {"embedding"})}), flush=True)
    for forced, spec_list in specs.items():
        for spec0 in spec_list:
            for k in SHAPES_K:
                for n in SHAPES_N:
                    g = torch.Generator().manual_seed(n * 1000 + k)
                    lin = nn.Linear(k, n)
                    with torch.no_grad():
                        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
                        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
                    name, _ = select_kernel(spec0, n, k, "cpu", "linear", prefer=forced)
                    case = {"forced": forced, "spec": spec0.label, "ran": name, "n": n, "k": k}
                    print("S " + json.dumps(case), flush=True)
                    lin16 = copy.deepcopy(lin).bfloat16()                 # a bf16 model
                    with torch.no_grad():
                        mod = get_kernel(name).from_module(lin, "linear", lin.weight, spec0)
                        mod16 = get_kernel(name).from_module(lin16, "linear", lin16.weight, spec0)
                    xs = [(m, torch.randn(m, k, generator=g), mod, lin) for m in SHAPES_M]
                    xs.append(("3d", torch.randn(2, 3, k, generator=g), mod, lin))
                    xs.append(("strided", torch.randn(2, 3, 2 * k, generator=g)[..., ::2], mod, lin))
                    xs.append(("bf16-strided", torch.randn(3, 2 * k, generator=g).bfloat16()[:, ::2], mod16, lin16))
                    out = []
                    for m, x, md, ln in xs:
                        with torch.no_grad():
                            y = md(x)
                            ref, mag = _reference(name, md, spec0, ln, x)
                        ok_shape = tuple(y.shape) == tuple(ref.shape) and y.dtype == x.dtype
                        out.append({**case, "m": m, "shape_ok": ok_shape,
                                    "db": _accuracy_db(ref, mag, y) if ok_shape else None})
                    print("R " + json.dumps(out), flush=True)


def test_every_kernel_on_odd_shapes_in_a_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True,
                          timeout=600, env=env)
    lines = proc.stdout.splitlines()
    started = [json.loads(l[2:]) for l in lines if l.startswith("S ")]
    results = [json.loads(l[2:]) for l in lines if l.startswith("R ")]
    assert proc.returncode == 0, (f"worker died (return code {proc.returncode}) while running "
                                  f"{started[-1] if started else 'start-up'}\n{proc.stderr[-3000:]}")
    assert results[0] == {"missing_specs": []}, "every registered kernel needs specs in this sweep"
    assert len(results) - 1 == len(started)
    cases = [c for r in results[1:] for c in r]
    bad = [c for c in cases if not c["shape_ok"]
           or c["db"] < (FLOOR_BF16_IN if c["m"] == "bf16-strided" else FLOOR_DB[c["ran"]])]
    assert not bad, f"{len(bad)} of {len(cases)} cases below their accuracy floor, e.g. {bad[:5]}"
    ran = {(c["forced"], c["ran"]) for c in cases}
    # the sweep reaches each real kernel on some shape, and the fallback on others
    for forced in ("int8_wo", "int4_wo", "lowbit_unpack", "fp16", "dequant"):
        assert (forced, forced) in ran, forced
    for forced in ("int8_wo", "int4_wo"):
        assert (forced, "dequant") in ran, forced


if __name__ == "__main__":
    worker()


def test_int8_wo_on_a_misaligned_bf16_view_matches_the_reference():
    """A contiguous bf16 input whose data starts off a 64-byte boundary (a view into a larger buffer)
    must not reach the kernel's aligned loads: forward copies it; the result equals an aligned input's."""
    import torch
    from torch import nn
    from bitplan.kernels.formats import QuantSpec
    from bitplan.kernels.registry import get_kernel, select_kernel
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    name, why = select_kernel(QuantSpec(8), 16, 64, "cpu", "linear", prefer="int8_wo")
    if name != "int8_wo":
        pytest.skip(f"int8_wo does not run here: {why}")
    mod = get_kernel(name).from_module(lin, "linear", lin.weight.detach(), QuantSpec(8))
    buf = torch.randn(3 * 64 + 1, dtype=torch.bfloat16)
    x = buf[1:].view(3, 64)                                    # data_ptr off by 2 bytes
    assert x.is_contiguous() and x.data_ptr() % 64
    assert torch.equal(mod(x), mod(x.clone()))
