import typing

import keras
import numpy as np
import tensorflow as tf


@typing.runtime_checkable
class SparseTables(typing.Protocol):
    """A layer with tables that the trainer's sparse optimizer updates row by row (`SparseEmbedding`, or a
    user's own layer that implements these two methods); the trainer finds them by this protocol, not by type.
    """

    def sparse_tables(self):
        """The variables updated by row (every shard of every table)."""

    def checkpoint_slices(self):
        """`(key, shards)` when one table is split into shards saved as one tensor under `key`, else None."""


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


ID_MAPPINGS = ("dense", "hash", "modulo")
UNSEEN_ROWS = ("zeros", "learned")

_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def mix64(ids):
    """splitmix64's output function of int64 ids, as `uint64`: a bijection of 64-bit values whose every output
    bit depends on every input bit, so sequential or strided ids spread like random ones (Steele, Lea & Flood,
    "Fast splittable pseudorandom number generators", OOPSLA 2014). Stock ops: wrapping `uint64` multiply and
    logical shifts, no strings.
    """
    def xorshift(z, bits):
        return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(bits, tf.uint64)))

    z = tf.bitcast(tf.cast(ids, tf.int64), tf.uint64) + tf.constant(_GAMMA, tf.uint64)
    z = xorshift(z, 30) * tf.constant(_MIX_1, tf.uint64)
    z = xorshift(z, 27) * tf.constant(_MIX_2, tf.uint64)
    return xorshift(z, 31)



class ShardedRows:
    """What the table layers (`SparseEmbedding`, `DynamicEmbedding`) share: rows in `shards` (variables of
    contiguous row ranges, `num_shards` of them), `SparseTables` for the sparse optimizers and checkpoints, and the
    padding mask and output shape of an embedding lookup (`padding_id`, `output_dim`)."""

    @property
    def tables(self):
        """The table's variables: one, or the `num_shards` shards in row order."""
        return list(self.shards)

    def sparse_tables(self):
        """`SparseTables`: the table's variables, updated by row by the sparse optimizer."""
        return self.tables

    def checkpoint_slices(self):
        """`SparseTables`: a sharded table is saved under the key of the unsharded one (`emb_item.embeddings`)."""
        if self.num_shards <= 1:
            return None
        return self.shards[0].path.rsplit("_part_", 1)[0].replace("/", "."), list(self.shards)

    def compute_mask(self, ids, mask=None):
        if self.padding_id is None:
            return None
        return keras.ops.not_equal(keras.ops.cast(ids, "int64"), self.padding_id)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def compute_output_spec(self, ids, training=False, force_default=None, return_admitted=False):
        out = keras.KerasTensor(self.compute_output_shape(ids.shape), dtype=self.compute_dtype)
        return (out, keras.KerasTensor(ids.shape, dtype="bool")) if return_admitted else out


def read_rows(layer, ids, flat, rows, read, force_default=None, return_admitted=False):
    """The embeddings of `ids` (any shape; `flat` = them as `[n]`) for a table layer (`SparseEmbedding`,
    `DynamicEmbedding`): position i reads row `rows[i]` of `layer.shards` where `read[i]`, else the default row
    (zeros, or `layer.unseen_embedding` for ids other than padding). Only the rows read are gathered, from the
    variables themselves, so the gradient is an `IndexedSlices` of those rows: other ids' rows and padding get no
    entry at all. Returns `ids.shape + [E]` in the layer's compute dtype.

    `force_default` (bool, `ids.shape`): positions that read the default row in this call whatever their row
    (`mm_ads.layers.ColdItems`' new-item training). With `return_admitted`, returns `(embeddings, admitted)`,
    `admitted` (bool, `ids.shape`) saying which positions read their own row."""
    if force_default is not None:
        read = tf.logical_and(read, tf.logical_not(tf.reshape(tf.cast(force_default, tf.bool), [-1])))
    positions = tf.where(read)  # [M, 1]
    tables = [v.value for v in layer.shards]  # the tf.Variables: the gather reads only the rows
    found = tf.nn.embedding_lookup(tables if len(tables) > 1 else tables[0],
                                   tf.gather_nd(rows, positions))  # [M, E], float32
    out = tf.scatter_nd(positions, found, [tf.size(flat, tf.int64), layer.output_dim])  # [n, E]
    if layer.unseen_embedding is not None:
        unseen = tf.logical_and(tf.logical_not(read), tf.not_equal(flat, layer.padding_id)
                                if layer.padding_id is not None else tf.ones_like(read))  # [n]
        out += tf.cast(unseen, out.dtype)[:, None] * layer.unseen_embedding.value[None, :]
    out = tf.reshape(out, tf.concat([tf.shape(ids), [layer.output_dim]], 0))  # ids.shape + [E]
    out = tf.ensure_shape(out, ids.shape.concatenate([layer.output_dim]))
    out = tf.cast(out, layer.compute_dtype)
    if return_admitted:
        return out, tf.ensure_shape(tf.reshape(read, tf.shape(ids)), ids.shape)
    return out

