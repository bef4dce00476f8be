"""Tests of the MovieLens reader's ml-100k layout, per-user split, co-liked pairs, and that no reader output
depends on later data (leakage)."""

import csv
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from mm_ads.data.dataset import Manifest
from mm_ads.data.readers import DataFormatError, movielens

# u.item rows: id, title, release date, genre flags (unknown, Action, Comedy, Drama)
MOVIES = [(1, "Alpha (1990)", "01-Jan-1990", "0100"), (2, "Beta (1991)", "01-Jan-1991", "0110"),
          (3, "Gamma", "01-Jan-1995", "0010"), (4, "Delta (1992)", "", "0001"), (5, "unknown", "", "1000"),
          (6, "\u00c9psilon (1993)", "05-May-1993", "0001"), (7, "Zeta (1994)", "01-Jan-1994", "0100")]
USERS = [(1, 17, "F", "student"), (2, 30, "M", "engineer"), (3, 56, "M", "writer")]
# (user, movie, stars, time); per user (time, movie) order, with valid_fraction = test_fraction = 0.2:
# users 1 and 2 (5 ratings): 3 train, 1 valid, 1 test; user 3 (4 ratings: floor(0.8) = 0): all train.
RATINGS = [(1, 1, 5, 100), (1, 2, 4, 200), (1, 4, 1, 200), (1, 3, 5, 300), (1, 6, 4, 400),
           (2, 2, 2, 150), (2, 1, 5, 250), (2, 3, 4, 350), (2, 4, 5, 450), (2, 5, 3, 650),
           (3, 4, 5, 120), (3, 7, 2, 130), (3, 1, 4, 500), (3, 2, 5, 600)]


def _write_100k(d, ratings=RATINGS):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\nDrama|3\n\n")
    (d / "u.occupation").write_text("engineer\nstudent\nwriter\n")
    with open(d / "u.item", "w", encoding="latin-1") as f:
        for mid, title, date, flags in MOVIES:
            f.write(f"{mid}|{title}|{date}||http://x/{mid}|" + "|".join(flags) + "\n")
    (d / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|5550{u}\n" for u, a, g, o in USERS))
    (d / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in reversed(ratings)))
    return d


def _read_ctr(data_dir, split):
    m = Manifest.load(data_dir)
    ds = tf.data.TFRecordDataset(m.files("ctr", split)).batch(1 << 16)
    parts = [tf.io.parse_example(b, m.spec.parse_spec()) for b in ds]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in m.spec.parse_spec()}


def _pairs(data_dir, split):
    return pq.read_table(os.path.join(data_dir, "pretrain", f"text_pairs-{split}.parquet")).to_pylist()


KW = {"seq_len": 3, "negatives_per_positive": 1, "split": "per_user", "valid_fraction": 0.2, "test_fraction": 0.2,
      "seed": 5}


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    base = tmp_path_factory.mktemp("ml100k")
    out = str(base / "out")
    m = movielens.prepare(str(_write_100k(base / "in")), out, **KW)
    return m, out


def test_splits_histories_and_profiles(ml100k):
    m, out = ml100k
    assert m.extra["layout"] == "100k" and m.provenance["layout"] == "100k"
    assert sorted(m.components["ctr"]) == ["test", "train", "valid"]
    want = {  # (user, item, time) → history (S = 3): strictly earlier positives, most recent last
        "train": {(1, 1, 100): [0, 0, 0], (1, 2, 200): [0, 0, 1], (1, 4, 200): [0, 0, 1],  # same second: unseen
                  (2, 2, 150): [0, 0, 0], (2, 1, 250): [0, 0, 2], (2, 3, 350): [0, 2, 1],
                  (3, 4, 120): [0, 0, 0], (3, 7, 130): [0, 0, 4], (3, 1, 500): [0, 4, 7], (3, 2, 600): [4, 7, 1]},
        "valid": {(1, 3, 300): [1, 2, 4], (2, 4, 450): [2, 1, 3]},
        "test": {(1, 6, 400): [2, 4, 3], (2, 5, 650): [1, 3, 4]},  # train + valid positives, never later ones
    }
    profile = {1: (1, 1, 2), 2: (3, 2, 1), 3: (7, 2, 3)}  # age group, gender (F=1, M=2), occupation
    for split, rows in want.items():
        ctr = _read_ctr(out, split)
        pos = ctr["label"] == 1
        got = {(int(u), int(i), int(t)): h.tolist() for u, i, t, h in
               zip(ctr["user_id"][pos], ctr["item_id"][pos], ctr["timestamp"][pos], ctr["hist_item_id"][pos])}
        assert got == rows, split
        for j in range(3):
            np.testing.assert_array_equal(ctr[f"user_profile_{j}"], [profile[u][j] for u in ctr["user_id"]])
    stats = m.extra["stats"]
    assert sum(m.num_rows("ctr", x) for x in want) == 2 * len(RATINGS) - stats["negatives_dropped"]
    assert (stats["train_users"], stats["valid_users"], stats["test_users"]) == (3, 2, 2)
    assert stats["test_users_seen_in_train_fraction"] == 1.0
    assert m.spec.tables()["user_profile_0"] == 8 and m.spec.tables()["user_profile_2"] == 4
    assert m.extra["vocab"]["user_profile_2"] == ["engineer", "student", "writer"]


