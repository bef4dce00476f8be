"""CTR train-step throughput: our sparse path vs stock Keras 3, small vs large item table, FLOP use, memory.

For every variant (`--variants`) and two item-table sizes (`--small_rows`, `--big_rows`; the other tables are
small), one process builds and times:

* **ours** — the real step of `mm_ads.training.trainer.Trainer` (`_make_train_step`, fed through the
  trainer's own `distribute_datasets_from_function` input path): `build_ctr_model` with `SparseEmbedding`
  tables, the sparse optimizer (`--optimizer`) on the tables and Adam on the dense variables, loss averaged
  over the global batch, one host sync (`float(loss)`) per step as in `Trainer.train`.
* **stock** — a hand-written Keras-3 baseline with the same architecture: `keras.layers.Embedding` tables
  (padding zeroed like `SparseEmbedding`), but the non-embedding part reuses our `DINAttention`, `SimTier` and
  `MLP` layers so that only the embedding + optimizer path differs; one stock `keras.optimizers.Adagrad` /
  `Adam` (`--optimizer`) for every variable; `compile(loss=BinaryCrossentropy(from_logits=True),
  jit_compile=False)` and `model.fit(steps_per_epoch=--steps)` on a `tf.data` of the in-memory batch
  repeated (`--stock_big_steps` at `--big_rows`, where a stock step takes seconds). The first `fit` call
  (tracing) is not timed.

Inputs are one synthetic batch held in memory: ids Zipf-distributed over each table (so ids repeat within a
batch; ranks are scattered over the table by a multiplicative hash), ~`--pad_fraction` padding at the end of
histories, unit-norm float32 vectors. All configurations of a variant are timed interleaved in every repeat
(the VM's step times "snap"), and the table reports median and best ms/step over repeats.

FLOPs per example are counted analytically from the built layer shapes: a matmul of `[m, k] @ [k, n]` costs
`2·m·k·n` forward and `3×` that for forward + backward (weight and input gradients). Per example:

    attention  = 3·2·(S·(2E'+F_s)·H1 + E'·H1 + S·Σ H_i·H_i+1 + S·H_last + S·E')   (split first layer, pooling)
    mlp        = 3·2·(F·M1 + Σ M_i·M_i+1 + M_last)
    similarity = 2·S·D                                    (SimTier; forward only: no gradient reaches data)

with E' the concatenated id-embedding width, H the attention units, M the MLP units, F the MLP input width.
Elementwise ops, embedding gathers and optimizer updates are not counted. Utilisation = FLOPs/example ×
examples/s against (a) an fp32 `--matmul_size`² `tf.matmul` measured in the same run and (b) the design
note's ~544 GFLOP/s theoretical peak of this 2-core Zen 5. When it works, `tf.compat.v1.profiler` also
counts the FLOPs of the traced train step's graph (registered ops only) as a cross-check.

Memory: `VmRSS` before and after building each configuration (model + optimizer slots), and the peak
(`VmHWM`, reset through `/proc/self/clear_refs`) during its warm-up steps.

With `--peer=deepctr` (off by default) the `id` variant also times **DeepCTR's DIN** (`deepctr.models.DIN`, the
usual open-source implementation) on the same batch, in two configurations: `deepctr_shipped` (its default
`l2(1e-6)` embedding regulariser, whose gradient is dense) and `deepctr_tuned` (no embedding regulariser at all:
row-sparse table gradients). DeepCTR needs tf_keras, so each configuration runs in a worker process of its own
venv (`tools/bench/deepctr_peer.py`, `tools/bench/deepctr_worker.py`; create it once with
`python -m tools.bench.deepctr_peer --setup`), fed this process's batch through an `.npz` and driven over a pipe:
its timed steps are interleaved with ours and stock's like every other configuration (the parent times each
request; the worker runs `model.fit(steps_per_epoch=n)`, as stock does). Its memory columns are the worker
process's own. Its shapes: the same tables (user, item, category, brand; histories share the item / category /
brand tables), E, S, attention 80-40 and MLP 200-80 with PReLU, Adagrad at the same learning rate.

Run from the repository root (~5–8 minutes at the defaults on 2 cores):

```
python -m tools.bench.ctr_step
python -m tools.bench.ctr_step --variants=simtier --optimizer=adam --skip_stock
python -m tools.bench.ctr_step --variants=id --peer=deepctr --repeats=3 --steps=20   # + DeepCTR DIN
```
"""

