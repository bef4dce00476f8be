import keras
import tensorflow as tf


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

    Args:
        num_buckets: number of rows of the table.
        output_dim: embedding dimension E.
        padding_id: the id that marks an empty slot; `None` disables masking.
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
        self.num_buckets = num_buckets
        self.output_dim = output_dim
        self.padding_id = padding_id
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.supports_masking = True

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_buckets, self.output_dim),
            initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer,
            dtype="float32",
        )
        self.built = True

    def bucketize(self, ids):
        """Raw ids → row indices in `[0, num_buckets)` (integer arithmetic only)."""
        ids = tf.cast(ids, tf.int64)
        return tf.math.floormod(ids, tf.constant(self.num_buckets, tf.int64))

    def call(self, ids):
        ids = tf.cast(ids, tf.int64)
        rows = self.bucketize(ids)
        table = self.embeddings.value  # the tf.Variable itself: gather reads only the rows
        out = tf.nn.embedding_lookup(table, rows)  # ids.shape + [E], float32
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
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            }
        )
        return config