def test_negatives_not_rated_by_then_and_existing(ml100k):
    m, out = ml100k
    first = {}
    rated = {}
    for u, i, _, t in RATINGS:
        first[i] = min(first.get(i, t), t)
        rated[(u, i)] = t
    negatives = 0
    for split in ("train", "valid", "test"):
        ctr = _read_ctr(out, split)
        for u, i, t, y, c in zip(ctr["user_id"], ctr["item_id"], ctr["timestamp"], ctr["label"],
                                 ctr["item_created_at"]):
            assert c == first[i] <= t
            if y == 0:
                negatives += 1
                assert rated.get((int(u), int(i)), t + 1) > t  # may be rated later: no future information
    assert negatives == len(RATINGS) - m.extra["stats"]["negatives_dropped"] and negatives >= len(RATINGS) - 2


def test_items_text_and_attributes(ml100k):
    m, out = ml100k
    items = pq.read_table(os.path.join(out, "items.parquet")).to_pydict()
    assert items["text"] == ["Alpha (1990). Genres: Action.", "Beta (1991). Genres: Action, Comedy.",
                             "Gamma (1995). Genres: Comedy.", "Delta (1992). Genres: Drama.", "unknown.",
                             "\u00c9psilon (1993). Genres: Drama.", "Zeta (1994). Genres: Action."]
    assert items["title"][2] == "Gamma" and items["year"][:5] == [1990, 1991, 1995, 1992, None]
    cats = m.extra["vocab"]["category"]
    assert [cats[c - 1] for c in items["category_id"]] == ["Action", "Action", "Comedy", "Drama",
                                                           movielens.NO_GENRES, "Drama", "Action"]
    assert items["num_ratings"] == [3, 3, 1, 2, 0, 0, 1]  # train split only (the valid/test ratings excluded)
    stats = pq.read_table(os.path.join(out, "item_stats.parquet")).to_pydict()
    train = _read_ctr(out, "train")
    ids, counts = np.unique(train["item_id"], return_counts=True)
    assert stats["item_id"] == ids.tolist() and stats["train_count"] == counts.tolist()


def test_coliked_pairs(ml100k):
    _, out = ml100k
    got = {s: [(r["user_id"], r["query_id"], r["positive_id"], r["negative_id"], r["negative_disliked"])
               for r in _pairs(out, s)] for s in ("train", "valid", "test")}
    assert got == {
        # user 1: Action movie 2 — no Action movie disliked, 7 the only Action movie unrated in train;
        # user 2: Comedy has no other movie; user 3: Action movie 7 disliked (2 stars) in train
        "train": [(1, 1, 2, 7, False), (2, 1, 3, -1, False), (3, 4, 1, 7, True), (3, 1, 2, 7, True)],
        "valid": [(1, 2, 3, -1, False), (2, 3, 4, 6, False)],  # user 2 had not rated Drama movie 6
        "test": [(1, 3, 6, 4, True)],  # movie 4 (Drama) rated 1 star by user 1
    }
    # the query is a catalogue movie: SCL leaves it out of its own negatives and candidates
    assert all(r["query_item_id"] == r["query_id"] for s in ("train", "valid", "test") for r in _pairs(out, s))
    row = _pairs(out, "test")[0]
    assert (row["query"], row["positive"], row["negative"], row["timestamp"]) == (
        "Gamma (1995). Genres: Comedy.", "\u00c9psilon (1993). Genres: Drama.", "Delta (1992). Genres: Drama.", 400)


