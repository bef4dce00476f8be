"""The paper report on datasets other than the synthetic world (README "The paper's experiments on other data").

Both datasets are written here in the real input layouts and go through `mm_ads.data.prepare`, then through
the report with `--world_dir` (MovieLens: Table 2 on the dataset's own tag → title pairs; Taobao-MM: its own
SCL vectors through `--vector_table=scl`, Table 2 and Fig 6a skipped).
"""

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_ads.data.readers import prepare as prepare_dataset
from mm_ads.reports import paper

# a cut-down smoke profile: one seed, the variants the figures need, short MAKE
_OVERRIDES = {"seeds": "0", "variants": "id,simtier,make,simtier_make", "make_epochs": "1", "fig3_epochs": "1",
              "fig6c_epochs": "0,1", "fig6a_rows": "untrained,scl"}


def _run(repo_root, out, **values):
    flags = paper.config_lib.read_flagfile(os.path.join(repo_root, "configs", "paper", "smoke.flags"))
    options = paper.PaperConfig.from_values({**flags, **_OVERRIDES, **values})
    cwd = os.getcwd()
    os.chdir(repo_root)  # profiles name flagfiles relative to the repository
    try:
        return paper.run_paper(options, out)
    finally:
        os.chdir(cwd)


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _movielens(d, num_users=150, num_movies=120, seed=0):
    """A MovieLens release with tags, big enough for every stage; tags follow the movies' genres."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    genres = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance"]
    words = {g: [f"{g.lower()} {w}" for w in ("classic", "gem", "favourite", "must see")] for g in genres}
    movie_genre = {j: genres[j % len(genres)] for j in range(num_movies)}
    _write_csv(d / "movies.csv", ["movieId", "title", "genres"],
               [(j + 1, f"{movie_genre[j]} story {j} ({1980 + j % 30})", movie_genre[j]) for j in range(num_movies)])
    ratings, tags = [], []
    for u in range(1, num_users + 1):
        taste = rng.choice(genres, size=2, replace=False)
        liked = [j for j in range(num_movies) if movie_genre[j] in taste]
        t = 1_000_000 + int(rng.integers(0, 100_000))
        for j in rng.choice(liked, size=int(rng.integers(8, 20)), replace=False):
            t += int(rng.integers(1, 500))
            ratings.append((u, int(j) + 1, float(rng.integers(6, 11)) / 2, t))
            if rng.random() < 0.5:
                tags.append((u, int(j) + 1, str(rng.choice(words[movie_genre[int(j)]])), t))
    _write_csv(d / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
    _write_csv(d / "tags.csv", ["userId", "movieId", "tag", "timestamp"], tags)
    return d


def _taobao_mm(d, num_users=120, num_items=90, num_samples=2400, seed=0):
    """Taobao-MM parquet files: clicks follow a hidden item cluster shared by the user's history and the SCL
    vectors, so the multimodal variants have something to find."""
    rng = np.random.default_rng(seed)
    d.mkdir()
    items = np.arange(1, num_items + 1, dtype=np.int64) * 7919  # sparse hashed-looking ids
    cluster = rng.integers(0, 6, size=num_items)
    centres = rng.normal(size=(6, 128))
    vecs = centres[cluster] + 0.5 * rng.normal(size=(num_items, 128))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    users = np.arange(1, num_users + 1, dtype=np.int64) * 104729
    user_cluster = rng.integers(0, 6, size=num_users)
    hists, hist_cats = [], []
    for c in user_cluster:
        own = np.flatnonzero(cluster == c)
        h = rng.choice(own, size=int(rng.integers(3, 15)))
        hists.append(items[h].tolist())
        hist_cats.append((cluster[h] + 1).tolist())
    user_table = pa.table({
        "129_1": pa.array(users), **{f"130_{i}": pa.array(rng.integers(1, 5, size=num_users)) for i in range(1, 6)},
        "150_2_180": pa.array(hists, pa.list_(pa.int64())), "151_2_180": pa.array(hist_cats, pa.list_(pa.int64())),
    })
    for split in ("train", "test"):
        pq.write_table(user_table, d / f"{split}_user_features.parquet")
    pq.write_table(pa.table({"205": items, "206": (cluster + 1).astype(np.int64),
                             "213": rng.integers(1, 9, size=num_items), "214": rng.integers(1, 9, size=num_items)}),
                   d / "item_features.parquet")
    pq.write_table(pa.table({"205": items, "205_c": pa.array(np.rint(vecs * 127).astype(np.int8).tolist(),
                                                             pa.list_(pa.int8()))}), d / "scl_embedding.parquet")
    u = rng.integers(0, num_users, size=num_samples)
    i = rng.integers(0, num_items, size=num_samples)
    p = np.where(cluster[i] == user_cluster[u], 0.35, 0.05)
    label = (rng.random(num_samples) < p).astype(np.int8)
    cut = num_samples * 4 // 5
    for split, rows in (("train", slice(0, cut)), ("test", slice(cut, None))):
        pq.write_table(pa.table({"label_0": pa.array([[int(x), 0] for x in label[rows]], pa.list_(pa.int8())),
                                 "129_1": pa.array(users[u[rows]]), "205": pa.array(items[i[rows]])}),
                       d / f"{split}_samples.parquet")
    return d


def _check_table3(results, out):
    t3 = results["table3"]
    assert set(t3["table"]) == {"id", "simtier", "make", "simtier_make"}
    for variant, row in t3["table"].items():
        assert 0.0 < row["auc"][0] < 1.0 and 0.0 < row["gauc"][0] < 1.0, (variant, row)
    assert [p["make_epochs"] for p in results["fig6c"]] == [0, 1]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["table3"]["table"]["id"]["auc"] == list(t3["table"]["id"]["auc"])


# large (~50 s): the Taobao-MM test above runs the same report code on a real-format world in the default suite
@pytest.mark.large
def test_movielens_world_dir(tmp_path, repo_root):
    data = str(tmp_path / "ml_data")
    manifest = prepare_dataset("movielens", str(_movielens(tmp_path / "ml")), data,
                                   {"seq_len": 10, "negatives_per_positive": 2}, seed=0)
    pairs = manifest.num_rows("pretrain/text_pairs", "train")
    assert pairs > 100
    out = str(tmp_path / "report")
    results = _run(repo_root, out, world_dir=data)
    assert results["data"]["data_dir"] == os.path.abspath(data)
    assert results["data"]["text_pairs_train"] == pairs
    rows = results["table2"]["synthetic_text"]["rows"]
    assert {"untrained", "scl"} <= set(rows) and all(0.0 <= rows[r]["acc@1"] <= 1.0 for r in ("untrained", "scl"))
    assert [p["row"] for p in results["fig6a"]] == ["untrained", "scl"]
    _check_table3(results, out)
    assert "Table 2" in open(os.path.join(out, "report.md")).read()


# large (~30 s): the report on a Taobao-MM world with its own vectors; the reader is tested in tests/data
@pytest.mark.large
def test_taobao_mm_world_dir_with_its_own_vectors(tmp_path, repo_root):
    data = str(tmp_path / "tb_data")
    manifest = prepare_dataset("taobao_mm", str(_taobao_mm(tmp_path / "tb")), data,
                                   {"seq_len": 10, "num_buckets": 4096}, seed=0)
    assert "scl" in manifest.extra["vector_tables"]
    out = str(tmp_path / "report")
    results = _run(repo_root, out, world_dir=data, vector_table="scl")
    assert results["table2"] == {} and results["fig6a"] == []
    assert results["data"]["vector_table"] == "scl" and results["data"]["text_pairs_train"] == 0
    assert not os.path.exists(os.path.join(out, "table2"))
    _check_table3(results, out)
    report = open(os.path.join(out, "report.md")).read()
    assert "Table 2 and Fig 6a: skipped" in report
    # every CTR run read the dataset's own table
    run_config = json.load(open(os.path.join(out, "ctr", "simtier", "seed0", "config.json")))
    assert "scl" in json.dumps(run_config)


@pytest.mark.parametrize("values, message", [({"vector_table": "nope"}, "nope")])
def test_unknown_vector_table_named(tmp_path, repo_root, values, message):
    data = str(tmp_path / "tb_data")
    prepare_dataset("taobao_mm", str(_taobao_mm(tmp_path / "tb", num_samples=300)), data,
                        {"seq_len": 10, "num_buckets": 4096}, seed=0)
    with pytest.raises(Exception, match=message):
        _run(repo_root, str(tmp_path / "report"), world_dir=data, **values)
