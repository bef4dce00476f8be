"""A collision-free embedding table: a hash map from ids to rows of a bounded row pool, with eviction."""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from mm_ads.layers.sparse_embedding import UNSEEN_ROWS, ShardedRows, mix64, partition_sizes, read_rows

# The two keys `tf.lookup.experimental.DenseHashTable` reserves for its empty and deleted buckets: the two
# smallest int64 values. The map's keys are `map_keys(ids)` (a bijection), so the ids equal to these two values
# (`row_ids` marks free rows with EMPTY_KEY) and the two ids whose key is one of them are never admitted.
EMPTY_KEY = np.iinfo(np.int64).min
DELETED_KEY = EMPTY_KEY + 1
_NO_ROW = -1
_INT64_MAX = np.iinfo(np.int64).max
_SAMPLE = 1 << 16  # rows sampled to find the eviction threshold of a larger pool


class _Untracked:
    """A holder that keeps an object out of Keras/TF tracking (the optimizer must not become part of the layer)."""

    def __init__(self, value=None):
        self.value = value


_LOCK = []  # the admission lock of the dynamic tables with exclusive updates


def admission_lock(device=None):
    """The one `tf.CriticalSection` that every `DynamicEmbedding` with exclusive updates admits ids under,
    created on `device` (the first caller's; under ParameterServerStrategy a ps task) and shared by all the
    tables of the process: a step takes it once per table call, in turn, and never holds two locks. (One lock per
    table deadlocked the first step of a model with 7 dynamic tables under ParameterServerStrategy.)"""
    if not _LOCK:
        with tf.init_scope(), tf.device(device) if device else contextlib.nullcontext():
            _LOCK.append(tf.CriticalSection(name="dynamic_embedding_admission"))
    return _LOCK[0]


