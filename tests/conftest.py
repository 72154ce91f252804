import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty param store, validation on and fixed seeds."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # small networks: one thread is fastest, and never oversubscribes
