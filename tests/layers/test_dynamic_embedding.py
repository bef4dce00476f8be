"""`DynamicEmbedding`: collision-free id → row map, default row, eviction, slots of recycled rows, checkpoints."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers.dynamic_embedding import DELETED_KEY, EMPTY_KEY, DynamicEmbedding
from mm_ads.layers.sparse_embedding import mix64
from mm_ads.training.checkpoint import model_checkpoint
from mm_ads.training.sparse_optimizers import SparseAdagrad, SparseAdam
from tests.layer_test_case import assert_config_round_trip

DEFAULT = np.array([7.0, 8.0, 9.0], np.float32)


def _layer(**kw):
    args = dict(capacity=8, output_dim=3)
    args.update(kw)
    layer = DynamicEmbedding(**args)
    layer.build()
    if layer.unseen_embedding is not None:
        layer.unseen_embedding.assign(DEFAULT)
    return layer


def _ids(*values):
    return tf.constant(values, tf.int64)


def _mapped(layer):
    """`{id: row}` held by the layer (its rows' ids), after checking that the hash map says the same."""
    row_ids = layer.row_ids.numpy()
    rows = np.flatnonzero(row_ids != EMPTY_KEY)
    assert layer.size().numpy() == len(rows)
    np.testing.assert_array_equal(layer.rows_of(tf.constant(row_ids[rows])).numpy(), rows)
    return dict(zip(row_ids[rows].tolist(), rows.tolist()))


def _unmix(key):
    """The int64 id whose `mix64` is the int64 `key` (splitmix64's output function inverted)."""
    m = (1 << 64) - 1

    def unshift(z, bits):
        out = z
        for _ in range(64 // bits + 1):
            out = z ^ (out >> bits)
        return out & m

    z = unshift(key & m, 31)
    z = unshift(z * pow(0x94D049BB133111EB, -1, 1 << 64) & m, 27)
    z = unshift(z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64) & m, 30)
    z = (z - 0x9E3779B97F4A7C15) & m
    return z - (1 << 64) if z >= 1 << 63 else z


RESERVED = [EMPTY_KEY, DELETED_KEY, _unmix(EMPTY_KEY), _unmix(DELETED_KEY)]


def test_the_reserved_ids_are_the_maps_reserved_keys_or_map_onto_them():
    keys = tf.bitcast(mix64(tf.constant(RESERVED[2:], tf.int64)), tf.int64).numpy().tolist()
    assert keys == [EMPTY_KEY, DELETED_KEY]


@pytest.mark.parametrize("unseen_row", ["zeros", "learned"])
def test_ids_never_trained_read_exactly_the_default_row(unseen_row):
    layer = _layer(unseen_row=unseen_row)
    default = DEFAULT if unseen_row == "learned" else np.zeros(3, np.float32)
    layer(_ids(5, 6), training=True)
    ids = _ids(5, 41, -3, 1 << 40, *RESERVED, 0)
    out = layer(ids).numpy()
    for i in range(1, 8):  # never trained, including the four reserved ids
        np.testing.assert_array_equal(out[i], default)
    np.testing.assert_array_equal(out[8], np.zeros(3))  # padding
    np.testing.assert_array_equal(out[0], layer.initial_vectors(_ids(5)).numpy()[0])
    assert layer.size().numpy() == 2  # reading admitted nothing
    assert layer.compute_mask(ids).numpy().tolist() == [True] * 8 + [False]
    # training admits 41 but never the reserved ids
    layer(_ids(41, *RESERVED), training=True)
    assert sorted(_mapped(layer)) == [5, 6, 41]


def test_distinct_ids_own_distinct_rows_and_duplicates_share_one():
    layer = _layer(capacity=64)
    ids = np.array([[11, 11, -5, 11], [2 ** 62, 7, -5, 0], [64, 128, 7, 192]], np.int64)  # ids ≡ mod 64 too
    out = layer(tf.constant(ids), training=True).numpy()
    mapped = _mapped(layer)
    distinct = sorted(set(ids.ravel().tolist()) - {0})
    assert sorted(mapped) == distinct and len(set(mapped.values())) == len(distinct)  # collision-free
    assert sorted(mapped.values()) == list(range(len(distinct)))  # free rows taken in order
    np.testing.assert_array_equal(out[0, 0], out[0, 1])
    for i, j in np.ndindex(ids.shape):
        if ids[i, j]:
            np.testing.assert_array_equal(out[i, j], layer.initial_vectors(_ids(ids[i, j])).numpy()[0])
    assert len({tuple(v) for v in out.reshape(-1, 3)[ids.ravel() != 0]}) == len(distinct)
    np.testing.assert_array_equal(layer.row_ids.numpy()[list(mapped.values())], list(mapped))


def test_initial_vectors_depend_on_the_id_and_seed_only_and_are_truncated_normal():
    a, b = _layer(init_stddev=0.5), _layer(init_stddev=0.5, seed=3)
    v = a.initial_vectors(_ids(1, 2, 1)).numpy()
    np.testing.assert_array_equal(v[0], v[2])
    assert not np.array_equal(v[0], v[1])
    assert not np.array_equal(v[0], b.initial_vectors(_ids(1)).numpy()[0])
    many = a.initial_vectors(tf.range(1, 20_001, dtype=tf.int64)).numpy().ravel()  # 60,000 values
    # a normal truncated at ±2 sd has sd 0.880 sd; Keras's TruncatedNormal(stddev=0.5) the same
    reference = keras.initializers.TruncatedNormal(stddev=0.5, seed=0)((20_000, 3)).numpy().ravel()
    assert np.abs(many).max() <= 1.0 and abs(many.mean()) < 0.01
    assert abs(many.std() - 0.44) < 0.01 and abs(reference.std() - 0.44) < 0.01
    assert abs(np.mean(np.abs(many) < 0.5) - np.mean(np.abs(reference) < 0.5)) < 0.01  # same shape, not just sd


def test_pool_stays_bounded_and_the_least_frequent_then_stalest_rows_go_first():
    layer = _layer(capacity=4)
    layer(_ids(1, 2, 3, 4), training=True)  # step 0: rows 0..3
    layer(_ids(1, 2), training=True)  # step 1: 1 and 2 read twice
    layer(_ids(4), training=True)  # step 2: 4 read twice, 3 once and least recently
    layer(_ids(5), training=True)  # step 3: full: 3 evicted (frequency 1)
    assert _mapped(layer) == {1: 0, 2: 1, 5: 2, 4: 3}
    layer(_ids(6, 7), training=True)  # step 4: 5 read once; 1, 2, 4 twice, 1 and 2 least recently (tie: lower row)
    assert _mapped(layer) == {2: 1, 4: 3, 6: 2, 7: 0}
    # a call with more new ids than the pool: the ids of this step keep their rows, the extra ids read the default
    out = layer(_ids(10, 11, 12, 13, 14, 15), training=True).numpy()
    assert layer.size().numpy() == 4 and layer.num_free.numpy() == 0
    assert np.count_nonzero(np.abs(out).sum(-1)) == 4
    assert sorted(_mapped(layer)) == [10, 11, 12, 13]
    assert sorted(layer.row_ids.numpy().tolist()) == [10, 11, 12, 13]


def test_a_large_full_pool_evicts_about_the_one_percent_least_frequent_rows():
    """Above 65,536 rows the eviction threshold comes from a sample of the pool: about `want` rows go, all rare."""
    c = 100_000
    layer = _layer(capacity=c, output_dim=1)
    ids = tf.range(1, c + 1, dtype=tf.int64) * 7
    layer.id_to_row.insert(layer.map_keys(ids), tf.range(c, dtype=tf.int64))
    layer.row_ids.assign(ids)
    frequency = np.where(np.arange(c) % 10 == 3, 1, 2 + np.arange(c) % 5)  # a tenth read once, the rest 2-6 times
    layer.frequency.assign(frequency)
    layer.last_seen.assign(np.full(c, 4))
    layer.num_free.assign(0)
    layer.calls.assign(5)  # step 5
    layer(tf.constant([3, 5, 7], tf.int64), training=True)  # two new ids (7 is known): one pass, ≥ 1% of the pool
    evicted = np.flatnonzero(layer.row_ids.numpy() == EMPTY_KEY)
    # the threshold is the once-read rows' key, and its ties are taken in row order up to 1% of the pool
    assert len(evicted) + 2 == 1000 and layer.num_free.numpy() == len(evicted)
    assert set(frequency[evicted]) == {1} and evicted.max() < 10_000  # the rare rows of the lowest rows
    assert layer.size().numpy() == c - len(evicted) and layer.rows_of(_ids(7)).numpy()[0] == 0
    assert sorted(layer.rows_of(_ids(3, 5)).numpy()) == [9983, 9993]  # the last two freed rows (a stack)


def test_ids_not_read_for_t_steps_lose_their_row():
    layer = _layer(capacity=16, evict_after_steps=3)
    layer(_ids(1, 2, 3), training=True)  # step 0
    for _ in range(3):
        layer(_ids(1), training=True)  # steps 1-3; the pass of step 3 keeps 2 and 3 (not read for 3 steps)
    assert sorted(_mapped(layer)) == [1, 2, 3]
    for _ in range(3):
        layer(_ids(2), training=True)  # steps 4-6; the pass of step 6 frees 3 (last read at step 0)
    assert sorted(_mapped(layer)) == [1, 2]
    assert layer.num_free.numpy() == 14 and layer.size().numpy() == 2
    assert EMPTY_KEY in layer.row_ids.numpy().tolist()


def test_calls_per_step_reads_of_one_step_share_the_clock():
    layer = _layer(capacity=2, calls_per_step=2)
    layer(_ids(1), training=True)
    layer(_ids(2), training=True)  # same step: 1 is protected although the pool is now full
    assert layer.last_seen.numpy().tolist() == [0, 0] and layer.calls.numpy() == 2
    out = layer(_ids(3), training=True)  # step 1, call 1: 1 and 2 are from step 0, one of them makes room
    assert np.abs(out.numpy()).sum() > 0 and layer.size().numpy() == 2 and 3 in _mapped(layer)
    out = layer(_ids(4), training=True)  # step 1, call 2: only the row read in step 0 may go, not 3's
    assert sorted(_mapped(layer)) == [3, 4]


def _train_step(layer, optimizer):
    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, training=True) * tf.constant([1.0, -2.0, 0.5]))
        grads = tape.gradient(loss, [v.value for v in layer.sparse_tables()])
        optimizer.apply_gradients(zip(grads, layer.sparse_tables()))
    return step


