import numpy as np
import pyarrow.parquet as pq
import pytest

from mm_ads.data import synthetic
from mm_ads.data.vectors import write_vector_table

TINY = dict(seed=1, num_items=300, num_users=200, num_categories=6, num_impressions=4000, num_search_pairs=50,
            seq_len=8, image_size=8, num_shards=2)


def attribute_vectors(items, dim=16, seed=0):
    """Unit vectors from an item's semantic attributes (a stand-in for a trained encoder in tests)."""
    rng = np.random.default_rng(seed)
    parts = []
    for key, size in (("category_id", 64), ("colour", 12), ("pattern", 6), ("material", 5)):
        onehot = np.eye(size + 1)[np.asarray(items[key])]
        parts.append(onehot @ rng.normal(size=(size + 1, dim)))
    v = np.sum(parts, axis=0) + 0.1 * rng.normal(size=(len(items["item_id"]), dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny synthetic dataset with an attribute-vector table registered in its manifest."""
    out = str(tmp_path_factory.mktemp("ctr") / "world")
    world = synthetic.World(synthetic.WorldConfig(**TINY)).generate(progress=False)
    synthetic.write_world(world, out, progress=False)
    items = pq.read_table(f"{out}/items.parquet").to_pydict()
    write_vector_table(f"{out}/vectors/attributes.parquet", np.asarray(items["item_id"]),
                       attribute_vectors(items), encoder_version="test-attributes")
    # register the table like a reader would
    import json

    path = f"{out}/manifest.json"
    manifest = json.load(open(path))
    manifest["extra"]["vector_tables"] = {"attributes": "vectors/attributes.parquet"}
    json.dump(manifest, open(path, "w"))
    return out
