"""The diffusion tests' tiny UNets run on one PyTorch thread: two threads gain nothing on them, and on a
loaded machine OpenMP's waiting threads made a 5-second distillation take minutes."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