def _trained_alone(make_optimizer, ids):
    """The row values and slots of a fresh table and optimizer after one step on `ids`."""
    layer, optimizer = _layer(capacity=2), make_optimizer()
    optimizer.build(layer.sparse_tables())
    _train_step(layer, optimizer)(ids)
    return layer.embeddings.numpy(), [v.numpy() for v in optimizer.variables[2:]]  # after iterations, lr


@pytest.mark.parametrize("make_optimizer,same_value", [(lambda: SparseAdam(0.1), False),
                                                       (lambda: SparseAdagrad(0.1), True)])
def test_a_recycled_row_starts_from_the_new_ids_initial_vector_and_fresh_slots(make_optimizer, same_value):
    """Adam's step size depends on the optimizer's step count, so only its slots are compared with a fresh run."""
    layer, optimizer = _layer(capacity=2), make_optimizer()
    optimizer.build(layer.sparse_tables())
    layer.use_optimizer(optimizer)
    step = _train_step(layer, optimizer)
    for _ in range(3):
        step(_ids(1, 2))  # rows 0 (id 1) and 1 (id 2) trained three times
    trained = layer.embeddings.numpy().copy()
    step(_ids(2, 3))  # 3 takes row 0 (1 is the least recently read), trained once
    assert _mapped(layer) == {2: 1, 3: 0}
    rows, slots = _trained_alone(make_optimizer, _ids(3))
    for slot, reference in zip(optimizer.variables[2:], slots):
        np.testing.assert_allclose(slot.numpy()[0], reference[0], rtol=1e-6)
    if same_value:
        np.testing.assert_allclose(layer.embeddings.numpy()[0], rows[0], rtol=1e-6)
    step(_ids(1, 3))  # 1 comes back into row 1 (2's; 3 is read in this step): a fresh start again
    assert _mapped(layer) == {3: 0, 1: 1}
    rows, slots = _trained_alone(make_optimizer, _ids(1))
    for slot, reference in zip(optimizer.variables[2:], slots):
        np.testing.assert_allclose(slot.numpy()[1], reference[0], rtol=1e-6)
    if same_value:
        np.testing.assert_allclose(layer.embeddings.numpy()[1], rows[0], rtol=1e-6)
    assert np.abs(layer.embeddings.numpy()[1] - trained[0]).max() > 1e-3  # not 1's old, trained row


