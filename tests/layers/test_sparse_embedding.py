import keras
import numpy as np
import pytest
import tensorflow as tf

from mm_ads.layers.sparse_embedding import SparseEmbedding


def _layer(**kw):
    args = dict(num_buckets=10, output_dim=3,
                embeddings_initializer=keras.initializers.Constant(np.arange(30).reshape(10, 3)))
    args.update(kw)
    return SparseEmbedding(**args)


def test_exact_values_dense_ids_and_padding():
    layer = _layer()
    ids = tf.constant([[4, 0, -1, 23, (1 << 62) + 3, 9]], tf.int64)
    out = layer(ids).numpy()
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    # dense ids: 4 and 9 read their rows; -1, 23, 2^62+3 are outside the table: the default row (zeros);
    # 0 is padding → zeros, masked
    np.testing.assert_array_equal(out[0], [table[4], np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), table[9]])
    np.testing.assert_array_equal(layer.compute_mask(ids).numpy(), [[True, False, True, True, True, True]])
    assert len(layer.trainable_weights) == 1 and layer.embeddings.shape == (10, 3) and not layer.non_trainable_weights


def test_modulo_mapping_keeps_the_bucketing_of_older_models():
    layer = _layer(id_mapping="modulo")
    ids = tf.constant([[4, 0, -1, 23, (1 << 62) + 3, 20]], tf.int64)
    out = layer(ids).numpy()
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    # floormod: -1 → 9, 23 → 3, 2^62+3 → (2^62 mod 10 + 3) mod 10 = 7; 0 is padding → zeros; 20 reads padding's
    # row 0 but is not padding (masked by value)
    np.testing.assert_array_equal(out[0], [table[4], np.zeros(3), table[9], table[3], table[7], table[0]])
    np.testing.assert_array_equal(layer.compute_mask(ids).numpy(), [[True, False, True, True, True, True]])


def test_no_padding_and_validation():
    out = _layer(padding_id=None)(tf.constant([0], tf.int64)).numpy()
    np.testing.assert_array_equal(out, [[0.0, 1.0, 2.0]])
    for kw, match in [({"num_buckets": 0}, "num_buckets"), ({"output_dim": 2.5}, "output_dim"),
                      ({"padding_id": "x"}, "padding_id"), ({"id_mapping": "identity"}, "id_mapping"),
                      ({"admit_after": -1}, "admit_after"), ({"admit_after": True}, "admit_after"),
                      ({"unseen_row": "random"}, "unseen_row")]:
        with pytest.raises(ValueError, match=match):
            _layer(**kw)


def test_gradient_is_row_sparse_and_skips_padding():
    layer = _layer()
    layer.build()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant([[2, 2, 0, 5]], tf.int64)))
    g = tape.gradient(loss, layer.embeddings.value)
    assert isinstance(g, tf.IndexedSlices)
    dense = tf.convert_to_tensor(g).numpy()
    assert np.flatnonzero(dense.any(axis=1)).tolist() == [2, 5]
    np.testing.assert_array_equal(dense[2], [2, 2, 2])


def test_shared_table_between_features():
    layer = _layer()
    target = keras.Input((), dtype="int64", name="item_id")
    hist = keras.Input((4,), dtype="int64", name="hist_item_id")
    out = keras.layers.Concatenate(axis=1)([keras.layers.Reshape((1, 3))(layer(target)), layer(hist)])
    model = keras.Model([target, hist], out)
    assert len(model.trainable_weights) == 1
    y = model([tf.constant([1], tf.int64), tf.constant([[1, 0, 0, 2]], tf.int64)]).numpy()
    np.testing.assert_array_equal(y[0, 0], y[0, 1])


def test_bfloat16_policy_keeps_float32_table():
    layer = _layer(dtype="mixed_bfloat16")
    out = layer(tf.constant([1, 2], tf.int64))
    assert out.dtype == tf.bfloat16 and layer.embeddings.dtype == "float32"
    np.testing.assert_array_equal(out.numpy().astype(np.float32), [[3, 4, 5], [6, 7, 8]])


