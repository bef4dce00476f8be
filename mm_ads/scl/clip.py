"""Cross-modal item-image ↔ item-title alignment: the paper's CLIP-E baseline (Table 2).

CLIP-E trains an image tower and a text tower so that an item's image and its own title map close
together (CLIP's symmetric InfoNCE over the global batch, learnable temperature), with no search
queries involved: it learns what e-commerce items look like and how they are named, but not which
items users treat as the same thing. Its towers are then evaluated on the query → item retrieval task
of SCL (text tower on `pretrain/text_pairs`, image tower on `pretrain/image_pairs`).

Data: the dataset's `items` table (`item_id`, `title`, `image`); items with an empty title or image
are skipped (counted in `describe()`). A seeded `eval_fraction` of the items is held out for the
task's own metric, image → title Acc@N among the held-out items.

Entry point: `python -m mm_ads.train --task=clip --flagfile=configs/scl/clip.flags --data_dir=DIR
--model_dir=DIR` writes `text_encoder.keras` and `image_encoder.keras` besides the usual files.
"""

import os

import keras
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from mm_ads.data.dataset import Manifest
from mm_ads.metrics.retrieval import acc_at_n
from mm_ads.scl import augment as augment_lib
from mm_ads.scl.losses import Temperature, info_nce
from mm_ads.scl.text_tower import build_vocabulary
from mm_ads.training.task import Task
from mm_ads.utils.io import save_keras

EVAL_FRACTION = 0.05


@keras.saving.register_keras_serializable(package="mm_ads")
class CrossModalModel(keras.Model):
    """A text tower and an image tower trained to agree on items, plus the temperature.

    Args:
        text_encoder / image_encoder: the towers (`TextTower` / `PretrainedTextTower`, `ImageTower` /
            `PretrainedImageTower`) with the same output width.
        temperature_init / temperature_min / temperature_max / learn_temperature: see `Temperature`.

    Call arguments:
        inputs: `{"title": tf.string [B], "image": float32 [B, H, W, 3]}`.

    Returns:
        `(text vectors [B, D], image vectors [B, D])`, unit norm.
    """

    def __init__(self, text_encoder, image_encoder, temperature_init=0.07, temperature_min=0.01,
                 temperature_max=1.0, learn_temperature=True, **kwargs):
        super().__init__(**kwargs)
        if text_encoder.output_dim != image_encoder.output_dim:
            raise ValueError(f"CrossModalModel: the towers' widths differ ({text_encoder.output_dim} vs "
                             f"{image_encoder.output_dim})")
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.learn_temperature = bool(learn_temperature)
        self.temperature = Temperature(temperature_init, temperature_min, temperature_max,
                                       trainable=self.learn_temperature, name="temperature")

    def build(self, input_shape=None):
        self.text_encoder.build((None,))
        self.image_encoder.build((None, None, None, 3))
        self.temperature.build()

    def call(self, inputs, training=None):
        return (self.text_encoder(inputs["title"], training=training),
                self.image_encoder(inputs["image"], training=training))


