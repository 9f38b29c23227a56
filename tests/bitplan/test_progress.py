"""Progress counting must not change what the estimators compute."""
import numpy as np
import torch

from bitplan.progress import counting_loss
from bitplan.sensitivity import score
from bitplan.sensitivity.losses import LabelFreeLoss


class Bar:
    n = 0

    def update(self, k=1):
        self.n += k


def test_counted_label_free_loss_keeps_the_exact_estimator_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    batches = [torch.randn(32, 8), torch.randn(32, 8)]
    bar = Bar()
    fn = counting_loss(None, model, batches, bar)
    assert isinstance(fn, LabelFreeLoss)
    counted = score(model, batches, method="hessian", loss_fn=fn, max_probes=8)
    plain = score(model, batches, method="hessian", max_probes=8)
    assert counted.meta["probe_mode"] == plain.meta["probe_mode"] == "output"
    np.testing.assert_array_equal(counted.loss, plain.loss)
    assert bar.n > 0
