"""Tests of the image-folder reader on the real clothing archive and on fixtures."""

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm_ads.data.readers import DataFormatError, image_folder
from mm_ads.data.readers.common import fingerprint_bytes


def _photo(seed, fmt="JPEG", size=(12, 10)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tree(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _table(out, kind, split):
    return pq.read_table(os.path.join(out, f"{kind}-{split}.parquet")).to_pydict()


def _check_pairs(out, split):
    images = _table(out, "images", split)
    pairs = _table(out, "pretrain/image_pairs", split)
    class_of = dict(zip(images["item_id"], images["class_id"]))
    assert pairs["query"] == pairs["positive"] == images["image"]
    for i, (pid, nid, neg) in enumerate(zip(pairs["positive_id"], pairs["negative_id"], pairs["negative"])):
        assert pid == images["item_id"][i] == fingerprint_bytes(images["image"][i])
        if nid == -1:
            assert neg == b""
        else:
            assert nid != pid and class_of[nid] == class_of[pid] and fingerprint_bytes(neg) == nid
    return images, pairs


def test_real_clothing_archive(shared_data, tmp_path):
    src = os.path.join(shared_data, "images", "clothing-small-96px.tar.gz")
    if not os.path.isfile(src):
        pytest.skip(f"{src} is absent")
    out = str(tmp_path / "out")
    m = image_folder.prepare(src, out, seed=0)
    assert m.format == "image_folder" and m.name == "clothing-small-96px" and m.provenance["input"] == src
    assert m.extra["pairs_need_augmentation"] is True and len(m.extra["classes"]) == 10
    counts = {s: m.num_rows("images", s) for s in ("train", "validation", "test")}
    assert counts == {"train": 3068, "validation": 341, "test": 372} and sum(counts.values()) == 3781
    assert m.extra["stats"]["corrupt_skipped"] == 0
    # nothing extracted: only the dataset's own files are in the output
    found = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert found == sorted(["manifest.json"] + [f"images-{s}.parquet" for s in counts]
                           + [f"pretrain/image_pairs-{s}.parquet" for s in counts])
    images, pairs = _check_pairs(out, "validation")
    assert set(images["width"]) == set(images["height"]) == {96}  # the archive holds 96x96 JPEGs
    assert all(p.startswith("validation/") for p in images["path"])
    with Image.open(io.BytesIO(images["image"][0])) as im:
        assert im.size == (images["width"][0], images["height"][0]) and im.format == "JPEG"
    assert [m.extra["classes"][c] for c in images["class_id"]] == images["class_name"]
    assert (np.array(pairs["negative_id"]) != -1).all()


def test_class_folders_with_corrupt_file_and_deterministic_split(tmp_path, caplog):
    files = {f"{c}/{i:02d}.{'png' if i % 2 else 'jpg'}": _photo(40 * k + i, "PNG" if i % 2 else "JPEG")
             for k, c in enumerate(["boots", "hat"]) for i in range(40)}
    files["hat/broken.jpg"] = _photo(999)[:60]  # truncated JPEG
    files["README.md"] = b"not a photo"
    files["hat/.hidden.jpg"] = b"ignored"
    root = _write_tree(tmp_path / "photos", files)
    m = image_folder.prepare(str(root), str(tmp_path / "a"), test_fraction=0.25, seed=4)
    assert m.extra["stats"]["corrupt_skipped"] == 1 and m.extra["corrupt_files"] == ["hat/broken.jpg"]
    assert any("hat/broken.jpg" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert m.extra["classes"] == ["boots", "hat"]
    test = _table(str(tmp_path / "a"), "images", "test")
    assert m.num_rows("images", "train") + len(test["path"]) == 80
    for c in ("boots", "hat"):
        assert 3 <= test["class_name"].count(c) <= 17  # about a quarter of each class's 40
    assert set(test["path"]) == {p for p in files if p.endswith(("jpg", "png")) and not p.startswith("hat/.")
                                 and p != "hat/broken.jpg" and image_folder.hash_split([p], 0.25, 4)[0]}
    _check_pairs(str(tmp_path / "a"), "train")
    # same seed → same split, and adding photos moves none of the existing ones across splits
    for i in range(5):
        (root / "hat" / f"new{i}.jpg").write_bytes(_photo(500 + i))
    image_folder.prepare(str(root), str(tmp_path / "b"), test_fraction=0.25, seed=4)
    test_b = set(_table(str(tmp_path / "b"), "images", "test")["path"])
    assert {p for p in test_b if "/new" not in p} == set(test["path"])
    image_folder.prepare(str(root), str(tmp_path / "c"), test_fraction=0.25, seed=5)
    assert set(_table(str(tmp_path / "c"), "images", "test")["path"]) != test_b


def test_corrupt_error_names_the_file(tmp_path):
    root = _write_tree(tmp_path / "photos", {"a/1.jpg": _photo(1), "a/2.jpg": b"\xff\xd8garbage", "b/3.jpg": _photo(3)})
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        image_folder.prepare(str(root), str(out), on_corrupt="error")
    assert e.value.where == "member 'a/2.jpg'" and e.value.field == "image" and "a decodable image" in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_tar_with_wrapping_dir_and_splits(tmp_path):
    names = [f"shop/{s}/{c}/{i}.jpg" for s in ("train", "test") for c in ("x", "y") for i in range(3)]
    files = {name: _photo(k) for k, name in enumerate(names)}
    files["shop/train/x/dup.jpg"] = files["shop/train/x/0.jpg"]  # byte-identical photo
    files["shop/test/z/only.jpg"] = _photo(5000)  # a class with one photo: no negative
    archive = tmp_path / "shop.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo("./" + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m = image_folder.prepare(str(archive), str(tmp_path / "out"), seed=1)
    assert m.name == "shop" and m.extra["classes"] == ["x", "y", "z"]
    assert {s: m.num_rows("images", s) for s in ("train", "test")} == {"train": 7, "test": 7}
    assert m.extra["stats"]["train_duplicate_images"] == 1
    images, pairs = _check_pairs(str(tmp_path / "out"), "train")
    assert images["path"][0].startswith("shop/train/")
    _, pairs = _check_pairs(str(tmp_path / "out"), "test")
    z = _table(str(tmp_path / "out"), "images", "test")["class_name"].index("z")
    assert pairs["negative_id"][z] == -1 and m.extra["stats"]["test_without_negative"] == 1
    assert sorted(os.listdir(tmp_path)) == ["out", "shop.tgz"]  # nothing extracted


def test_bad_layout(tmp_path):
    root = _write_tree(tmp_path / "p", {"train/x/1.jpg": _photo(1), "train/2.jpg": _photo(2)})
    with pytest.raises(DataFormatError) as e:
        image_folder.prepare(str(root), str(tmp_path / "out"))
    assert e.value.where == "member 'train/2.jpg'" and "<split>/<class>/<file>" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no image files"):
        image_folder.prepare(str(_write_tree(tmp_path / "q", {"a/readme.txt": b"x"})), str(tmp_path / "out"))