import gc
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from mm_ads.config import CTRModelConfig, TrainConfig
from mm_ads.ctr.model import build_ctr_model, make_inputs, model_input_names
from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR, FeatureSpec, missing_flag_name
from mm_ads.layers.din_attention import DINAttention
from mm_ads.layers.mlp import MLP
from mm_ads.layers.sim_tier import SimTier
from mm_ads.training.task import Task
from mm_ads.training.trainer import Trainer
from tools.bench import deepctr_peer
from tools.bench import machine as bench_machine

_VARIANTS = flags.DEFINE_list("variants", ["id", "simtier"], "CTR variants to measure (id, simtier).")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adagrad", ["adagrad", "adam"],
                               "Sparse optimizer of ours and the stock optimizer of the baseline.")
_STEPS = flags.DEFINE_integer("steps", 40, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps after building each configuration.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved measurements per configuration.")
_BIG_ROWS = flags.DEFINE_integer("big_rows", 10_000_000, "Rows of the large item table.")
_SMALL_ROWS = flags.DEFINE_integer("small_rows", 100_000, "Rows of the small item table.")
_SKIP_STOCK = flags.DEFINE_bool("skip_stock", False, "Measure only our train step.")
_STOCK_BIG_STEPS = flags.DEFINE_integer(
    "stock_big_steps", 3, "Warm-up and timed steps of the stock baseline (and of DeepCTR as shipped, with "
    "--peer=deepctr) at --big_rows (its step takes seconds: the dense table read and update dominate, so a few "
    "steps suffice and keep the run short).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "Behaviour-sequence length S.")
_EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", 16, "Width of every id embedding.")
_VECTOR_DIM = flags.DEFINE_integer("vector_dim", 128, "Multimodal vector dim D.")
_ZIPF = flags.DEFINE_float("zipf_exponent", 1.2, "Zipf exponent of the synthetic ids (> 1).")
_PAD = flags.DEFINE_float("pad_fraction", 0.1, "Mean fraction of padded history positions.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "Side of the square fp32 matmul that measures peak.")
_DESIGN_PEAK = flags.DEFINE_float("design_peak_gflops", 544.0, "Theoretical fp32 peak quoted in DESIGN.md.")
_PROFILE_FLOPS = flags.DEFINE_bool("profile_flops", True, "Cross-check FLOPs with tf.compat.v1.profiler.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch and the initialisers.")
_PEER = flags.DEFINE_enum("peer", "none", ["none", "deepctr"],
                          "Also time a peer implementation on the id variant: deepctr = DeepCTR's DIN as shipped and "
                          "without its embedding regulariser, in its own venv (python -m tools.bench.deepctr_peer "
                          "--setup).")
_PEER_CONFIGS = flags.DEFINE_list("peer_configs", list(deepctr_peer.CONFIGS), "DeepCTR configurations to time "
                                  "with --peer=deepctr: shipped (l2(1e-6) on the tables), tuned (no regulariser).")
_PEER_VENV = flags.DEFINE_string("peer_venv", deepctr_peer.DEFAULT_VENV, "The DeepCTR peer venv.")
_PEER_ACTIVATION = flags.DEFINE_enum("peer_activation", "prelu", ["prelu", "library"],
                                     "Activation of the peer's MLPs: prelu (as ours) or library (DeepCTR's "
                                     "defaults: Dice in the attention, ReLU in the MLP).")

# Small side tables (the item table is the one whose size varies).
_NUM_USERS, _NUM_CATEGORIES, _NUM_BRANDS = 100_000, 1_000, 10_000
_HASH_MULTIPLIER = 2_654_435_761  # Knuth's multiplicative hash: scatters Zipf ranks over the table


# -- machine and memory ------------------------------------------------------------------------------------
def machine_info():
    """The machine (tools.bench.machine), the avx512f flag and the Keras version."""
    return bench_machine.machine_info(avx512f_flag=bench_machine.cpu_flag("avx512f"), keras=keras.__version__)


rss_mb, hwm_mb, reset_hwm = bench_machine.rss_mb, bench_machine.hwm_mb, bench_machine.reset_hwm


# -- synthetic inputs --------------------------------------------------------------------------------------
def make_spec(item_rows, seq_len, vector_dim):
    """`FeatureSpec.default` with an item table of `item_rows` rows (row 0 = padding) and small side tables."""
    return FeatureSpec.default(seq_len=seq_len, vector_dim=vector_dim, num_items=item_rows - 1,
                               num_categories=_NUM_CATEGORIES, num_brands=_NUM_BRANDS, num_users=_NUM_USERS)


def zipf_ids(rng, num_ids, shape, exponent):
    """Ids in `[1, num_ids]`: Zipf ranks (folded into range) scattered over the table by a hash."""
    ranks = (rng.zipf(exponent, size=shape).astype(np.int64) - 1) % num_ids
    return (ranks * _HASH_MULTIPLIER) % num_ids + 1


def synthetic_batch(spec, variant, batch, rng, exponent, pad_fraction):
    """One in-memory batch `(features, labels)` of the model inputs of `variant`, and the padding mask."""
    s = spec.seq_len
    pad = rng.integers(0, int(round(2 * pad_fraction * s)) + 1, batch)  # [B] mean ≈ pad_fraction·S
    valid = np.arange(s)[None, :] < (s - pad)[:, None]  # [B, S]
    features = {}
    for f in spec:
        if not f.is_id:
            continue
        ids = zipf_ids(rng, f.num_buckets - 1, (batch,) + f.shape, exponent)
        if f.role == "history":
            ids = np.where(valid, ids, f.padding_id)
        features[f.name] = ids
    if variant != "id":
        d = spec.vector_dim
        target = rng.standard_normal((batch, d), dtype=np.float32)
        hist = rng.standard_normal((batch, s, d), dtype=np.float32)
        target /= np.linalg.norm(target, axis=-1, keepdims=True)
        hist /= np.linalg.norm(hist, axis=-1, keepdims=True)
        features[ITEM_VECTOR] = target
        features[HIST_ITEM_VECTOR] = np.where(valid[..., None], hist, 0.0).astype(np.float32)
        features[missing_flag_name(ITEM_VECTOR)] = np.zeros(batch, np.float32)
        features[missing_flag_name(HIST_ITEM_VECTOR)] = (~valid).astype(np.float32)
    features = {k: features[k] for k in model_input_names(spec, variant)}
    labels = (rng.random(batch) < 0.1).astype(np.float32)
    return features, labels, valid


def repeated_dataset(features, labels):
    return tf.data.Dataset.from_tensors((features, labels)).repeat()


# -- ours: the real Trainer step ---------------------------------------------------------------------------
class InMemoryCTRTask(Task):
    """The CTR task's model and loss (`CTRTask.per_example_loss`) on one in-memory batch repeated."""

    def __init__(self, spec, model_config, features, labels):
        self.spec, self.model_config = spec, model_config
        self.features, self.labels = features, labels

    def build_model(self):
        return build_ctr_model(self.spec, self.model_config)

    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        if batch_size != len(self.labels):
            raise ValueError(f"The in-memory batch has {len(self.labels)} examples, asked for {batch_size}")
        return repeated_dataset(self.features, self.labels)

    def num_examples(self, split):
        return len(self.labels) * 10**9

    def per_example_loss(self, model, features, labels, training):
        logits = model(features, training=training)["logit"]  # [B]
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, logits.dtype), logits=logits)

    def evaluate(self, model, split):
        raise NotImplementedError("benchmark task: no evaluation")


class Ours:
    """`Trainer`'s own train step and input path; `run(n)` runs n steps with a host sync per step."""

    kind = "ours"

    def __init__(self, spec, model_config, features, labels, optimizer, batch_size, model_dir,
                 task_class=InMemoryCTRTask):
        task = task_class(spec, model_config, features, labels)
        config = TrainConfig(sparse_optimizer=optimizer, dense_optimizer="adam", seed=_SEED.value)
        config.validate()
        self.trainer = Trainer(task, config, batch_size, model_dir)
        self.model = self.trainer.model
        self.step_fn = self.trainer._make_train_step()
        self.iterator = iter(self.trainer._dataset(0, 0))

    def run(self, steps):
        loss = float("nan")
        for _ in range(steps):
            loss = float(self.step_fn(self.iterator))
        return loss

    def graph(self):
        return self.step_fn.get_concrete_function(self.iterator).graph


# -- stock Keras 3 baseline --------------------------------------------------------------------------------
def build_stock_model(spec, config):
    """`build_ctr_model`'s architecture with stock `keras.layers.Embedding` tables; outputs the logit `[B]`.

    Mirrors `mm_ads.ctr.model.build_ctr_model` for the `id` and `simtier` variants (same input names, same
    concatenation order, same DIN/SimTier/MLP layers); ids are in range, so no bucketing is needed.
    """
    variant = config.variant
    if variant not in ("id", "simtier"):
        raise ValueError(f"The stock baseline mirrors the id and simtier variants only, got {variant!r}")
    inputs = make_inputs(spec, variant)
    e = config.embedding_dim
    tables = {t: keras.layers.Embedding(n, e, name=f"emb_{t}") for t, n in spec.tables().items()}

    def embed(name):
        ids = inputs[name]
        valid = keras.ops.cast(keras.ops.not_equal(ids, spec[name].padding_id), "float32")
        return tables[spec[name].table](ids) * keras.ops.expand_dims(valid, -1)  # padding → 0

    history = spec.by_role("history")
    targets = [next(f for f in spec.by_role("item") if f.table == h.table) for h in history]
    mask = keras.ops.not_equal(inputs[history[0].name], history[0].padding_id)  # [B, S]
    query = keras.ops.concatenate([embed(t.name) for t in targets], axis=-1)  # [B, E·k]
    keys = keras.ops.concatenate([embed(h.name) for h in history], axis=-1)  # [B, S, E·k]
    other_item = [embed(f.name) for f in spec.by_role("item") if f.name not in {t.name for t in targets}]
    user = [embed(f.name) for f in spec.by_role("user") + spec.by_role("context")]
    mlp_inputs = []
    if variant == "simtier":
        hist_missing = keras.ops.equal(inputs[missing_flag_name(HIST_ITEM_VECTOR)], 0.0)
        hist_has_vec = keras.ops.logical_and(mask, hist_missing)
        mlp_inputs.append(keras.ops.expand_dims(inputs[missing_flag_name(ITEM_VECTOR)], -1))  # [B, 1]
        mlp_inputs.append(SimTier(num_tiers=config.num_tiers, count_transform=config.tier_transform,
                                  name="sim_tier")(inputs[ITEM_VECTOR], inputs[HIST_ITEM_VECTOR],
                                                   mask=hist_has_vec))  # [B, N]
    interest = DINAttention(hidden_units=config.attention_units, activation=config.activation,
                            name="din")(query, keys, mask=mask)  # [B, E·k]
    features = keras.ops.concatenate(user + [query, interest] + other_item + mlp_inputs, axis=-1)  # [B, F]
    mlp = MLP(hidden_units=config.mlp_units, activation=config.activation, dropout=config.dropout, output_units=1,
              name="mlp")
    logit = keras.ops.squeeze(mlp(features), -1)  # [B]
    return keras.Model(inputs, logit, name=f"stock_{variant}")


class Stock:
    """Stock Keras: `Embedding` + one stock optimizer + `compile` + `fit(steps_per_epoch=n)`."""

    kind = "stock"

    def __init__(self, spec, model_config, features, labels, optimizer, learning_rate):
        keras.utils.set_random_seed(_SEED.value)
        self.model = build_stock_model(spec, model_config)
        opt = {"adagrad": keras.optimizers.Adagrad, "adam": keras.optimizers.Adam}[optimizer](learning_rate)
        self.model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True),
                           jit_compile=False)
        opt.build(self.model.trainable_variables)  # slots now, so that the RSS after building includes them
        self.dataset = repeated_dataset(features, labels)

    def run(self, steps):
        history = self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
        return history.history["loss"][-1]


