import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm_ads.data import render, synthetic
from mm_ads.data.dataset import Manifest

SMALL = dict(seed=3, num_items=600, num_users=400, num_categories=8, num_impressions=8000, num_search_pairs=400,
             seq_len=10, image_size=16, num_shards=2)


@pytest.fixture(scope="module")
def world():
    return synthetic.World(synthetic.WorldConfig(**SMALL)).generate(progress=False)


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w") / "world")
    synthetic.write_world(world, out, progress=False)
    return out


def _read_ctr(data_dir, split):
    import tensorflow as tf

    m = Manifest.load(data_dir)
    ds = tf.data.TFRecordDataset(m.files("ctr", split)).batch(100_000)
    batch = next(iter(ds))
    return {k: v.numpy() for k, v in tf.io.parse_example(batch, m.spec.parse_spec()).items()}


def test_deterministic_for_a_seed(world):
    again = synthetic.World(synthetic.WorldConfig(**SMALL)).generate(progress=False)
    for k in ("user", "item", "time", "label", "hist"):
        np.testing.assert_array_equal(world.impressions[k], again.impressions[k])
    assert world.titles == again.titles
    assert world.images == again.images
    assert world.search["text_query"] == again.search["text_query"]
    other = synthetic.World(synthetic.WorldConfig(**{**SMALL, "seed": 4})).generate(progress=False)
    assert not np.array_equal(world.impressions["item"], other.impressions["item"])


