"""Pairs whose query is itself a catalogue item (`query_item_id`, e.g. MovieLens co-liked pairs): the query's own
item is neither one of its InfoNCE negatives nor one of its Acc@N candidates."""

import keras
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf

from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
from mm_ads.data.dataset import QUERY_ITEM_ID, DatasetWriter
from mm_ads.scl.task import SCLTask

# four items; each pair is (the movie liked before, the movie liked next): 1 ↔ 2 and 3 ↔ 4
TEXTS = {1: "alpha one", 2: "alpha two", 3: "gamma three", 4: "gamma four"}
QUERY_ITEMS = np.array([1, 2, 3, 4, 1, 3], np.int64)
POSITIVES = np.array([2, 1, 4, 3, 2, 4], np.int64)


def _write(path, with_query_item):
    columns = {"query": [TEXTS[i] for i in QUERY_ITEMS], "positive": [TEXTS[i] for i in POSITIVES],
               "negative": [""] * len(POSITIVES), "positive_id": POSITIVES, "negative_id": np.full(len(POSITIVES), -1)}
    if with_query_item:
        columns[QUERY_ITEM_ID] = QUERY_ITEMS
    with DatasetWriter(path, name="query-items", format="test") as w:
        for split in ("train", "test"):
            w.write_parquet("pretrain/text_pairs", split, pa.table(columns))
    return path


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("query_item")
    return {flag: _write(str(root / f"d{int(flag)}"), flag) for flag in (False, True)}


def _task(data_dir, tmp_path):
    config = ExperimentConfig(
        task="scl", model_dir=str(tmp_path / "m"),
        data=DataConfig(data_dir=data_dir, batch_size=6, eval_batch_size=4, shuffle_buffer=0),
        train=TrainConfig(seed=0, max_steps=1, export=False),
        scl=SCLConfig(output_dim=8, projection_hidden=16, text_width=8, text_layers=1, text_heads=2, max_tokens=8,
                      num_oov_buckets=4, use_queue=False, use_triplet=False)).validate()
    return SCLTask(config)


def _item_encoder():
    """Text → a fixed vector per item: each item is closest to itself, then to its pair partner."""
    vectors = {1: [1.0, 0.0, 0.0, 0.0], 2: [0.8, 0.6, 0.0, 0.0], 3: [0.0, 0.0, 1.0, 0.0], 4: [0.0, 0.0, 0.8, 0.6]}
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant([TEXTS[i] for i in sorted(TEXTS)]), tf.range(4, dtype=tf.int64)), -1)
    matrix = tf.constant([vectors[i] for i in sorted(vectors)], tf.float32)
    return lambda texts, training=False: tf.gather(matrix, table.lookup(texts))


def test_acc_at_n_leaves_the_query_item_out(data_dirs, tmp_path):
    encoder = _item_encoder()
    without = _task(data_dirs[False], tmp_path).evaluate_encoder(encoder, "eval")
    with_item = _task(data_dirs[True], tmp_path).evaluate_encoder(encoder, "eval")
    # the query's own item (identical text) outranks its positive unless it is left out
    assert (without["acc@1"], without["acc@5"]) == (0.0, 1.0)
    assert (with_item["acc@1"], with_item["acc@5"]) == (1.0, 1.0)
    assert with_item["num_candidates"] == without["num_candidates"] == 4


def test_info_nce_masks_the_query_item_among_in_batch_keys(data_dirs, tmp_path):
    losses = {}
    for flag, path in data_dirs.items():
        task = _task(path, tmp_path)
        keras.utils.set_random_seed(0)
        model = task.build_model()
        features, labels = next(iter(task.build_inputs("train", 6, training=False)))
        assert (QUERY_ITEM_ID in features) == flag
        losses[flag] = task.per_example_loss(model, features, labels, training=False)[0].numpy()
    # every query's item is the positive of another row of the batch: one negative fewer for every row
    assert np.all(losses[True] < losses[False] - 1e-6), (losses[True], losses[False])
    # the masked loss is InfoNCE over the batch's keys other than the query's own item (numpy reference)
    task = _task(data_dirs[True], tmp_path)
    keras.utils.set_random_seed(0)
    model = task.build_model()
    features, _ = next(iter(task.build_inputs("train", 6, training=False)))
    q = model(features["query"], training=False).numpy()
    k = model.keys(features["positive"]).numpy()
    tau = float(model.temperature.tau())
    for i in range(len(q)):
        keep = (POSITIVES != POSITIVES[i]) & (POSITIVES != QUERY_ITEMS[i])
        keep[i] = True
        logits = q[i] @ k.T / tau
        want = np.log(np.exp(logits[keep]).sum()) - logits[i]
        np.testing.assert_allclose(losses[True][i], want, rtol=1e-4, atol=1e-5)
