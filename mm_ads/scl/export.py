"""SavedModel export of a trained SCL encoder: raw text strings or encoded image bytes in → `[B, D]` vectors.

Signature `serving_default`: input `text` (tf.string `[B]`) or `image` (tf.string `[B]`, PNG/JPEG bytes,
decoded and resized to `image_size`² inside the graph); output `vector` (float32 `[B, D]`, unit norm).
Signature `encoder_info` (no inputs): `encoder_version` (the content hash `encoder_version`
gives the vector tables of `python -m mm_ads.encode`, so online and batch vectors of one encoder carry one
version), `modality`, `dim`, `image_size` — what the encoder service needs to know about the model.
Written in the versioned, atomic layout of `mm_ads.export.saved_model`, with TF Serving's warm-up file
(`mm_ads.export.warmup`): `serving_default` at each of `warmup_batch_sizes` on a short title or a grey PNG of
`image_size`², and one `encoder_info` request.
"""

import hashlib
import json

import keras
import numpy as np
import tensorflow as tf

from mm_ads.export import warmup as warmup_lib
from mm_ads.export.saved_model import write_archive
from mm_ads.scl.augment import decode_image

ENCODER_INFO_SIGNATURE = "encoder_info"


def encoder_version(encoder, prefix="scl"):
    """`<prefix>-<16 hex>`: SHA-256 of the encoder's class, config and weights (by path, in path order)."""
    h = hashlib.sha256()
    h.update(type(encoder).__name__.encode())
    h.update(json.dumps(encoder.get_config(), sort_keys=True, default=str).encode())
    for v in sorted(encoder.weights, key=lambda v: v.path):
        value = keras.ops.convert_to_numpy(v)
        h.update(v.path.encode())
        h.update(str(value.dtype).encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return f"{prefix}-{h.hexdigest()[:16]}"


def decode_images(data, image_size):
    """tf.string `[B]` encoded images → float32 `[B, S, S, 3]` in [0, 1]."""
    return tf.map_fn(lambda b: decode_image(b, image_size), data,
                     fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32))


WARMUP_TEXT = "plain cotton shirt with short sleeves"  # the text of the warm-up requests


def export_encoder(encoder, export_base, modality, image_size=32, version=None,
                   warmup_batch_sizes=warmup_lib.DEFAULT_BATCH_SIZES):
    """Exports `encoder` (a `TextTower` or `ImageTower`) to `<export_base>/<version>/`; returns that path.

    `warmup_batch_sizes`: those of the `serving_default` requests of the version's warm-up file (empty: no file).
    """
    if modality not in ("text", "image"):
        raise ValueError(f"export_encoder: modality must be 'text' or 'image', got {modality!r}")
    warmup_batch_sizes = warmup_lib.check_batch_sizes(warmup_batch_sizes)
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    for layer in encoder._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.StringLookup):  # its hash table is not found through the model
            archive.track(layer)
    if modality == "text":
        def serve(text):
            return {"vector": tf.identity(encoder(text, training=False), name="vector")}
    else:
        def serve(image):
            return {"vector": tf.identity(encoder(decode_images(image, image_size), training=False), name="vector")}
    input_spec = tf.TensorSpec((None,), tf.string, name=modality)
    archive.add_endpoint("serving_default", serve, input_signature=[input_spec])
    info = encoder_info_values(encoder, modality, image_size)

    def encoder_info():
        return {k: tf.constant(v, name=k) for k, v in info.items()}

    archive.add_endpoint(ENCODER_INFO_SIGNATURE, tf.function(encoder_info, autograph=False), input_signature=[])
    warmup = None
    if warmup_batch_sizes:
        value = WARMUP_TEXT if modality == "text" else \
            tf.io.encode_png(tf.fill((image_size, image_size, 3), tf.constant(128, tf.uint8))).numpy()
        warmup = warmup_lib.warmup_logs({"serving_default": {modality: input_spec}, ENCODER_INFO_SIGNATURE: {}},
                                        warmup_batch_sizes, values={modality: value})
    return write_archive(archive, export_base, version, warmup=warmup)


def encoder_info_values(encoder, modality, image_size):
    """What the `encoder_info` signature returns: `{encoder_version, modality, dim, image_size}`."""
    return {"encoder_version": encoder_version(encoder, f"scl-{modality}"), "modality": modality,
            "dim": int(encoder.output_dim), "image_size": int(image_size)}


def read_encoder_info(loaded):
    """`{encoder_version, modality, dim, image_size}` of a loaded encoder SavedModel, or None when it was
    exported without the `encoder_info` signature."""
    if ENCODER_INFO_SIGNATURE not in loaded.signatures:
        return None
    out = {k: v.numpy() for k, v in loaded.signatures[ENCODER_INFO_SIGNATURE]().items()}
    return {k: v.decode() if isinstance(v, bytes) else int(v) for k, v in out.items()}