def test_written_files_identical_for_same_seed(world, written, tmp_path):
    again = synthetic.World(synthetic.WorldConfig(**SMALL)).generate(progress=False)
    out = str(tmp_path / "again")
    synthetic.write_world(again, out, progress=False)
    for rel in Manifest.load(written).files("ctr", "train"):
        name = os.path.relpath(rel, written)
        with open(rel, "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read()


def test_records_match_spec_and_history_is_causal(world, written):
    m = Manifest.load(written)
    spec = m.spec
    cols = _read_ctr(written, "train")
    n = m.num_rows("ctr", "train")
    for f in spec.stored_features:
        assert cols[f.name].shape == (n,) + f.shape, f.name
    hist = cols["hist_item_id"]
    # left-padded: once a slot is filled, every later slot is filled
    filled = hist != 0
    assert np.all(np.diff(filled.astype(int), axis=1) >= 0)
    # ids in range and side features consistent with the catalogue
    assert hist.max() <= SMALL["num_items"] and cols["item_id"].min() >= 1
    items = pq.read_table(os.path.join(written, "items.parquet")).to_pydict()
    cat = np.asarray(items["category_id"])
    np.testing.assert_array_equal(cols["hist_category_id"][filled], cat[hist[filled] - 1])
    np.testing.assert_array_equal(cols["category_id"], cat[cols["item_id"] - 1])
    # an item is never shown before it exists, and history items existed before the impression
    assert np.all(cols["item_created_at"] <= cols["timestamp"])
    created = np.asarray(items["created_at"])
    hist_created = np.where(filled, created[np.maximum(hist - 1, 0)], 0)
    assert np.all(hist_created <= cols["timestamp"][:, None])


def test_in_log_history_items_are_earlier_clicks(world):
    imp = world.impressions
    # for each user, the last history slot of a later impression is an earlier click or a prior item
    order = np.argsort(imp["time"], kind="stable")
    last_click = {}
    checked = 0
    for j in order:
        u = imp["user"][j]
        if u in last_click:
            assert imp["hist"][j, -1] == last_click[u] + 1
            checked += 1
        if imp["label"][j]:
            last_click[u] = imp["item"][j]
    assert checked > 50


def test_time_ordered_split_ctr_and_cold_start(world, written):
    m = Manifest.load(written)
    train, test = _read_ctr(written, "train"), _read_ctr(written, "test")
    assert train["timestamp"].max() < test["timestamp"].min()
    for split in (train, test):
        assert 0.02 <= split["label"].mean() <= 0.15
    t_split = m.extra["time"]["test_start"]
    assert m.extra["time"]["train_end"] == t_split  # no valid split: train runs up to the test
    new_in_test = test["item_created_at"] >= t_split
    assert new_in_test.sum() > 0, "no cold-start impressions in the test split"
    assert not np.isin(test["item_id"][new_in_test], train["item_id"]).any()
    stats = m.extra["stats"]
    assert stats["test_impressions_of_unseen_items"] >= new_in_test.sum()


def test_valid_days_holds_out_the_last_train_days_with_the_same_clicks(world, written, tmp_path):
    held = synthetic.World(synthetic.WorldConfig(**SMALL, valid_days=1)).generate(progress=False)
    for k in ("user", "item", "time", "label", "hist"):  # the same log: only the partition differs
        np.testing.assert_array_equal(world.impressions[k], held.impressions[k])
    out = str(tmp_path / "held")
    synthetic.write_world(held, out, progress=False)
    m = Manifest.load(out)
    t = m.extra["time"]
    assert t["test_start"] - t["train_end"] == synthetic.DAY
    train, valid, test = (_read_ctr(out, s) for s in ("train", "valid", "test"))
    assert train["timestamp"].max() < t["train_end"] <= valid["timestamp"].min()
    assert valid["timestamp"].max() < t["test_start"] <= test["timestamp"].min()
    full_train, full_test = _read_ctr(written, "train"), _read_ctr(written, "test")
    np.testing.assert_array_equal(np.concatenate([train["label"], valid["label"]]), full_train["label"])
    np.testing.assert_array_equal(test["label"], full_test["label"])
    assert m.extra["stats"]["impressions_valid"] == len(valid["label"]) > 500
    assert m.extra["stats"]["impressions_train"] == len(train["label"])
    stats = pq.read_table(os.path.join(out, "item_stats.parquet")).to_pydict()
    assert sum(stats["train_count"]) == len(train["label"])  # item frequencies from the train split only
    assert max(stats["first_seen"]) < t["train_end"]


def test_long_tail(world):
    counts = np.bincount(world.impressions["item"], minlength=SMALL["num_items"])
    top = np.sort(counts)[::-1]
    # the top 5% of items take a large share; the bottom half almost nothing
    assert top[: SMALL["num_items"] // 20].sum() > 0.4 * top.sum()
    assert top[SMALL["num_items"] // 2:].sum() < 0.1 * top.sum()


def test_clicks_depend_on_semantic_affinity(world):
    imp = world.impressions
    clicked = imp["label"] == 1
    assert imp["affinity"][clicked].mean() > imp["affinity"][~clicked].mean() + 0.3
    # and on item quality (an id-only effect)
    q = world.quality[imp["item"]]
    assert q[clicked].mean() > q[~clicked].mean() + 0.1


def test_items_have_near_identical_siblings(world):
    it = world.items
    keys = ("category", "colour", "pattern", "material", "size")
    sig = np.stack([it[k] for k in keys], 1)
    # many items share a category and all but one attribute with another item
    same_cat = sig[:, None, 0] == sig[None, :, 0]
    diff = (sig[:, None, 1:] != sig[None, :, 1:]).sum(-1)
    one_off = (same_cat & (diff == 1)).any(axis=1)
    assert one_off.mean() > 0.5


def test_hard_negatives_share_category_and_differ(world, written):
    it = world.items
    s = world.search
    neg, pos = s["negative"], s["bought"]
    ok = neg >= 0
    assert ok.mean() > 0.95
    np.testing.assert_array_equal(it["category"][neg[ok]], it["category"][pos[ok]])
    assert np.all(neg[ok] != pos[ok])
    keys = ("colour", "pattern", "material", "size", "brand")
    ndiff = sum((it[k][neg[ok]] != it[k][pos[ok]]).astype(int) for k in keys)
    assert np.all(ndiff >= 1) and np.median(ndiff) <= 2
    table = pq.read_table(os.path.join(written, "pretrain", "text_pairs-train.parquet")).to_pydict()
    assert set(table) >= {"query", "positive", "negative", "positive_id", "negative_id"}
    titles = dict(zip(it["item_id"], world.titles))
    for q, p, pid in list(zip(table["query"], table["positive"], table["positive_id"]))[:50]:
        assert titles[pid] == p and q


def test_images_and_titles_show_the_attributes(world, written):
    items = pq.read_table(os.path.join(written, "items.parquet")).to_pydict()
    img = np.array(Image.open(io.BytesIO(items["image"][0])))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    # two items identical but for colour get different images; same attributes and brand → same image
    a = render.render_images(*[np.array([v]) for v in (1, 0, 0, 0, 1, 1)], image_size=16)
    b = render.render_images(*[np.array([v]) for v in (1, 5, 0, 0, 1, 1)], image_size=16)
    assert np.abs(a.astype(int) - b.astype(int)).sum() > 0
    np.testing.assert_array_equal(a, render.render_images(*[np.array([v]) for v in (1, 0, 0, 0, 1, 1)],
                                                          image_size=16))
    cats = render.category_words(SMALL["num_categories"])
    for i in range(20):
        words = items["title"][i].split()
        assert words[0] == render.brand_name(items["brand_id"][i])
        name, syn = cats[items["category_id"][i]]
        assert name in words or any(s in words for s in syn)
    photos = pq.read_table(os.path.join(written, "pretrain", "image_pairs-train.parquet")).to_pydict()
    q = np.array(Image.open(io.BytesIO(photos["query"][0])))
    p = np.array(Image.open(io.BytesIO(photos["positive"][0])))
    assert q.shape == p.shape and np.abs(q.astype(int) - p.astype(int)).mean() > 5


def test_manifest_item_stats_and_summary(written):
    m = Manifest.load(written)
    assert m.format == "synthetic" and m.seed == 3
    stats = pq.read_table(os.path.join(written, "item_stats.parquet")).to_pydict()
    assert sum(stats["train_count"]) == m.num_rows("ctr", "train")
    text = m.summary()
    assert "ctr: test=" in text and "ctr_train" in text
    assert json.load(open(os.path.join(written, "manifest.json")))["spec"]["seq_len"] == 10


def test_failed_write_leaves_nothing(world, tmp_path, monkeypatch):
    out = tmp_path / "broken"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic.DatasetWriter, "write_item_stats", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.write_world(world, str(out), progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_without_flag(world, written):
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthetic.write_world(world, written, progress=False)


@pytest.mark.parametrize("field,value", [("num_items", 0), ("target_ctr", 0.7), ("mutation_prob", 1.5),
                                               ("valid_days", 6), ("valid_days", -1)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        synthetic.WorldConfig(**{field: value}).validate()


def test_entry_point_smoke_flagfile(tmp_path, repo_root):
    out = tmp_path / "smoke"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "mm_ads.data.synthetic", "--flagfile=configs/data/smoke.flags",
         f"--output_dir={out}", "--num_impressions=3000"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ctr: test=" in proc.stdout
    m = Manifest.load(str(out))
    assert m.num_rows("ctr", "train") + m.num_rows("ctr", "test") == 3000
    assert m.spec.seq_len == 20
    helpfull = subprocess.run([sys.executable, "-m", "mm_ads.data.synthetic", "--helpfull"], cwd=repo_root,
                              env=env, capture_output=True, text=True, timeout=120)
    # absl prints the help and exits 1 (its convention for --help/--helpfull)
    assert "--num_items" in helpfull.stdout and "Traceback" not in helpfull.stderr
