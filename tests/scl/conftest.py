import dataclasses
import os

import pytest

from mm_ads.data import synthetic


def _flagfile_values(path):
    values = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if line.startswith("--") and "=" in line:
            key, value = line[2:].split("=", 1)
            values[key] = value
    return values


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory, repo_root):
    """The synthetic world of configs/data/smoke.flags (text and image pre-training pairs, 32 px)."""
    fields = {f.name: f.type for f in dataclasses.fields(synthetic.WorldConfig)}
    values = _flagfile_values(os.path.join(repo_root, "configs", "data", "smoke.flags"))
    config = synthetic.WorldConfig(**{k: fields[k](v) for k, v in values.items()})
    out = str(tmp_path_factory.mktemp("scl") / "world")
    synthetic.write_world(synthetic.World(config).generate(progress=False), out, progress=False)
    return out