def test_a_sharded_pool_trains_and_recycles_rows_like_one_pool():
    def train(num_shards):
        layer, optimizer = _layer(capacity=5, num_shards=num_shards), SparseAdam(0.1)
        optimizer.build(layer.sparse_tables())
        layer.use_optimizer(optimizer)
        step = _train_step(layer, optimizer)
        for batch in ([1, 2, 3], [4, 5, 1], [6, 7, 1], [2, 8, 6]):  # full from the second step on: rows recycled
            step(tf.constant(batch, tf.int64))
        moments = [np.concatenate([m.numpy() for m in slot]) for slot in (optimizer._momentums, optimizer._velocities)]
        return _mapped(layer), np.concatenate([v.numpy() for v in layer.shards]), moments

    one, three = train(1), train(3)
    assert one[0] == three[0] and len(one[0]) == 5
    np.testing.assert_allclose(three[1], one[1], rtol=1e-6)
    for a, b in zip(three[2], one[2]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sparse_optimizer_moves_only_the_rows_read():
    layer, optimizer = _layer(capacity=8), SparseAdam(0.1)
    layer(_ids(1, 2, 3, 4), training=True)
    optimizer.build(layer.sparse_tables())
    layer.use_optimizer(optimizer)
    before = layer.embeddings.numpy().copy()
    _train_step(layer, optimizer)(_ids(2, 4, 4))
    moved = np.flatnonzero(np.abs(layer.embeddings.numpy() - before).sum(-1))
    assert moved.tolist() == [1, 3]
    assert np.flatnonzero(np.abs(optimizer.variables[2].numpy()).sum(-1)).tolist() == [1, 3]


def test_use_optimizer_needs_a_sparse_optimizer():
    with pytest.raises(ValueError, match="reset_rows"):
        _layer().use_optimizer(keras.optimizers.Adam())


@pytest.mark.parametrize("shards", [(1, 1), (3, 1), (1, 2)])
def test_checkpoint_round_trip_restores_the_id_to_row_map_and_rows(tmp_path, shards):
    def model(num_shards):
        ids = keras.Input((2,), dtype="int64", name="ids")
        layer = DynamicEmbedding(capacity=6, output_dim=3, num_shards=num_shards, evict_after_steps=2,
                                 unseen_row="learned", name="emb_item")
        return keras.Model(ids, layer(ids)), layer

    source, table = model(shards[0])
    table.unseen_embedding.assign(DEFAULT)
    for batch in ([1, 2], [3, 9], [4, 5], [6, 7], [8, 2]):
        table(_ids(*batch), training=True)
    path = model_checkpoint(source).save(str(tmp_path / "ckpt"))
    probe = _ids(1, 2, 3, 4, 5, 6, 7, 8, 9, 77)
    expected, mapped = table(probe).numpy(), _mapped(table)
    assert len(mapped) <= 6
    restored, again = model(shards[1])
    model_checkpoint(restored).restore(path).assert_existing_objects_matched()
    assert _mapped(again) == mapped
    np.testing.assert_array_equal(again(probe).numpy(), expected)
    for name in ("row_ids", "last_seen", "frequency", "free_rows", "num_free", "calls"):
        np.testing.assert_array_equal(getattr(again, name).numpy(), getattr(table, name).numpy())
    # training goes on from the same state: the same admissions and evictions
    table(_ids(10, 11), training=True)
    again(_ids(10, 11), training=True)
    assert _mapped(again) == _mapped(table)


def test_keras_file_round_trip_rebuilds_the_map(tmp_path):
    ids = keras.Input((3,), dtype="int64", name="ids")
    model = keras.Model(ids, DynamicEmbedding(capacity=4, output_dim=3, unseen_row="learned", name="emb")(ids))
    table = model.get_layer("emb")
    table.unseen_embedding.assign(DEFAULT)
    for batch in ([1, 2, 3], [4, 5, 0], [6, 1, 0]):
        table(_ids(*batch), training=True)
    probe = _ids(1, 2, 3, 4, 5, 6, 9)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path).get_layer("emb")
    assert _mapped(loaded) == _mapped(table) and len(_mapped(table)) == 4
    np.testing.assert_array_equal(loaded(probe).numpy(), table(probe).numpy())


