"""The CTR task: inputs from the canonical dataset, binary cross-entropy, exact evaluation with slices."""

import os

import tensorflow as tf

from mm_ads.ctr.make import restore_make
from mm_ads.ctr.model import build_ctr_model, model_input_names
from mm_ads.data import pipeline
from mm_ads.data.dataset import Manifest, read_item_stats
from mm_ads.data.spec import ITEM_CREATED_AT, ITEM_ID, TIMESTAMP, FeatureSpec
from mm_ads.data.vectors import VectorTable
from mm_ads.metrics.ctr import CTRMetrics
from mm_ads.training.task import Task


class CTRTask(Task):
    """Trains and evaluates a CTR model variant on a canonical dataset (under any strategy).

    Args:
        config: a validated `mm_ads.config.ExperimentConfig`.
        extra_block: forwarded to `build_ctr_model` (more MLP inputs).
        make_checkpoint: for the MAKE variants, a checkpoint of MAKE's pre-training (phase A) whose MAKE
            variables `build_model` restores into the new model (see `mm_ads.ctr.make`).
        vector_dim: for a multimodal variant whose vectors the caller joins itself (the near-line trainer
            reads them from the online index table): the vector dim D of the model's FeatureSpec. No vector
            table is loaded, so `build_inputs` and `evaluate` are then unavailable; the model, loss and
            training step are unchanged.
        vector_dims: the same for several modalities: `{modality: D}` (`FeatureSpec.with_modalities`; `{"": D}` is
            `vector_dim=D`).
    """

    def __init__(self, config, extra_block=None, make_checkpoint=None, vector_dim=None, vector_dims=None):
        self.config = config
        self.extra_block = extra_block
        self.make_checkpoint = make_checkpoint
        data = config.data
        self.manifest = Manifest.load(data.data_dir)
        spec = self.manifest.spec
        if spec is None:
            raise ValueError(f"Dataset {data.data_dir} has no FeatureSpec: it holds no CTR impressions")
        base = FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0)
        self.join, self.joins = None, []
        if vector_dim is not None:
            vector_dims = {"": int(vector_dim)}
        if config.model.uses_vectors and vector_dims:
            self.spec = base.with_modalities(vector_dims)
        elif config.model.uses_vectors:
            tables = {modality: VectorTable.load(path) for modality, path, _ in pipeline.resolve_modality_tables(
                self.manifest, data.vector_table or None, option="--vector_table")}
            self.spec = base.with_modalities({m: t.dim for m, t in tables.items()})
            self.joins = [pipeline.VectorJoin(t, self.spec, modality=m) for m, t in tables.items()]
            if len(self.joins) == 1:
                self.join = self.joins[0]
        else:
            self.spec = base
        self.input_names = model_input_names(self.spec, config.model.variant)
        self._eval_fn = None
        self._train_counts = None

    supports_parameter_server = True

    def build_model(self):
        model = build_ctr_model(self.spec, self.config.model, extra_block=self.extra_block,
                                embedding_shards=self.config.train.embedding_shards)
        if self.make_checkpoint:
            restore_make(model, self.make_checkpoint)
        return model

    def _split_name(self, split):
        """The dataset's name of the task's split `"train"`, `"valid"` or `"eval"`."""
        data = self.config.data
        if split == "valid":
            if not self.manifest.has_split("ctr", data.valid_split):
                raise ValueError(f"Dataset {data.data_dir} has no ctr validation split (--valid_split="
                                 f"{data.valid_split!r})")
            return data.valid_split
        return data.train_split if split == "train" else data.eval_split

    def selection_split(self):
        """`"valid"` when the dataset has the `--valid_split` (other than `--eval_split`): early stopping then
        chooses the epoch there, never on the split it reports; else `"eval"`."""
        data = self.config.data
        return "valid" if self.manifest.validation_split(data.valid_split, data.eval_split) else "eval"

    def num_examples(self, split):
        return self.manifest.num_rows("ctr", self._split_name(split))

    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        if self.config.model.uses_vectors and not self.joins:
            raise ValueError("This CTRTask was built with vector_dim= (vectors joined by the caller): it has no "
                             "vector table for a tf.data pipeline")
        data = self.config.data
        name = self._split_name(split)
        shuffle = training and data.shuffle_buffer > 0
        # Training repeats the split: an epoch is `num_examples // global batch` steps, and under
        # multi-worker training a worker whose shard holds fewer examples than that must not run dry
        # (its peers would wait for it in the all-reduce). Within one epoch nothing repeats otherwise.
        # epoch=None: an unseeded shuffle (parameter-server workers each draw their own order).
        return pipeline.make_ctr_dataset(
            data.data_dir, name, batch_size, vector_table=self.joins or None, spec=self.spec, shuffle=shuffle,
            shuffle_buffer=max(data.shuffle_buffer, 1),
            seed=None if epoch is None else self.config.train.seed * 1000 + epoch,
            input_context=input_context, drop_remainder=training, repeat=training,
        )

    def model_inputs(self, features):
        return {k: features[k] for k in self.input_names}

    def per_example_loss(self, model, features, labels, training):
        logits = model(self.model_inputs(features), training=training)["logit"]  # [B]
        labels = tf.cast(labels, logits.dtype)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)  # [B]

    def train_counts(self):
        """(item ids, training impressions) from the dataset's item_stats, or None (read once)."""
        if "item_stats" not in self.manifest.components:
            return None
        if self._train_counts is None:
            self._train_counts = read_item_stats(self.manifest)
        return self._train_counts

    def evaluate(self, model, split="eval"):
        """Exact AUC, GAUC (by user), LogLoss, calibration and frequency/new-item/age slices."""
        data = self.config.data
        ds = self.build_inputs(split, data.eval_batch_size, training=False)

        def predict(inputs):
            # one trace per model: the batch dimension is left open (the last batch is smaller), so evaluating
            # never retraces (TF's retracing warnings)
            if self._eval_fn is None or self._eval_fn[0] is not model:
                signature = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in inputs.items()}
                self._eval_fn = (model, tf.function(lambda f: model(f, training=False)["ctr"],
                                                    input_signature=[signature]))
            return self._eval_fn[1](inputs)

        counts = self.train_counts()
        metrics = CTRMetrics(train_counts_by_item=counts)
        user = self.spec.by_role("user")[0].name if self.spec.by_role("user") else None
        has_age = TIMESTAMP in self.spec and ITEM_CREATED_AT in self.spec
        for features, labels in ds:
            probs = predict(self.model_inputs(features)).numpy()
            metrics.update(
                labels.numpy(), probs,
                groups=features[user].numpy() if user else None,
                item_ids=features[ITEM_ID].numpy() if counts is not None and ITEM_ID in self.spec else None,
                item_ages=(features[TIMESTAMP] - features[ITEM_CREATED_AT]).numpy() if has_age else None,
            )
        result = metrics.result()
        if self.join is not None:
            result["vector_join"] = {k: v for k, v in self.join.stats(log=False).items()}
        elif self.joins:
            result["vector_join"] = {j.modality: j.stats(log=False) for j in self.joins}
        return result

    def describe(self):
        return {"variant": self.config.model.variant, "data_dir": os.path.abspath(self.config.data.data_dir),
                "num_train": self.num_examples("train"), "num_eval": self.num_examples("eval")}
