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
    records = serialize_examples({"ids": (ids, "int64"), "label": (labels, "float32")})
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


# -- kinds beyond ids -------------------------------------------------------------------------------------------
def _kinds_spec():
    base = FeatureSpec.default(seq_len=4, vector_dim=0, num_items=10, num_categories=3, num_brands=3, num_users=5)
    return FeatureSpec(list(base) + [
        Feature("age", "user", "float32", kind="numeric", mean=30.0, std=10.0, nan_value=0.0),
        Feature("scores", "item", "float32", (2,), kind="numeric", boundaries=[0.0, 1.0], table="score"),
        Feature("occupation", "user", "string", table="occupation", num_buckets=16),
        Feature("genres", "item", "int64", (3,), table="category", num_buckets=4, kind="tags", combiner="sum",
                truncate=True),
    ], 4, 0)


def test_kinds_json_round_trip_and_defaults_left_out():
    spec = _kinds_spec()
    again = FeatureSpec.loads(spec.dumps())
    assert again == spec and again["scores"].boundaries == (0.0, 1.0) and again["age"].nan_value == 0.0
    js = {f["name"]: f for f in spec.to_json()["features"]}
    assert js["age"] == {"name": "age", "role": "user", "dtype": "float32", "shape": [], "padding_id": 0,
                         "kind": "numeric", "mean": 30.0, "std": 10.0, "nan_value": 0.0}
    assert js["genres"]["kind"] == "tags" and js["genres"]["combiner"] == "sum" and js["genres"]["truncate"] is True
    assert "kind" not in js["item_id"] and "combiner" not in js["item_id"] and "truncate" not in js["item_id"]
    # tags share the category table with the item's category id; numeric buckets get their own table
    assert spec.tables()["category"] == 4 and spec.tables()["score"] == 3 and spec.tables()["occupation"] == 16
    assert spec.table_padding()["score"] is None and spec.table_padding()["occupation"] == 0
    parse = spec.parse_spec()
    assert parse["occupation"].dtype == tf.string and parse["genres"].shape == (3,)
    assert spec.tensor_specs()["occupation"].dtype == tf.string
    assert {"age", "scores", "occupation", "genres"} <= {f.name for f in spec.model_features}


def test_a_spec_written_before_kinds_existed_loads_and_writes_the_same():
    old = {"seq_len": 2, "vector_dim": 0, "features": [
        {"name": "user_id", "role": "user", "dtype": "int64", "shape": [], "table": "user", "num_buckets": 3,
         "padding_id": 0},
        {"name": "item_id", "role": "item", "dtype": "int64", "shape": [], "table": "item", "num_buckets": 9,
         "padding_id": 0},
        {"name": "hist_item_id", "role": "history", "dtype": "int64", "shape": [2], "table": "item",
         "num_buckets": 9, "padding_id": 0},
        {"name": "label", "role": "label", "dtype": "float32", "shape": [], "padding_id": 0}]}
    spec = FeatureSpec.from_json(old)
    assert spec.to_json() == old
    assert all(f.kind == "id" for f in spec if f.role != "label") and spec.tables() == {"user": 3, "item": 9}


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="a", role="user", dtype="float32", kind="numeric", mean=1.0), "mean and std together"),
    (dict(name="a", role="user", dtype="float32", kind="numeric", mean=1.0, std=0.0), "std must be > 0"),
    (dict(name="a", role="user", dtype="float32", kind="numeric", boundaries=[2.0, 1.0]), "strictly increasing"),
    (dict(name="a", role="user", dtype="int64", kind="numeric"), "must be float32"),
    (dict(name="a", role="history", dtype="float32", shape=(4,), kind="numeric"), "must have a role in"),
    (dict(name="a", role="user", kind="tags", table="t", num_buckets=3), r"shape \[M\]"),
    (dict(name="a", role="user", kind="tags", shape=(2,), table="t", num_buckets=3, combiner="max"), "combiner"),
    (dict(name="a", role="user", dtype="string", table="t", num_buckets=9, id_mapping="hash"), "always hashed"),
    (dict(name="a", role="meta", dtype="string"), "string"),
    (dict(name="a", role="user", table="t", num_buckets=3, nan_value=0.0), "for numeric features"),
    (dict(name="a", role="user", table="t", num_buckets=3, truncate=True), "for tags features"),
    (dict(name="a", role="user", kind="bogus"), "kind must be one of"),
])
def test_kind_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Feature(**kwargs)


