"""The text tower: a word tokenizer built from the training data + a small transformer with mean pooling.

Tokenization (inside the model, so a SavedModel takes raw strings): lower-case, every run of characters
that are not letters, digits or '-' becomes a separator, split on it, keep the first `max_tokens` words.
Ids: 0 = padding, `1..num_oov_buckets` = out-of-vocabulary words hashed into buckets (so unseen words
still get distinct-ish embeddings), then the vocabulary in order. The vocabulary is the `vocab_size`
most frequent training words seen at least `min_count` times (`build_vocabulary`); it is part of the
tower's config (saved with `.keras`) and written to `<model_dir>/vocab.json` with its counts.
"""

import collections

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from mm_ads.scl.projection import ProjectionHead

SEPARATORS = r"[^\p{L}\p{N}\-]+"


def split_words(texts):
    """tf.string `[B]` → ragged `[B, None]` words (the tokenizer's rule; also used to build the vocabulary)."""
    texts = tf.strings.regex_replace(tf.strings.lower(texts, encoding="utf-8"), SEPARATORS, " ")
    return tf.strings.split(tf.strings.strip(texts))


def build_vocabulary(texts, vocab_size, min_count=1, batch_size=4096):
    """The `vocab_size` most frequent words of `texts` (ties by first appearance), with counts.

    Returns:
        `(words, stats)`: the vocabulary list and `{"num_texts", "num_words", "distinct_words",
        "vocab_size", "coverage"}` (coverage: fraction of the training words inside the vocabulary).
    """
    if int(vocab_size) < 1:
        raise ValueError(f"build_vocabulary: vocab_size must be >= 1, got {vocab_size}")
    counts = collections.Counter()
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        words = split_words(tf.constant(texts[start:start + batch_size], tf.string)).flat_values.numpy()
        counts.update(w.decode("utf-8") for w in words)
    ranked = [w for w, c in counts.most_common() if c >= int(min_count)][: int(vocab_size)]
    total = sum(counts.values())
    covered = sum(counts[w] for w in ranked)
    stats = {"num_texts": len(texts), "num_words": int(total), "distinct_words": len(counts),
             "vocab_size": len(ranked), "coverage": covered / total if total else 0.0,
             "counts": {w: int(counts[w]) for w in ranked}}
    return ranked, stats


@keras.saving.register_keras_serializable(package="mm_ads")
class WordTokenizer(keras.layers.Layer):
    """Raw strings → padded word ids `[B, T]` (0 = padding, 1..num_oov_buckets = hashed OOV words).

    Args:
        vocabulary: list of words (see `build_vocabulary`).
        max_tokens: T, words kept per text.
        num_oov_buckets: hash buckets for out-of-vocabulary words (>= 1).

    Call arguments:
        inputs: tf.string `[B]`.

    Returns:
        int64 `[B, T]`.
    """

    def __init__(self, vocabulary, max_tokens=32, num_oov_buckets=64, **kwargs):
        super().__init__(**kwargs)
        if int(max_tokens) < 1:
            raise ValueError(f"WordTokenizer: max_tokens must be >= 1, got {max_tokens}")
        if int(num_oov_buckets) < 1:
            raise ValueError(f"WordTokenizer: num_oov_buckets must be >= 1, got {num_oov_buckets}")
        self.vocabulary = [str(w) for w in vocabulary]
        if "" in self.vocabulary:
            raise ValueError("WordTokenizer: the vocabulary must not contain the empty string (padding)")
        self.max_tokens = int(max_tokens)
        self.num_oov_buckets = int(num_oov_buckets)
        self.lookup = keras.layers.StringLookup(vocabulary=self.vocabulary or None, mask_token="",
                                                num_oov_indices=self.num_oov_buckets, name="lookup")
        self.built = True

    @property
    def total_ids(self):
        """Size of the id space: padding + OOV buckets + vocabulary."""
        return 1 + self.num_oov_buckets + len(self.vocabulary)

    def call(self, inputs):
        words = split_words(tf.reshape(tf.convert_to_tensor(inputs), [-1]))
        words = words.to_tensor(default_value="", shape=[None, self.max_tokens])  # [B, T]
        return tf.cast(self.lookup(words), tf.int64)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_tokens)

    def get_config(self):
        return {**super().get_config(), "vocabulary": list(self.vocabulary), "max_tokens": self.max_tokens,
                "num_oov_buckets": self.num_oov_buckets}


