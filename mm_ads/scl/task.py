"""The SCL task: pair tables → (query, positive, hard negative) batches, InfoNCE + triplet loss, Acc@N eval.

Per step and replica (b examples, B = b × replicas global):
  q = encoder(query) `[b, D]`; k = key encoder(positive) `[b, D]` (no gradient with MoCo);
  keys = all_gather(k) `[B, D]` ∪ queue `[K, D]`; loss_i = InfoNCE(q_i; keys, positive = own column,
  same-item keys masked) + w · triplet(q_i, k_i, key encoder(negative_i)) (rows without a hard negative: 0).
  Options: `negatives_in_infonce` appends the all-gathered hard-negative keys to the InfoNCE candidates;
  `symmetric_loss` averages that loss with the item → query one (encoder(positive_i) against the all-gathered
  key encoder(query) of the batch, same-item rows masked, no queue).
After the optimizer step (`after_apply_gradients`): key encoder ← m·key + (1−m)·encoder, enqueue the
all-gathered keys with their item ids, clamp log τ. Every replica applies the same update.
"""

import os
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from mm_ads.data.dataset import POSITIVE_GROUP_ID, QUERY_ITEM_ID, Manifest
from mm_ads.metrics.retrieval import acc_at_n
from mm_ads.scl import augment as augment_lib
from mm_ads.scl.image_tower import ImageTower
from mm_ads.scl.losses import info_nce, triplet
from mm_ads.scl.model import SCLModel
from mm_ads.scl.momentum import update_variables
from mm_ads.scl.text_tower import TextTower, build_vocabulary
from mm_ads.training.task import Task

VOCAB_FILE = "vocab.json"


def build_encoder(scl, vocabulary=None, modality=None):
    """The tower of `modality` (default `scl.modality`) described by an `SCLConfig`."""
    modality = modality or scl.modality
    if modality == "text" and scl.text_encoder == "minilm":
        from mm_ads.scl.pretrained_tower import PretrainedTextTower

        return PretrainedTextTower(scl.pretrained_path, scl.max_tokens, scl.output_dim, scl.projection_hidden,
                                   name="text_tower")
    if modality == "image" and scl.image_encoder == "efficientnet_lite0":
        from mm_ads.scl.pretrained_image_tower import PretrainedImageTower

        return PretrainedImageTower(scl.image_pretrained_path, scl.output_dim, scl.projection_hidden,
                                    input_size=scl.image_tower_size, name="image_tower")
    if modality == "text":
        return TextTower(vocabulary or [], scl.max_tokens, scl.num_oov_buckets, scl.text_width, scl.text_layers,
                         scl.text_heads, scl.output_dim, scl.projection_hidden, name="text_tower")
    return ImageTower(scl.image_widths, scl.image_blocks, 8, scl.output_dim, scl.projection_hidden,
                      name="image_tower")


def build_scl_model(scl, vocabulary=None):
    model = SCLModel(build_encoder(scl, vocabulary), scl.use_queue, scl.queue_size, scl.momentum,
                     scl.temperature_init, scl.temperature_min, scl.temperature_max, scl.learn_temperature,
                     name="scl")
    # a concrete input shape: Keras derives the tower's default SavedModel signature from it
    model.build((None,) if scl.modality == "text" else (None, None, None, 3))
    return model


