"""fisher (ModelOpt output Taylor) against a direct computation."""
import numpy as np
import torch

from bitplan.kernels.quantizer import fake_quantize
from bitplan.sensitivity import score
from sens_helpers import ce_loss

BITS = (2, 4, 8)


def layer_io(net, x):
    """Inputs and outputs (with grad) of each Linear of the Sequential, and the final output."""
    ins, outs, h = [], [], x
    for m in net:
        if isinstance(m, torch.nn.Linear):
            ins.append(h.detach())
            h = m(h)
            outs.append(h)
        else:
            h = m(h)
    return ins, outs, h


def dy_sq(m, x, b):
    dw = fake_quantize(m.weight.detach(), b) - m.weight.detach()
    return (x @ dw.t()).pow(2)


def test_task_loss_equals_direct_empirical_fisher(net, labelled):
    t = score(net, labelled, method="fisher", loss_fn=ce_loss, bits=BITS)
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    want = np.zeros((3, len(BITS)))
    for x, y in labelled:
        ins, outs, out = layer_io(net, x)
        gs = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), outs)
        for i, (m, xi, g) in enumerate(zip(lins, ins, gs)):
            for j, b in enumerate(BITS):
                want[i, j] += 0.5 * len(x) * float((g.pow(2) * dy_sq(m, xi, b)).sum())
    np.testing.assert_allclose(t.loss, want, rtol=1e-5, atol=1e-12)
    assert t.meta["gradient"] == "empirical Fisher of loss_fn"


def test_label_free_exact_equals_hessian_diagonal(net, batches):
    """exact=True: ½ Σ diag(∂²L/∂Y_l²) ⊙ ΔY² with the Hessian formed by autograd."""
    t = score(net, batches, method="fisher", exact=True, bits=BITS)
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]
    pos = [i for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    want = np.zeros((3, len(BITS)))
    for x in batches:
        ref = net(x).detach()
        ins, outs, _ = layer_io(net, x)
        for i, (m, xi, y) in enumerate(zip(lins, ins, outs)):
            rest = net[pos[i] + 1:]
            h = torch.autograd.functional.hessian(
                lambda yy: torch.nn.functional.mse_loss(rest(yy), ref), y.detach())
            diag = h.reshape(y.numel(), y.numel()).diagonal().reshape(y.shape)
            for j, b in enumerate(BITS):
                want[i, j] += 0.5 * float((diag * dy_sq(m, xi, b)).sum())
    np.testing.assert_allclose(t.loss, want, rtol=1e-4, atol=1e-12)


def test_sampled_probes_converge_to_exact(net, batches):
    exact = score(net, batches, method="fisher", exact=True, bits=BITS).loss
    approx = score(net, batches, method="fisher", samples=3000, bits=BITS).loss
    np.testing.assert_allclose(approx, exact, rtol=0.1)


def test_unused_layer_scores_zero(blocks_model, block_batches):
    t = score(blocks_model, block_batches, method="fisher")
    assert t.meta["no_grad_layers"] == ["unused"] and np.all(t.loss[t.names.index("unused")] == 0)
    assert np.all(np.delete(t.loss, t.names.index("unused"), 0)[:, 0] > 0)
