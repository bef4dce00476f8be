"""SimTier: histogram of target-to-history semantic similarities (paper section 4.2, Algorithm 1)."""

import keras
from keras import ops

from mm_ads.layers.sim_score import similarity_and_validity

COUNT_TRANSFORMS = ("none", "log1p", "fraction")


@keras.saving.register_keras_serializable(package="mm_ads")
class SimTier(keras.layers.Layer):
    """Counts how many history items fall into each of `num_tiers` similarity tiers w.r.t. the target.

    Follows Algorithm 1 of the paper — similarity `[B, S]` → tier index `[B, S]` → equality against
    `range(N)` `[B, S, N]` → sum over the sequence `[B, N]` (computed as a segment sum over the `[B, S]`
    tier indices, the same counts without the `[B, S, N]` tensor) — with two corrections of the pseudocode:

    - Tier index `clip(ceil((s + 1) / 2 * N) - 1, 0, N - 1)`: tier `k` holds the scores in
      `(2k/N - 1, 2(k+1)/N - 1]` (tier 0 also holds -1.0), so s = -1.0 → tier 0, s = 1.0 → tier N-1 and
      every valid score is counted exactly once. (The pseudocode's `ceil((s + 1) / 2 * N)` yields 0..N
      but compares against `range(0, N)`: every score above `1 - 2/N`, the near-duplicates, is dropped.)
      Scores slightly outside [-1, 1] (rounding, or un-normalised inputs with `normalize=False`) are
      clipped into the first/last tier.
    - Positions with `mask` False are never counted (the pseudocode counts zero-padded items, s = 0, in
      the middle tier). Items whose vector is all zeros are treated as missing and not counted either,
      with or without `mask`: a zero vector has no direction, so no similarity. A zero target vector
      therefore gives an all-zero row. Consequently, without a count transform or tier weights, the
      row sum equals the number of valid, non-zero history items.

    Similarity and tier boundaries are computed in float32 whatever the dtype policy (float inputs are
    not autocast to bf16/fp16), and the output is float32: counts above 256 are not exact in bfloat16.

    **Calibrated tiers** (`boundaries`): equal tiers over [-1, 1] suit an encoder whose similarities spread
    over that range; a text encoder's target-to-history similarities may all fall in, say, [0.2, 0.6], so
    that only 4-5 of 20 equal tiers are ever used. `boundaries` gives the N-1 increasing inner tier
    boundaries instead (e.g. quantiles of the training similarities, `quantile_boundaries`): tier `k` holds
    the scores in `(b_{k-1}, b_k]` with `b_0 = -inf`, `b_N = +inf` — the same rule as the equal tiers,
    whose boundaries are `2k/N - 1`. The boundaries are part of the layer's config, so a saved model or
    export carries them.

    Args:
        num_tiers: int N >= 1, number of equal-width tiers over [-1, 1]. Default 20 (width 0.1, as in
            the authors' public MUSE implementation). With `boundaries`: must be `len(boundaries) + 1`
            (or None).
        boundaries: optional N-1 strictly increasing floats, the inner tier boundaries (see above).
        count_transform: "none" (raw counts, the paper's definition), "log1p" (`log(1 + count)`, MUSE) or
            "fraction" (counts divided by the number of counted history items: the histogram as a
            distribution, whose scale does not grow with the history length; an empty history gives 0s).
        normalize: L2-normalise both inputs (cosine similarity). Set False when the inputs are already
            unit vectors (then the similarity is their dot product, as in the paper's Eq. 2).
        learnable_tier_weights: multiply the (transformed) counts by a learnable float32 weight per tier,
            initialised to ones (MUSE).
        scale: multiplier applied to integer (int8-quantised) inputs after casting them to float32, e.g. a
            vector table's `scale`. Float inputs are used as given. Cosine is scale-invariant; the value
            matters only with `normalize=False`.

    Call arguments:
        target: `[B, D]` float or int8 target-item vectors.
        history: `[B, S, D]` float or int8 history vectors.
        mask: optional `[B, S]` bool, True = valid history position. None: every non-zero vector is valid.

    Returns:
        `[B, N]` float32 tier counts (transformed/weighted if configured).

    Example:

    ```python
    tiers = SimTier(num_tiers=20)(target_vec, history_vec, mask=history_mask)  # [B, 20]
    features = keras.layers.Concatenate()([id_features, tiers])
    ```

    References:
        - Sheng et al. 2024, Enhancing Taobao Display Advertising with Multimodal Representations:
          Challenges, Approaches and Insights (CIKM 2024), section 4.2 and Algorithm 1.
        - MUSE (Wu et al. 2024), the same team's public PyTorch SimTier: tier width 0.1, log(1 + count),
          learnable per-tier weights.
    """

    def __init__(
        self,
        num_tiers=20,
        boundaries=None,
        count_transform="none",
        normalize=True,
        learnable_tier_weights=False,
        scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if boundaries is not None:
            boundaries = [float(b) for b in boundaries]
            if not boundaries or any(not b < c for b, c in zip(boundaries, boundaries[1:])) or any(
                    b != b for b in boundaries):
                raise ValueError(f"`boundaries` must be one or more strictly increasing floats. Received: "
                                 f"boundaries={boundaries}")
            if num_tiers is None:
                num_tiers = len(boundaries) + 1
            if num_tiers != len(boundaries) + 1:
                raise ValueError(f"`num_tiers` must be len(boundaries) + 1 = {len(boundaries) + 1}. Received: "
                                 f"num_tiers={num_tiers!r}")
        if not isinstance(num_tiers, int) or isinstance(num_tiers, bool) or num_tiers < 1:
            raise ValueError(f"`num_tiers` must be an int >= 1. Received: num_tiers={num_tiers!r}")
        if count_transform not in COUNT_TRANSFORMS:
            raise ValueError(
                f"`count_transform` must be one of {COUNT_TRANSFORMS}. Received: count_transform={count_transform!r}"
            )
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0. Received: scale={scale}")
        self.num_tiers = num_tiers
        self.boundaries = boundaries
        self.count_transform = count_transform
        self.normalize = bool(normalize)
        self.learnable_tier_weights = bool(learnable_tier_weights)
        self.scale = float(scale)

    @property
    def input_dtype(self):
        # Similarities and tier boundaries in float32: float inputs are never autocast to bf16/fp16.
        return "float32"

    def build(self, target_shape, history_shape):
        if len(target_shape) != 2 or len(history_shape) != 3 or target_shape[-1] != history_shape[-1]:
            raise ValueError(
                "SimTier expects target [B, D] and history [B, S, D]. Received: "
                f"target_shape={target_shape}, history_shape={history_shape}"
            )
        self.tier_weights = None
        if self.learnable_tier_weights:
            self.tier_weights = self.add_weight(
                shape=(self.num_tiers,), initializer="ones", dtype="float32", autocast=False, name="tier_weights"
            )

    def call(self, target, history, mask=None):
        n = self.num_tiers
        scores, valid = similarity_and_validity(target, history, self.normalize, self.scale, mask)  # [B, S]
        if self.boundaries is None:
            indices = ops.clip(ops.ceil((scores + 1.0) / 2.0 * n) - 1.0, 0.0, n - 1.0)
            indices = ops.cast(indices, "int32")  # [B, S] in 0..N-1
        else:  # the number of inner boundaries below the score: (b_{k-1}, b_k] -> k
            inner = ops.convert_to_tensor(self.boundaries, dtype="float32")  # [N-1]
            indices = ops.sum(ops.cast(ops.expand_dims(scores, -1) > inner, "int32"), axis=-1)  # [B, S]
        # Algorithm 1's equality against range(N) summed over S, without the [B, S, N] tensor: every valid
        # position adds 1 to segment b·N + tier (a segment sum over B·S elements); invalid ones go to one
        # extra segment that is dropped.
        batch = ops.shape(indices)[0]
        rows = ops.expand_dims(ops.arange(batch, dtype="int32") * n, -1)  # [B, 1]
        segments = ops.where(valid, indices + rows, batch * n)  # [B, S]
        counts = ops.segment_sum(ops.reshape(ops.cast(valid, "float32"), (-1,)), ops.reshape(segments, (-1,)),
                                 num_segments=batch * n + 1)
        counts = ops.reshape(counts[:-1], (batch, n))  # [B, N]
        if self.count_transform == "log1p":
            counts = ops.log1p(counts)
        elif self.count_transform == "fraction":
            counts = counts / ops.maximum(ops.sum(counts, axis=-1, keepdims=True), 1.0)
        if self.tier_weights is not None:
            counts = counts * self.tier_weights
        return counts

    def compute_output_spec(self, target, history, mask=None):
        return keras.KerasTensor((target.shape[0], self.num_tiers), dtype="float32")

    def compute_mask(self, inputs, previous_mask=None):
        # The sequence axis is counted away: no mask on the output.
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_tiers": self.num_tiers,
                "boundaries": self.boundaries,
                "count_transform": self.count_transform,
                "normalize": self.normalize,
                "learnable_tier_weights": self.learnable_tier_weights,
                "scale": self.scale,
            }
        )
        return config


def quantile_boundaries(similarities, num_tiers):
    """The N-1 inner boundaries that split `similarities` (a 1-D array of target-to-history cosine
    similarities, e.g. from training impressions) into `num_tiers` tiers of equal mass: the quantiles
    k/N, k = 1..N-1. Ties (an encoder with many equal scores) are merged, so fewer boundaries may come back;
    a SimTier built with them has `len(boundaries) + 1` tiers. Raises when there are no finite values."""
    import numpy as np

    values = np.asarray(similarities, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("quantile_boundaries needs at least one finite similarity")
    q = np.quantile(values, np.arange(1, num_tiers) / num_tiers)
    out = [float(q[0])]
    for b in q[1:]:
        if b > out[-1]:
            out.append(float(b))
    return out