def test_round_trip_config_and_keras_file(tmp_path):
    layer = _layer(padding_id=-5)
    ids = tf.constant([[1, -5, 7]], tf.int64)
    expected = layer(ids).numpy()
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert again.get_config() == layer.get_config()
    if not again.built:
        again.build()
    again.set_weights(layer.get_weights())
    np.testing.assert_array_equal(again(ids).numpy(), expected)
    inp = keras.Input((3,), dtype="int64")
    model = keras.Model(inp, layer(inp))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(ids).numpy(), expected)


def test_partition_sizes_and_routing_follow_tensorflow_div_rule():
    from mm_ads.layers.sparse_embedding import partition_sizes, shard_of

    assert partition_sizes(10, 3) == [4, 3, 3] and partition_sizes(10, 1) == [10]
    shard, local = shard_of(np.arange(10), 10, 3)
    assert shard.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] and local.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="num_shards"):
        _layer(num_shards=11)
    with pytest.raises(ValueError, match="num_shards"):
        partition_sizes(10, 0)


def test_sharded_table_equals_the_whole_table_in_lookups_updates_and_checkpoints(tmp_path):
    """3 shards of a 10-row table: same outputs, same SparseAdagrad updates, and a checkpoint that restores
    into 1 or 2 shards (the format does not depend on the number of shards)."""
    from mm_ads.training.checkpoint import model_checkpoint
    from mm_ads.training.sparse_optimizers import SparseAdagrad

    def model(num_shards):
        ids = keras.Input((4,), dtype="int64", name="ids")
        layer = _layer(num_shards=num_shards, name="emb_item", embeddings_initializer="zeros")
        out = keras.Model(ids, keras.ops.sum(layer(ids), axis=(1, 2)))
        start = 0
        for v in layer.tables:  # the rows of the test table, split like the shards
            v.assign(np.arange(30, dtype=np.float32).reshape(10, 3)[start:start + v.shape[0]])
            start += v.shape[0]
        return out, layer

    whole, w_layer = model(1)
    sharded, s_layer = model(3)
    assert [tuple(v.shape) for v in s_layer.tables] == [(4, 3), (3, 3), (3, 3)]
    assert [v.path for v in s_layer.tables] == [f"emb_item/embeddings_part_{i}" for i in range(3)]
    x = tf.constant([[4, 0, -1, 23], [9, 9, 3, 7]], tf.int64)  # rows on every shard, repeats, padding
    np.testing.assert_array_equal(whole(x).numpy(), sharded(x).numpy())
    opt_w, opt_s = SparseAdagrad(0.5), SparseAdagrad(0.5)
    for step in range(3):
        for m, opt, layer in ((whole, opt_w, w_layer), (sharded, opt_s, s_layer)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(m(x) ** 2) * (step + 1)
            grads = tape.gradient(loss, [v.value for v in layer.tables])
            assert all(isinstance(g, tf.IndexedSlices) for g in grads)
            opt.apply_gradients(zip(grads, layer.tables))
    table = np.concatenate([v.numpy() for v in s_layer.tables])
    np.testing.assert_allclose(table, w_layer.embeddings.numpy(), rtol=1e-6)
    assert not np.array_equal(table, np.arange(30).reshape(10, 3))  # it trained

    path = tf.train.Checkpoint(model=model_checkpoint(sharded)).save(str(tmp_path / "ckpt"))
    assert dict(tf.train.list_variables(path))["model/emb_item..embeddings/.ATTRIBUTES/VARIABLE_VALUE"] == [10, 3]
    for n in (1, 2):
        fresh, layer = model(n)
        for v in layer.tables:
            v.assign(tf.zeros_like(v))
        tf.train.Checkpoint(model=model_checkpoint(fresh)).restore(path).assert_existing_objects_matched()
        np.testing.assert_array_equal(np.concatenate([v.numpy() for v in layer.tables]), table)
    again = SparseEmbedding.from_config(s_layer.get_config())
    assert again.num_shards == 3