@keras.saving.register_keras_serializable(package="mm_ads")
class SparseEmbedding(ShardedRows, keras.layers.Layer):
    """A large embedding table looked up by int64 ids, with sparse gradients and a default row for unseen ids.

    **Ids to rows** (`id_mapping`), integer arithmetic only (no string hashing):
      * `"dense"`: ids are row numbers. An id in `[0, num_buckets)` reads its own row; an id outside the table
        has no row and reads the default row (below). The prepared datasets (synthetic world, MovieLens) number
        their ids `1..N` with tables of `N + 1` rows: every id keeps its own row.
      * `"hash"`: raw ids of any value (e.g. Taobao's signed 64-bit hashed ids) go to row
        `mix64(id) mod num_buckets`. The mixing hash (splitmix64's output function) spreads sequential or
        strided ids like a random function does, where a bare `id mod num_buckets` would pile ids `k·stride`
        into a few rows. Distinct ids may still share a row (a fixed-size table holds no id dictionary).
      * `"modulo"`: `floormod(id, num_buckets)`, every id has a row. The mapping of models configured before
        `id_mapping` existed, kept so that their checkpoints restore and serve unchanged; new models should use
        "dense" or "hash" (a modulo maps strided ids into few rows, and `k·num_buckets` onto padding's row).

    **Unseen and rare ids** (`admit_after = k`): with `k ≥ 1` the layer keeps an exact per-row count of the
    ids looked up in training (`counts`, an int64 `[num_buckets]` weight; padding is not counted), and a row is
    *admitted* once its count reaches `k`. A call with `training=True` first adds the batch's ids to the
    counts (duplicates within the batch count once each; under `tf.distribute` the counts of all replicas are
    summed, the variable's aggregation is "sum"), then reads: an admitted row reads itself, any other id reads
    the default row. Calls with `training=False` (evaluation, serving) only read. So an id never seen in
    training reads the default row, never its row's random initial value. `k = 1` admits every id in the step
    it first trains (a training id always reads and trains its own row); `k = 0` keeps no counts (every id
    with a row reads it). The counts are a non-trainable weight: checkpointed with the model and exported in
    its SavedModel, so serving sees the admitted set of training.

    The default row (`unseen_row`) is `"zeros"` or `"learned"`: one trainable `[E]` vector
    (`unseen_embedding`, initialised to zeros, a dense variable for the dense optimizer) shared by every id
    without an admitted row: the model learns what "a rare id" means. Rows of ids that are not admitted are
    not gathered, so their gradient is empty (not a zero row): the optimizers never touch them and their
    slots, whichever sparse optimizer is used.

    Positions whose id equals `padding_id` are masked by value: their output is zero (not the default row),
    they are not counted, they get no gradient, and for sequence inputs `compute_mask` returns
    `ids != padding_id`. An id that merely lands on the padding id's row (e.g. `k·num_buckets` under a
    modulo) is not padding.

    Rows are gathered straight from the variable (`tf.nn.embedding_lookup`), so the gradient is a
    `tf.IndexedSlices` touching only the rows read; pair the table with `mm_ads.training.SparseAdam` (or
    `SparseAdagrad`, `SparseSGD`) so that the update touches only those rows too. One layer instance can
    serve several features (target item and history items share the item table): call it on each.

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
    (`mm_ads.training.checkpoint.model_checkpoint`), so a table trained with 4 shards restores into 1 or 3.
    Range partitioning keeps that property (a shard is a slice); its cost is that dense ids whose
    popularity follows the id order put the hot rows on the first shard. Hashed ids spread evenly. The
    counts stay one variable.

    Args:
        num_buckets: number of rows of the table.
        output_dim: embedding dimension E.
        padding_id: the id that marks an empty slot; `None` disables masking.
        num_shards: row partitions of the table (1 = one variable `embeddings`).
        embeddings_initializer: initializer of the table (float32 variable).
        embeddings_regularizer: optional regularizer (note: a regularizer reads the whole
            table every step; prefer none for tables of millions of rows).
        id_mapping: `"dense"` (ids are rows; ids outside the table read the default row), `"hash"`
            (`mix64(id) mod num_buckets`) or `"modulo"` (`id mod num_buckets`, for models configured before
            the option existed).
        admit_after: k, the training lookups after which a row is admitted; 0 = no counting (every row is).
        unseen_row: the default row of ids without an admitted row: `"zeros"` or `"learned"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        ids: int tensor of any shape, e.g. `[B]` or `[B, S]`.
        training: whether the call trains (counts the ids when `admit_after > 0`).
        force_default: optional bool tensor of `ids.shape`: positions that read the default row in this call
            (no gradient reaches their rows); `mm_ads.layers.ColdItems` draws them for new-item training.
        return_admitted: also return which positions read their own row (bool, `ids.shape`): false for ids
            without an admitted row (new ones at serving time), padding and `force_default` positions.

    Returns:
        Embeddings of shape `ids.shape + [E]` in the layer's compute dtype; with `return_admitted`, the tuple
        `(embeddings, admitted)`.

    Example:

    >>> table = SparseEmbedding(num_buckets=1000, output_dim=8, id_mapping="hash", admit_after=2)
    >>> table(tf.constant([[3, -7, 0]], tf.int64)).shape
    TensorShape([1, 3, 8])

    References:
        - Zhou et al., Deep Interest Network for Click-Through Rate Prediction, KDD 2018.
        - Steele, Lea & Flood, Fast Splittable Pseudorandom Number Generators, OOPSLA 2014 (splitmix64).
    """

    def __init__(
        self,
        num_buckets,
        output_dim,
        padding_id=0,
        embeddings_initializer="truncated_normal",
        embeddings_regularizer=None,
        num_shards=1,
        id_mapping="dense",
        admit_after=0,
        unseen_row="zeros",
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
        if id_mapping not in ID_MAPPINGS:
            raise ValueError(f"id_mapping must be one of {ID_MAPPINGS}, got {id_mapping!r}")
        if not isinstance(admit_after, int) or isinstance(admit_after, bool) or admit_after < 0:
            raise ValueError(f"admit_after must be an int >= 0, got {admit_after!r}")
        if unseen_row not in UNSEEN_ROWS:
            raise ValueError(f"unseen_row must be one of {UNSEEN_ROWS}, got {unseen_row!r}")
        self.num_buckets = num_buckets
        self.num_shards = num_shards
        self.output_dim = output_dim
        self.padding_id = padding_id
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.id_mapping = id_mapping
        self.admit_after = admit_after
        self.unseen_row = unseen_row
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
        self.counts = None
        if self.admit_after:
            # summed over replicas: every replica adds its own ids, each copy ends with the global count
            self.counts = self.add_weight(name="counts", shape=(self.num_buckets,), initializer="zeros",
                                          dtype="int64", trainable=False, aggregation="sum")
        self.unseen_embedding = None
        if self.unseen_row == "learned":
            self.unseen_embedding = self.add_weight(name="unseen_embedding", shape=(self.output_dim,),
                                                    initializer="zeros", dtype="float32")
        self.built = True

    def bucketize(self, ids):
        """Ids → `(rows, has_row)`: row indices in `[0, num_buckets)` and whether the id has a row at all
        (padding has none; under "dense" neither has an id outside the table, whose row is then 0)."""
        ids = tf.cast(ids, tf.int64)
        n = tf.constant(self.num_buckets, tf.int64)
        if self.id_mapping == "hash":
            rows = tf.cast(tf.math.floormod(mix64(ids), tf.cast(n, tf.uint64)), tf.int64)
            has_row = tf.ones_like(ids, tf.bool)
        elif self.id_mapping == "modulo":
            rows = tf.math.floormod(ids, n)
            has_row = tf.ones_like(ids, tf.bool)
        else:
            has_row = tf.logical_and(ids >= 0, ids < n)
            rows = tf.where(has_row, ids, tf.zeros_like(ids))
        if self.padding_id is not None:
            has_row = tf.logical_and(has_row, tf.not_equal(ids, self.padding_id))
        return rows, has_row

    def admitted(self, ids):
        """Whether each id reads its own row (bool, `ids.shape`): it has a row and that row is admitted."""
        rows, has_row = self.bucketize(ids)
        if self.counts is None:
            return has_row
        return tf.logical_and(has_row, tf.gather(self.counts.value, rows) >= self.admit_after)

    def _count(self, rows, has_row):
        """Adds the looked-up rows (padding and ids without a row excluded) to `counts`, once per occurrence."""
        counted = tf.boolean_mask(rows, has_row)  # [M]
        # a scatter-add sums duplicate indices itself: no tf.unique on the training step's path
        self.counts.value.scatter_add(tf.IndexedSlices(tf.ones_like(counted), counted))

    def call(self, ids, training=False, force_default=None, return_admitted=False):
        ids = tf.cast(ids, tf.int64)
        flat = tf.reshape(ids, [-1])  # [n]
        rows, has_row = self.bucketize(flat)
        read = has_row
        if self.counts is not None:
            if training:
                self._count(rows, has_row)
            # after the update (ordered on the variable): an id admitted by this very batch reads its own row;
            # in training with k = 1 that is every id just counted, so the counts need not be read back
            if not (training and self.admit_after == 1):
                read = tf.logical_and(has_row, tf.gather(self.counts.value, rows) >= self.admit_after)
        return read_rows(self, ids, flat, rows, read, force_default, return_admitted)

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
                "id_mapping": self.id_mapping,
                "admit_after": self.admit_after,
                "unseen_row": self.unseen_row,
            }
        )
        return config
