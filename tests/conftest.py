"""Test configuration.

`--run_large` enables tests marked `large` (slow, minutes each). `--random_seed=N` (default 0) seeds Python,
NumPy, TensorFlow and Keras before every test, so a run is reproducible and a test that passes only for some
random initialisations shows up when the layer tests are swept over seeds (`make test-seeds`, run by CI).
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def pytest_addoption(parser):
    parser.addoption("--run_large", action="store_true", default=False, help="run tests marked large")
    parser.addoption("--random_seed", type=int, default=0, help="global random seed set before every test")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run_large"):
        return
    skip = pytest.mark.skip(reason="large test: pass --run_large to run it")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    import keras

    keras.utils.set_random_seed(request.config.getoption("--random_seed"))


@pytest.fixture(scope="session")
def shared_data():
    """Path of the real public data (../shared/data next to the repo); skips the test when absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root():
    return REPO
