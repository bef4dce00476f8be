import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.scl.image_tower import ImageTower, ResidualBlock
from mm_ads.scl.projection import ProjectionHead
from mm_ads.scl.text_tower import TextTower, WordTokenizer, build_vocabulary
from tests.layer_test_case import assert_config_round_trip, dtype_policy

TEXTS = ["Red striped pillow, soft!", "blue mug", "crimson-cushion XL 2024", "unseen words here", ""]


def _text_tower(**kw):
    vocab, _ = build_vocabulary(TEXTS[:3], 50)
    args = dict(max_tokens=6, num_oov_buckets=4, width=8, num_layers=1, num_heads=2, output_dim=5,
                projection_hidden=8, name="text")
    args.update(kw)
    return TextTower(vocab, **args)


def test_vocabulary_and_tokenizer():
    vocab, stats = build_vocabulary(TEXTS[:3] + ["pillow pillow"], vocab_size=3)
    assert vocab == ["pillow", "red", "striped"]  # most frequent first, ties by first appearance
    assert stats["num_words"] == 11 and stats["distinct_words"] == 9 and stats["coverage"] == pytest.approx(5 / 11)
    tok = WordTokenizer(vocab, max_tokens=4, num_oov_buckets=2)
    ids = tok(tf.constant(["PILLOW, red!", "zzz striped a b c d", ""])).numpy()
    assert ids.shape == (3, 4)
    np.testing.assert_array_equal(ids[0], [3, 4, 0, 0])  # 0 pad, 1..2 OOV buckets, vocabulary from 3
    assert 1 <= ids[1, 0] <= 2 and ids[1, 1] == 5  # OOV hashed; truncated to max_tokens
    np.testing.assert_array_equal(ids[2], 0)
    assert tok.total_ids == 1 + 2 + 3


@pytest.mark.parametrize("kind", ["text", "image"])
def test_towers_output_unit_vectors_and_round_trip(kind, tmp_path):
    if kind == "text":
        tower, x = _text_tower(), tf.constant(TEXTS[:4])
    else:
        tower = ImageTower(widths=(4, 8), groups=2, output_dim=5, projection_hidden=0, name="image")
        x = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    v = tower(x).numpy()
    assert v.shape == (len(x), 5) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert_config_round_trip(tower)
    path = str(tmp_path / f"{kind}.keras")
    tower.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(tower) and loaded.get_config() == tower.get_config()
    np.testing.assert_allclose(loaded(x).numpy(), v, atol=1e-6)
    # a batch of one gives the same vector (no batch statistics: GroupNorm / LayerNorm only)
    np.testing.assert_allclose(tower(x[:1]).numpy()[0], v[0], atol=1e-5)


def test_text_padding_does_not_change_the_vector():
    tower = _text_tower(max_tokens=10)
    a = tower(tf.constant(["red pillow"])).numpy()
    b = tower(tf.constant(["  red,,  pillow  "])).numpy()  # separators only: same words, same padding
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isfinite(tower(tf.constant([""])).numpy()).all()  # all-padding row is finite


def test_text_tower_weight_count_and_oov_fraction():
    tower = _text_tower()
    tower.build()
    vocab_ids = tower.tokenizer.total_ids
    emb = vocab_ids * 8 + 6 * 8
    block = 2 * (2 * 8) + 4 * (8 * 8 + 8) + (8 * 32 + 32) + (32 * 8 + 8)
    head = (8 * 8 + 8) + (8 * 5 + 5)
    assert tower.count_params() == emb + block + 2 * 8 + head
    assert tower.oov_fraction(["red zzzz"]) == pytest.approx(0.5)


def test_image_tower_accepts_uint8_and_bfloat16():
    tower = ImageTower(widths=(4,), groups=2, output_dim=3, projection_hidden=0)
    x = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    np.testing.assert_allclose(tower(x).numpy(), tower(x.astype(np.float32) / 255.0).numpy(), atol=1e-6)
    with dtype_policy("mixed_bfloat16"):
        low = ImageTower(widths=(4,), groups=2, output_dim=3, projection_hidden=0)
        out = low(x).numpy()
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_layer_argument_validation():
    with pytest.raises(ValueError, match="output_dim"):
        ProjectionHead(output_dim=0)
    with pytest.raises(ValueError, match="strides"):
        ResidualBlock(4, strides=3)
    with pytest.raises(ValueError, match="empty string"):
        WordTokenizer(["a", ""])
    with pytest.raises(ValueError, match="widths"):
        ImageTower(widths=())
