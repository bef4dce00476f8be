import numpy as np
import pytest
import tensorflow as tf

from mm_ads.data.spec import HIST_ITEM_VECTOR, ITEM_VECTOR, Feature, FeatureSpec, missing_flag_name


def _spec(**kw):
    args = dict(seq_len=4, vector_dim=8, num_items=100, num_categories=5, num_brands=7, num_users=10,
                profile_buckets=(3,))
    args.update(kw)
    return FeatureSpec.default(**args)


def test_default_layout_and_shared_tables():
    spec = _spec()
    assert spec["item_id"].table == spec["hist_item_id"].table == "item"
    assert spec.tables() == {"user": 11, "user_profile_0": 4, "item": 101, "category": 6, "brand": 8}
    assert spec[ITEM_VECTOR].shape == (8,) and spec[HIST_ITEM_VECTOR].shape == (4, 8)
    assert spec.label == "label"
    assert ITEM_VECTOR not in [f.name for f in spec.stored_features]
    assert missing_flag_name(ITEM_VECTOR) == "item_vector_missing"


def test_json_round_trip_is_exact():
    spec = _spec()
    again = FeatureSpec.loads(spec.dumps())
    assert again == spec and again.to_json() == spec.to_json()
    assert [f.shape for f in again] == [f.shape for f in spec]


def test_parse_and_tensor_specs_follow_the_spec():
    spec = _spec()
    parse = spec.parse_spec()
    assert parse["hist_item_id"].shape == (4,) and parse["label"].dtype == tf.float32
    assert ITEM_VECTOR not in parse
    specs = spec.tensor_specs()
    assert specs[HIST_ITEM_VECTOR].shape.as_list() == [None, 4, 8]
    assert specs["item_id"].dtype == tf.int64 and specs["item_id"].name == "item_id"
    assert "label" not in specs and "timestamp" not in specs
    example = tf.train.Example(features=tf.train.Features(feature={
        f.name: (tf.train.Feature(float_list=tf.train.FloatList(value=np.zeros(int(np.prod(f.shape)) or 1)))
                 if f.dtype == "float32" else
                 tf.train.Feature(int64_list=tf.train.Int64List(value=np.ones(int(np.prod(f.shape)) or 1, int))))
        for f in spec.stored_features}))
    parsed = tf.io.parse_example([example.SerializeToString()] * 2, parse)
    assert parsed["hist_item_id"].shape == (2, 4)


@pytest.mark.parametrize("make,match", [
    (lambda: Feature("x", "item", table="item"), "num_buckets"),
    (lambda: Feature("x", "bogus"), "role"),
    (lambda: Feature("x", "history", shape=(), table="t", num_buckets=3), "rank"),
    (lambda: Feature("x", "vector", "float32", (8,)), "source"),
    (lambda: Feature("x y", "meta"), "identifier"),
    (lambda: Feature("x", "label", dtype="int64"), "float32"),
])
def test_feature_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_spec_validation():
    good = _spec(vector_dim=0)
    feats = list(good.features)
    with pytest.raises(ValueError, match="disagree on num_buckets"):
        FeatureSpec(feats + [Feature("other_item", "item", table="item", num_buckets=5)], 4, 0)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        FeatureSpec(feats + [Feature("h2", "history", shape=(3,), table="item", num_buckets=101)], 4, 0)
    with pytest.raises(ValueError, match="Duplicate"):
        FeatureSpec(feats + [feats[0]], 4, 0)
    with pytest.raises(ValueError, match="exactly one label"):
        FeatureSpec([f for f in feats if f.role != "label"], 4, 0)
    with pytest.raises(ValueError, match="source"):
        FeatureSpec(feats + [Feature("v", "vector", "float32", (8,), source="user_id")], 4, 8)
    with pytest.raises(ValueError, match="Malformed"):
        FeatureSpec.from_json({"features": []})
    with pytest.raises(KeyError, match="No feature 'nope'"):
        good["nope"]


def test_serialize_examples_round_trips_through_parse_example():
    from mm_ads.data.dataset import serialize_examples

    rng = np.random.default_rng(0)
    ids = rng.integers(-(1 << 62), 1 << 62, (5, 3))
    ids[0, 0] = 0
    labels = rng.random((5, 1)).astype(np.float32)
    records = serialize_examples({"ids": (ids, False), "label": (labels, True)})
    parsed = tf.io.parse_example(records, {"ids": tf.io.FixedLenFeature([3], tf.int64),
                                           "label": tf.io.FixedLenFeature([1], tf.float32)})
    np.testing.assert_array_equal(parsed["ids"].numpy(), ids)
    np.testing.assert_array_equal(parsed["label"].numpy(), labels)
    # the same bytes as the reference protobuf encoder's parse (field order aside): equal when re-parsed
    example = tf.train.Example.FromString(records[2])
    assert list(example.features.feature["ids"].int64_list.value) == ids[2].tolist()


def test_user_side_inputs():
    """User, context and history features, the history's vector and its flag; in the given order."""
    spec = FeatureSpec(list(_spec()) + [Feature("hour", "context", "int64", (), table="hour", num_buckets=24)],
                       seq_len=4, vector_dim=8)
    names = ["item_id", "hist_brand_id", "user_id", "hour", ITEM_VECTOR, missing_flag_name(ITEM_VECTOR),
             missing_flag_name(HIST_ITEM_VECTOR), HIST_ITEM_VECTOR, "timestamp", "label", "not_a_feature",
             "user_profile_0", "category_id"]
    assert spec.user_side_inputs(names) == ["hist_brand_id", "user_id", "hour", missing_flag_name(HIST_ITEM_VECTOR),
                                            HIST_ITEM_VECTOR, "user_profile_0"]
    assert spec.user_side_inputs({"user_id": 0, "item_id": 0}) == ["user_id"]  # any iterable of names