def test_with_normalization_computes_mean_and_std_from_data():
    age = Feature("age", "user", "float32", kind="numeric").with_normalization([20.0, 30.0, np.nan, 40.0])
    assert age.mean == 30.0 and age.std == pytest.approx(np.std([20.0, 30.0, 40.0]), abs=1e-6)
    pair = Feature("xy", "item", "float32", (2,), kind="numeric").with_normalization([[1.0, 5.0], [3.0, 5.0]])
    assert pair.mean == (2.0, 5.0) and pair.std == (1.0, 1.0)  # a constant column keeps std 1
    with pytest.raises(ValueError, match="only a numeric feature"):
        Feature("b", "user", "float32", kind="numeric", boundaries=[1.0]).with_normalization([1.0])


def test_a_table_is_either_int_or_string_ids():
    base = list(FeatureSpec.default(seq_len=2, vector_dim=0, num_items=5, num_categories=2, num_brands=2,
                                    num_users=3))
    with pytest.raises(ValueError, match="disagree on their values"):
        FeatureSpec(base + [Feature("tags", "item", "string", (2,), table="category", num_buckets=3, kind="tags")],
                    2, 0)


# -- prepared columns: bad input names the feature and the row ------------------------------------------------------
def _columns(n=4):
    return {"user_id": np.ones(n, np.int64), "user_profile_0": np.ones(n, np.int64), "item_id": np.arange(n) + 1,
            "category_id": np.ones(n, np.int64), "brand_id": np.ones(n, np.int64),
            "hist_item_id": np.zeros((n, 4), np.int64), "hist_category_id": np.zeros((n, 4), np.int64),
            "hist_brand_id": np.zeros((n, 4), np.int64), "timestamp": np.arange(n), "item_created_at": np.zeros(n),
            "label": np.zeros(n, np.float32), "age": np.array([20.0, np.nan, 30.0, np.nan]),
            "scores": np.zeros((n, 2), np.float32), "occupation": np.array(["a", "b", "c", "d"]),
            "genres": [[1], [1, 2, 3, 1], [], [2, 2]]}


def _kinds_spec_with_profile(**changes):
    feats = [f for f in _kinds_spec()]
    feats.insert(1, Feature("user_profile_0", "user", table="p", num_buckets=3))
    return FeatureSpec([Feature(**{**f.__dict__, **changes.get(f.name, {})}) for f in feats], 4, 0)


def test_conform_columns_converts_pads_and_counts_fallbacks():
    from mm_ads.data.dataset import conform_columns

    counts = {}
    cols, n = conform_columns(_columns(), _kinds_spec_with_profile(), "ctr/train", first_row=10, fallbacks=counts)
    assert n == 4 and counts == {"age": {"nan_filled": 2}, "genres": {"truncated": 1}}
    np.testing.assert_array_equal(cols["age"], [20.0, 0.0, 30.0, 0.0])
    assert cols["genres"].tolist() == [[1, 0, 0], [1, 2, 3], [0, 0, 0], [2, 2, 0]]
    assert cols["occupation"].tolist() == [b"a", b"b", b"c", b"d"] and cols["genres"].dtype == np.int64
    # conformed columns conform to themselves, nothing counted twice
    again = {}
    conform_columns(cols, _kinds_spec_with_profile(), "ctr/train", fallbacks=again)
    assert again == {}


@pytest.mark.parametrize("change,spec_change,match", [
    ({"user_profile_0": np.array([1, 2, "teacher", 3], object)}, {},
     r"ctr/train: row 12: feature 'user_profile_0' \(int64\) is declared int64 but holds 'teacher'"),
    ({"user_profile_0": np.array(["1", "2", "3", "4"])}, {}, r"row 10: feature 'user_profile_0'.*holds '1'"),
    ({}, {"age": {"nan_value": None}},
     r"ctr/train: row 11: feature 'age' \(float32 numeric\) is NaN; declare nan_value"),
    ({}, {"genres": {"truncate": False}},
     r"ctr/train: row 11: feature 'genres' \(int64 tags \[3\]\) has 4 values, more than its maximum 3"),
    ({"occupation": np.array(["a", 7, "c", "d"], object)}, {},
     r"row 11: feature 'occupation' \(string\) is declared string but holds 7"),
    ({"age": np.array([1.0, np.inf, 2.0, 3.0])}, {}, r"row 11: feature 'age' .* is inf"),
    ({"item_id": np.array([1.0, 2.5, 3.0, 4.0])}, {}, r"row 11: feature 'item_id' \(int64\) is declared int64"),
])
def test_bad_columns_name_the_feature_and_the_row(change, spec_change, match):
    from mm_ads.data.dataset import conform_columns

    with pytest.raises(ValueError, match=match):
        conform_columns({**_columns(), **change}, _kinds_spec_with_profile(**spec_change), "ctr/train", first_row=10)