def test_global_time_split_with_valid(tmp_path):
    inp = _write_100k(tmp_path / "in")
    m = movielens.prepare(str(inp), str(tmp_path / "out"), **dict(KW, split="global_time", valid_fraction=0.2,
                                                                     test_fraction=0.2))
    # 14 positive times sorted; cutoffs at indexes floor(0.6 * 14) = 8 and floor(0.8 * 14) = 11
    times = sorted(t for *_, t in RATINGS)
    assert m.extra["split"]["valid_cutoff"] == times[8] == 350 and m.extra["split"]["cutoff"] == times[11] == 500
    for split, (lo, hi) in {"train": (0, 350), "valid": (350, 500), "test": (500, 10**9)}.items():
        ctr = _read_ctr(str(tmp_path / "out"), split)
        assert ((ctr["timestamp"] >= lo) & (ctr["timestamp"] < hi)).all()
        assert int(ctr["label"].sum()) == sum(lo <= t < hi for *_, t in RATINGS)
    stats = m.extra["stats"]
    assert (stats["test_users"], stats["test_users_seen_in_train"]) == (2, 2)


def _same_ctr(a, b, keep=None):
    for split in ("train", "valid", "test"):
        x, y = _read_ctr(a, split), _read_ctr(b, split)
        mx, my = (keep(x), keep(y)) if keep and split == "test" else (slice(None), slice(None))
        for k in x:
            np.testing.assert_array_equal(x[k][mx], y[k][my], err_msg=f"{split}/{k}")


