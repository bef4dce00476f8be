"""DeepCTR's DIN on `ctr_step`'s in-memory batch, timed on request (run by the peer venv's python).

Started by `tools.bench.deepctr_peer.PeerProcess` (see its docstring for the venv and the protocol) as

    .venv-deepctr/bin/python -m tools.bench.deepctr_worker --config=shipped|tuned --batch=FILE.npz
        --item_rows=N --num_users=U --num_categories=C --num_brands=K --embedding_dim=16
        --learning_rate=0.05 --warmup=10

The batch is the `.npz` that `ctr_step` writes from its own `synthetic_batch` (the `id` variant's inputs
`user_id, item_id, category_id, brand_id` [B] and `hist_item_id, hist_category_id, hist_brand_id` [B, S], padding
id 0 at the end of histories, and `label` [B]): the peer trains on the very batch ours and stock train on.

The model is `deepctr.models.DIN` with the features of `ctr_step`'s `id` variant: `SparseFeat`s for the user,
the item (`--item_rows` rows), its category and brand, and `VarLenSparseFeat`s for the S-long histories of item
ids, categories and brands sharing the item / category / brand tables (`embedding_name`), all E-wide
(int64 ids, padding masked by DeepCTR's `mask_zero`); `history_feature_list=[item_id, category_id, brand_id]`
(our DIN's query and keys have the same three tables), `att_hidden_size=(80, 40)`, `dnn_hidden_units=(200, 80)`,
PReLU in both MLPs as in our model (`--activation=library` keeps DeepCTR's Dice / ReLU), no dropout, no batch
norm; `compile(tf.keras.optimizers.Adagrad(--learning_rate), "binary_crossentropy")` and
`fit(steps_per_epoch=N)` on a `tf.data` of the batch repeated, like the stock baseline.

Configurations:

* `shipped`: DIN's defaults for regularisation (`l2_reg_embedding=1e-6`: an `l2` regulariser on every table,
  whose gradient is a dense table-sized tensor every step, so Adagrad updates every row).
* `tuned`: no embedding regulariser at all: `deepctr.inputs.l2` returns None while the model is built (passing
  `l2_reg_embedding=0` is not enough: it still attaches `l2(0.0)`, whose gradient is just as dense). The tables'
  gradients are then `IndexedSlices` and Adagrad updates only the looked-up rows.
"""

import argparse
import gc
import json
import os
import sys
import time
import types

from tools.bench import machine as bench_machine


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("shipped", "tuned"), required=True)
    p.add_argument("--batch", required=True, help=".npz of the batch (ctr_step writes it)")
    p.add_argument("--item_rows", type=int, required=True)
    p.add_argument("--num_users", type=int, required=True)
    p.add_argument("--num_categories", type=int, required=True)
    p.add_argument("--num_brands", type=int, required=True)
    p.add_argument("--embedding_dim", type=int, default=16)
    p.add_argument("--attention_units", default="80,40")
    p.add_argument("--mlp_units", default="200,80")
    p.add_argument("--activation", choices=("prelu", "library"), default="prelu")
    p.add_argument("--learning_rate", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_din(args, seq_len):
    """deepctr.models.DIN for `args` (see the module docstring)."""
    import deepctr.inputs
    import tensorflow as tf
    from deepctr.feature_column import SparseFeat, VarLenSparseFeat
    from deepctr.models import DIN

    e = args.embedding_dim
    tables = {"user_id": args.num_users + 1, "item_id": args.item_rows, "category_id": args.num_categories + 1,
              "brand_id": args.num_brands + 1}
    columns = [SparseFeat(name, rows, embedding_dim=e, dtype="int64") for name, rows in tables.items()]
    history = ["item_id", "category_id", "brand_id"]
    columns += [VarLenSparseFeat(SparseFeat(f"hist_{name}", tables[name], embedding_dim=e, dtype="int64",
                                            embedding_name=name), maxlen=seq_len) for name in history]
    kwargs = dict(dnn_hidden_units=tuple(int(u) for u in args.mlp_units.split(",")),
                  att_hidden_size=tuple(int(u) for u in args.attention_units.split(",")), dnn_dropout=0.0,
                  dnn_use_bn=False, seed=args.seed, task="binary")
    if args.activation == "prelu":
        kwargs.update(dnn_activation=tf.keras.layers.PReLU, att_activation=tf.keras.layers.PReLU)
    if args.config == "shipped":
        return DIN(columns, history, **kwargs)
    saved = deepctr.inputs.l2
    deepctr.inputs.l2 = lambda *a, **k: None  # no embedding regulariser at all (see the module docstring)
    try:
        return DIN(columns, history, **kwargs)
    finally:
        deepctr.inputs.l2 = saved


def embedding_regularised(model):
    """Whether any embedding table carries a regulariser (a check that `tuned` removed them all)."""
    return any(getattr(layer, "embeddings_regularizer", None) is not None for layer in model.layers)


def main(argv=None):
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; everything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message):
        out.write(json.dumps(message, allow_nan=False) + "\n")
        out.flush()

    try:
        from tools.bench import deepctr_peer as peer

        args = parse_args(argv)
        import requests

        requests.get = lambda *a, **k: types.SimpleNamespace(status_code=0)  # see deepctr_peer.NO_VERSION_CHECK
        import deepctr
        import numpy as np
        import tensorflow as tf
        import tf_keras

        with np.load(args.batch) as z:
            data = {k: z[k] for k in z.files}
        labels = data.pop("label").astype(np.float32).reshape(-1, 1)
        features = {k: (v.reshape(-1, 1) if v.ndim == 1 else v).astype(np.int64) for k, v in data.items()}
        seq_len = features["hist_item_id"].shape[1]
        tf.keras.utils.set_random_seed(args.seed)
        gc.collect()
        before = bench_machine.rss_mb()
        start = time.perf_counter()
        model = build_din(args, seq_len)
        optimizer = tf.keras.optimizers.Adagrad(args.learning_rate)
        model.compile(optimizer=optimizer, loss="binary_crossentropy")
        optimizer.build(model.trainable_variables)  # slots now, so the RSS after building includes them
        built = time.perf_counter() - start
        after = bench_machine.rss_mb()
        if embedding_regularised(model) != (args.config == "shipped"):
            raise RuntimeError(f"{args.config}: embedding regularisers {embedding_regularised(model)}")
        dataset = tf.data.Dataset.from_tensors(({k: features[k] for k in model.input_names}, labels)).repeat()
        have_reset = bench_machine.reset_hwm()
        model.fit(dataset, epochs=1, steps_per_epoch=max(args.warmup, 1), shuffle=False, verbose=0)
        hwm = bench_machine.hwm_mb()
        tables = {v.name: list(v.shape) for v in model.trainable_variables if "emb" in v.name}
        answer({"ok": True, "ready": True, "build_s": built, "params": int(model.count_params()),
                "tables": tables, "regularisation_losses": len(model.losses),
                "memory": {"build_mb": after - before, "rss_after_build_mb": after,
                           "step_peak_mb": (hwm - after) if have_reset else None, "hwm_mb": hwm},
                "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                             "deepctr": deepctr.__version__}})
        for line in sys.stdin:
            kind, steps = peer.parse_request(peer.decode_message(line))
            if kind == "quit":
                break
            start = time.perf_counter()
            history = model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
            ms = (time.perf_counter() - start) * 1000.0 / steps
            answer({"ok": True, "ms_per_step": ms, "loss": float(history.history["loss"][-1])})
    except Exception as e:  # the parent reports it; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
