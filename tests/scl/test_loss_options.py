"""SCL loss options of the regime study: hard negatives as InfoNCE candidates, the symmetric (item → query) loss,
and training on the first N pairs; each checked against the NumPy reference on the model's own vectors."""

import keras
import numpy as np
import pyarrow as pa
import pytest

from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
from mm_ads.data.dataset import DatasetWriter
from mm_ads.scl.task import SCLTask
from tests.scl import reference
from tests.scl.tiny_data import write_tiny_text_pairs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("options") / "data")
    write_tiny_text_pairs(path)
    return path


def _task(data_dir, tmp_path, **scl):
    config = ExperimentConfig(
        task="scl", model_dir=str(tmp_path / "m"),
        data=DataConfig(data_dir=data_dir, batch_size=16, eval_batch_size=16, shuffle_buffer=0),
        train=TrainConfig(seed=0, max_steps=1, export=False),
        scl=SCLConfig(**{**dict(output_dim=8, projection_hidden=16, text_width=8, text_layers=1, text_heads=2,
                                max_tokens=8, num_oov_buckets=4, queue_size=13, momentum=0.9, temperature_init=0.2,
                                triplet_margin=0.5), **scl})).validate()
    return SCLTask(config)


def _loss_and_vectors(task):
    keras.utils.set_random_seed(0)
    model = task.build_model()
    features, _ = next(iter(task.build_inputs("train", 16, training=False)))
    loss, _ = task.per_example_loss(model, features, None, training=False)
    vectors = {c: np.asarray(model.keys(features[c])) for c in ("positive", "negative", "query")}
    vectors["q_query"] = np.asarray(model(features["query"], training=False))
    vectors["q_positive"] = np.asarray(model(features["positive"], training=False))
    ids = {c: features[c].numpy() for c in ("positive_id", "negative_id")}
    return np.asarray(loss), vectors, ids, float(model.temperature.tau())


@pytest.mark.parametrize("use_triplet", [False, True])
def test_hard_negatives_as_infonce_candidates_equal_the_reference(data_dir, tmp_path, use_triplet):
    loss, v, ids, tau = _loss_and_vectors(_task(data_dir, tmp_path, negatives_in_infonce=True,
                                                use_triplet=use_triplet))
    empty = np.zeros((0, 8))
    expected = reference.scl_loss(v["q_query"], v["positive"], ids["positive_id"], empty, [], [], tau,
                                  v["negative"], ids["negative_id"], margin=0.5,
                                  weight=1.0 if use_triplet else 0.0, negatives_as_candidates=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
    # the candidates only add to log Z: every row's loss rises over the plain InfoNCE (triplet off)
    plain, *_ = _loss_and_vectors(_task(data_dir, tmp_path, use_triplet=use_triplet))
    assert np.all(loss > plain), (loss, plain)


def test_symmetric_loss_is_the_mean_of_both_directions(data_dir, tmp_path):
    loss, v, ids, tau = _loss_and_vectors(_task(data_dir, tmp_path, symmetric_loss=True, use_triplet=False))
    empty = np.zeros((0, 8))
    forward = reference.scl_loss(v["q_query"], v["positive"], ids["positive_id"], empty, [], [], tau)
    # item → query: each item against the batch's queries; rows whose positive is the same item are masked
    backward = reference.scl_loss(v["q_positive"], v["query"], ids["positive_id"], empty, [], [], tau)
    np.testing.assert_allclose(loss, 0.5 * (forward + backward), rtol=1e-4, atol=1e-5)
    assert not np.allclose(forward, backward)


def test_max_train_pairs_trains_on_the_first_pairs_only(data_dir, tmp_path):
    full, first = _task(data_dir, tmp_path), _task(data_dir, tmp_path, max_train_pairs=20)
    assert (full.num_examples("train"), first.num_examples("train")) == (48, 20)
    assert first.num_examples("eval") == full.num_examples("eval") == 48  # evaluation keeps the whole split
    rows = [f for f, _ in first.build_inputs("train", 7, training=False)]
    np.testing.assert_array_equal(np.concatenate([f["positive_id"].numpy() for f in rows]),
                                  full._columns("train")["positive_id"][:20])
    # the vocabulary is built from those pairs only
    words = {w for t in list(first._columns("train")["query"]) + list(first._columns("train")["positive"])
             for w in t.split()}
    assert set(first.vocabulary) <= words and set(first.vocabulary) < set(full.vocabulary)


def test_negatives_in_infonce_refuses_grouped_pairs(tmp_path):
    path = str(tmp_path / "grouped")
    table = pa.table({"query": ["a b", "c d"], "positive": ["x", "y"], "negative": ["y", "x"],
                      "positive_id": np.array([1, 2], np.int64), "negative_id": np.array([2, 1], np.int64),
                      "positive_group_id": np.array([1, 1], np.int64)})
    with DatasetWriter(path, name="grouped", format="test") as w:
        for split in ("train", "test"):
            w.write_parquet("pretrain/text_pairs", split, table)
    with pytest.raises(ValueError, match=f"{path}.*negatives_in_infonce.*positive_group_id"):
        _task(path, tmp_path, negatives_in_infonce=True)
    _task(path, tmp_path)  # without the option the same pairs are fine
