"""The Task interface: what the one training loop needs from a task (CTR, SCL, CLIP-E).

A task owns the model construction, the input pipelines, the loss and the evaluation;
the `Trainer` owns the loop, the strategy, optimizers, checkpoints and summaries. Models
stay forward-only so that the same model trains and exports unchanged.
"""

import abc

from mm_ads.layers.sparse_embedding import SparseTables


class Task(abc.ABC):
    # Whether the task trains correctly with asynchronous steps on parameter servers (`build_inputs` then
    # gets `epoch=None`: an unseeded, repeated stream per worker). Tasks that keep replicas in lock-step
    # (momentum encoders, queues) do not.
    supports_parameter_server = False

    @abc.abstractmethod
    def build_model(self):
        """Returns a `keras.Model` (built, variables created)."""

    @abc.abstractmethod
    def build_inputs(self, split, batch_size, input_context=None, epoch=0, training=True):
        """A `tf.data.Dataset` of `(features, labels)` with `batch_size` examples per batch.

        With an `input_context`, the dataset is this input pipeline's shard and
        `batch_size` is the per-replica batch size. `epoch` seeds the shuffle so that
        a resumed run replays exactly the same order (None: unseeded, for parameter-server workers).
        """

    @abc.abstractmethod
    def num_examples(self, split):
        """Number of examples of a split (for steps per epoch)."""

    @abc.abstractmethod
    def per_example_loss(self, model, features, labels, training):
        """Per-example loss `[B]` (the trainer averages it over the global batch).

        May return `(loss [B], aux)`: `aux` is then handed to `after_apply_gradients` in the same
        replica step (e.g. the keys a contrastive task enqueues).
        """

    def after_apply_gradients(self, model, aux):
        """Called in replica context after the optimizers stepped (momentum encoders, queues). No-op here."""
        del model, aux

    @abc.abstractmethod
    def evaluate(self, model, split):
        """Exact evaluation on the host: a dict of metrics (JSON-serialisable)."""

    def selection_split(self):
        """The split early stopping evaluates on after every epoch: `"eval"` here. A task with a validation
        split returns `"valid"` (`build_inputs`, `num_examples` and `evaluate` then accept it), so that the
        epoch is chosen there and only the chosen epoch is evaluated on the eval split."""
        return "eval"

    def sparse_variables(self, model):
        """Variables updated by the sparse optimizer: the tables (every shard) of every layer with `SparseTables`
        (e.g. `SparseEmbedding`)."""
        out, seen = [], set()
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, SparseTables) and id(layer) not in seen:
                seen.add(id(layer))
                out.extend(layer.sparse_tables())
        return out
