"""A user-built functional Keras model with SimTier + SimScore + DINAttention + MLP trains and round-trips."""

import keras
import numpy as np

from mm_ads.layers import MLP, DINAttention, SimScore, SimTier
from tests.layer_test_case import assert_keras_save_round_trip

N, S, D, E = 64, 6, 8, 4


def build_model():
    target_vec = keras.Input((D,), name="target_vec")
    history_vec = keras.Input((S, D), name="history_vec")
    target_emb = keras.Input((E,), name="target_emb")
    history_emb = keras.Input((S, E), name="history_emb")
    mask = keras.Input((S,), dtype="bool", name="mask")
    tiers = SimTier(num_tiers=10, count_transform="log1p", learnable_tier_weights=True)(
        target_vec, history_vec, mask=mask
    )  # [B, 10]
    sim = SimScore()(target_vec, history_vec, mask=mask)  # [B, S]
    pooled = DINAttention(hidden_units=(8, 4), activation="dice")(
        target_emb, history_emb, side_features=sim, mask=mask
    )  # [B, E]
    features = keras.layers.Concatenate()([target_emb, pooled, tiers])  # [B, E + E + 10]
    logit = MLP([16, 8], activation="prelu", output_units=1, name="head")(features)  # [B, 1]
    return keras.Model([target_vec, history_vec, target_emb, history_emb, mask], logit)


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "target_vec": rng.normal(size=(N, D)).astype(np.float32),
        "history_vec": rng.normal(size=(N, S, D)).astype(np.float32),
        "target_emb": rng.normal(size=(N, E)).astype(np.float32),
        "history_emb": rng.normal(size=(N, S, E)).astype(np.float32),
        "mask": rng.random((N, S)) < 0.6,
    }
    x["mask"][:4] = False  # a few users without history
    y = rng.integers(0, 2, size=(N, 1)).astype(np.float32)
    return x, y


def test_functional_model_fits_and_round_trips():
    keras.utils.set_random_seed(0)
    model = build_model()
    x, y = data()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed), [w.path for w, c in zip(model.trainable_weights, changed) if not c]
    assert np.all(np.isfinite(model.predict(x, verbose=0)))
    loaded = assert_keras_save_round_trip(model, x, atol=1e-5)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