def _shard_rows(rows, num_rows, num_shards):
    """Graph version of `shard_of`: `(shard, row within the shard)` of int64 rows under `partition_sizes`."""
    q, r = divmod(num_rows, num_shards)
    big = r * (q + 1)
    low = rows < big
    shard = tf.where(low, rows // (q + 1), r + (rows - big) // max(q, 1))
    local = tf.where(low, rows % (q + 1), (rows - big) % max(q, 1))
    return tf.cast(shard, tf.int32), local


@keras.saving.register_keras_serializable(package="mm_ads")
class DynamicEmbedding(ShardedRows, keras.layers.Layer):
    """A collision-free id table: an id → row hash map over a bounded pool of `capacity` rows, with eviction.

    Every admitted id owns one row of the pool; two distinct ids never share a row (a fixed-size hashed table,
    `SparseEmbedding(id_mapping="hash")`, lets them collide). The map is a stock
    `tf.lookup.experimental.DenseHashTable` (int64 id → int64 row, `MutableDenseHashTableV2` and
    `LookupTableFindV2` ops, which TF Serving runs); the pool is an ordinary `[capacity, E]` float32 variable
    (or `num_shards` row ranges of it, as `SparseEmbedding`'s shards), so gathers give `tf.IndexedSlices`
    gradients and the sparse optimizers (`mm_ads.training.SparseAdam`, ...) update only the rows read.

    **Admission** (calls with `training=True`): the distinct ids of the call (padding excluded; duplicates
    within the call get one row) that have no row are admitted: each takes a free row, which is written with
    the id's initial vector (a normal truncated at 2 stddev, like the `TruncatedNormal(stddev=init_stddev)` rows
    of a fixed table, drawn from a hash of `(id, seed)`: the same id always starts from the same vector,
    whichever row it lands in) and whose optimizer slots are reset (see `use_optimizer`). So an id never
    inherits another id's trained values.

    **Eviction**: the layer keeps, per row, its id (`row_ids`), the training step it was last read in
    (`last_seen`) and how many training steps read it (`frequency`), plus a stack of free rows. A reclaim pass
    frees (a) every row not read for more than `evict_after_steps` steps (0 = never stale) and (b) when the
    free rows still cannot hold the call's new ids, the lowest-frequency rows (ties: the least recently read),
    at least 1% of the pool at once so that passes stay rare (found through a threshold read off a sample of
    65,536 rows: exact for smaller pools, about the wanted number above). Rows read in the current step are never
    evicted. The pass runs every `evict_after_steps` steps and whenever the free rows run out; it scans the
    pool (O(capacity)), the other steps do O(batch) work. So an id not read for `T = evict_after_steps` steps
    loses its row within the next T steps (or sooner, when the pool is full). If a call has more new ids than
    the pool can free, the ones left over read the default row in that call and are admitted by a later one.

    The step clock advances once every `calls_per_step` training calls: a table read by k features of a model
    (the item table: target item and behaviour history) is called k times per optimizer step.

    **Reading**: an id with a row reads it; any other id (never trained, or evicted), in training or not,
    reads the default row (`unseen_row`: `"zeros"`, or `"learned"`: one trainable `[E]` vector shared by
    those ids). Calls with `training=False` (evaluation, serving) only read. Padding positions output zeros
    and are masked, as in `SparseEmbedding`. The map is keyed by `map_keys(id)` (splitmix64, a bijection:
    TensorFlow's dense hash map places int64 keys by their low bits, so sequential ids would cluster). Four ids
    are reserved and read the default row, never admitted: the two most negative int64 values (`EMPTY_KEY`,
    `DELETED_KEY`) and the two ids whose key is one of them.

    **State**: the hash map is checkpointed by `mm_ads.training.checkpoint.model_checkpoint` (it is a
    `tf.train.Checkpoint` trackable, listed by `lookup_tables()`), and exported in the SavedModel with its
    contents, so TF Serving reads the id → row map of training. The per-row bookkeeping variables are
    non-trainable weights, checkpointed with the model.

    **Distribution**: the map is one resource that each training call mutates, so synchronous replicas would race
    on it in lock-step: the layer refuses to be built under a strategy with more than one replica (a `ValueError`
    at build). Under `ParameterServerStrategy` the map, the bookkeeping variables (colocated with `row_ids`) and
    the admission ops of a training call live on one ps task; the pool shards are placed round-robin like
    `SparseEmbedding`'s. Every worker admits into that one map, and with `exclusive_updates` (default `None`: on
    under `ParameterServerStrategy`, off otherwise) each training call's admission — look up, pop free rows,
    insert, update the bookkeeping, write the new rows and reset their slots — runs under one
    `tf.CriticalSection` (`admission_lock`, shared by the tables of the process), so two concurrent calls never
    hand one row to two ids. `num_shards > 1` splits the pool into row ranges as `SparseEmbedding` does (same
    checkpoint key and slices, restorable into any number of shards).

    Args:
        capacity: rows of the pool: at most this many ids hold a row at once.
        output_dim: embedding dimension E.
        padding_id: the id that marks an empty slot; `None` disables masking.
        num_shards: row partitions of the pool (1 = one variable `embeddings`).
        evict_after_steps: T, the steps without a read after which a row is stale; 0 = only the
            lowest-frequency rows are evicted, when the pool is full.
        calls_per_step: training calls of the layer per optimizer step (the clock's period).
        unseen_row: the default row of ids without a row: `"zeros"` or `"learned"`.
        init_stddev: admitted rows start from a normal of this stddev truncated at 2 stddev.
        seed: int mixed into the initial vectors' hash.
        exclusive_updates: run each training call's admission under `admission_lock()` (concurrent training
            calls, e.g. the workers of a `ParameterServerStrategy`); `None` = only under that strategy.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        ids: int tensor of any shape, e.g. `[B]` or `[B, S]`.
        training: whether the call trains (admits new ids, advances the clock, may evict).
        force_default: optional bool tensor of `ids.shape`: positions that read the default row in this call
            (no gradient reaches their rows); `mm_ads.layers.ColdItems` draws them for new-item training.
        return_admitted: also return which positions read their own row (bool, `ids.shape`): false for ids
            without an admitted row (new ones at serving time), padding and `force_default` positions.

    Returns:
        Embeddings of shape `ids.shape + [E]` in the layer's compute dtype; with `return_admitted`, the tuple
        `(embeddings, admitted)`.

    Example:

    >>> table = DynamicEmbedding(capacity=1000, output_dim=8, evict_after_steps=100)
    >>> table(tf.constant([[3, -7, 0]], tf.int64), training=True).shape
    TensorShape([1, 3, 8])
    """

    def __init__(
        self,
        capacity,
        output_dim,
        padding_id=0,
        num_shards=1,
        evict_after_steps=0,
        calls_per_step=1,
        unseen_row="zeros",
        init_stddev=0.05,
        seed=0,
        exclusive_updates=None,
        **kwargs,
    ):
        kwargs["autocast"] = False  # a cast would read all rows every step
        super().__init__(**kwargs)
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
        if padding_id is not None and not isinstance(padding_id, int):
            raise ValueError(f"padding_id must be an int or None, got {padding_id!r}")
        if not isinstance(num_shards, int) or not 1 <= num_shards <= capacity:
            raise ValueError(f"num_shards must be an int in [1, capacity={capacity}], got {num_shards!r}")
        if not isinstance(evict_after_steps, int) or evict_after_steps < 0:
            raise ValueError(f"evict_after_steps must be an int >= 0, got {evict_after_steps!r}")
        if not isinstance(calls_per_step, int) or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an int >= 1, got {calls_per_step!r}")
        if unseen_row not in UNSEEN_ROWS:
            raise ValueError(f"unseen_row must be one of {UNSEEN_ROWS}, got {unseen_row!r}")
        if not init_stddev >= 0:
            raise ValueError(f"init_stddev must be >= 0, got {init_stddev!r}")
        self.capacity = capacity
        self.output_dim = output_dim
        self.padding_id = padding_id
        self.num_shards = num_shards
        self.evict_after_steps = evict_after_steps
        self.calls_per_step = calls_per_step
        self.unseen_row = unseen_row
        self.init_stddev = float(init_stddev)
        self.seed = int(seed)
        if exclusive_updates not in (None, True, False):
            raise ValueError(f"exclusive_updates must be None, True or False, got {exclusive_updates!r}")
        self.exclusive_updates = exclusive_updates
        self.supports_masking = True
        self._optimizer = _Untracked()
        self._home = None

    def build(self, input_shape=None):
        strategy = tf.distribute.get_strategy()
        parameter_server = isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)
        if not parameter_server and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                f"DynamicEmbedding {self.name!r} cannot be built under {type(strategy).__name__} with "
                f"{strategy.num_replicas_in_sync} replicas: its id → row map is one resource mutated by every "
                "training call, which replicas in lock-step would race on. Train it with one replica (the default "
                "strategy) or with ParameterServerStrategy, and use num_shards to split the pool into row ranges")
        if self.num_shards == 1:
            self.embeddings = self.add_weight(name="embeddings", shape=(self.capacity, self.output_dim),
                                              initializer="zeros", dtype="float32")
            self.shards = [self.embeddings]
        else:
            self.shards = [self.add_weight(name=f"embeddings_part_{i}", shape=(rows, self.output_dim),
                                           initializer="zeros", dtype="float32")
                           for i, rows in enumerate(partition_sizes(self.capacity, self.num_shards))]
            self.embeddings = None

        def state(name, initializer, shape=(self.capacity,)):
            return self.add_weight(name=name, shape=shape, initializer=initializer, dtype="int64", trainable=False)

        c = self.capacity
        self.row_ids = state("row_ids", lambda shape, dtype=None: tf.fill(shape, tf.constant(EMPTY_KEY, tf.int64)))
        # under ParameterServerStrategy the bookkeeping, the map and its lock live on row_ids' ps task (the
        # strategy places variables round-robin; the others are colocated with row_ids)
        home = self.row_ids.value.device if parameter_server else None
        self._home = home
        with strategy.extended.colocate_vars_with(self.row_ids.value) if parameter_server \
                else contextlib.nullcontext():
            self.last_seen = state("last_seen", "zeros")
            self.frequency = state("frequency", "zeros")
            # free rows as a stack: free_rows[:num_free], popped from the end; initially rows 0, 1, 2, ... in order
            self.free_rows = state("free_rows", lambda shape, dtype=None: tf.range(c - 1, -1, -1, dtype=tf.int64))
            self.num_free = state("num_free", lambda shape, dtype=None: tf.constant(c, tf.int64), shape=())
            self.calls = state("calls", "zeros", shape=())
        self.unseen_embedding = None
        if self.unseen_row == "learned":
            self.unseen_embedding = self.add_weight(name="unseen_embedding", shape=(self.output_dim,),
                                                    initializer="zeros", dtype="float32")
        exclusive = parameter_server if self.exclusive_updates is None else self.exclusive_updates
        with tf.init_scope():  # resources of the layer, not of whichever graph first builds it
            with tf.device(home) if home else contextlib.nullcontext():
                self.id_to_row = tf.lookup.experimental.DenseHashTable(
                    key_dtype=tf.int64, value_dtype=tf.int64, default_value=_NO_ROW, empty_key=EMPTY_KEY,
                    deleted_key=DELETED_KEY, name=f"{self.name}_id_to_row")
                self._admission_lock = _Untracked(admission_lock(home) if exclusive else None)
        self.built = True

    # ---- SparseTables protocol, optimizer and checkpoint hooks --------------------------------------------------

    def lookup_tables(self):
        """`{checkpoint key: table}`: the id → row map, which `model_checkpoint` saves next to the variables."""
        return {f"{self.name}.id_to_row": self.id_to_row}

    def use_optimizer(self, optimizer):
        """Resets the slots of `optimizer` (a built `mm_ads.training` sparse optimizer of this pool) for every row
        that a later training call hands to a new id. Without it a new id would start from the slots (Adam's
        moments, Adagrad's accumulator) of the row's previous id. Call it before tracing the training step."""
        if optimizer is not None and not hasattr(optimizer, "reset_rows"):
            raise ValueError(f"{type(optimizer).__name__} cannot reset the slots of recycled rows (no reset_rows): "
                             "use a mm_ads.training sparse optimizer")
        self._optimizer.value = optimizer

    def load_own_variables(self, store):
        """`.keras` loading: the variables, then the id → row map rebuilt from `row_ids` (the `.keras` format
        stores variables only; `tf.train.Checkpoint` and the SavedModel store the map itself)."""
        super().load_own_variables(store)
        self.rebuild_map()

    def rebuild_map(self):
        """Replaces the map's contents by the ids that `row_ids` says hold a row."""
        row_ids = self.row_ids.value
        rows = tf.reshape(tf.where(tf.not_equal(row_ids, EMPTY_KEY)), [-1])
        keys, _ = self.id_to_row.export()
        self.id_to_row.erase(tf.boolean_mask(keys, tf.logical_and(tf.not_equal(keys, EMPTY_KEY),
                                                                   tf.not_equal(keys, DELETED_KEY))))
        self.id_to_row.insert(self.map_keys(tf.gather(row_ids, rows)), rows)

    # ---- ids, rows, state --------------------------------------------------------------------------------------

    @staticmethod
    def map_keys(ids):
        """The hash map's key of each id: `mix64(id)` as int64, a bijection. TensorFlow's dense hash map places an
        int64 key by its low bits (identity hash), so raw sequential ids would fill contiguous runs of buckets and
        make probe chains thousands long; mixed keys spread like random ones."""
        return tf.bitcast(mix64(ids), tf.int64)

    def _valid(self, ids):
        keys = self.map_keys(ids)
        valid = tf.logical_and(tf.not_equal(ids, EMPTY_KEY), tf.not_equal(ids, DELETED_KEY))
        valid = tf.logical_and(valid, tf.logical_and(tf.not_equal(keys, EMPTY_KEY), tf.not_equal(keys, DELETED_KEY)))
        if self.padding_id is not None:
            valid = tf.logical_and(valid, tf.not_equal(ids, self.padding_id))
        return valid

    def rows_of(self, ids):
        """The row of each id (int64, `ids.shape`), -1 for ids without one (padding and reserved keys included)."""
        ids = tf.cast(ids, tf.int64)
        valid = self._valid(ids)
        safe = tf.where(valid, ids, tf.zeros_like(ids))  # any key but the reserved ones; masked below
        rows = tf.ensure_shape(self.id_to_row.lookup(self.map_keys(safe)), ids.shape)
        return tf.where(valid, rows, tf.fill(tf.shape(rows), tf.constant(_NO_ROW, tf.int64)))

    def size(self):
        """How many ids hold a row (int64 scalar)."""
        return self.id_to_row.size()

    def initial_vectors(self, ids):
        """The vector an admitted id starts from: `[n, E]` float32, a function of `(id, seed)` only: splitmix64 of
        the id and of each column gives a uniform in (0, 1), mapped through the inverse normal CDF restricted to
        ±2 stddev (`erfinv`): a normal of stddev `init_stddev` truncated at 2 stddev, as Keras's
        `TruncatedNormal`."""
        key = tf.bitcast(mix64(tf.bitwise.bitwise_xor(tf.cast(ids, tf.int64), tf.constant(self.seed, tf.int64))),
                         tf.int64)  # [n]
        columns = tf.range(self.output_dim, dtype=tf.int64) * tf.constant(0x632BE59BD9B4E019, tf.int64)  # [E]
        bits = mix64(key[:, None] + columns[None, :])  # [n, E] uint64
        unit = (tf.cast(tf.bitwise.right_shift(bits, tf.constant(11, tf.uint64)), tf.float64) + 0.5) / float(1 << 53)
        low = 0.5 * math.erfc(math.sqrt(2.0))  # Φ(-2)
        p = low + unit * (1.0 - 2.0 * low)  # uniform on (Φ(-2), Φ(2))
        normal = math.sqrt(2.0) * tf.math.erfinv(2.0 * p - 1.0)  # [n, E] in (-2, 2)
        return tf.cast(normal * self.init_stddev, tf.float32)

    def _scatter_pool(self, rows, values):
        if self.num_shards == 1:
            self.embeddings.value.scatter_update(tf.IndexedSlices(values, rows))
            return
        shard, local = _shard_rows(rows, self.capacity, self.num_shards)
        locals_ = tf.dynamic_partition(local, shard, self.num_shards)
        parts = tf.dynamic_partition(values, shard, self.num_shards)
        for variable, r, v in zip(self.shards, locals_, parts):
            variable.value.scatter_update(tf.IndexedSlices(v, r))

    def _reset_slots(self, rows):
        optimizer = self._optimizer.value
        if optimizer is None or not optimizer.built:
            return
        if self.num_shards == 1:
            optimizer.reset_rows(self.embeddings, rows)
            return
        shard, local = _shard_rows(rows, self.capacity, self.num_shards)
        for variable, r in zip(self.shards, tf.dynamic_partition(local, shard, self.num_shards)):
            optimizer.reset_rows(variable, r)

    def _lowest(self, key, want, num_candidates):
        """Rows of the `want` smallest keys (candidates have keys below int64 max), without sorting the pool.

        A threshold is read off the sorted keys of a sample of `_SAMPLE` rows (every row when the pool has no
        more, then the selection is exact: the `want` smallest keys, ties to the lower row); rows below it are
        taken, and rows equal to it in row order until `want`. With a sample the threshold is the sample's
        quantile `want / num_candidates` (plus 1%), so about `want` rows are taken (more when more rows fall
        below the estimated threshold), the least frequent ones (an exact top-k when fewer than 64 sampled rows
        are candidates).
        """
        c = self.capacity
        if c <= _SAMPLE:
            threshold_index = want - 1
            sample = key
            size = c
        else:
            sample = tf.gather(key, tf.range(_SAMPLE, dtype=tf.int64) * (c // _SAMPLE))  # strided rows
            size = _SAMPLE
            in_sample = tf.reduce_sum(tf.cast(sample < _INT64_MAX, tf.int64))
            fraction = tf.cast(want, tf.float64) / tf.cast(tf.maximum(num_candidates, 1), tf.float64) + 0.01
            threshold_index = tf.minimum(tf.cast(tf.math.ceil(fraction * tf.cast(in_sample, tf.float64)), tf.int64),
                                         in_sample) - 1
        sorted_sample = tf.sort(sample)
        threshold = tf.gather(sorted_sample, tf.clip_by_value(threshold_index, 0, size - 1))
        below = key < threshold
        tie = tf.equal(key, threshold)  # filled up to `want` in row order
        take_ties = want - tf.reduce_sum(tf.cast(below, tf.int64))
        below = tf.logical_or(below, tf.logical_and(tie, tf.cumsum(tf.cast(tie, tf.int64)) <= take_ties))
        below = tf.logical_and(below, key < _INT64_MAX)
        rows = tf.reshape(tf.where(tf.logical_and(below, want > 0)), [-1])
        if c <= _SAMPLE:
            return rows
        # too few candidates in the sample to estimate a threshold: an exact top-k (rare, e.g. a pool almost all
        # read in this step)
        return tf.cond(in_sample >= 64, lambda: rows,
                       lambda: tf.cast(tf.math.top_k(-key, k=tf.cast(want, tf.int32), sorted=False).indices, tf.int64))

    def _reclaim(self, step, needed):
        """Frees the stale rows, then (if the free rows are still fewer than `needed`) the lowest-frequency ones."""
        c = self.capacity
        row_ids = self.row_ids.value
        last_seen = self.last_seen.value
        occupied = tf.not_equal(row_ids, EMPTY_KEY)  # [C]
        if self.evict_after_steps:
            stale = tf.logical_and(occupied, last_seen < step - self.evict_after_steps)
        else:
            stale = tf.zeros_like(occupied)
        short = needed - self.num_free.value - tf.reduce_sum(tf.cast(stale, tf.int64))
        # candidates: occupied, not stale, not read in this step; key: frequency, then last read
        candidate = tf.logical_and(tf.logical_and(occupied, tf.logical_not(stale)), last_seen < step)
        key = tf.where(candidate, self.frequency.value * (step + 2) + last_seen, tf.constant(_INT64_MAX, tf.int64))
        num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int64))
        want = tf.minimum(tf.maximum(short, (c + 99) // 100) * tf.cast(short > 0, tf.int64), num_candidates)
        lowest = self._lowest(key, want, num_candidates)  # [~want] rows
        evicted = tf.concat([tf.reshape(tf.where(stale), [-1]), lowest], 0)  # [V]
        self.id_to_row.erase(self.map_keys(tf.gather(row_ids, evicted)))
        self.row_ids.value.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(evicted), EMPTY_KEY), evicted))
        self.frequency.value.scatter_update(tf.IndexedSlices(tf.zeros_like(evicted), evicted))
        n = self.num_free.value
        self.free_rows.value.scatter_update(
            tf.IndexedSlices(evicted, n + tf.range(tf.size(evicted, tf.int64), dtype=tf.int64)))
        self.num_free.assign_add(tf.size(evicted, tf.int64))
        return tf.constant(True)

    def _admit(self, ids, valid):
        """Training: refreshes the rows of known ids, admits the new ones (evicting when needed); returns the row
        of every id (-1 for invalid ids and for new ids the pool had no room for)."""
        calls = self.calls.value
        step = calls // self.calls_per_step
        first_call = tf.equal(calls % self.calls_per_step, 0)
        self.calls.assign_add(1)
        unique, position = tf.unique(tf.where(valid, ids, tf.constant(EMPTY_KEY, tf.int64)))  # [U], [n]
        real = tf.not_equal(unique, EMPTY_KEY)  # the map must not be asked for its empty key
        keys = self.map_keys(tf.where(real, unique, tf.zeros_like(unique)))
        rows = tf.ensure_shape(self.id_to_row.lookup(keys), unique.shape)
        rows = tf.where(real, rows, tf.constant(_NO_ROW, tf.int64))  # [U]
        known = rows >= 0
        seen = tf.boolean_mask(rows, known)
        fresh_reads = tf.boolean_mask(seen, tf.gather(self.last_seen.value, seen) < step)  # first read this step
        self.frequency.value.scatter_add(tf.IndexedSlices(tf.ones_like(fresh_reads), fresh_reads))
        self.last_seen.value.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(seen), step), seen))
        is_new = tf.logical_and(real, tf.logical_not(known))
        new = tf.boolean_mask(unique, is_new)  # [N]
        needed = tf.size(new, tf.int64)
        due = needed > self.num_free.value
        if self.evict_after_steps:
            due = tf.logical_or(due, tf.logical_and(first_call, tf.logical_and(
                step > 0, tf.equal(step % self.evict_after_steps, 0))))
        tf.cond(due, lambda: self._reclaim(step, needed), lambda: tf.constant(False))
        n_free = self.num_free.value
        taken = tf.minimum(needed, n_free)
        new = new[:taken]
        new_rows = tf.reverse(tf.gather(self.free_rows.value, tf.range(n_free - taken, n_free)), [0])  # [taken]
        self.num_free.assign_sub(taken)
        self.id_to_row.insert(self.map_keys(new), new_rows)
        self.row_ids.value.scatter_update(tf.IndexedSlices(new, new_rows))
        self.last_seen.value.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(new_rows), step), new_rows))
        self.frequency.value.scatter_update(tf.IndexedSlices(tf.ones_like(new_rows), new_rows))
        self._scatter_pool(new_rows, self.initial_vectors(new))
        self._reset_slots(new_rows)
        rows = tf.tensor_scatter_nd_update(rows, tf.where(is_new)[:taken], new_rows)  # [U]
        return tf.gather(rows, position)  # [n]

    def _admit_exclusive(self, ids, valid):
        """`_admit`, under the layer's `tf.CriticalSection` when it has one (see **Distribution**).

        Every update of the map, the bookkeeping, the pool and the optimizer slots that `_admit` makes happens
        between taking the lock and releasing it: the rows returned depend on all of them (the critical section
        only waits for what its result depends on)."""
        lock = self._admission_lock.value
        if lock is None:
            return self._admit(ids, valid)

        def admit():
            if tf.executing_eagerly():  # ops run one after the other
                return self._admit(ids, valid)
            graph = tf.compat.v1.get_default_graph()
            before = set(graph.get_operations())
            rows = self._admit(ids, valid)
            effects = [op for op in graph.get_operations() if op not in before and op._is_stateful]
            with tf.control_dependencies(effects):
                return tf.identity(rows)

        return lock.execute(admit, exclusive_resource_access=False)

    def call(self, ids, training=False, force_default=None, return_admitted=False):
        ids = tf.cast(ids, tf.int64)
        flat = tf.reshape(ids, [-1])  # [n]
        if training:
            with tf.device(self._home) if self._home else contextlib.nullcontext():
                rows = self._admit_exclusive(flat, self._valid(flat))  # [n]
        else:
            rows = self.rows_of(flat)  # [n]
        return read_rows(self, ids, flat, rows, rows >= 0, force_default, return_admitted)  # -1: no row

    def get_config(self):
        config = super().get_config()
        config.pop("autocast", None)
        config.update({
            "capacity": self.capacity,
            "output_dim": self.output_dim,
            "padding_id": self.padding_id,
            "num_shards": self.num_shards,
            "evict_after_steps": self.evict_after_steps,
            "calls_per_step": self.calls_per_step,
            "unseen_row": self.unseen_row,
            "init_stddev": self.init_stddev,
            "seed": self.seed,
            "exclusive_updates": self.exclusive_updates,
        })
        return config



