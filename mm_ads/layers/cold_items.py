"""ColdItems: which examples' target item is treated as never seen in training (new-item training)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mm_ads")
class ColdItems(keras.layers.Layer):
    """Draws, in training, the examples whose target item takes the new-item path (DropoutNet-style).

    A model serves brand-new items through its id table's default row (`SparseEmbedding(admit_after >= 1)`), but
    it only learns what to do with that row, and how far to trust features that were fitted item by item
    (MAKE's outputs), if some training examples go that way too. In training this layer marks each example
    independently with probability `rate`; the model then reads the target's default row for them
    (`SparseEmbedding(..., force_default=cold)`) and takes its new-item path (`mm_ads.ctr.model`). At evaluation
    and serving it marks nothing: the id table itself says which ids have no admitted row
    (`return_admitted=True`), and exactly those take the path.

    Args:
        rate: the share of training examples marked, in [0, 1).
        seed: seed of the draws (a `keras.random.SeedGenerator`; None draws from Keras's global seed, which the
            trainer sets from the run's seed).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        ids: the target ids, `[B]` (only their shape is read).
        training: whether to draw.

    Returns:
        `[B]` bool, True = treat the example's target item as never seen.

    Example:

    >>> cold = ColdItems(rate=0.1, seed=0)
    >>> bool(ops.any(cold(np.arange(1000), training=False)))
    False

    References:
        - Volkovs, Yu & Poutanen, DropoutNet: Addressing Cold Start in Recommender Systems, NeurIPS 2017.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        rate = float(rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, ids, training=False):
        if not training or self.rate == 0.0:
            return ops.zeros(ops.shape(ids), "bool")
        return keras.random.uniform(ops.shape(ids), seed=self.seed_generator) < self.rate

    def compute_output_spec(self, ids, training=False):
        return keras.KerasTensor(ids.shape, dtype="bool")

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
