"""The one custom training loop, used under every tf.distribute strategy.

A `tf.function` step runs under `strategy.run`: per-example losses are averaged over the
**global** batch (so replicas' gradients sum to the single-device gradient), embedding
tables go to a sparse optimizer (row-sparse updates), all other variables to a dense one.
`Trainer.train_batch` runs the same step on a batch handed over from Python (the near-line trainer's
stream batches) instead of the task's `tf.data` pipeline.

Fault tolerance: a checkpoint (model, both optimizers, global step) is written every
`checkpoint_every` steps and at the end. The input order of epoch `e` is a pure function
of (seed, e), so a restarted run restores the last checkpoint and skips the batches of the
current epoch it had already trained on: a kill loses at most the steps since the last
checkpoint and never trains a batch twice in the resulting model.

Early stopping (`early_stopping_patience > 0`): after every epoch the trainer evaluates on the task's
selection split (`Task.selection_split`: a CTR dataset's validation split when it has one, so that the epoch
is never chosen on the split whose metrics are reported), keeps the best epoch's checkpoint in
`<model_dir>/ckpt_best/` and stops once `early_stopping_patience` evaluations in a row did not beat it; the
model then holds the best epoch's weights, evaluated once on the eval split, and the returned metrics are
theirs. The decision is re-derived from `eval_history.json` (every entry names its `split`) on resume, so a
restarted run stops where it would have.

Clusters (see `mm_ads.training.distribute`):
  * MultiWorkerMirroredStrategy: every worker runs this loop in lock-step on its own input shard.
    Only the chief writes `<model_dir>/ckpt`, summaries and `eval_history.json` and evaluates; the other
    workers take part in every save (as TensorFlow requires) into a temporary directory that is deleted
    at once, and restore from the chief's `ckpt/` (the model dir must be on storage every worker reads).
    After a lost worker, the whole cluster is restarted and resumes from the last checkpoint exactly as
    a single process does.
  * ParameterServerStrategy: the chief is the coordinator. It schedules steps on the workers through a
    `ClusterCoordinator` (asynchronous: each worker applies its step's gradients to the variables on the
    ps tasks as soon as it is done), waits for them at log/checkpoint/evaluation points, and evaluates
    and saves from the ps variables. Each worker reads the whole training split, repeated and shuffled in
    its own unseeded order (the coordinator traces one dataset function for all workers: there is no
    per-worker shard index), so an epoch is `num_examples // batch_size` steps drawn across workers.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mm_ads import config as config_lib
from mm_ads.training import distribute
from mm_ads.training import model_dir as run_dir
from mm_ads.training.checkpoint import training_checkpoint
from mm_ads.training.sparse_optimizers import SparseAdagrad, SparseAdam, SparseSGD, combine_rows
from mm_ads.utils import io as io_utils

_SPARSE = {"sgd": SparseSGD, "adagrad": SparseAdagrad, "adam": SparseAdam}
_DENSE = {"sgd": keras.optimizers.SGD, "adagrad": keras.optimizers.Adagrad, "adam": keras.optimizers.Adam}


def _split(entry):
    """The split of an evaluation history entry (entries written before splits were recorded: "eval")."""
    return entry.get("split", "eval")


def planned_steps(num_examples, global_batch, config):
    """`(steps per epoch, total steps)` of training `num_examples` with `config` (a `TrainConfig`)."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"The training split has {num_examples} examples, fewer than one batch of {global_batch}")
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    return steps_per_epoch, total


