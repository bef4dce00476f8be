"""SavedModel export of a trained SCL encoder: raw text strings or encoded image bytes in → `[B, D]` vectors.

Signature `serving_default`: input `text` (tf.string `[B]`) or `image` (tf.string `[B]`, PNG/JPEG bytes,
decoded and resized to `image_size`² inside the graph); output `vector` (float32 `[B, D]`, unit norm).
Written in the versioned, atomic layout of `mm_ads.export.saved_model`.
"""

import keras
import tensorflow as tf

from mm_ads.export.saved_model import write_archive
from mm_ads.scl.augment import decode_image


def decode_images(data, image_size):
    """tf.string `[B]` encoded images → float32 `[B, S, S, 3]` in [0, 1]."""
    return tf.map_fn(lambda b: decode_image(b, image_size), data,
                     fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32))


def export_encoder(encoder, export_base, modality, image_size=32, version=None):
    """Exports `encoder` (a `TextTower` or `ImageTower`) to `<export_base>/<version>/`; returns that path."""
    if modality not in ("text", "image"):
        raise ValueError(f"export_encoder: modality must be 'text' or 'image', got {modality!r}")
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
    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec((None,), tf.string, name=modality)])
    return write_archive(archive, export_base, version)
