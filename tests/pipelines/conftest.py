"""The continual pipeline tests train and evaluate the tiny model many times: one torch thread runs its small
matrices faster than two, most of all on a machine other jobs share (no spin-waiting between threads)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