class _Progress:
    """One progress line: a bar, the loss and examples/s (rewritten in place on a terminal)."""

    def __init__(self, total_steps, stream=sys.stderr):
        self.total, self.stream = total_steps, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def show(self, step, epoch, loss, rate, final=False):
        frac = step / max(self.total, 1)
        bar = "=" * int(frac * 24)
        line = (f"step {step}/{self.total} [{bar:<24}] epoch {epoch} loss {loss:.4f} "
                f"{rate:,.0f} examples/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class Trainer:
    """Trains a `Task` with the custom loop.

    Args:
        task: a `mm_ads.training.task.Task`.
        config: a `mm_ads.config.TrainConfig`.
        batch_size: global training batch size.
        model_dir: where checkpoints (`ckpt/`), summaries (`summaries/`) and logs go.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        extra_checkpoint: `{name: trackable}` saved and restored in the same checkpoint as the model and
            optimizers (e.g. the near-line trainer's stream offsets: one atomic checkpoint for both).
        combine_sparse_gradients: sum the table gradients' rows of each distinct id on every replica before
            they are all-gathered or sent to the ps tasks (`combine_rows`); None = only when they travel
            (more than one replica, or parameter servers). Same math, fewer bytes.
    """

    def __init__(self, task, config, batch_size, model_dir, strategy=None, extra_checkpoint=None,
                 combine_sparse_gradients=None):
        self.task = task
        self.config = config
        self.global_batch = int(batch_size)
        self.model_dir = model_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = distribute.is_chief(self.strategy)
        self.parameter_server = distribute.is_parameter_server(self.strategy)
        if self.parameter_server and not task.supports_parameter_server:
            raise ValueError(f"{type(task).__name__} does not support strategy=parameter_server (its replicas must "
                             "stay in lock-step); use multi_worker")
        replicas = self.strategy.num_replicas_in_sync
        self.combine_sparse_gradients = (replicas > 1 or self.parameter_server if combine_sparse_gradients is None
                                         else bool(combine_sparse_gradients))
        if self.global_batch % replicas:
            raise ValueError(f"batch_size {self.global_batch} must be divisible by the {replicas} replicas")
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            self.model = task.build_model()
            sparse = task.sparse_variables(self.model)
            sparse_ids = {id(v) for v in sparse}
            self.sparse_vars = sparse
            self.dense_vars = [v for v in self.model.trainable_variables if id(v) not in sparse_ids]
            self.sparse_opt = _SPARSE[config.sparse_optimizer](config.sparse_learning_rate)
            self.dense_opt = _DENSE[config.dense_optimizer](config.dense_learning_rate)
            if self.sparse_vars:
                self.sparse_opt.build(self.sparse_vars)
                for layer in self.model._flatten_layers():
                    if hasattr(layer, "use_optimizer"):  # tables that hand rows to new ids reset their slots
                        layer.use_optimizer(self.sparse_opt)
            if self.dense_vars:
                self.dense_opt.build(self.dense_vars)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        if self.parameter_server:
            self._log_placement()
        self.checkpoint = training_checkpoint(self.model, self.sparse_opt, self.dense_opt, self.step,
                                              **(extra_checkpoint or {}))
        # Every process restores from the chief's directory; only the chief's manager writes there.
        self.ckpt_dir = run_dir.path(model_dir, run_dir.CKPT)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir, max_to_keep=3) if self.chief else None
        self._saved_step = None
        self._planned = None
        self._train_step = None
        self._batch_step = None
        self.history = []
        self.best_manager = (tf.train.CheckpointManager(self.checkpoint, run_dir.path(model_dir, run_dir.CKPT_BEST),
                                                        max_to_keep=1)
                             if self.chief and config.early_stopping_patience else None)
        self.early_stopping = None  # the summary of early stopping, after `train`
        # where early stopping's end-of-epoch evaluations run ("eval", or "valid" for a task that has it)
        self.selection = task.selection_split() if config.early_stopping_patience else "eval"

    def _log_placement(self):
        """Logs where every table shard and sparse-optimizer slot lives (`<path> [rows, E] on <device>`), and every
        lookup table (`<key> (lookup table) on <device>`)."""
        for v in self.sparse_vars + [v for v in self.sparse_opt.variables if len(v.shape) == 2]:
            logging.info("placement: %s %s on %s", v.path, list(v.shape), _as_tf(v).device)
        for layer in self.model._flatten_layers():  # the id → row maps of dynamic tables
            for key, table in (layer.lookup_tables() if hasattr(layer, "lookup_tables") else {}).items():
                logging.info("placement: %s (lookup table) on %s", key, table.resource_handle.device)

    @property
    def steps_per_epoch(self):
        return self._planned_steps()[0]

    @property
    def total_steps(self):
        return self._planned_steps()[1]

    def _planned_steps(self):
        # computed on first use: a trainer fed batch by batch (`train_batch`) has no planned epochs
        if self._planned is None:
            self._planned = planned_steps(self.task.num_examples("train"), self.global_batch, self.config)
        return self._planned

    # -- the step ------------------------------------------------------------------------
    def _make_step_fn(self):
        """The replica step: forward, loss averaged over the global batch, sparse + dense updates."""
        task, model = self.task, self.model
        sparse_vars, dense_vars = self.sparse_vars, self.dense_vars
        k = len(sparse_vars)
        global_batch = self.global_batch
        strategy = self.strategy
        combine = self.combine_sparse_gradients

        def step_fn(features, labels):
            with tf.GradientTape() as tape:
                per_example = task.per_example_loss(model, features, labels, training=True)
                aux = None
                if isinstance(per_example, tuple):
                    per_example, aux = per_example
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                if model.losses:
                    loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
            targets = [v.value for v in sparse_vars] + [v.value for v in dense_vars]
            grads = tape.gradient(loss, targets)
            if k:
                sparse_grads = [combine_rows(g) for g in grads[:k]] if combine else grads[:k]
                self.sparse_opt.apply_gradients(zip(sparse_grads, sparse_vars))
            if dense_vars:
                self.dense_opt.apply_gradients(zip(grads[k:], dense_vars))
            task.after_apply_gradients(model, aux)
            return loss

        return step_fn

    def _make_train_step(self):
        step_fn, strategy = self._make_step_fn(), self.strategy

        @tf.function
        def train_step(iterator):
            features, labels = next(iterator)
            per_replica = strategy.run(step_fn, args=(features, labels))
            self.step.assign_add(1)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return train_step

    def _dataset(self, epoch, skip):
        def fn(input_context):
            per_replica = input_context.get_per_replica_batch_size(self.global_batch)
            ds = self.task.build_inputs("train", per_replica, input_context=input_context, epoch=epoch,
                                        training=True)
            return ds.skip(skip) if skip else ds

        return self.strategy.distribute_datasets_from_function(fn)

    def train_batch(self, features, labels):
        """One training step on a batch held by the caller; returns the loss (a float).

        The same step as `train` (the same replica step, optimizers and global-step counter), fed from
        Python instead of a `tf.data` pipeline: `features` maps the task's input names to arrays with the
        batch first, `labels` is `[n]`. Every example keeps the weight it has in a full batch (the loss is
        averaged over `batch_size`), so a batch of `n < batch_size` examples takes an `n / batch_size`
        step. One replica only (the default strategy). Traced once for every batch size.
        """
        if self.strategy.num_replicas_in_sync != 1:
            raise ValueError("train_batch feeds one replica: use the default strategy")
        if self._batch_step is None:
            step_fn, strategy = self._make_step_fn(), self.strategy

            @tf.function(reduce_retracing=True)
            def batch_step(features, labels):
                loss = strategy.run(step_fn, args=(features, labels))
                self.step.assign_add(1)
                return loss

            self._batch_step = batch_step
        return float(self._batch_step(features, labels))

    # -- the loop ------------------------------------------------------------------------
    @property
    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.ckpt_dir)

    def restore(self):
        latest = self.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Restored %s (step %d)", latest, int(self.step.numpy()))
        self._saved_step = int(self.step.numpy()) if latest else None
        return int(self.step.numpy())

    def save(self, best=False):
        """Writes a checkpoint of the current step (chief: `<model_dir>/ckpt`, or `ckpt_best` with `best`; other
        workers: a temporary directory, deleted at once — they take part because a multi-worker save may need
        every worker)."""
        step = int(self.step.numpy())
        if not best:
            self._saved_step = step
        if self.chief:
            path = (self.best_manager if best else self.manager).save(checkpoint_number=step)
            logging.info("Saved checkpoint %s", path)
            return path
        tmp = tempfile.mkdtemp(prefix="mm_ads-worker-ckpt-")
        try:
            self.checkpoint.write(os.path.join(tmp, run_dir.CKPT))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return None

    def _load_history(self):
        path = run_dir.path(self.model_dir, run_dir.EVAL_HISTORY)
        if os.path.exists(path):
            with open(path) as f:
                self.history = json.load(f)

    def _evaluate(self, epoch, step, split="eval"):
        """Evaluates the model on the task's `split` ("eval", or "valid"), recorded in the history (and
        `eval_history.json`) with its `split`; returns the metrics."""
        if not self.chief:  # metrics are the chief's: the other workers go on (they wait at the next step)
            return {}
        metrics = self.task.evaluate(self.model, split)
        entry = {"epoch": epoch, "step": step, "split": split,
                 **{k: v for k, v in metrics.items() if not isinstance(v, dict)}}
        self.history = [h for h in self.history if (h["step"], _split(h)) != (step, split)] + [entry]
        if self.chief:
            io_utils.write_json(run_dir.path(self.model_dir, run_dir.EVAL_HISTORY), self.history)
            with self.writer.as_default(step=step):
                for k, v in entry.items():
                    if isinstance(v, float) and math.isfinite(v):
                        tf.summary.scalar(f"eval/{k}", v)
        logging.info("eval at step %d (epoch %.2f): %s", step, epoch, entry)
        return metrics

    def _early_stopping_state(self):
        """`(best entry, evaluations since it)` over the end-of-epoch entries of the evaluation history on the
        selection split."""
        metric = self.config.early_stopping_metric
        higher = config_lib.EARLY_STOPPING_METRICS[metric]
        best, since = None, 0
        for entry in sorted(self.history, key=lambda h: h["step"]):
            value = entry.get(metric)
            if (value is None or not math.isfinite(value) or entry["step"] % self.steps_per_epoch
                    or _split(entry) != self.selection):
                continue
            if best is None or (value > best[metric] if higher else value < best[metric]):
                best, since = entry, 0
            else:
                since += 1
        return best, since

    def _should_stop(self):
        patience = self.config.early_stopping_patience
        return bool(patience) and self._early_stopping_state()[1] >= patience

    def _after_epoch_evaluation(self, step):
        """Early stopping after the evaluation at `step` (an epoch's end): keeps a new best; True = stop."""
        best, since = self._early_stopping_state()
        if best is not None and best["step"] == step:
            self.save(best=True)
        return since >= self.config.early_stopping_patience

    def _finish_early_stopping(self, step, last_eval):
        """Loads the best epoch's weights (evaluated again: the returned metrics are theirs) and records the
        summary in `self.early_stopping`."""
        cfg = self.config
        best, since = self._early_stopping_state()
        if best is None:
            raise ValueError(f"Early stopping on {cfg.early_stopping_metric!r}: no end-of-epoch evaluation has it")
        self.early_stopping = {
            "metric": cfg.early_stopping_metric, "patience": cfg.early_stopping_patience, "split": self.selection,
            "best_epoch": round(best["step"] / self.steps_per_epoch), "best_step": best["step"],
            "best_value": best[cfg.early_stopping_metric], "epochs_trained": round(step / self.steps_per_epoch),
            "max_epochs": round(self.total_steps / self.steps_per_epoch), "stopped_early": step < self.total_steps,
        }
        logging.info("early stopping: %s", self.early_stopping)
        if best["step"] == step and last_eval and self.selection == "eval":
            return last_eval
        if best["step"] != step:
            best_dir = run_dir.path(self.model_dir, run_dir.CKPT_BEST)
            path = tf.train.latest_checkpoint(best_dir)
            if path is None or not path.endswith(f"-{best['step']}"):
                raise ValueError(f"The best epoch's checkpoint (step {best['step']}) is missing from {best_dir} "
                                 f"(found {path})")
            self.checkpoint.restore(path).assert_existing_objects_matched()
        if self.selection == "eval":
            return self.task.evaluate(self.model, "eval") if self.chief else {}
        # the chosen epoch, once on the eval split (recorded in the history under that split)
        return self._evaluate(best["epoch"], best["step"], "eval")

    def train(self):
        """Runs (or resumes) training to `total_steps` (or early stopping); returns the final evaluation
        metrics (with early stopping: of the best epoch, whose weights the model then holds)."""
        cfg = self.config
        os.makedirs(self.model_dir, exist_ok=True)
        self.writer = (tf.summary.create_file_writer(os.path.join(self.model_dir, "summaries")) if self.chief
                       else tf.summary.create_noop_writer())
        self._load_history()
        step = self.restore()
        if self.parameter_server:
            if cfg.early_stopping_patience:
                raise ValueError("early stopping is not supported with strategy=parameter_server")
            return self._train_parameter_server(step)
        if self._train_step is None:
            self._train_step = self._make_train_step()
        progress = _Progress(self.total_steps)
        last_eval = None
        stop = self._should_stop()
        t0, n0, loss_sum, loss_n = time.time(), step, 0.0, 0
        while step < self.total_steps and not stop:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            iterator = iter(self._dataset(epoch, in_epoch))
            while in_epoch < self.steps_per_epoch and step < self.total_steps:
                loss = float(self._train_step(iterator))
                self._check_finite([loss], f"at step {step + 1}")
                step += 1
                in_epoch += 1
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
                if self._log_due(step):
                    self._log_training(progress, step, loss_sum / loss_n, n0, t0)
                    t0, n0, loss_sum, loss_n = time.time(), step, 0.0, 0
                if step % cfg.checkpoint_every == 0:
                    self.save()
                end_of_epoch = in_epoch == self.steps_per_epoch
                if self._eval_due(step):
                    last_eval = self._evaluate(step / self.steps_per_epoch, step, self.selection)
                    if cfg.early_stopping_patience and end_of_epoch:
                        stop = self._after_epoch_evaluation(step)
                        if stop:
                            logging.info("early stopping at epoch %d: no better %s on the %s split for %d epoch(s)",
                                         epoch + 1, cfg.early_stopping_metric, self.selection,
                                         cfg.early_stopping_patience)
                            break
        return self._finish(step, last_eval)

    # -- what both loops share -------------------------------------------------------------
    def _log_due(self, step):
        return step % self.config.log_every == 0 or step == self.total_steps

    def _eval_due(self, step):
        """Every `eval_every` steps, or at the end of every epoch when `eval_every` is 0."""
        every = self.config.eval_every
        return bool(step % every == 0 if every else step % self.steps_per_epoch == 0)

    def _check_finite(self, losses, where):
        bad = [x for x in losses if not math.isfinite(x)]
        if bad:
            raise FloatingPointError(f"Loss became {bad[0]} {where}; the last checkpoint ({self.latest_checkpoint}) "
                                     "is intact")

    def _log_training(self, progress, step, loss, since_step, since_time):
        """The progress line and the train/ summaries: mean loss and examples per second since `since_step`."""
        rate = (step - since_step) * self.global_batch / max(time.time() - since_time, 1e-9)
        progress.show(step, (step - 1) // self.steps_per_epoch + 1, loss, rate, final=step == self.total_steps)
        if self.chief:
            with self.writer.as_default(step=step):
                tf.summary.scalar("train/loss", loss)
                tf.summary.scalar("train/examples_per_second", rate)

    def _finish(self, step, last_eval):
        """The last checkpoint and evaluation (with early stopping: the best epoch's); returns its metrics."""
        if self._saved_step != step:  # the same decision on every worker
            self.save()
        if self.config.early_stopping_patience:
            last_eval = self._finish_early_stopping(step, last_eval)
        elif last_eval is None:
            last_eval = self._evaluate(step / self.steps_per_epoch, step)
        self.writer.flush()
        return last_eval

    # -- the parameter-server loop ---------------------------------------------------------
    def per_worker_iterator(self, coordinator):
        """An iterator over every worker's own input pipeline, for steps scheduled by `coordinator`.

        Worker `i` of `W` reads its own part of the training split (files `i, i+W, ...`, or every W-th record
        when there are fewer files than workers), repeated, shuffled in the worker's own unseeded order.
        Without this split every worker would read the whole split in its own order: in the steps of one
        epoch some examples would be trained on twice and others never (the one-epoch CTR models of this
        package over-fit on repeated examples; measured in BUILD.md).
        """
        # the coordinator is connected to the cluster: its devices include every worker task's
        num_workers = len({d.name.split("/device:")[0] for d in tf.config.list_logical_devices()
                           if "/job:worker/" in d.name})
        logging.info("Input of the parameter-server workers: each of %d reads its own 1/%d of the split",
                     num_workers, num_workers)

        def dataset_fn(input_context):
            per_replica = input_context.get_per_replica_batch_size(self.global_batch)
            # ParameterServerStrategy hands every worker the same context (one pipeline): the worker's
            # index is only known where the function runs, as a tensor.
            worker_context = tf.distribute.InputContext(
                num_input_pipelines=num_workers,
                input_pipeline_id=tf.distribute.coordinator.experimental_get_current_worker_index(),
                num_replicas_in_sync=input_context.num_replicas_in_sync)
            return self.task.build_inputs("train", per_replica, input_context=worker_context, epoch=None,
                                          training=True)

        # built once here, eagerly: checks the files (the traced function for the workers cannot)
        self.task.build_inputs("train", self.global_batch, epoch=None, training=True)
        logging.info("Creating the input pipelines of the workers")
        with _unseeded(self.config.seed):  # each worker's shuffle draws its own seed when its iterator is created
            per_worker = coordinator.create_per_worker_dataset(
                lambda: self.strategy.distribute_datasets_from_function(dataset_fn))
        return iter(per_worker)

    def _train_parameter_server(self, step):
        """The coordinator's loop: schedules `total_steps - step` steps on the workers (asynchronous)."""
        cfg = self.config
        coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(self.strategy)
        train_step = self._train_step = self._train_step or self._make_train_step()
        iterator = self.per_worker_iterator(coordinator)
        logging.info("Scheduling steps %d..%d on the workers", step + 1, self.total_steps)
        if step < cfg.ps_sync_steps:
            logging.info("Synchronous warm-up: steps %d..%d one at a time, then asynchronous", step + 1,
                         min(cfg.ps_sync_steps, self.total_steps))
        progress = _Progress(self.total_steps)
        last_eval = None
        t0, n0 = time.time(), step
        pending = []
        while step < self.total_steps:
            pending.append(coordinator.schedule(train_step, args=(iterator,)))
            step += 1
            if step <= cfg.ps_sync_steps:
                coordinator.join()  # warm-up: the next step starts from this one's weights
            checkpoint = step % cfg.checkpoint_every == 0
            evaluate = self._eval_due(step)
            if not (self._log_due(step) or checkpoint or evaluate):
                continue
            coordinator.join()  # every scheduled step has been applied on the ps
            losses = [float(r.fetch()) for r in pending]
            pending = []
            self._check_finite(losses, f"by step {step}")
            if self._log_due(step):
                self._log_training(progress, step, sum(losses) / len(losses), n0, t0)
                t0, n0 = time.time(), step
            if checkpoint:
                self.save()
            if evaluate:
                last_eval = self._evaluate(step / self.steps_per_epoch, step)
        return self._finish(step, last_eval)


def _as_tf(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


@contextlib.contextmanager
def _unseeded(seed):
    """Clears TensorFlow's global seed for the block (ops created in it draw fresh seeds at run time), then
    sets it back to `seed`."""
    tf.random.set_seed(None)
    try:
        yield
    finally:
        tf.random.set_seed(seed)


def set_global_determinism(seed):
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    np.random.seed(seed)