@pytest.mark.parametrize("sampling", movielens.SAMPLING)
def test_no_leakage_ml100k_latest_rating_altered(tmp_path, sampling):
    """Altering the latest rating of the file (a test row: its movie and stars) changes no other record, no item
    text, no item statistic and no train/valid pair."""
    kw = dict(KW, negative_sampling=sampling)
    a = movielens.prepare(str(_write_100k(tmp_path / "in_a")), str(tmp_path / "a"), **kw)
    latest = max(RATINGS, key=lambda r: r[3])
    altered = [r if r != latest else (latest[0], 6, 5, latest[3]) for r in RATINGS]  # 6: valid pair negative
    b = movielens.prepare(str(_write_100k(tmp_path / "in_b", altered)), str(tmp_path / "b"), **kw)
    _same_ctr(str(tmp_path / "a"), str(tmp_path / "b"), keep=lambda c: c["timestamp"] < latest[3])
    for name in ("item_stats.parquet", "pretrain/text_pairs-train.parquet", "pretrain/text_pairs-valid.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name)), name
    # items: equal but for created_at (an item's first rating: movie 5 is now never rated), which only rows at
    # or after that time see (meta item_created_at)
    items_a, items_b = (pq.read_table(tmp_path / x / "items.parquet").to_pydict() for x in "ab")
    assert items_a.pop("created_at")[4] == latest[3] and items_b.pop("created_at")[4] is None
    assert items_a == items_b
    assert a.num_rows("pretrain/text_pairs", "test") + 1 == b.num_rows("pretrain/text_pairs", "test")  # 4 → 6 liked


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.parametrize("split", movielens.SPLITS)
def test_no_leakage_csv_test_period_ratings_and_tags(tmp_path, split):
    """CSV layout: altering the latest ratings (test rows) and adding / changing test-period tags leaves train and
    valid records, earlier test records, item texts, item_stats and train/valid pairs unchanged."""
    movies = [(10 * j + 1, f"Movie {j} ({1990 + j})", ["Action", "Comedy", "Drama"][j % 3]) for j in range(9)]
    ratings = []
    for u in range(1, 7):
        for k in range(6):
            j = (u * 2 + k * 5) % 9
            ratings.append((u, 10 * j + 1, float(1 + (u + k) % 5), 1000 + 100 * k + u))
    tags = [(1, 1, "classic", 1001), (2, 11, "funny", 1102), (3, 1, "Classic", 1203), (4, 21, "dark", 1550)]
    kw = {"seq_len": 4, "negatives_per_positive": 2, "valid_fraction": 0.25, "test_fraction": 0.25, "seed": 1,
          "split": split}

    def build(name, ratings, tags):
        d = tmp_path / f"in_{name}"
        d.mkdir()
        _write_csv(d / "movies.csv", ["movieId", "title", "genres"], movies)
        _write_csv(d / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
        _write_csv(d / "tags.csv", ["userId", "movieId", "tag", "timestamp"], tags)
        return movielens.prepare(str(d), str(tmp_path / name), **kw)

    a = build("a", ratings, tags)
    # test period: global_time from the cutoff (1404); per_user (6 ratings: 1 valid, 1 test each) a tag is
    # train-period before its tagger's valid rating (at 1400 + user), test-period from the test one (1500 + user)
    cutoff = a.extra["split"]["cutoff"] if split == "global_time" else 1510
    assert split != "global_time" or a.extra["split"]["valid_cutoff"] == 1301 and cutoff == 1404
    assert a.num_rows("ctr", "test") == {"global_time": 9, "per_user": 6}[split] * 3  # positives · (1 + 2)
    assert tags[2][3] < 1301 and tags[3][3] >= 1504  # "dark" (user 4): test period in both splits
    late = sorted(r[3] for r in ratings)[-3:]  # the three latest ratings get a movie their user never rated, 5 stars
    unrated = {u: min({m for m, *_ in movies} - {r[1] for r in ratings if r[0] == u}) for u in range(1, 7)}
    altered = [(u, unrated[u], 5.0, t) if t in late else (u, m, r, t) for u, m, r, t in ratings]
    more_tags = tags + [(5, 31, "classic", cutoff), (6, 1, "space", cutoff + 50), (1, 11, "funny", cutoff + 1)]
    more_tags[3] = (4, 21, "gritty", 1550)  # a test-period tag changed
    b = build("b", altered, more_tags)
    assert b.extra["split"] == a.extra["split"]
    _same_ctr(str(tmp_path / "a"), str(tmp_path / "b"), keep=lambda c: c["timestamp"] < min(late))
    items_a = pq.read_table(tmp_path / "a" / "items.parquet")
    assert items_a.equals(pq.read_table(tmp_path / "b" / "items.parquet"))
    assert items_a.column("text").to_pylist()[0] == "Movie 0 (1990). Genres: Action. Tags: classic."
    assert "dark" not in " ".join(items_a.column("text").to_pylist())  # a test-period tag: not in the text
    for name in ("item_stats.parquet", "pretrain/text_pairs-train.parquet", "pretrain/text_pairs-valid.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name)), name
    queries = {r["query"] for r in _pairs(str(tmp_path / "b"), "test")}
    assert {"space", "gritty", "classic"} <= queries  # classic on movie 31 first tagged in the test period


def test_layout_detection_and_malformed_100k(tmp_path):
    inp = _write_100k(tmp_path / "in")
    assert movielens.detect_layout(str(inp)) == "100k"
    (inp / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(FileNotFoundError, match="found both"):
        movielens.prepare(str(inp), str(tmp_path / "o"))
    os.remove(inp / "ratings.csv")
    lines = (inp / "u.data").read_text().splitlines(keepends=True)
    for edit, where, field in ((("1\t99\t3\t10\n"), "line 2", "movieId"), ("9\t1\t3\t10\n", "line 2", "userId"),
                               ("1\t1\t7\t10\n", "line 2", "rating"), ("1\t1\t3\n", "line 2", "(record)")):
        (inp / "u.data").write_text("".join(lines[:1] + [edit] + lines[2:]))
        with pytest.raises(DataFormatError) as e:
            movielens.prepare(str(inp), str(tmp_path / "o"))
        assert e.value.path.endswith("u.data") and (e.value.where, e.value.field) == (where, field), str(e.value)
    (inp / "u.data").write_text("".join(lines))
    user = (inp / "u.user").read_text()
    (inp / "u.user").write_text(user.replace("|F|student|", "|F|pilot|"))
    with pytest.raises(DataFormatError, match="u.user: line 1: field 'occupation'"):
        movielens.prepare(str(inp), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_real_ml100k(shared_data, tmp_path):
    """The real ml-100k: the per-user protocol's counts (10% valid, 10% test per user; floor per user)."""
    inp = os.path.join(shared_data, "movielens-100k")
    if not os.path.exists(os.path.join(inp, "u.data")):
        pytest.skip(f"{inp} is absent")
    m = movielens.prepare(inp, str(tmp_path / "out"), seq_len=10, negatives_per_positive=1, split="per_user",
                          valid_fraction=0.1, test_fraction=0.1)
    s = m.extra["stats"]
    assert (s["ratings"], s["users"], s["items"]) == (100_000, 943, 1682)
    assert (s["train_positives"], s["valid_positives"], s["test_positives"]) == (80_808, 9_596, 9_596)
    assert s["train_users"] == s["valid_users"] == s["test_users"] == s["test_users_seen_in_train"] == 943
    assert m.spec.tables() == {"user": 944, "user_profile_0": 8, "user_profile_1": 3, "user_profile_2": 22,
                               "item": 1683, "category": 20, "brand": 73}
    assert sum(m.num_rows("ctr", x) for x in ("train", "valid", "test")) == 200_000 - s["negatives_dropped"]
    assert s["negatives_dropped"] < 100
    pairs = {x: m.num_rows("pretrain/text_pairs", x) for x in ("train", "valid", "test")}
    assert pairs == {"train": s["text_pairs_train"], "valid": s["text_pairs_valid"], "test": s["text_pairs_test"]}
    assert pairs["train"] > 40_000 and pairs["valid"] > 4_000 and pairs["test"] > 4_000
    shutil.rmtree(tmp_path / "out")


def test_extra_features_genres_age_occupation(tmp_path):
    """`extra_features`: every genre as tags, the age as a standardised numeric, the occupation as a string id."""
    out = str(tmp_path / "out")
    m = movielens.prepare(str(_write_100k(tmp_path / "in")), out, **KW,
                          extra_features=["genres", "age", "occupation"])
    spec = m.spec
    assert spec["genres"].kind == "tags" and spec["genres"].shape == (2,) and spec["genres"].num_buckets == 5
    ages = np.array([17.0, 30.0, 56.0])
    assert spec["user_age"].kind == "numeric" and spec["user_age"].mean == pytest.approx(ages.mean(), abs=1e-4)
    assert spec["user_age"].std == pytest.approx(ages.std(), abs=1e-4)
    assert spec["user_occupation"].dtype == "string" and spec["user_occupation"].num_buckets == 64
    assert m.extra["vocab"]["genre"] == ["(no genres listed)", "Action", "Comedy", "Drama"]  # "unknown" is the first
    rows = _read_ctr(out, "train")
    genre = {1: [2, 0], 2: [2, 3], 3: [3, 0], 4: [4, 0], 5: [1, 0], 6: [4, 0], 7: [2, 0]}  # movie → genre ids
    assert all(rows["genres"][k].tolist() == genre[i] for k, i in enumerate(rows["item_id"].tolist()))
    user = {1: (17.0, b"student"), 2: (30.0, b"engineer"), 3: (56.0, b"writer")}
    assert all((rows["user_age"][k], rows["user_occupation"][k]) == user[u]
               for k, u in enumerate(rows["user_id"].tolist()))
    # the default layout is unchanged
    plain = movielens.prepare(str(tmp_path / "in"), str(tmp_path / "plain"), **KW)
    assert [f.name for f in plain.spec] == [f.name for f in spec][:len(plain.spec)] and "genres" not in plain.spec
    with pytest.raises(ValueError, match="extra_features must be among"):
        movielens.prepare(str(tmp_path / "in"), str(tmp_path / "bad"), **KW, extra_features=["zip"])


def test_real_ml100k_extra_features(shared_data, tmp_path):
    """The real ml-100k with --extra_features: user 1 (24, technician) and Toy Story (Animation, Children's,
    Comedy) as written in u.user / u.item."""
    inp = os.path.join(shared_data, "movielens-100k")
    if not os.path.exists(os.path.join(inp, "u.data")):
        pytest.skip(f"{inp} is absent")
    out = str(tmp_path / "out")
    m = movielens.prepare(inp, out, seq_len=5, negatives_per_positive=0, split="per_user", test_fraction=0.1,
                          extra_features=["genres", "age", "occupation"])
    assert m.spec["genres"].shape == (6,)  # the most genres of one movie
    with open(os.path.join(inp, "u.user"), encoding="latin-1") as f:
        ages = np.array([int(line.split("|")[1]) for line in f if line.strip()], np.float64)
    assert len(ages) == 943  # the standardisation is over the users' ages
    assert m.spec["user_age"].mean == pytest.approx(ages.mean(), abs=1e-5) == pytest.approx(34.052, abs=1e-3)
    assert m.spec["user_age"].std == pytest.approx(ages.std(), abs=1e-5)
    vocab = m.extra["vocab"]["genre"]
    assert len(vocab) == 19 and m.spec["genres"].num_buckets == 20
    rows = _read_ctr(out, "train")
    user1 = np.flatnonzero(rows["user_id"] == 1)
    assert len(user1) > 0 and set(rows["user_age"][user1]) == {24.0}
    assert set(rows["user_occupation"][user1]) == {b"technician"}
    toy_story = rows["genres"][np.flatnonzero(rows["item_id"] == 1)[0]]
    assert [vocab[g - 1] for g in toy_story if g] == ["Animation", "Children's", "Comedy"]
    shutil.rmtree(out)