class SCLTask(Task):
    """SCL pre-training of a text or image encoder on a dataset's `pretrain/<modality>_pairs` tables.

    Args:
        config: a validated `mm_ads.config.ExperimentConfig` with `task="scl"`.
    """

    def __init__(self, config):
        self.config = config
        self.scl = config.scl
        self.manifest = Manifest.load(config.data.data_dir)
        self.component = f"pretrain/{self.scl.modality}_pairs"
        if self.component not in self.manifest.components:
            raise ValueError(f"Dataset {config.data.data_dir} has no {self.component} table "
                             f"(it has {sorted(self.manifest.components)})")
        self.needs_augmentation = bool(self.manifest.extra.get("pairs_need_augmentation", False))
        self._columns_cache = {}
        if self.scl.negatives_in_infonce and POSITIVE_GROUP_ID in self._columns("train"):
            raise ValueError(f"Dataset {config.data.data_dir}: --negatives_in_infonce needs pairs without "
                             f"{POSITIVE_GROUP_ID} (a hard negative's group is unknown, so same-product keys "
                             "could not be masked)")
        if self.needs_augmentation and self.scl.modality == "image" and not self.scl.augment:
            raise ValueError(f"Dataset {config.data.data_dir} pairs query == positive and needs augmentation: "
                             "set --augment")
        # one inference function per encoder (and one for the triplet terms per model), reused by every
        # evaluation: a new tf.function per epoch retraces each time (TF's retracing warnings)
        self._predict_fns = weakref.WeakKeyDictionary()
        self._triplet_fns = weakref.WeakKeyDictionary()
        self.vocabulary, self.vocabulary_stats = None, None
        if self.scl.modality == "text" and self.scl.text_encoder == "scratch":
            cols = self._columns("train")
            texts = list(cols["query"]) + list(cols["positive"])
            self.vocabulary, self.vocabulary_stats = build_vocabulary(texts, self.scl.vocab_size, self.scl.min_count)

    # -- data ----------------------------------------------------------------------------
    def _split(self, split):
        return self.config.data.train_split if split == "train" else self.config.data.eval_split

    def _columns(self, split):
        name = self._split(split)
        limit = self.scl.max_train_pairs if split == "train" else 0
        key = f"{name}[:{limit}]" if limit else name
        if key not in self._columns_cache:
            table = pa.concat_tables([pq.read_table(p) for p in self.manifest.files(self.component, name)])
            if limit:
                table = table.slice(0, limit)
            cols = {}
            for c in ("query", "positive", "negative"):
                cols[c] = np.asarray(table.column(c).to_pylist(), dtype=object)
            for c in ("positive_id", "negative_id"):
                cols[c] = table.column(c).to_numpy().astype(np.int64)
            if QUERY_ITEM_ID in table.column_names:  # queries that are catalogue items themselves
                cols[QUERY_ITEM_ID] = table.column(QUERY_ITEM_ID).to_numpy().astype(np.int64)
            if POSITIVE_GROUP_ID in table.column_names:  # positives that are the same product share a group
                cols[POSITIVE_GROUP_ID] = table.column(POSITIVE_GROUP_ID).to_numpy().astype(np.int64)
            self._columns_cache[key] = cols
        return self._columns_cache[key]

    def num_examples(self, split):
        rows = self.manifest.num_rows(self.component, self._split(split))
        return min(rows, self.scl.max_train_pairs) if split == "train" and self.scl.max_train_pairs else rows

    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        cols = self._columns(split)
        n = len(cols["positive_id"])
        data = {k: tf.constant(list(v), tf.string) if v.dtype == object else v for k, v in cols.items()}
        data["index"] = np.arange(n, dtype=np.int64)
        ds = tf.data.Dataset.from_tensor_slices(data)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        seed = self.config.train.seed * 1000 + int(epoch)
        if training and self.config.data.shuffle_buffer > 0:
            ds = ds.shuffle(min(self.config.data.shuffle_buffer, n), seed=seed, reshuffle_each_iteration=False)
        if self.scl.modality == "image":
            ds = ds.map(self._image_fn(training, seed), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(lambda row: (row, row["positive_id"]))
        return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)

    def _image_fn(self, training, seed):
        size, aug, needs = self.scl.image_size, self.scl.augment, self.needs_augmentation

        def fn(row):
            out = dict(row)
            q, p, neg = (augment_lib.decode_image(row[c], size) for c in ("query", "positive", "negative"))
            base = tf.stack([tf.constant(seed, tf.int64), row["index"]])
            if training and aug:
                q = augment_lib.augment_image(q, base * 3)
                p = augment_lib.augment_image(p, base * 3 + 1)
            elif needs:  # evaluation on self-paired images: a fixed (seeded) view of the query
                q = augment_lib.augment_image(q, tf.stack([tf.constant(7919, tf.int64), row["index"]]))
            out.update(query=q, positive=p, negative=neg)
            return out

        return fn

    # -- model and loss ------------------------------------------------------------------
    def build_model(self):
        return build_scl_model(self.scl, self.vocabulary)

    def per_example_loss(self, model, features, labels, training):
        scl = self.scl
        queries = model(features["query"], training=training)  # [b, D]
        keys = model.keys(features["positive"])  # [b, D]
        # tf.identity places the ids on this replica's device: a collective (all_gather under
        # MultiWorkerMirroredStrategy) rejects an input-pipeline tensor that has no device. The ids that mask
        # false negatives (and go into the queue) are the positives' groups when the pairs have them.
        ids = tf.identity(tf.cast(features.get(POSITIVE_GROUP_ID, features["positive_id"]), tf.int64))  # [b]
        ctx = tf.distribute.get_replica_context()
        b = tf.shape(ids)[0]
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            gather = lambda x: ctx.all_gather(x, axis=0)  # noqa: E731
            offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * b
        else:
            gather, offset = tf.identity, 0
        all_keys, all_ids = gather(keys), gather(ids)  # [B, D], [B]
        labels = offset + tf.range(b)
        tau = model.temperature.tau()
        use_triplet = scl.use_triplet and scl.triplet_weight > 0
        if use_triplet or scl.negatives_in_infonce:
            neg_ids = tf.cast(features["negative_id"], tf.int64)
            negatives = model.keys(features["negative"])  # [b, D]
            pos_ids = tf.cast(features["positive_id"], tf.int64)
            has_negative = tf.logical_and(neg_ids >= 0, tf.not_equal(neg_ids, pos_ids))  # [b]
        candidates, candidate_ids, candidate_valid = all_keys, all_ids, None
        if scl.negatives_in_infonce:  # appended after the positives, so `labels` still point at them
            candidates = tf.concat([all_keys, gather(negatives)], 0)  # [2B, D]
            candidate_ids = tf.concat([all_ids, gather(neg_ids)], 0)
            negative_valid = gather(tf.cast(has_negative, tf.int32)) > 0  # [B] (collectives take no bool)
            candidate_valid = tf.concat([tf.ones_like(all_ids, tf.bool), negative_valid], 0)
        queue = {}
        if model.use_queue:
            queue = dict(queue_keys=tf.convert_to_tensor(model.queue.keys),  # [K, D]
                         queue_ids=tf.convert_to_tensor(model.queue.ids), queue_valid=model.queue.valid())
        if QUERY_ITEM_ID in features:
            queue["query_ids"] = tf.cast(features[QUERY_ITEM_ID], tf.int64)
        loss = info_nce(queries, candidates, labels, ids, candidate_ids, tau, key_valid=candidate_valid,
                        **queue)  # [b]
        if scl.symmetric_loss:  # item → query: the batch's queries are the candidates; same-item rows masked
            item_queries = model(features["positive"], training=training)  # [b, D]
            query_keys = gather(model.keys(features["query"]))  # [B, D]
            loss = 0.5 * (loss + info_nce(item_queries, query_keys, labels, ids, all_ids, tau))
        if use_triplet:
            loss += scl.triplet_weight * triplet(queries, keys, negatives, scl.triplet_margin, has_negative)
        return loss, ((all_keys, all_ids) if model.use_queue else None)

    def after_apply_gradients(self, model, aux):
        ops = []
        if model.use_queue:
            ops.append(model.update_key_encoder())
            ops.append(model.queue.enqueue(*aux))
        if model.learn_temperature:
            clamp = model.temperature.clamped_log_value
            ops.append(update_variables(lambda v: v.assign(clamp(v)), [model.temperature.log_temperature]))
        return tf.group(ops)

    # -- evaluation ----------------------------------------------------------------------
    def _predict_fn(self, encoder):
        """`encoder`'s inference call as one `tf.function`, made once per encoder."""
        predict = self._predict_fns.get(encoder)
        if predict is None:
            predict = tf.function(lambda x: encoder(x, training=False), reduce_retracing=True)
            self._predict_fns[encoder] = predict
        return predict

    def encode_split(self, encoder, split):
        """(query vectors, positive vectors, positive ids) of a split, encoded by `encoder` (the query tower).
        The rows are in the split's stored order (evaluation never shuffles)."""
        ds = self.build_inputs(split, self.config.data.eval_batch_size, training=False)
        predict = self._predict_fn(encoder)
        queries, positives, ids = [], [], []
        for features, _ in ds:
            queries.append(predict(features["query"]).numpy())
            positives.append(predict(features["positive"]).numpy())
            ids.append(features["positive_id"].numpy())
        return np.concatenate(queries), np.concatenate(positives), np.concatenate(ids)

    def candidates(self):
        """`(item ids [M], values [M], groups [M] or None)` of the dataset's fixed Acc@N candidate set, or None.

        A dataset names one in `manifest.extra["candidates"]` = `{"component", "column", "modality"}` and
        optionally `"group_column"` (the image_folder catalogue: every catalogue image, `items.parquet`'s `image`,
        grouped by product `class_id`); used when its modality is this task's. Without it the candidates are the
        split's distinct positives."""
        spec = self.manifest.extra.get("candidates")
        if not spec or spec.get("modality", self.scl.modality) != self.scl.modality:
            return None
        if "candidates" not in self._columns_cache:
            paths = self.manifest.files(spec["component"], "all")
            columns = ["item_id", spec["column"]] + ([spec["group_column"]] if spec.get("group_column") else [])
            try:
                table = pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
            except (pa.ArrowInvalid, KeyError, OSError) as e:
                raise ValueError(f"{paths}: the candidate table named by manifest.extra['candidates'] = {spec} is "
                                 f"not readable with columns {columns} ({e})") from e
            groups = (table.column(spec["group_column"]).to_numpy().astype(np.int64)
                      if spec.get("group_column") else None)
            self._columns_cache["candidates"] = (table.column("item_id").to_numpy().astype(np.int64),
                                                 np.asarray(table.column(spec["column"]).to_pylist(), dtype=object),
                                                 groups)
        return self._columns_cache["candidates"]

    def encode_values(self, encoder, values):
        """float32 `[M, D]` vectors of raw values (texts, or encoded images decoded at `image_size`)."""
        predict = self._predict_fn(encoder)
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(values), tf.string))
        if self.scl.modality == "image":
            size = self.scl.image_size
            ds = ds.map(lambda x: augment_lib.decode_image(x, size), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
        out = [predict(batch).numpy() for batch in ds.batch(self.config.data.eval_batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.scl.output_dim), np.float32)

    def evaluate_encoder(self, encoder, split="eval"):
        """Exact Acc@1/5/10 (eq. 6) of any tower of this modality on a split: each query against all distinct
        positives of the split (deduped by item id), or, when the dataset names a candidate set (`candidates`,
        e.g. a whole catalogue), against all of it (and the positives); with groups (products of several
        catalogue images), acc@N asks for any candidate of the positive's group and item_acc@N for the positive
        itself. Also used for untrained, zero-shot and CLIP-E towers."""
        queries, positives, ids = self.encode_split(encoder, split)
        own_items = self._columns(split).get(QUERY_ITEM_ID)  # the query's own item is not a candidate for it
        fixed = self.candidates()
        if fixed is None:
            result = acc_at_n(queries, positives, ns=(1, 5, 10), positive_ids=ids, exclude_ids=own_items)
            result["num_candidates"] = int(len(np.unique(ids)))
        else:
            cand_ids, values, groups = fixed
            vectors = self.encode_values(encoder, values)
            kwargs = dict(ns=(1, 5, 10), positive_ids=ids, exclude_ids=own_items, candidate_vectors=vectors,
                          candidate_ids=cand_ids)
            result = acc_at_n(queries, positives, candidate_groups=groups, **kwargs)
            if groups is not None:  # acc@N: the right group (product); item_acc@N: the pair's own positive
                result.update({f"item_{k}": v for k, v in acc_at_n(queries, positives, **kwargs).items()})
                result["num_candidate_groups"] = int(len(np.unique(groups)))
            result["num_candidates"] = int(len(np.union1d(cand_ids, ids)))
            result["candidate_set"] = self.manifest.extra["candidates"]["component"]
        result["num_queries"] = int(len(ids))
        if self.scl.modality == "text" and hasattr(encoder, "oov_fraction"):
            cols = self._columns(split)
            result["oov_fraction"] = encoder.oov_fraction(list(cols["query"]) + list(cols["positive"]))
        return result

    def evaluate(self, model, split="eval"):
        """`evaluate_encoder` of the SCL model's query encoder, plus τ, the queue fill and how often the split's
        triplets violate the margin (`triplet_violation_rate`, see `triplet_violations`)."""
        result = self.evaluate_encoder(model.encoder, split)
        result["temperature"] = float(model.temperature.tau())
        if model.use_queue:
            result["queue_fill"] = int(model.queue.count.numpy())
        result.update(self.triplet_violations(model, split))
        return result

    def triplet_violations(self, model, split="eval"):
        """How often the split's <query, positive, hard negative> triplets violate the margin, as the training
        loss sees them (query encoder for the query; the key encoder, or the encoder without MoCo, for the
        positive and the negative): `triplet_violation_rate` = the fraction of rows with a hard negative where
        `margin − q·p + q·n > 0` (only those rows give the triplet loss a gradient), `triplet_loss` its mean,
        `triplet_rows` the rows with a hard negative. Measured whether or not the run trains with the triplet
        loss, so the ablations can be compared."""
        margin = float(self.scl.triplet_margin)
        key_encoder = model.key_encoder if model.use_queue else model.encoder

        def terms_fn(features):
            q = model.encoder(features["query"], training=False)  # [b, D]
            p = key_encoder(features["positive"], training=False)
            n = key_encoder(features["negative"], training=False)
            pos_id, neg_id = (tf.cast(features[c], tf.int64) for c in ("positive_id", "negative_id"))
            valid = tf.logical_and(neg_id >= 0, tf.not_equal(neg_id, pos_id))  # [b]
            return triplet(q, p, n, margin), valid

        terms = self._triplet_fns.get(model)
        if terms is None or terms[1] != margin:
            terms = (tf.function(terms_fn, reduce_retracing=True), margin)
            self._triplet_fns[model] = terms
        terms = terms[0]

        losses, valid = [], []
        for features, _ in self.build_inputs(split, self.config.data.eval_batch_size, training=False):
            loss, ok = terms(features)
            losses.append(loss.numpy())
            valid.append(ok.numpy())
        losses, valid = np.concatenate(losses), np.concatenate(valid)
        rows = int(valid.sum())
        if rows == 0:
            return {"triplet_rows": 0}
        return {"triplet_rows": rows, "triplet_violation_rate": float((losses[valid] > 0).mean()),
                "triplet_loss": float(losses[valid].mean())}

    def write_vocabulary(self, model_dir):
        """`<model_dir>/vocab.json`: the words and counts of the text tower's vocabulary (text only)."""
        from mm_ads.utils import io as io_utils

        if self.vocabulary is None:
            return None
        path = os.path.join(model_dir, VOCAB_FILE)
        io_utils.write_json(path, {"vocabulary": self.vocabulary, **self.vocabulary_stats})
        return path

    def describe(self):
        return {"modality": self.scl.modality, "data_dir": os.path.abspath(self.config.data.data_dir),
                "num_train": self.num_examples("train"), "num_eval": self.num_examples("eval"),
                "use_queue": self.scl.use_queue, "use_triplet": self.scl.use_triplet,
                "symmetric_loss": self.scl.symmetric_loss, "negatives_in_infonce": self.scl.negatives_in_infonce,
                "vocabulary": None if self.vocabulary is None else {
                    k: v for k, v in self.vocabulary_stats.items() if k != "counts"}}
