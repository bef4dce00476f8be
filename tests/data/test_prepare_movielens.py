"""Tests of the MovieLens reader on fixtures in the GroupLens CSV layout."""

import csv
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from mm_ads.data.dataset import Manifest
from mm_ads.data.readers import DataFormatError, movielens

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Horror"]


def _read_ctr(data_dir, split):
    m = Manifest.load(data_dir)
    ds = tf.data.TFRecordDataset(m.files("ctr", split)).batch(1 << 16)
    parts = [tf.io.parse_example(b, m.spec.parse_spec()) for b in ds]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in m.spec.parse_spec()}


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fixture(d, num_users=25, num_movies=40, seed=0):
    """A small MovieLens release: sparse movieIds, quoted titles, ties in time, tags with commas/case."""
    rng = np.random.default_rng(seed)
    d.mkdir(exist_ok=True)
    movies = []
    for j in range(num_movies):
        mid = 3 * j + 1
        title = f"Movie {j}, The ({1980 + j % 7})" if j % 5 else f"Film \"{j}\" ({1990 + j % 3})"
        if j == 7:
            title = "Untitled Project"
        genres = "(no genres listed)" if j == 11 else "|".join(GENRES[(j + k) % 5] for k in range(1 + j % 3))
        movies.append((mid, title, genres))
    _write_csv(d / "movies.csv", ["movieId", "title", "genres"], movies)
    ratings = []
    for u in range(1, num_users + 1):
        n = int(rng.integers(3, min(25, num_movies - 5)))
        chosen = rng.choice(num_movies - 5, size=n, replace=False)  # the last 5 movies are never rated
        t = 1_000_000 + int(rng.integers(0, 10_000))
        for j in chosen:
            t += int(rng.choice([0, 0, 5, 100]))  # same-second ratings are common in MovieLens
            ratings.append((u * 7, 3 * int(j) + 1, float(rng.integers(1, 11)) / 2, t))
    _write_csv(d / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
    tags = [(7, 1, "Pixar", 1_000_001), (14, 1, " pixar ", 1_000_002), (7, 1, "funny, for kids", 1_000_003),
            (21, 4, "pixar", 1_002_000), (7, 10, "dark", 1_009_000), (14, 13, "Dark", 1_020_000),
            (21, 16, "space opera", 1_030_000), (14, 13, "", 1_000_500)]
    _write_csv(d / "tags.csv", ["userId", "movieId", "tag", "timestamp"], tags)
    return d, movies, ratings, tags


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("ml")
    inp, movies, ratings, tags = _fixture(base / "in")
    out = str(base / "out")
    m = movielens.prepare(str(inp), out, seq_len=4, negatives_per_positive=3, test_fraction=0.2, min_rating=2.0,
                          max_tags_per_item=2, seed=3, rows_per_shard=150, provenance={"argv": ["t"]})
    return m, out, movies, ratings, tags


def test_counts_shapes_and_spec(dataset):
    m, out, movies, ratings, _ = dataset
    assert m.format == "movielens" and m.provenance["argv"] == ["t"] and m.provenance["input"].endswith("in")
    spec = m.spec
    assert spec.seq_len == 4 and spec.tables()["item"] == len(movies) + 1
    assert spec.tables()["user"] == len({r[0] for r in ratings}) + 1
    positives = sum(r[2] >= 2.0 for r in ratings)
    train, test = _read_ctr(out, "train"), _read_ctr(out, "test")
    n = len(train["label"]) + len(test["label"])
    assert n == positives * 4 - m.extra["stats"]["negatives_dropped"]
    assert train["label"].sum() + test["label"].sum() == positives
    assert train["hist_item_id"].shape[1:] == (4,) and train["hist_item_id"].dtype == np.int64
    assert train["label"].dtype == np.float32 and train["timestamp"].dtype == np.int64
    files = m.components["ctr"]["train"]["files"]
    assert len(files) == -(-len(train["label"]) // 150) > 1
    assert files == [f"ctr/train-{i:05d}-of-{len(files):05d}.tfrecord" for i in range(len(files))]


def test_time_split_history_and_negatives(dataset):
    m, out, movies, ratings, _ = dataset
    train, test = _read_ctr(out, "train"), _read_ctr(out, "test")
    assert test["timestamp"].min() >= m.extra["split"]["cutoff"] > train["timestamp"].max()
    frac = (test["label"].sum()) / (train["label"].sum() + test["label"].sum())
    assert 0.2 <= frac < 0.4
    movie_index = {mid: i + 1 for i, (mid, _, _) in enumerate(movies)}
    users = sorted({r[0] for r in ratings})
    rated = {}  # dense user → {item: first rating time}
    positives = {}  # dense user → [(time, item)]
    for u, mid, rating, t in ratings:
        du, it = users.index(u) + 1, movie_index[mid]
        rated.setdefault(du, {})[it] = min(t, rated.get(du, {}).get(it, t))
        if rating >= 2.0:
            positives.setdefault(du, []).append((t, it))
    first_rating = {}
    for _, mid, _, t in ratings:
        it = movie_index[mid]
        first_rating[it] = min(first_rating.get(it, t), t)
    checked = 0
    for ctr in (train, test):
        for i in range(len(ctr["label"])):
            u, it, t = int(ctr["user_id"][i]), int(ctr["item_id"][i]), int(ctr["timestamp"][i])
            hist = ctr["hist_item_id"][i]
            # strictly earlier positives, oldest first (same-second ones ordered by item id), the newest 4
            want = [x for _, x in sorted(p for p in positives[u] if p[0] < t)][-4:]
            assert hist.tolist() == [0] * (4 - len(want)) + want  # left-padded, most recent last
            assert int(ctr["item_created_at"][i]) == first_rating[it] <= t
            if ctr["label"][i] == 0:  # not rated (high or low) by then; a later rating is no information here
                assert rated[u].get(it, t + 1) > t
            else:
                assert (t, it) in positives[u]
            checked += 1
    assert checked == len(train["label"]) + len(test["label"])


def test_attributes_items_and_item_stats(dataset):
    m, out, movies, ratings, _ = dataset
    items = pq.read_table(os.path.join(out, "items.parquet")).to_pydict()
    assert items["movie_id"] == [mid for mid, _, _ in movies]
    assert items["title"][1] == "Movie 1, The (1981)" and items["year"][1] == 1981 and items["year"][7] is None
    cats = m.extra["vocab"]["category"]
    assert [cats[c - 1] for c in items["category_id"]] == [g.split("|")[0] for _, _, g in movies]
    brands = m.extra["vocab"]["brand"]
    assert brands[items["brand_id"][7] - 1] == "unknown" and brands[items["brand_id"][1] - 1] == "1981"
    assert items["created_at"][-1] is None and items["num_ratings"][-1] == 0
    assert items["text"][11] == "Movie 11, The (1984)."  # no genres listed, no tags
    assert items["text"][0].startswith('Film "0" (1990). Genres: Action. Tags: pixar, funny, for kids.')
    train = _read_ctr(out, "train")
    np.testing.assert_array_equal(np.array(items["category_id"])[train["item_id"] - 1], train["category_id"])
    stats = pq.read_table(os.path.join(out, "item_stats.parquet")).to_pydict()
    ids, counts = np.unique(train["item_id"], return_counts=True)
    assert stats["item_id"] == ids.tolist() and stats["train_count"] == counts.tolist()
    first = {i: train["timestamp"][train["item_id"] == i].min() for i in ids}
    assert stats["first_seen"] == [int(first[i]) for i in ids]


def test_tag_pairs(dataset):
    m, out, movies, _, tags = dataset
    items = pq.read_table(os.path.join(out, "items.parquet")).to_pydict()
    rows = []
    for split in ("train", "test"):
        table = pq.read_table(os.path.join(out, f"pretrain/text_pairs-{split}.parquet"))
        rows += [(split, r) for r in table.to_pylist()]
    pairs = {(r["query"], r["positive_id"]) for _, r in rows}
    assert pairs == {("pixar", 1), ("funny, for kids", 1), ("pixar", 2), ("dark", 4), ("dark", 5),
                     ("space opera", 6)}
    tagged = {}
    for q, i in pairs:
        tagged.setdefault(q, set()).add(i)
    for split, r in rows:
        assert (split == "test") == (r["first_tagged_at"] >= m.extra["split"]["cutoff"])
        assert f"Tags: {r['query']}" not in r["positive"]
        assert r["positive"].startswith(items["title"][r["positive_id"] - 1])
        if r["negative_id"] != -1:
            assert items["category_id"][r["negative_id"] - 1] == items["category_id"][r["positive_id"] - 1]
            assert r["negative_id"] not in tagged[r["query"]] and r["negative"] == items["text"][r["negative_id"] - 1]
        else:
            assert r["negative"] == ""
    pixar = [r for _, r in rows if r["query"] == "pixar" and r["positive_id"] == 1][0]
    assert pixar["num_taggers"] == 2 and pixar["positive"].endswith("Tags: funny, for kids.")
    assert m.extra["stats"]["empty_tags_skipped"] == 1


def test_deterministic_for_seed(tmp_path):
    inp, *_ = _fixture(tmp_path / "in", num_users=8, num_movies=20)
    kw = {"seq_len": 3, "negatives_per_positive": 2, "negative_sampling": "popularity"}
    movielens.prepare(str(inp), str(tmp_path / "a"), seed=1, **kw)
    movielens.prepare(str(inp), str(tmp_path / "b"), seed=1, **kw)
    movielens.prepare(str(inp), str(tmp_path / "c"), seed=2, **kw)

    def blob(d):
        names = sorted(os.listdir(os.path.join(d, "ctr")))
        return b"".join(open(os.path.join(d, "ctr", f), "rb").read() for f in names)

    assert blob(tmp_path / "a") == blob(tmp_path / "b") != blob(tmp_path / "c")
    a = pq.read_table(tmp_path / "a" / "pretrain" / "text_pairs-train.parquet")
    assert a.equals(pq.read_table(tmp_path / "b" / "pretrain" / "text_pairs-train.parquet"))


def test_max_users_and_no_tags(tmp_path):
    inp, _, ratings, _ = _fixture(tmp_path / "in")
    os.remove(inp / "tags.csv")
    m = movielens.prepare(str(inp), str(tmp_path / "out"), max_users=5, negatives_per_positive=0, test_fraction=0.0)
    assert m.spec.tables()["user"] == 6
    pairs = pq.read_table(tmp_path / "out" / "pretrain" / "text_pairs-train.parquet")  # co-liked, not tag pairs
    assert "negative_disliked" in pairs.column_names and set(pairs.column("user_id").to_pylist()) <= set(range(1, 6))
    assert m.num_rows("pretrain/text_pairs", "test") == 0
    assert m.num_rows("ctr", "test") == 0
    ctr = _read_ctr(str(tmp_path / "out"), "train")
    assert (ctr["label"] == 1).all() and set(ctr["user_id"].tolist()) <= set(range(1, 6))


@pytest.mark.parametrize("file,edit,where,field", [
    ("ratings.csv", lambda rows: rows.__setitem__(3, "7,4,abc,1000\n"), "line 4", "rating"),
    ("ratings.csv", lambda rows: rows.__setitem__(5, "7,4,9.5,1000\n"), "line 6", "rating"),
    ("ratings.csv", lambda rows: rows.__setitem__(2, "7,4,3.0\n"), "line 3", "(record)"),
    ("ratings.csv", lambda rows: rows.__setitem__(6, "7,,3.0,1000\n"), "line 7", "movieId"),
    ("ratings.csv", lambda rows: rows.__setitem__(4, "7,5,3.0,1000\n"), "line 5", "movieId"),  # unknown movie
    ("ratings.csv", lambda rows: rows.__setitem__(0, "user,movieId,rating,timestamp\n"), "line 1", "header"),
    ("movies.csv", lambda rows: rows.__setitem__(3, "7,Movie 2, The (1982),Drama\n"), "line 4", "(record)"),
    ("movies.csv", lambda rows: rows.__setitem__(2, "x,Movie,Drama\n"), "line 3", "movieId"),
    ("movies.csv", lambda rows: rows.__setitem__(2, "1,Dup (1990),Drama\n"), "line 3", "movieId"),
    ("tags.csv", lambda rows: rows.__setitem__(2, "7,999,x,5\n"), "line 3", "movieId"),
])
def test_malformed_input_names_file_line_field(tmp_path, file, edit, where, field):
    inp, *_ = _fixture(tmp_path / "in", num_users=5)
    with open(inp / file, encoding="utf-8") as f:
        rows = f.readlines()
    edit(rows)
    with open(inp / file, "w", encoding="utf-8") as f:
        f.writelines(rows)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        movielens.prepare(str(inp), str(out))
    assert e.value.path.endswith(file) and e.value.where == where and e.value.field == field, str(e.value)
    assert f"{file}: {where}: field {field!r}: expected" in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_bad_arguments(tmp_path):
    inp, *_ = _fixture(tmp_path / "in", num_users=3)
    with pytest.raises(ValueError, match="'zipf'"):
        movielens.prepare(str(inp), str(tmp_path / "o"), negative_sampling="zipf")
    with pytest.raises(ValueError, match="test_fraction"):
        movielens.prepare(str(inp), str(tmp_path / "o"), test_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        os.remove(inp / "ratings.csv")
        movielens.prepare(str(inp), str(tmp_path / "o"))
