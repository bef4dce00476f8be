"""Image decoding and seeded augmentation for SCL pairs (tf.image stateless ops: a pure function of the seed)."""

import tensorflow as tf


def decode_image(data, image_size):
    """Encoded PNG/JPEG/GIF/BMP bytes (scalar) → float32 `[S, S, 3]` in [0, 1] (empty bytes → zeros)."""
    def decode():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)
        return tf.image.resize(image, (image_size, image_size), antialias=True)

    image = tf.cond(tf.strings.length(data) > 0, decode, lambda: tf.zeros((image_size, image_size, 3)))
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), (image_size, image_size, 3))


def augment_image(image, seed, min_crop=0.6, jitter=0.3):
    """A random view: random crop of 60–100 % of the side (resized back), horizontal flip, colour jitter.

    Args:
        image: float32 `[S, S, 3]` in [0, 1].
        seed: int32 `[2]` stateless seed.
        min_crop: smallest crop side, as a fraction of the image side.
        jitter: strength of brightness/contrast/saturation jitter (hue: a fifth of it).

    Returns:
        float32 `[S, S, 3]` in [0, 1].
    """
    size = image.shape[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 7)
    frac = tf.random.stateless_uniform((), seeds[0], min_crop, 1.0)
    side = tf.maximum(tf.cast(tf.round(frac * size), tf.int32), 1)
    crop = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seeds[1])
    out = tf.image.resize(crop, (size, size), antialias=True)
    out = tf.image.stateless_random_flip_left_right(out, seeds[2])
    if jitter > 0:
        out = tf.image.stateless_random_brightness(out, jitter * 0.5, seeds[3])
        out = tf.image.stateless_random_contrast(out, 1.0 - jitter, 1.0 + jitter, seeds[4])
        out = tf.image.stateless_random_saturation(out, 1.0 - jitter, 1.0 + jitter, seeds[5])
        out = tf.image.stateless_random_hue(out, jitter / 5.0, seeds[6])
    return tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0), (size, size, 3))