# -- the DeepCTR peer (its own venv and process) -----------------------------------------------------------
class Peer:
    """DeepCTR's DIN in a worker process (`tools.bench.deepctr_peer`); `run(n)` runs n steps there."""

    def __init__(self, config, rows, features, labels, learning_rate, warmup, work_dir):
        self.kind = f"deepctr_{config}"
        os.makedirs(work_dir, exist_ok=True)
        path = os.path.join(work_dir, "batch.npz")
        np.savez(path, label=labels, **features)
        args = [f"--config={config}", f"--batch={path}", f"--item_rows={rows}", f"--num_users={_NUM_USERS}",
                f"--num_categories={_NUM_CATEGORIES}", f"--num_brands={_NUM_BRANDS}",
                f"--embedding_dim={_EMBEDDING_DIM.value}", f"--learning_rate={learning_rate}",
                f"--warmup={warmup}", f"--activation={_PEER_ACTIVATION.value}", f"--seed={_SEED.value}"]
        self.process = deepctr_peer.PeerProcess(args, venv=_PEER_VENV.value)
        self.ready = self.process.ready
        self.worker_ms = []  # the worker's own timing of each request (the table uses the parent's)

    def run(self, steps):
        answer = self.process.run(steps)
        self.worker_ms.append(answer["ms_per_step"])
        return answer["loss"]

    def close(self):
        self.process.close()


