"""Training: the one custom training loop and what it runs.

* `trainer` — `Trainer`: the loop under every tf.distribute strategy, optimizers, checkpoints, summaries,
  evaluation and early stopping.
* `task` — `Task`: what the loop needs from a task (model, inputs, loss, evaluation).
* `sparse_optimizers` — sparse-aware optimizers for embedding tables (exported here).
* `distribute` — the strategies, and the cluster's worker / ps tasks.
* `model_dir` — the run directory: its file names, the resume and reuse rules.
* `checkpoint` — the checkpoint layout: a model's variables keyed by path, a training run's checkpoint, restoring
  a model from one.
* `vector_record` — the vector table a run trains with, recorded in its model dir.
"""

from mm_ads.training.sparse_optimizers import SparseAdagrad, SparseAdam, SparseSGD

__all__ = ["SparseAdagrad", "SparseAdam", "SparseSGD"]
