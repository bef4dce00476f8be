import os

import pytest

from mm_ads.data import synthetic


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory, repo_root):
    """The synthetic world of configs/data/smoke.flags (text and image pre-training pairs, 32 px)."""
    config = synthetic.world_config_from_flagfile(os.path.join(repo_root, "configs", "data", "smoke.flags"))
    out = str(tmp_path_factory.mktemp("scl") / "world")
    synthetic.write_world(synthetic.World(config).generate(progress=False), out, progress=False)
    return out