def peer_kinds(variant):
    """The peer configurations timed for `variant` (DeepCTR's DIN has no SimTier: id only)."""
    if _PEER.value == "none" or variant != "id":
        return []
    return [f"deepctr_{c}" for c in _PEER_CONFIGS.value]


# -- FLOPs -------------------------------------------------------------------------------------------------
def _kernels(mlp):
    dims = [tuple(d.kernel.shape) for d in mlp.dense_layers]
    if mlp.output_layer is not None:
        dims.append(tuple(mlp.output_layer.kernel.shape))
    return dims  # [(in, out), ...]


def flops_per_example(model, seq_len, vector_dim):
    """Analytic train-step FLOPs per example (see the module docstring): `{part: flops}`."""
    s = seq_len
    din = model.get_layer("din")
    att = _kernels(din.attention_mlp)
    in_width, h1 = att[0]
    width = in_width // 4  # the first attention layer reads [q, k, q - k, q·k (, side)]
    side = in_width - 4 * width
    forward = s * (2 * width + side) * h1 + width * h1  # split first layer: per position + per example
    forward += sum(s * i * o for i, o in att[1:])  # deeper layers and the 1-unit output, per position
    forward += s * width  # softmax-weighted pooling
    parts = {"attention": 3 * 2 * forward,
             "mlp": 3 * 2 * sum(i * o for i, o in _kernels(model.get_layer("mlp")))}
    try:
        model.get_layer("sim_tier")
        parts["similarity"] = 2 * s * vector_dim
    except ValueError:
        pass
    return parts


