import keras
import numpy as np
import tensorflow as tf


def partition_sizes(num_buckets, num_shards):
    """Rows of each shard under the "div" (contiguous range) partitioning of `num_buckets` rows.

    Shard `i` holds rows `[start_i, start_i + size_i)`; the first `num_buckets % num_shards` shards hold one
    row more than the others (TensorFlow's `tf.nn.embedding_lookup` rule for a list of tables).
    """
    if num_shards < 1 or num_shards > num_buckets:
        raise ValueError(f"num_shards must be in [1, num_buckets={num_buckets}], got {num_shards}")
    q, r = divmod(num_buckets, num_shards)
    return [q + 1 if i < r else q for i in range(num_shards)]


def shard_of(rows, num_buckets, num_shards):
    """`(shard, row within the shard)` of row indices (numpy int arrays) under `partition_sizes`."""
    q, r = divmod(num_buckets, num_shards)
    big = r * (q + 1)  # rows held by the larger shards
    rows = np.asarray(rows, np.int64)
    low = rows < big
    shard = np.where(low, rows // (q + 1), r + (rows - big) // q)
    local = np.where(low, rows % (q + 1), (rows - big) % q)
    return shard, local


@keras.saving.register_keras_serializable(package="mm_ads")
class SparseEmbedding(keras.layers.Layer):
    """A large embedding table looked up by raw int64 ids, with sparse gradients.

    Raw ids of any value (e.g. Taobao's signed 64-bit hashed ids) are bucketed with integer
    arithmetic, `bucket = floormod(id, num_buckets)` — no string hashing — so dense ids in
    `[0, num_buckets)` map to themselves and any other id lands in a valid row (hash
    collisions are the documented fallback for out-of-range ids). Rows are gathered straight
    from the variable (`tf.nn.embedding_lookup`), so the gradient is a `tf.IndexedSlices`
    touching only the looked-up rows; pair the table with `mm_ads.training.SparseAdam`
    (or `SparseAdagrad`, `SparseSGD`) so that the update touches only those rows too.

    Positions whose id equals `padding_id` are masked: their output is zero, they get no
    gradient, and for sequence inputs `compute_mask` returns `ids != padding_id`.

    One layer instance can serve several features (target item and history items share the
    item table): call it on each.

    **Sharded tables** (`num_shards > 1`): the table is `num_shards` variables (`embeddings_part_<i>`) that
    split the rows into contiguous ranges (`partition_sizes`: "div" partitioning, TensorFlow's rule for
    `tf.nn.embedding_lookup` on a list). A lookup routes every row to its shard, gathers there (the gather
    is colocated with the shard's variable, so under `ParameterServerStrategy` only the looked-up rows
    travel from the ps task that holds it) and stitches the results back in id order; the gradient is one
    `IndexedSlices` per shard, so the sparse optimizers update (and keep their slots next to) each shard
    where it lives. Under `ParameterServerStrategy` the shards are created one after another and so land
    on consecutive ps tasks (round-robin): with `num_shards` a multiple of the ps count, every ps holds the
    same number of rows. This replaces `tf.distribute`'s own partitioner, whose `ShardedVariable` Keras 3
    cannot use as a layer weight (it has no `.handle`). Checkpoints do not depend on `num_shards`: the
    trainer saves the shards as slices of one logical `[num_buckets, output_dim]` tensor
    (`mm_ads.training.trainer.model_checkpoint`), so a table trained with 4 shards restores into 1 or 3.
    Range partitioning keeps that property (a shard is a slice); its cost is that dense ids whose
    popularity follows the id order put the hot rows on the first shard. Raw hashed ids (e.g. Taobao's)
    spread evenly.

    Args:
        num_buckets: number of rows of the table.
        output_dim: embedding dimension E.
        padding_id: the id that marks an empty slot; `None` disables masking.
        num_shards: row partitions of the table (1 = one variable `embeddings`).
        embeddings_initializer: initializer of the table (float32 variable).
        embeddings_regularizer: optional regularizer (note: a regularizer reads the whole
            table every step; prefer none for tables of millions of rows).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        ids: int tensor of any shape, e.g. `[B]` or `[B, S]`.

    Returns:
        Embeddings of shape `ids.shape + [E]` in the layer's compute dtype.

    Example:

    >>> table = SparseEmbedding(num_buckets=1000, output_dim=8)
    >>> table(tf.constant([[3, -7, 0]], tf.int64)).shape
    TensorShape([1, 3, 8])

    References:
        - Zhou et al., Deep Interest Network for Click-Through Rate Prediction, KDD 2018.
    """

    def __init__(
        self,
        num_buckets,
        output_dim,
        padding_id=0,
        embeddings_initializer="truncated_normal",
        embeddings_regularizer=None,
        num_shards=1,
        **kwargs,
    ):
        # The table is never autocast: a cast would read all rows every step.
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        if not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
        if not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
        if padding_id is not None and not isinstance(padding_id, int):
            raise ValueError(f"padding_id must be an int or None, got {padding_id!r}")
        if not isinstance(num_shards, int) or not 1 <= num_shards <= num_buckets:
            raise ValueError(f"num_shards must be an int in [1, num_buckets={num_buckets}], got {num_shards!r}")
        self.num_buckets = num_buckets
        self.num_shards = num_shards
        self.output_dim = output_dim
        self.padding_id = padding_id
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.supports_masking = True

    def build(self, input_shape=None):
        if self.num_shards == 1:
            self.embeddings = self.add_weight(
                name="embeddings",
                shape=(self.num_buckets, self.output_dim),
                initializer=self.embeddings_initializer,
                regularizer=self.embeddings_regularizer,
                dtype="float32",
            )
            self.shards = [self.embeddings]
        else:
            if self.embeddings_regularizer is not None:
                raise ValueError("embeddings_regularizer is not supported with num_shards > 1")
            self.shards = [
                self.add_weight(name=f"embeddings_part_{i}", shape=(rows, self.output_dim),
                                initializer=self.embeddings_initializer, dtype="float32")
                for i, rows in enumerate(partition_sizes(self.num_buckets, self.num_shards))
            ]
            self.embeddings = None
        self.built = True

    @property
    def tables(self):
        """The table's variables: `[embeddings]`, or the `num_shards` shards in row order."""
        return list(self.shards)

    def bucketize(self, ids):
        """Raw ids → row indices in `[0, num_buckets)` (integer arithmetic only)."""
        ids = tf.cast(ids, tf.int64)
        return tf.math.floormod(ids, tf.constant(self.num_buckets, tf.int64))

    def call(self, ids):
        ids = tf.cast(ids, tf.int64)
        rows = self.bucketize(ids)
        # the tf.Variables themselves: the gather reads only the rows (from the shard that holds each)
        tables = [v.value for v in self.shards]
        out = tf.nn.embedding_lookup(tables if len(tables) > 1 else tables[0], rows)  # ids.shape + [E], float32
        if self.padding_id is not None:
            valid = tf.not_equal(ids, self.padding_id)
            out = out * tf.cast(valid, out.dtype)[..., None]
        return tf.cast(out, self.compute_dtype)

    def compute_mask(self, ids, mask=None):
        if self.padding_id is None:
            return None
        return keras.ops.not_equal(keras.ops.cast(ids, "int64"), self.padding_id)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.pop("autocast", None)
        config.update(
            {
                "num_buckets": self.num_buckets,
                "output_dim": self.output_dim,
                "padding_id": self.padding_id,
                "num_shards": self.num_shards,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            }
        )
        return config