def dynamic_tables(spec, config, embedding_shards=1, skip=()):
    """`{table: DynamicEmbedding}` of a FeatureSpec's tables (but those in `skip`) for a `CTRModelConfig` with
    `id_mapping="dynamic"`.

    A table's pool has `config.table_capacity` rows (0 = the table's rows in the spec); its clock advances once
    per training step: `calls_per_step` is the number of lookups `mm_ads.ctr.model.build_ctr_model` makes in the
    table (each history feature and its target item feature once per history feature, every other item, user
    and context feature once).
    """
    calls = {}
    for f in spec.features:
        if f.is_id:
            calls[f.table] = calls.get(f.table, 0) + (2 if f.role == "history" else 1)
    for t in {f.table for f in spec.by_role("history")}:
        if any(f.table == t for f in spec.by_role("item")):
            calls[t] -= 1  # the target item paired with the histories is looked up once per history, counted there
    tables = {}
    for t, n in spec.tables().items():
        if t in skip:
            continue
        capacity = config.table_capacity or n
        tables[t] = DynamicEmbedding(capacity, config.embedding_dim, padding_id=0,
                                     num_shards=min(embedding_shards, capacity),
                                     evict_after_steps=config.evict_after_steps, calls_per_step=calls[t],
                                     unseen_row=config.unseen_row, name=f"emb_{t}")
    return tables
