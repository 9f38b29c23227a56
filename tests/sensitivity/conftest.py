"""Fixtures for the sensitivity tests: tiny models and calibration data."""
import pytest
import torch

from sens_helpers import Blocks, mlp


@pytest.fixture
def net():
    return mlp()


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 6, generator=g) for _ in range(3)]


@pytest.fixture
def labelled():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


@pytest.fixture
def blocks_model():
    torch.manual_seed(3)
    return Blocks().eval()


@pytest.fixture
def block_batches():
    g = torch.Generator().manual_seed(4)
    return [torch.randn(6, 5, generator=g) for _ in range(2)]