class CrossModalTask(Task):
    """CLIP-E: symmetric image↔title InfoNCE on a dataset's `items` table.

    Args:
        config: a validated `ExperimentConfig` with `task="clip"`; the towers come from `config.scl`.
    """

    def __init__(self, config):
        self.config = config
        self.scl = config.scl
        self.manifest = Manifest.load(config.data.data_dir)
        if "items" not in self.manifest.components:
            raise ValueError(f"Dataset {config.data.data_dir} has no items table (it has "
                             f"{sorted(self.manifest.components)}): CLIP-E needs item titles and images")
        table = pq.read_table(self.manifest.files("items", "all")[0])
        for column in ("item_id", "title", "image"):
            if column not in table.column_names:
                raise ValueError(f"{self.manifest.files('items', 'all')[0]}: CLIP-E needs the column {column!r} "
                                 f"(columns: {table.column_names})")
        ids = table.column("item_id").to_numpy().astype(np.int64)
        titles = np.asarray(table.column("title").to_pylist(), dtype=object)
        images = np.asarray(table.column("image").to_pylist(), dtype=object)
        usable = np.array([bool(t and t.strip()) and bool(i) for t, i in zip(titles, images)], dtype=bool)
        self.skipped = int((~usable).sum())
        ids, titles, images = ids[usable], titles[usable], images[usable]
        held_out = np.random.default_rng(config.train.seed).random(len(ids)) < EVAL_FRACTION
        self.splits = {"train": (ids[~held_out], titles[~held_out], images[~held_out]),
                       "eval": (ids[held_out], titles[held_out], images[held_out])}
        if len(self.splits["train"][0]) < 2 or len(self.splits["eval"][0]) < 1:
            raise ValueError(f"Dataset {config.data.data_dir}: too few items with a title and an image for CLIP-E "
                             f"({int(usable.sum())} usable, {self.skipped} skipped)")
        self.vocabulary, self.vocabulary_stats = None, None
        if self.scl.text_encoder == "scratch":
            self.vocabulary, self.vocabulary_stats = build_vocabulary(self.splits["train"][1], self.scl.vocab_size,
                                                                      self.scl.min_count)

    def num_examples(self, split):
        return len(self.splits["train" if split == "train" else "eval"][0])

    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        ids, titles, images = self.splits["train" if split == "train" else "eval"]
        ds = tf.data.Dataset.from_tensor_slices({"item_id": ids, "title": tf.constant(list(titles), tf.string),
                                                 "image": tf.constant(list(images), tf.string)})
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if training and self.config.data.shuffle_buffer > 0:
            ds = ds.shuffle(min(self.config.data.shuffle_buffer, len(ids)), seed=self.config.train.seed * 1000 + epoch,
                            reshuffle_each_iteration=False)
        size = self.scl.image_size
        ds = ds.map(lambda row: (dict(row, image=augment_lib.decode_image(row["image"], size)), row["item_id"]),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)

    def build_model(self):
        from mm_ads.scl.task import build_encoder

        scl = self.scl
        model = CrossModalModel(build_encoder(scl, self.vocabulary, "text"), build_encoder(scl, None, "image"),
                                scl.temperature_init, scl.temperature_min, scl.temperature_max,
                                scl.learn_temperature, name="clip")
        model.build()
        return model

    def per_example_loss(self, model, features, labels, training):
        texts, images = model(features, training=training)  # [b, D] each
        ids = tf.identity(tf.cast(features["item_id"], tf.int64))  # [b]
        ctx = tf.distribute.get_replica_context()
        b = tf.shape(ids)[0]
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            all_texts, all_images = ctx.all_gather(texts, axis=0), ctx.all_gather(images, axis=0)  # [B, D]
            all_ids = ctx.all_gather(ids, axis=0)  # [B]
            offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * b
        else:
            all_texts, all_images, all_ids, offset = texts, images, ids, 0
        own = offset + tf.range(b)
        tau = model.temperature.tau()
        image_to_text = info_nce(images, all_texts, own, ids, all_ids, tau)  # [b]
        text_to_image = info_nce(texts, all_images, own, ids, all_ids, tau)  # [b]
        return 0.5 * (image_to_text + text_to_image)

    def after_apply_gradients(self, model, aux):
        from mm_ads.scl.momentum import update_variables

        if not model.learn_temperature:
            return tf.no_op()
        clamp = model.temperature.clamped_log_value
        return update_variables(lambda v: v.assign(clamp(v)), [model.temperature.log_temperature])

    def evaluate(self, model, split="eval"):
        """Image → title Acc@1/5/10 among the held-out items (exact)."""
        ds = self.build_inputs("eval", self.config.data.eval_batch_size, training=False)
        predict = tf.function(lambda x: model(x, training=False))
        texts, images, ids = [], [], []
        for features, _ in ds:
            t, v = predict(features)
            texts.append(t.numpy())
            images.append(v.numpy())
            ids.append(features["item_id"].numpy())
        ids = np.concatenate(ids)
        result = acc_at_n(np.concatenate(images), np.concatenate(texts), ns=(1, 5, 10), positive_ids=ids)
        result.update(num_queries=int(len(ids)), temperature=float(model.temperature.tau()))
        return result

    def save_encoders(self, model, model_dir):
        """`<model_dir>/{text,image}_encoder.keras`; returns their paths."""
        paths = {}
        for modality, encoder in (("text", model.text_encoder), ("image", model.image_encoder)):
            paths[modality] = os.path.join(model_dir, f"{modality}_encoder.keras")
            save_keras(encoder, paths[modality])
        return paths

    def describe(self):
        return {"data_dir": os.path.abspath(self.config.data.data_dir), "num_train": self.num_examples("train"),
                "num_eval": self.num_examples("eval"), "skipped_items": self.skipped,
                "text_encoder": self.scl.text_encoder, "image_encoder": self.scl.image_encoder}