def profiler_flops(graph):
    """FLOPs of a graph counted by `tf.compat.v1.profiler` (ops with registered statistics only), or None."""
    try:
        opts = (tf.compat.v1.profiler.ProfileOptionBuilder(tf.compat.v1.profiler.ProfileOptionBuilder
                                                            .float_operation()).with_empty_output().build())
        return tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops
    except Exception as e:  # the profiler is best-effort: report, don't fail the benchmark
        logging.warning("tf.compat.v1.profiler could not count FLOPs: %r", e)
        return None


def matmul_gflops(n, repeats):
    """GFLOP/s of `repeats` fp32 `[n, n] @ [n, n]` matmuls (after one warm-up)."""
    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)[:1, :1]))
    mm(a, b).numpy()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).numpy()
        out.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return out


# -- the measurement ---------------------------------------------------------------------------------------
def steps_of(kind, rows):
    """(warm-up steps, timed steps) of one configuration."""
    if kind in ("stock", "deepctr_shipped") and rows == _BIG_ROWS.value:  # seconds per step: dense table gradient
        return _STOCK_BIG_STEPS.value, _STOCK_BIG_STEPS.value
    return _WARMUP.value, _STEPS.value


def build_config(kind, variant, rows, batch, model_dir):
    """Builds one configuration; returns (runner, memory dict, build seconds)."""
    features, labels = batch
    spec = make_spec(rows, _SEQ_LEN.value, _VECTOR_DIM.value)
    model_config = CTRModelConfig(variant=variant, embedding_dim=_EMBEDDING_DIM.value)
    if kind.startswith("deepctr_"):  # memory and build time are the worker process's own
        runner = Peer(kind[len("deepctr_"):], rows, features, labels, TrainConfig().sparse_learning_rate,
                      steps_of(kind, rows)[0], model_dir)
        memory = {k: float("nan") if v is None else v for k, v in runner.ready["memory"].items()}
        logging.info("%s %s rows=%d built in %.1f s (worker): %s", kind, variant, rows, runner.ready["build_s"],
                     {k: runner.ready[k] for k in ("params", "tables", "regularisation_losses", "versions")})
        return runner, memory, runner.ready["build_s"]
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    if kind == "ours":
        runner = Ours(spec, model_config, features, labels, _OPTIMIZER.value, _BATCH_SIZE.value, model_dir)
    else:
        runner = Stock(spec, model_config, features, labels, _OPTIMIZER.value,
                       TrainConfig().sparse_learning_rate)
    built = time.perf_counter() - start
    after = rss_mb()
    have_reset = reset_hwm()
    runner.run(steps_of(kind, rows)[0])
    memory = {"build_mb": after - before, "rss_after_build_mb": after,
              "step_peak_mb": (hwm_mb() - after) if have_reset else float("nan"), "hwm_mb": hwm_mb()}
    logging.info("%s %s rows=%d built in %.1f s; RSS %+.0f MB → %.0f MB; peak during warm-up +%.0f MB",
                 kind, variant, rows, built, memory["build_mb"], after, memory["step_peak_mb"])
    return runner, memory, built


