"""MAKE's two phases (paper section 4.3): multi-epoch pre-training, then knowledge utilisation.

`python -m mm_ads.train --variant=make|simtier_make --make_epochs=K` (see `mm_ads.train`):

* **Phase A — pre-training.** `<model_dir>/make/` is a complete model dir of the `make_only` variant
  (MAKE alone: DIN over the multimodal vectors, MLP, BCE on the click label, paper eqs. 3-5), trained
  for `make_epochs` epochs by the same trainer: its own optimizers, checkpoints (`make/ckpt/`),
  `config.json`, `eval_history.json` (one evaluation per epoch) and `metrics.json`. Its learning rate is
  `--make_learning_rate` (0 = `--dense_learning_rate`); `--max_steps` caps it like any training. It is
  resumable like any run; once `make/metrics.json` is written, re-running the command skips it.
  With a validation split in the dataset (`--valid_split`, default `valid`) and `--make_patience` > 0 (default
  1), phase A evaluates on that split after every epoch and stops once `make_patience` epochs in a row did
  not improve its GAUC: `make_epochs` is the maximum and phase B starts from the best epoch
  (`make/ckpt_best/`). The choice is made on validation, never on the test split; `make/metrics.json`
  then holds the validation metrics of the best epoch and `early_stopping` (best and trained epochs).
* **Phase B — knowledge utilisation.** The ID model (`epochs`, one in the flagfiles) is built with a MAKE
  layer of the same name and sizes, so its variables have the same paths; `restore_make` loads them from
  phase A's last checkpoint before the trainer restores phase B's own checkpoint (a resumed phase B keeps
  its own MAKE values). MAKE's v_MAKE, hidden outputs and logit enter the ID model's MLP; MAKE is frozen
  (`make_trainable=false`, the default: its variables are not trainable, it runs in inference mode and
  stays bit-identical) or fine-tuned with the ID model's dense optimizer (`--make_trainable`).

With `make_epochs=0` there is no phase A: MAKE starts from its initialisation and trains jointly with
the ID model in phase B (the paper's "0 epochs" point of Fig. 6(c)).
"""

import copy
import os

from mm_ads.config import ID_TABLE_FIELDS, SIMTIER_FIELDS, CTRModelConfig
from mm_ads.ctr.model import make_layer_names
from mm_ads.data.dataset import Manifest
from mm_ads.training import model_dir as run_dir
from mm_ads.training.checkpoint import restore_model
from mm_ads.training.model_dir import MAKE_DIR
from mm_ads.training.trainer import planned_steps


def validation_split(config):
    """The split MAKE's pre-training stops early on: `data.valid_split` when the dataset has it and
    `make_patience > 0`, else None (phase A then trains exactly `make_epochs` epochs)."""
    if not config.model.make_patience:
        return None
    split = config.data.valid_split
    return split if Manifest.load(config.data.data_dir).has_split("ctr", split) else None


def pretrain_config(config):
    """The `ExperimentConfig` of phase A for the `ExperimentConfig` of a MAKE variant.

    Same data, batch size, seed, optimizers and MAKE sizes; variant `make_only`, model dir
    `<model_dir>/make`, `make_epochs` epochs, learning rate `make_learning_rate` (if set), no export. With a
    validation split (`validation_split`): evaluated on it after every epoch and stopped early on its GAUC
    (patience `make_patience`; `make_epochs` is the maximum), so that no choice is made on the test split.
    """
    if not config.model.pretrains_make:
        raise ValueError(f"Variant {config.model.variant!r} with make_epochs={config.model.make_epochs} has no "
                         "MAKE pre-training")
    cfg = copy.deepcopy(config)
    cfg.model_dir = os.path.join(config.model_dir, MAKE_DIR)
    cfg.model.variant = "make_only"
    # SimTier's options and the id tables' do not enter MAKE alone (it has no id embedding): their defaults, so
    # that make and simtier_make plan the same phase A (and a report shares it) whatever those settings
    defaults = CTRModelConfig()
    for name in SIMTIER_FIELDS + ID_TABLE_FIELDS:
        setattr(cfg.model, name, getattr(defaults, name))
    cfg.train.epochs = config.model.make_epochs
    if config.train.make_learning_rate:
        cfg.train.dense_learning_rate = config.train.make_learning_rate
    cfg.train.export = False
    valid = validation_split(config)
    if valid:
        cfg.data.eval_split = valid
        cfg.train.early_stopping_patience = config.model.make_patience
        cfg.train.early_stopping_metric = "gauc"
        cfg.train.eval_every = 0
    return cfg.validate()


def finished_pretraining(config):
    """`(metrics, checkpoint)` of a finished phase A for a MAKE variant's config, or None if it must (still) run.

    Phase A is finished when `<model_dir>/make/metrics.json` records the number of steps this config
    plans (`planned_steps`: with early stopping it may have stopped before). The checkpoint is the best
    epoch's under early stopping, else the last. Raises ValueError when a finished phase A of another length
    already fed a phase B.
    """
    cfg = pretrain_config(config)
    metrics = run_dir.finished_metrics(cfg.model_dir)
    if metrics is None:
        return None
    num_train = Manifest.load(cfg.data.data_dir).num_rows("ctr", cfg.data.train_split)
    _, steps = planned_steps(num_train, cfg.data.batch_size, cfg.train)
    checkpoint = run_dir.latest_checkpoint(cfg.model_dir, best=bool(cfg.train.early_stopping_patience))
    if metrics.get("planned_steps", metrics.get("steps")) == steps and checkpoint:
        return metrics, checkpoint
    if run_dir.latest_checkpoint(config.model_dir):
        raise ValueError(
            f"MAKE's pre-training in {cfg.model_dir} ran {metrics.get('steps')} steps, this run plans {steps}, and "
            f"the ID model in {config.model_dir} already trained with it: use a new --model_dir"
        )
    return None


def restore_make(model, checkpoint):
    """Restores every variable of `model`'s MAKE modules ("make", or "make_<m>" per modality with
    `make_fusion="separate"`) from `checkpoint` (phase A's, or any model's with MAKE modules of the same names and
    sizes); the rest of `model` is untouched.

    Raises if a MAKE variable is absent from the checkpoint (e.g. other MAKE sizes).
    """
    names = make_layer_names(model)
    if not names:
        raise ValueError(f"Model {model.name!r} has no MAKE layer to restore")
    for name in names:
        restore_model(model.get_layer(name), checkpoint)
