"""The trainer finds the tables its sparse optimizer updates by the `SparseTables` protocol, not by type."""

import keras
import numpy as np

from mm_ads.layers.sparse_embedding import SparseEmbedding, SparseTables
from mm_ads.training.checkpoint import model_checkpoint
from mm_ads.training.task import Task


class HashedBag(keras.layers.Layer):
    """A user's own layer with a row-updated table: the mean of the rows of a bag of ids."""

    def build(self, input_shape):
        self.table = self.add_weight(name="table", shape=(7, 3), initializer="ones")

    def call(self, ids):
        return keras.ops.mean(keras.ops.take(self.table, ids % 7, axis=0), axis=1)

    def sparse_tables(self):
        return [self.table]

    def checkpoint_slices(self):
        return None


def _model():
    ids = keras.Input((4,), dtype="int64", name="ids")
    item = keras.Input((), dtype="int64", name="item")
    emb = SparseEmbedding(11, 3, num_shards=2, name="emb_item")
    out = keras.ops.concatenate([HashedBag(name="bag")(ids), emb(item)], axis=-1)
    return keras.Model({"ids": ids, "item": item}, out), emb


def test_tables_are_found_by_protocol_and_shards_checkpoint_as_one_tensor():
    model, emb = _model()
    found = Task.sparse_variables(None, model)
    assert [v.path for v in found] == ["bag/table", *[s.path for s in emb.shards]]
    assert isinstance(emb, SparseTables) and not isinstance(keras.layers.Dense(2), SparseTables)
    key, shards = emb.checkpoint_slices()
    assert key == "emb_item.embeddings" and len(shards) == 2
    # the checkpoint holds the sharded table once, as the unsharded [11, 3] tensor
    ckpt = model_checkpoint(model)
    whole = getattr(ckpt, "emb_item.embeddings")
    assert tuple(whole.shape) == (11, 3)
    np.testing.assert_array_equal(getattr(ckpt, "bag.table").numpy(), np.ones((7, 3)))