def measure_variant(variant, model_dir, rng):
    """All configurations of one variant, interleaved; returns {(kind, rows): result dict}, batch stats."""
    batch_size = _BATCH_SIZE.value
    sizes = [_SMALL_ROWS.value, _BIG_ROWS.value]
    kinds = ["ours"] + ([] if _SKIP_STOCK.value else ["stock"]) + peer_kinds(variant)
    batches, stats = {}, {}
    for rows in sizes:
        spec = make_spec(rows, _SEQ_LEN.value, _VECTOR_DIM.value)
        features, labels, valid = synthetic_batch(spec, variant, batch_size, rng, _ZIPF.value, _PAD.value)
        batches[rows] = (features, labels)
        hist = features["hist_item_id"][valid]
        item_rows = np.concatenate([features["item_id"], hist])
        stats[rows] = {"padding": 1.0 - valid.mean(), "unique_item_rows": len(np.unique(item_rows)),
                       "item_lookups": item_rows.size}
    configs = {}
    try:
        for kind in kinds:
            for rows in sizes:
                runner, memory, built = build_config(kind, variant, rows, batches[rows],
                                                     os.path.join(model_dir, f"{kind}_{variant}_{rows}"))
                configs[(kind, rows)] = {"runner": runner, "memory": memory, "build_s": built, "ms": []}
        for r in range(_REPEATS.value):
            for key, c in configs.items():
                steps = steps_of(*key)[1]
                start = time.perf_counter()
                c["runner"].run(steps)
                c["ms"].append((time.perf_counter() - start) * 1000.0 / steps)
                logging.info("repeat %d %s %s rows=%d: %.2f ms/step", r, key[0], variant, key[1], c["ms"][-1])
    finally:
        for c in configs.values():
            if isinstance(c["runner"], Peer):
                c["peer_worker_ms"] = c["runner"].worker_ms
                c["runner"].close()
    flops = flops_per_example(configs[("ours", sizes[0])]["runner"].model, _SEQ_LEN.value, _VECTOR_DIM.value)
    graph_flops = None
    if _PROFILE_FLOPS.value:
        graph_flops = profiler_flops(configs[("ours", sizes[0])]["runner"].graph())
    for c in configs.values():
        del c["runner"]
    return configs, stats, flops, graph_flops