def test_config_round_trip_and_argument_errors():
    layer = DynamicEmbedding(capacity=10, output_dim=4, padding_id=None, num_shards=2, evict_after_steps=5,
                             calls_per_step=2, unseen_row="learned", init_stddev=0.1, seed=4, exclusive_updates=True)
    assert_config_round_trip(layer)
    for kw, match in [({"capacity": 0}, "capacity"), ({"num_shards": 11}, "num_shards"),
                      ({"evict_after_steps": -1}, "evict_after_steps"), ({"calls_per_step": 0}, "calls_per_step"),
                      ({"unseen_row": "random"}, "unseen_row"), ({"exclusive_updates": "yes"}, "exclusive_updates")]:
        with pytest.raises(ValueError, match=match):
            DynamicEmbedding(**{"capacity": 10, "output_dim": 4, **kw})


def _consistent(layer):
    """Checks that the map, the rows' ids and the free-row stack of `layer` agree; returns `{id: row}`."""
    keys, rows = (t.numpy() for t in layer.id_to_row.export())
    live = (keys != EMPTY_KEY) & (keys != DELETED_KEY)
    keys, rows = keys[live], rows[live]
    assert len(set(rows.tolist())) == len(rows), f"{len(rows) - len(set(rows.tolist()))} rows held by two ids"
    row_ids = layer.row_ids.numpy()
    occupied = np.flatnonzero(row_ids != EMPTY_KEY)
    assert sorted(rows.tolist()) == occupied.tolist()
    np.testing.assert_array_equal(layer.map_keys(tf.constant(row_ids[rows])).numpy(), keys)
    free = layer.free_rows.numpy()[:layer.num_free.numpy()]
    assert len(free) + len(occupied) == layer.capacity
    assert not set(free.tolist()) & set(occupied.tolist()) and len(set(free.tolist())) == len(free)
    return dict(zip(row_ids[rows].tolist(), rows.tolist()))