@keras.saving.register_keras_serializable(package="mm_ads")
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm self-attention + GELU feed-forward block with a padding mask.

    Args:
        num_heads: attention heads.
        intermediate_dim: feed-forward width.
        dropout: dropout rate.

    Call arguments:
        inputs: `[B, T, W]`; mask: bool `[B, T]` (False = padding).

    Returns:
        `[B, T, W]`.
    """

    def __init__(self, num_heads=4, intermediate_dim=256, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.intermediate_dim = int(intermediate_dim)
        self.dropout = float(dropout)
        self.supports_masking = True

    def build(self, input_shape):
        width = int(input_shape[-1])
        if width % self.num_heads:
            raise ValueError(f"TransformerBlock: width {width} must be divisible by num_heads {self.num_heads}")
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=self.dtype_policy, name="norm1")
        self.attention = keras.layers.MultiHeadAttention(self.num_heads, width // self.num_heads,
                                                         dropout=self.dropout, dtype=self.dtype_policy,
                                                         name="attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=self.dtype_policy, name="norm2")
        self.ffn_in = keras.layers.Dense(self.intermediate_dim, activation="gelu", dtype=self.dtype_policy,
                                         name="ffn_in")
        self.ffn_out = keras.layers.Dense(width, dtype=self.dtype_policy, name="ffn_out")
        self.drop = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.norm1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.norm2.build(input_shape)
        self.ffn_in.build(input_shape)
        self.ffn_out.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def call(self, inputs, mask=None, training=None):
        attention_mask = None
        if mask is not None:
            mask = ops.cast(mask, "bool")
            attention_mask = ops.logical_and(mask[:, :, None], mask[:, None, :])  # [B, T, T]
        h = self.norm1(inputs)
        x = inputs + self.drop(self.attention(h, h, attention_mask=attention_mask, training=training),
                               training=training)
        h = self.ffn_out(self.ffn_in(self.norm2(x)))
        return x + self.drop(h, training=training)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="mm_ads")
class TextTower(keras.Model):
    """Raw text → L2-normalised D-dim vector: tokenizer, embeddings, transformer blocks, masked mean pool, head.

    Args:
        vocabulary: word list (see `build_vocabulary`).
        max_tokens: words kept per text.
        num_oov_buckets: hash buckets for out-of-vocabulary words.
        width: token embedding width W.
        num_layers: transformer blocks (0 = bag of embeddings).
        num_heads: attention heads.
        output_dim: D.
        projection_hidden: hidden width of the projection head (0 = linear).
        dropout: dropout inside the transformer.

    Call arguments:
        inputs: tf.string `[B]`.

    Returns:
        float32 `[B, D]` unit vectors (an empty text gives a finite vector).

    Example:

    ```python
    tower = TextTower(vocabulary=["red", "pillow"], output_dim=128)
    v = tower(tf.constant(["red pillow", "blue mug"]))  # [2, 128]
    ```

    References:
        Paper §3.1–3.3 (one encoder per modality, shared by query and item).
    """

    def __init__(self, vocabulary, max_tokens=32, num_oov_buckets=64, width=64, num_layers=2, num_heads=4,
                 output_dim=128, projection_hidden=256, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = [str(w) for w in vocabulary]
        self.max_tokens = int(max_tokens)
        self.num_oov_buckets = int(num_oov_buckets)
        self.width = int(width)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.output_dim = int(output_dim)
        self.projection_hidden = int(projection_hidden)
        self.dropout = float(dropout)
        if self.width < 1 or self.num_layers < 0:
            raise ValueError(f"TextTower: width must be >= 1 and num_layers >= 0, got {width}, {num_layers}")
        self.tokenizer = WordTokenizer(self.vocabulary, self.max_tokens, self.num_oov_buckets, name="tokenizer")

    def build(self, input_shape=None):
        self.token_embedding = keras.layers.Embedding(self.tokenizer.total_ids, self.width, name="token_embedding")
        self.position_embedding = keras.layers.Embedding(self.max_tokens, self.width, name="position_embedding")
        self.blocks = [TransformerBlock(self.num_heads, 4 * self.width, self.dropout, name=f"block_{i}")
                       for i in range(self.num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self.head = ProjectionHead(self.output_dim, self.projection_hidden, name="projection")
        self.token_embedding.build((None, self.max_tokens))
        self.position_embedding.build((None, self.max_tokens))
        for block in self.blocks:
            block.build((None, self.max_tokens, self.width))
        self.final_norm.build((None, self.max_tokens, self.width))
        self.head.build((None, self.width))

    def call(self, inputs, training=None):
        ids = self.tokenizer(inputs)  # [B, T]
        mask = ops.not_equal(ids, 0)  # [B, T]
        x = self.token_embedding(ids) + self.position_embedding(ops.arange(self.max_tokens))[None]  # [B, T, W]
        for block in self.blocks:
            x = block(x, mask=mask, training=training)
        x = self.final_norm(x)
        weights = ops.cast(mask, x.dtype)[:, :, None]  # [B, T, 1]
        pooled = ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)  # [B, W]
        return self.head(pooled)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs.shape[0], self.output_dim), dtype="float32")

    def oov_fraction(self, texts):
        """Fraction of the words of `texts` that fall into OOV buckets (NumPy, for reports)."""
        ids = self.tokenizer(tf.constant(list(texts), tf.string)).numpy()
        words = ids[ids > 0]
        return float(np.mean(words <= self.num_oov_buckets)) if words.size else 0.0

    def get_config(self):
        return {**super().get_config(), "vocabulary": list(self.vocabulary), "max_tokens": self.max_tokens,
                "num_oov_buckets": self.num_oov_buckets, "width": self.width, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "output_dim": self.output_dim,
                "projection_hidden": self.projection_hidden, "dropout": self.dropout}