def markdown_table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv):
    del argv
    for v in _VARIANTS.value:
        if v not in ("id", "simtier"):
            raise app.UsageError(f"--variants: only id and simtier are measured, got {v!r}")
    if _ZIPF.value <= 1.0:
        raise app.UsageError(f"--zipf_exponent must be > 1, got {_ZIPF.value}")
    if _PEER.value == "deepctr":
        for c in _PEER_CONFIGS.value:
            if c not in deepctr_peer.CONFIGS:
                raise app.UsageError(f"--peer_configs: one of {deepctr_peer.CONFIGS}, got {c!r}")
        if "id" not in _VARIANTS.value:
            raise app.UsageError("--peer=deepctr times DeepCTR's DIN on the id variant: add id to --variants")
        try:
            deepctr_peer.check_venv(_PEER_VENV.value)
        except deepctr_peer.PeerError as e:
            raise app.UsageError(f"--peer=deepctr: {e}") from None
    keras.config.set_dtype_policy("float32")
    info = machine_info()
    rng = np.random.default_rng(_SEED.value)
    batch = _BATCH_SIZE.value
    start_all = time.perf_counter()
    peak = matmul_gflops(_MATMUL.value, 3)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ctr_step_") as tmp:
        for variant in _VARIANTS.value:
            results[variant] = measure_variant(variant, tmp, rng)
            gc.collect()
            keras.backend.clear_session()
    peak += matmul_gflops(_MATMUL.value, 3)
    load_after = os.getloadavg()
    small, big = _SMALL_ROWS.value, _BIG_ROWS.value
    peak_best, peak_median = max(peak), statistics.median(peak)

    rows, ratio_rows, flop_rows, mem_rows, batch_rows = [], [], [], [], []
    for variant, (configs, stats, flops, graph_flops) in results.items():
        summary = {}
        for (kind, n), c in configs.items():
            med, best = statistics.median(c["ms"]), min(c["ms"])
            summary[(kind, n)] = (med, best)
            rows.append([variant, kind, f"{n:,}", f"{med:.2f}", f"{best:.2f}", f"{batch / med * 1000:,.0f}",
                         f"{batch / best * 1000:,.0f}", " ".join(f"{x:.1f}" for x in c["ms"])])
            m = c["memory"]
            mem_rows.append([variant, kind, f"{n:,}", f"{c['build_s']:.1f}", f"{m['build_mb']:+,.0f}",
                             f"{m['rss_after_build_mb']:,.0f}", f"{m['step_peak_mb']:+,.0f}", f"{m['hwm_mb']:,.0f}"])
        for n in (small, big):
            batch_rows.append([variant, f"{n:,}", f"{stats[n]['padding']:.1%}",
                               f"{stats[n]['unique_item_rows']:,} / {stats[n]['item_lookups']:,}"])
        ours_s, ours_b = summary[("ours", small)], summary[("ours", big)]
        ratio = ours_b[0] / ours_s[0]
        ratio_rows.append([variant, f"ours ms/step {big:,} / {small:,} rows", f"{ratio:.2f}",
                           f"{ours_b[1] / ours_s[1]:.2f}", "≤ 1.2", "met" if ratio <= 1.2 else "NOT met"])
        for kind in peer_kinds(variant):
            for n in (big, small):
                speedup = summary[(kind, n)][0] / summary[("ours", n)][0]
                ratio_rows.append([variant, f"ours / {kind} examples/s at {n:,} rows", f"{speedup:.2f}",
                                   f"{summary[(kind, n)][1] / summary[('ours', n)][1]:.2f}", "-", "-"])
            if ("stock", big) in summary:
                for n in (big, small):
                    speedup = summary[("stock", n)][0] / summary[(kind, n)][0]
                    ratio_rows.append([variant, f"{kind} / stock examples/s at {n:,} rows", f"{speedup:.2f}",
                                       f"{summary[('stock', n)][1] / summary[(kind, n)][1]:.2f}", "-", "-"])
        if ("stock", big) in summary:
            for n in (big, small):
                speedup = summary[("stock", n)][0] / summary[("ours", n)][0]
                target = "≥ 2.5" if n == big else "-"
                verdict = ("met" if speedup >= 2.5 else "NOT met") if n == big else "-"
                ratio_rows.append([variant, f"ours / stock examples/s at {n:,} rows", f"{speedup:.2f}",
                                   f"{summary[('stock', n)][1] / summary[('ours', n)][1]:.2f}", target, verdict])
        total = sum(flops.values())
        for n in (small, big):
            rate = batch / summary[("ours", n)][0] * 1000
            gflops = total * rate / 1e9
            flop_rows.append([variant, f"ours, {n:,} rows", f"{total / 1e6:.2f}",
                              "-" if graph_flops is None else f"{graph_flops / batch / 1e6:.2f}",
                              f"{gflops:.1f}", f"{gflops / peak_best:.1%}", f"{gflops / _DESIGN_PEAK.value:.1%}"])
        flop_parts = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in flops.items())
        flop_rows[-1].append(flop_parts)
        flop_rows[-2].append(flop_parts)

    load = info["load"]
    print(f"machine: {info['cpus']} CPUs, {info['cpu_model']} (avx512f in /proc/cpuinfo flags: "
          f"{info['avx512f_flag']}); load average (1/5/15 min) before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")
    print(f"versions: Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}; "
          "dtype float32, no XLA")
    print(f"shapes: batch {batch}, S={_SEQ_LEN.value}, E={_EMBEDDING_DIM.value}, D={_VECTOR_DIM.value}; item table "
          f"{small:,} vs {big:,} rows, users {_NUM_USERS + 1:,}, categories {_NUM_CATEGORIES + 1:,}, brands "
          f"{_NUM_BRANDS + 1:,}; ids Zipf({_ZIPF.value}); {_WARMUP.value} warm-up steps, then "
          f"{_REPEATS.value} interleaved repeats × {_STEPS.value} steps (stock at {big:,} rows: "
          f"{_STOCK_BIG_STEPS.value} + {_STOCK_BIG_STEPS.value}); total {time.perf_counter() - start_all:.0f} s")
    print(f"ours: Trainer._make_train_step, Sparse{_OPTIMIZER.value.capitalize()} on the tables + Adam on dense. "
          f"stock: keras.layers.Embedding + keras.optimizers.{_OPTIMIZER.value.capitalize()} on everything + "
          "model.fit; DINAttention/SimTier/MLP layers reused, so only the embedding + optimizer path differs.")
    if _PEER.value == "deepctr":
        print(f"peer: DeepCTR {deepctr_peer.DEEPCTR_VERSION} DIN (tf_keras {deepctr_peer.TF_KERAS_VERSION}, "
              f"TF_USE_LEGACY_KERAS=1, own venv {_PEER_VENV.value}, one worker process per configuration), id "
              f"variant only, {_PEER_ACTIVATION.value} activations, tf.keras Adagrad + model.fit on everything; "
              "deepctr_shipped = library default l2(1e-6) on every table (dense table gradient), deepctr_tuned = "
              "no embedding regulariser (row-sparse). Peer memory columns: the worker process's own RSS.")
    print()
    print(markdown_table(rows, ["variant", "path", "item rows", "median ms/step", "best ms/step",
                                "median ex/s", "best ex/s", "per repeat ms"]))
    print()
    print(markdown_table(ratio_rows, ["variant", "ratio", "median", "best", "target", "verdict"]))
    print()
    print(f"peak: fp32 {_MATMUL.value}² tf.matmul best {peak_best:.0f} GFLOP/s (median {peak_median:.0f}, "
          f"before+after); theoretical (DESIGN.md) {_DESIGN_PEAK.value:.0f} GFLOP/s")
    print(markdown_table(flop_rows, ["variant", "step", "analytic MFLOP/ex", "profiler MFLOP/ex", "GFLOP/s (median)",
                                     "vs measured matmul", "vs theoretical", "parts (MFLOP/ex)"]))
    print()
    print(markdown_table(mem_rows, ["variant", "path", "item rows", "build s", "ΔRSS build MB", "RSS after MB",
                                    "step peak over RSS MB", "VmHWM MB"]))
    print()
    print(markdown_table(batch_rows, ["variant", "item rows", "history padding", "unique item rows / lookups"]))


if __name__ == "__main__":
    app.run(main)