def test_concurrent_training_calls_under_the_admission_lock_never_share_a_row():
    """Two threads train one table at once (what the workers of a ParameterServerStrategy do to a map on a ps
    task): each call's lookup → free-row allocation → insert runs under the admission lock. Without it the same
    run hands one row to two ids (hundreds, measured) and loses clock ticks."""
    import threading

    assert _layer()._admission_lock.value is None  # one process: no lock by default
    layer = _layer(capacity=300, output_dim=4, evict_after_steps=3, exclusive_updates=True)
    assert layer._admission_lock.value is not None

    @tf.function(input_signature=[tf.TensorSpec([256], tf.int64)])
    def step(ids):
        return tf.reduce_sum(layer(ids, training=True))

    traced = {op.type for op in step.get_concrete_function().graph.get_operations()}
    assert {"MutexLock", "ConsumeMutexLock"} <= traced
    errors = []

    def train(worker):
        rng = np.random.default_rng(worker)
        try:
            for _ in range(60):  # disjoint ids (even / odd), 5,000 of them through 300 rows: evictions
                step(tf.constant(rng.integers(1, 2500, 256) * 2 + worker, tf.int64))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=train, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(_consistent(layer)) == 300
    assert layer.calls.numpy() == 120  # every call of both threads ticked the clock once


_TWO_REPLICAS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mm_ads.layers.dynamic_embedding import DynamicEmbedding
with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
    DynamicEmbedding(4, 2).build()  # one replica: allowed
try:
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        DynamicEmbedding(4, 2, name="emb_item").build()
except ValueError as e:
    print("ERROR", e)
"""


@pytest.mark.large
def test_more_than_one_replica_is_a_clear_error(repo_root):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    proc = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR DynamicEmbedding 'emb_item' cannot be built under MirroredStrategy with 2 replicas" in proc.stdout
