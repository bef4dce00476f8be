"""image_folder with a catalogue: users' photos → catalogue image of the same product (+ a sibling's as hard
negative), nested class folders, split handling, the unmatched policy, bad layouts, and SCL's Acc@N against the
whole catalogue."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm_ads.data.readers import DataFormatError, image_catalogue, image_folder
from mm_ads.data.readers.common import fingerprint_bytes
from tests.data.test_prepare_image_folder import _photo, _write_tree


def _tar(path, files, wrap=""):
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(wrap + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read(out, name):
    return pq.read_table(os.path.join(out, name)).to_pydict()


# catalogue: <department>/<product>/<file>; photos: <split>/<department>/<product>/<variant>/<file>
CATALOGUE = {"shoes/boots": 2, "shoes/sandals": 1, "hats/cap": 1, "hats/fedora": 1, "bags/tote": 1}
PHOTOS = {
    "train": {"shoes/boots/black": 3, "shoes/boots/brown": 3, "shoes/sandals/red": 2, "hats/cap/blue": 2,
              "bags/tote/plain": 2, "hats/beanie/grey": 2},  # no beanie in the catalogue
    "test": {"shoes/boots/black": 1, "hats/cap/blue": 1, "bags/tote/plain": 1},
}


def _shop(tmp_path, photo_splits=True):
    cat = {f"{p}/ref{i}.png": _photo(1000 + 10 * k + i, "PNG")
           for k, (p, n) in enumerate(CATALOGUE.items()) for i in range(n)}
    photos, seed = {}, 0
    for split, groups in PHOTOS.items():
        for path, n in groups.items():
            for i in range(n):
                seed += 1
                photos[(f"{split}/" if photo_splits else "") + f"{path}/{split}{i}.jpg"] = _photo(seed)
    return _write_tree(tmp_path / "photos", photos), _write_tree(tmp_path / "catalogue", cat), photos, cat


def _check_pairs(out, split, siblings=True):
    """Every pair: positive = a catalogue image of the photo's product; negative = another product's (a sibling's
    unless counted as a fallback). Returns (photos table, pairs, catalogue {item_id: product})."""
    items = _read(out, "items.parquet")
    product_of = dict(zip(items["item_id"], items["class_name"]))
    image_of = dict(zip(items["item_id"], items["image"]))
    photos = _read(out, f"images-{split}.parquet")
    pairs = _read(out, f"pretrain/image_pairs-{split}.parquet")
    assert pairs["query"] == photos["image"]
    fallbacks = 0
    for i, product in enumerate(photos["class_name"]):
        pid, nid = pairs["positive_id"][i], pairs["negative_id"][i]
        assert product_of[pid] == product and pairs["positive"][i] == image_of[pid]
        assert fingerprint_bytes(pairs["positive"][i]) == pid and pairs["positive"][i] != pairs["query"][i]
        assert nid != pid and product_of[nid] != product and pairs["negative"][i] == image_of[nid]
        fallbacks += product_of[nid].rpartition("/")[0] != product.rpartition("/")[0]
    assert photos["item_id"] == [fingerprint_bytes(b) for b in photos["image"]]
    return photos, pairs, product_of, fallbacks


def test_nested_photos_against_a_flat_catalogue(tmp_path, caplog):
    photos_dir, cat_dir, photos, cat = _shop(tmp_path)
    out = str(tmp_path / "out")
    m = image_folder.prepare(str(photos_dir), out, catalogue=str(cat_dir), class_depth=2, seed=3)
    assert m.extra["pairs_need_augmentation"] is False
    assert m.extra["classes"] == sorted(CATALOGUE)
    assert m.extra["candidates"] == {"component": "items", "column": "image", "group_column": "class_id",
                                     "modality": "image"}
    assert m.provenance["catalogue"] == str(cat_dir) and m.extra["unmatched"] == {"hats/beanie": 2}
    assert m.extra["layout"] == {"query": "<split>/<class path>/<file>", "catalogue": "<class path>/<file>",
                                 "query_splits": "folders"}
    stats = m.extra["stats"]
    assert stats["unmatched_skipped"] == 2 and stats["unmatched_products"] == 1
    assert stats["catalogue_images"] == 6 and stats["catalogue_products"] == 5
    assert stats["catalogue_products_without_query"] == 1  # hats/fedora: still a candidate
    assert stats["train_pairs"] == 12 and stats["test_pairs"] == 3 and stats["query_photos"] == 15
    # bags/tote has no sibling in bags/: its negatives fall back to another department
    assert stats["train_negative_fallback"] == 2 and stats["test_negative_fallback"] == 1
    assert stats["train_without_negative"] == stats["test_without_negative"] == 0
    assert any("hats/beanie" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert {c: m.num_rows(c, s) for c, s in [("items", "all"), ("images", "train"), ("pretrain/image_pairs", "test")]} \
        == {"items": 6, "images": 12, "pretrain/image_pairs": 3}

    items = _read(out, "items.parquet")
    assert sorted(items["path"]) == sorted(cat) and items["item_id"] == [fingerprint_bytes(b) for b in items["image"]]
    assert [m.extra["classes"][c] for c in items["class_id"]] == items["class_name"]
    photos_tab, pairs, product_of, fallbacks = _check_pairs(out, "train")
    assert fallbacks == 2 and all(p.startswith("train/") for p in photos_tab["path"])
    assert set(photos_tab["class_name"]) == {"shoes/boots", "shoes/sandals", "hats/cap", "bags/tote"}
    for product, neg in zip(photos_tab["class_name"], pairs["negative_id"]):
        want = {"shoes/boots": {"shoes/sandals"}, "shoes/sandals": {"shoes/boots"},
                "hats/cap": {"hats/fedora"}}.get(product)
        assert want is None or product_of[neg] in want
    assert pairs["class_id"] == photos_tab["class_id"]
    assert pairs["positive_group_id"] == [image_catalogue.product_id(c) for c in photos_tab["class_name"]]
    assert [m.extra["classes"][c] for c in pairs["negative_class_id"]] == [product_of[n] for n in pairs["negative_id"]]
    # both catalogue images of the boots serve as positives (seeded per photo)
    boots = {p for p, c in zip(pairs["positive_id"], photos_tab["class_name"]) if c == "shoes/boots"}
    assert len(boots) == 2
    _check_pairs(out, "test")

    # the same seed gives the same pairs; adding photos changes no existing pair
    _write_tree(photos_dir, {"train/shoes/boots/black/new.jpg": _photo(777)})
    image_folder.prepare(str(photos_dir), str(tmp_path / "again"), catalogue=str(cat_dir), class_depth=2, seed=3)
    again = _read(str(tmp_path / "again"), "pretrain/image_pairs-train.parquet")
    keep = [i for i, q in enumerate(again["query"]) if q != _photo(777)]
    assert [again["positive_id"][i] for i in keep] == pairs["positive_id"]
    assert [again["negative_id"][i] for i in keep] == pairs["negative_id"]


def test_photos_without_splits_and_an_archived_catalogue_with_splits(tmp_path):
    photos_dir, _, photos, cat = _shop(tmp_path, photo_splits=False)
    # the catalogue as a .tgz with a wrapping folder and split folders of its own (pooled)
    cat_split = {(f"train/{rel}" if i % 2 else f"test/{rel}"): data
                 for i, (rel, data) in enumerate(sorted(cat.items()))}
    archive = _tar(tmp_path / "catalogue.tgz", cat_split, wrap="./shop-catalogue/")
    out = str(tmp_path / "out")
    m = image_folder.prepare(str(photos_dir), out, catalogue=str(archive), class_depth=2, test_fraction=0.3, seed=1,
                             name="shop")
    assert m.name == "shop"
    assert m.extra["layout"] == {"query": "<class path>/<file>",
                                 "catalogue": "shop-catalogue/<split>/<class path>/<file>",
                                 "query_splits": "seeded hash split"}
    assert m.extra["stats"]["catalogue_images"] == 6 and m.extra["stats"]["catalogue_products"] == 5
    assert sorted(_read(out, "items.parquet")["path"]) == sorted(f"shop-catalogue/{p}" for p in cat_split)
    matched = [p for p in photos if not p.startswith("hats/beanie/")]
    test = set(_read(out, "images-test.parquet")["path"])
    assert test == {p for p in matched if image_folder.hash_split([p], 0.3, 1)[0]} and 0 < len(test) < len(matched)
    assert m.num_rows("pretrain/image_pairs", "train") + len(test) == len(matched) == 15
    _check_pairs(out, "train")
    _check_pairs(out, "test")
    assert sorted(os.listdir(tmp_path)) == ["catalogue", "catalogue.tgz", "out", "photos"]  # nothing extracted


def test_default_class_depth_is_the_whole_parent_path(tmp_path):
    cat = {"shoes/boots/black/a.png": _photo(1, "PNG"), "shoes/boots/brown/b.png": _photo(2, "PNG"),
           "shoes/clogs/c.png": _photo(3, "PNG")}
    photos = {"train/shoes/boots/black/1.jpg": _photo(4), "train/shoes/boots/brown/2.jpg": _photo(5),
              "test/shoes/boots/black/3.jpg": _photo(6), "test/shoes/clogs/4.jpg": _photo(7)}
    out = str(tmp_path / "out")
    m = image_folder.prepare(str(_write_tree(tmp_path / "p", photos)), out,
                             catalogue=str(_write_tree(tmp_path / "c", cat)))
    assert m.extra["classes"] == ["shoes/boots/black", "shoes/boots/brown", "shoes/clogs"]
    assert m.extra["stats"]["unmatched_skipped"] == 0
    photos_tab, pairs, product_of, fallbacks = _check_pairs(out, "train")
    # the two boots variants are each other's siblings (parent shoes/boots); clogs has none under shoes/
    assert [product_of[n] for n in pairs["negative_id"]] == ["shoes/boots/brown", "shoes/boots/black"]
    assert fallbacks == 0
    _, _, _, fallbacks = _check_pairs(out, "test")
    assert fallbacks == 1 and m.extra["stats"]["test_negative_fallback"] == 1


def test_single_product_catalogue_has_no_negative(tmp_path):
    out = str(tmp_path / "out")
    m = image_folder.prepare(str(_write_tree(tmp_path / "p", {"a/1.jpg": _photo(1), "a/2.jpg": _photo(2)})), out,
                             catalogue=str(_write_tree(tmp_path / "c", {"a/x.png": _photo(3, "PNG")})),
                             test_fraction=0.0)
    pairs = _read(out, "pretrain/image_pairs-train.parquet")
    assert pairs["negative_id"] == [-1, -1] and pairs["negative"] == [b"", b""]
    assert m.extra["stats"]["train_without_negative"] == 2 and m.extra["stats"]["train_negative_fallback"] == 0


def test_unmatched_error_names_the_photo_and_writes_nothing(tmp_path):
    photos_dir, cat_dir, _, _ = _shop(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        image_folder.prepare(str(photos_dir), str(out), catalogue=str(cat_dir), class_depth=2, on_unmatched="error")
    assert e.value.path == str(photos_dir) and e.value.where == "member 'train/hats/beanie/grey/train0.jpg'"
    assert e.value.got == "hats/beanie" and f"a product of the catalogue {cat_dir}" in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["catalogue", "photos"]


@pytest.mark.parametrize("case", ["empty_query", "empty_catalogue", "no_class_folder", "no_catalogue_class_folder",
                                  "too_shallow", "mixed_splits", "nothing_matches", "corrupt_catalogue"])
def test_bad_layouts_name_the_path_and_write_nothing(tmp_path, case):
    photos = {"train/shoes/boots/1.jpg": _photo(1), "test/shoes/boots/2.jpg": _photo(2)}
    cat = {"shoes/boots/a.png": _photo(3, "PNG"), "shoes/clogs/b.png": _photo(4, "PNG")}
    depth = 2
    if case == "empty_query":
        photos = {"README.md": b"no photos here"}
    elif case == "empty_catalogue":
        cat = {"shoes/notes.txt": b"x"}
    elif case == "no_class_folder":
        photos["train/3.jpg"] = _photo(5)
    elif case == "no_catalogue_class_folder":
        cat["c.png"] = _photo(6, "PNG")
    elif case == "too_shallow":
        photos["train/shoes/4.jpg"] = _photo(7)
    elif case == "mixed_splits":
        photos["shoes/boots/5.jpg"] = _photo(8)
    elif case == "nothing_matches":
        depth = 0
        photos = {"train/shoes/boots/black/1.jpg": _photo(1)}
    elif case == "corrupt_catalogue":
        cat = {"shoes/boots/a.png": b"\x89PNG broken"}
    photos_dir = _write_tree(tmp_path / "photos", photos)
    cat_dir = _write_tree(tmp_path / "catalogue", cat)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        image_folder.prepare(str(photos_dir), str(out), catalogue=str(cat_dir), class_depth=depth)
    err = e.value
    expected = {
        "empty_query": (photos_dir, "all members", "image files (.jpg"),
        "empty_catalogue": (cat_dir, "all members", "in the catalogue tree"),
        "no_class_folder": (photos_dir, "member 'train/3.jpg'", "a class folder under the split folder of the query"),
        "no_catalogue_class_folder": (cat_dir, "member 'c.png'", "a class folder under the root of the catalogue"),
        "too_shallow": (photos_dir, "member 'train/shoes/4.jpg'", "at least 2 class folder(s) under the split folder"),
        "mixed_splits": (photos_dir, "member 'shoes/boots/5.jpg'", "every image must be under one"),
        "nothing_matches": (photos_dir, "all members", "whose product (class path, class_depth=0) is in the catalogue"),
        "corrupt_catalogue": (cat_dir, "all members", "at least one decodable catalogue image"),
    }[case]
    assert err.path == str(expected[0]) and err.where == expected[1] and expected[2] in str(err), str(err)
    assert str(expected[0]) in str(err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["catalogue", "photos"]


def test_class_depth_without_catalogue_is_refused(tmp_path):
    with pytest.raises(ValueError, match="class_depth=2 needs a catalogue"):
        image_folder.prepare(str(_write_tree(tmp_path / "p", {"a/1.jpg": _photo(1)})), str(tmp_path / "out"),
                             class_depth=2)


def _run(repo_root, module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo_root)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=900)


def test_command_line(tmp_path, repo_root):
    photos_dir, cat_dir, _, _ = _shop(tmp_path)
    out = tmp_path / "out"
    proc = _run(repo_root, "mm_ads.data.prepare", "--format=image_folder", f"--input={photos_dir}",
                f"--catalogue={cat_dir}", "--class_depth=2", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout and "unmatched_skipped: 2" in proc.stdout
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["provenance"]["flags"]["catalogue"] == str(cat_dir)
    assert manifest["provenance"]["flags"]["class_depth"] == 2


def _learnable_shop(tmp_path):
    """4 departments × 3 products (catalogue: 1–2 images each, plus 4 products nobody photographed); photos are
    noisy copies of their product's colour, so a few steps of SCL can learn something."""
    rng = np.random.default_rng(0)

    def img(colour, noise, fmt):
        pixels = np.clip(np.asarray(colour)[None, None] + rng.normal(0, noise, (16, 16, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format=fmt)
        return buf.getvalue()

    cat, photos = {}, {}
    for d in range(4):
        for p in range(4):
            colour = rng.integers(0, 255, 3)
            product = f"dept{d}/product{p}"
            for i in range(1 + (p % 2)):
                cat[f"{product}/ref{i}.png"] = img(colour, 5, "PNG")
            if p == 3:
                continue  # in the catalogue only
            for split, n in (("train", 8), ("test", 2)):
                for i in range(n):
                    photos[f"{split}/{product}/v{i % 2}/{i}.jpg"] = img(colour, 25, "JPEG")
    return _write_tree(tmp_path / "photos", photos), _write_tree(tmp_path / "catalogue", cat), cat


def test_scl_ranks_test_photos_against_the_whole_catalogue(tmp_path, repo_root):
    from mm_ads.config import ExperimentConfig, config_from_flagfile
    from mm_ads.runs import run
    from mm_ads.scl.task import SCLTask

    photos_dir, cat_dir, cat = _learnable_shop(tmp_path)
    data_dir = str(tmp_path / "data")
    m = image_folder.prepare(str(photos_dir), data_dir, catalogue=str(cat_dir), class_depth=2)
    assert m.num_rows("items", "all") == len(cat) == 24 and m.num_rows("pretrain/image_pairs", "test") == 24
    test_positives = set(_read(data_dir, "pretrain/image_pairs-test.parquet")["positive_id"])
    assert len(test_positives) < len(cat)  # the old candidate set would be the test positives only

    model_dir = str(tmp_path / "model")
    # in-process, one epoch: what is checked here does not need a trained tower
    run(config_from_flagfile(os.path.join(repo_root, "configs", "scl", "smoke_catalogue.flags"), data_dir=data_dir,
                             model_dir=model_dir, epochs=1))
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert metrics["num_candidates"] == 24 and metrics["num_queries"] == 24 and metrics["candidate_set"] == "items"
    assert metrics["num_candidate_groups"] == 16
    for n in (1, 5, 10):  # any image of the right product (acc) is a weaker ask than the pair's own (item_acc)
        assert 0.0 <= metrics[f"item_acc@{n}"] <= metrics[f"acc@{n}"] <= 1.0
    assert metrics["acc@1"] <= metrics["acc@5"] <= metrics["acc@10"]

    # the same numbers by a naive loop over the whole catalogue, for an untrained encoder
    config = ExperimentConfig.from_json(json.load(open(os.path.join(model_dir, "config.json"))))
    task = SCLTask(config)
    encoder = task.build_model().encoder
    with_catalogue = task.evaluate_encoder(encoder)
    queries, _, positive_ids = task.encode_split(encoder, "eval")
    items = _read(data_dir, "items.parquet")
    vectors = task.encode_values(encoder, items["image"])
    product = dict(zip(items["item_id"], items["class_id"]))
    ranks, item_ranks = [], []
    for q, pid in zip(queries, positive_ids):
        scores = vectors @ q
        own = scores[items["item_id"].index(pid)]
        mine = np.array([product[i] == product[pid] for i in items["item_id"]])
        ranks.append(int((scores[~mine] >= scores[mine].max()).sum()))
        item_ranks.append(int((scores >= own).sum()) - 1)
    for n in (1, 5, 10):
        assert with_catalogue[f"acc@{n}"] == pytest.approx(np.mean(np.array(ranks) < n))
        assert with_catalogue[f"item_acc@{n}"] == pytest.approx(np.mean(np.array(item_ranks) < n))
    # the loss masks keys of the same product (positive_group_id) as false negatives: with one group for the
    # whole batch only the own positive is left in each row's InfoNCE, so every row's loss drops
    import tensorflow as tf

    model = task.build_model()
    features, labels = next(iter(task.build_inputs("train", 16, training=False)))
    assert len(set(features["positive_group_id"].numpy())) < 16  # products repeat within the batch
    loss_products, _ = task.per_example_loss(model, features, labels, training=False)
    by_item = {k: v for k, v in features.items() if k != "positive_group_id"}
    loss_items, _ = task.per_example_loss(model, by_item, labels, training=False)
    one_group = dict(features, positive_group_id=tf.fill([16], tf.constant(7, tf.int64)))
    loss_one, _ = task.per_example_loss(model, one_group, labels, training=False)
    assert (loss_one.numpy() < loss_products.numpy()).all() and (loss_products.numpy() <= loss_items.numpy()).all()
    # without the catalogue named as candidates, the same encoder ranks against the test positives only
    task.manifest.extra.pop("candidates")
    without = task.evaluate_encoder(encoder)
    assert with_catalogue["num_candidates"] == 24 and without["num_candidates"] == len(test_positives)
    assert "item_acc@1" not in without
    for n in (1, 5, 10):  # more candidates can only push a positive down
        assert with_catalogue[f"item_acc@{n}"] <= without[f"acc@{n}"]


def test_real_clothing_photos_as_photos_and_catalogue(shared_data, tmp_path):
    """The clothing photos split into a catalogue (the first 2 train photos of each class) and users' photos
    (a share of the rest, with the archive's own train/validation/test folders)."""
    src = os.path.join(shared_data, "images", "clothing-small-96px.tar.gz")
    if not os.path.isfile(src):
        pytest.skip(f"{src} is absent")
    files = sorted(image_folder.iter_files(src))
    cat, photos, taken = {}, {}, {}
    for rel, data in files:
        split, cls, name = rel.split("/")[-3:]
        n = taken[(split, cls)] = taken.get((split, cls), 0) + 1
        if split == "train" and n <= 2:
            cat[f"{cls}/{name}"] = data
        elif n <= 12:
            photos[f"{split}/{cls}/{name}"] = data
    out = str(tmp_path / "out")
    m = image_folder.prepare(str(_write_tree(tmp_path / "photos", photos)), out,
                             catalogue=str(_write_tree(tmp_path / "catalogue", cat)), seed=0)
    stats = m.extra["stats"]
    assert len(m.extra["classes"]) == 10 and stats["catalogue_images"] == 20 and stats["unmatched_skipped"] == 0
    assert {s: stats[f"{s}_pairs"] for s in ("train", "validation", "test")} == {
        "train": 100, "validation": 120, "test": 120}
    for split in ("train", "validation", "test"):
        _, _, _, fallbacks = _check_pairs(out, split)
        assert fallbacks == 0 and stats[f"{split}_negative_fallback"] == 0  # flat classes: all are siblings
