import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test run gets its own checkpoint / importance cache folder."""
    old = os.environ.get("EXCISE_CACHE")
    os.environ["EXCISE_CACHE"] = str(tmp_path_factory.mktemp("excise-cache"))
    yield
    if old is None:
        os.environ.pop("EXCISE_CACHE", None)
    else:
        os.environ["EXCISE_CACHE"] = old


@pytest.fixture(scope="session")
def digits():
    from excise.data import load_digits

    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="session")
def fmnist_small():
    """A fixed 8,000-image slice of Fashion-MNIST train and 2,000 of test (real data, small enough for CPU)."""
    from fixtures.checkpoints import fmnist_small

    return fmnist_small()


@pytest.fixture(scope="session")
def committed():
    """``committed(setup, datasets)``: the setup prepared with its original and oracle read from the committed
    checkpoints (tests/fixtures/checkpoints.py), so that assertions on trained models hold on every CPU."""
    from fixtures.checkpoints import load_prepared

    return load_prepared
