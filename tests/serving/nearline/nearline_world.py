"""A tiny world for the near-line tests: synthetic impressions, an attribute-vector table and its index table."""

import json
import os

import numpy as np
import pyarrow.parquet as pq

from mm_ads.data import synthetic
from mm_ads.data.vectors import write_vector_table

TINY = dict(seed=3, num_items=200, num_users=150, num_categories=5, num_impressions=1500, num_search_pairs=20,
            seq_len=6, image_size=8, num_shards=2)
DIM = 8
ENCODER = "test-attributes"


def attribute_vectors(items, dim=DIM, seed=0):
    """Unit vectors from an item's category and colour (a stand-in for a trained encoder)."""
    rng = np.random.default_rng(seed)
    parts = [np.eye(size + 1)[np.asarray(items[key])] @ rng.normal(size=(size + 1, dim))
             for key, size in (("category_id", 64), ("colour", 12))]
    v = np.sum(parts, axis=0) + 0.1 * rng.normal(size=(len(items["item_id"]), dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def make_world(out, drop_items=()):
    """Writes the world to `out` with `vectors/attributes.parquet` registered (minus `drop_items`); returns it."""
    world = synthetic.World(synthetic.WorldConfig(**TINY)).generate(progress=False)
    synthetic.write_world(world, out, progress=False)
    items = pq.read_table(f"{out}/items.parquet").to_pydict()
    ids = np.asarray(items["item_id"])
    keep = ~np.isin(ids, np.asarray(drop_items, np.int64))
    vectors = attribute_vectors(items)
    write_vector_table(f"{out}/vectors/attributes.parquet", ids[keep], vectors[keep], encoder_version=ENCODER)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["extra"]["vector_tables"] = {"attributes": "vectors/attributes.parquet"}
    with open(path, "w") as f:
        json.dump(manifest, f)
    return out


def make_index_table(world, uri):
    """An index table at `uri` holding the world's vector table."""
    from mm_ads.serving.index.index_table import load_vector_table_into, open_index_table

    table = open_index_table(uri, dim=DIM, encoder_version=ENCODER, create=True)
    load_vector_table_into(table, os.path.join(world, "vectors", "attributes.parquet"))
    return table
