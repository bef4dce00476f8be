"""Tests of the product-pairs (ER-Magellan) reader on the real benchmarks and on fixtures."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from mm_ads.data.dataset import Manifest
from mm_ads.data.readers import DataFormatError, product_pairs
from mm_ads.data.readers.common import fingerprint_bytes, fingerprint_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _offer(**attrs):
    return " ".join(f"COL {k} VAL {v}" for k, v in attrs.items()) + " "


def _line(left, right, label):
    return f"{left}\t{right}\t{label}\n"


A = _offer(name="Sony Bravia KDL-40 TV", description="sony bravia kdl-40 tv 40 inch full hd lcd", price="999.0")
A_POS = _offer(name="sony kdl40 bravia", description="", price="899")
A_NEG1 = _offer(name="sony bravia kdl-46 tv", description="46 inch", price="")
A_NEG2 = _offer(name="samsung ln40 tv", description="", price="")
B = _offer(name="canon eos 5d", description="", price="")
B_POS = _offer(name="canon 5d body", description="", price="")


def _fixture(d, lines=None, split="train"):
    d.mkdir(parents=True, exist_ok=True)
    lines = lines or [_line(A, A_NEG1, 0), _line(A, A_POS, 1), _line(B, A_NEG2, 0), _line(B, B_POS, 1),
                      _line(A, A_NEG2, 0), _line(B, B, 0)]
    with open(d / f"{split}.txt", "w", encoding="utf-8") as f:
        f.writelines(lines)
    return d


def _pairs(out, split):
    return pq.read_table(os.path.join(out, f"pretrain/text_pairs-{split}.parquet")).to_pylist()


# -- fixtures ----------------------------------------------------------------------------------------------------
def test_offer_text_composition():
    attrs = product_pairs.parse_offer(A, "f", 1, "left")
    assert attrs == [("name", "Sony Bravia KDL-40 TV"), ("description", "sony bravia kdl-40 tv 40 inch full hd lcd"),
                     ("price", "999.0")]
    # title, description without its leading copy of the title, no price
    assert product_pairs.offer_text(attrs) == "sony bravia kdl-40 tv 40 inch full hd lcd"
    assert product_pairs.offer_text(attrs, max_description_words=2, include_price=True) == \
        "sony bravia kdl-40 tv 40 inch price 999.0"
    assert product_pairs.offer_text(attrs, max_description_words=0) == "sony bravia kdl-40 tv"
    wa = product_pairs.parse_offer(_offer(title="X 1", category="tvs", brand="Acme", modelno="", price="3"), "f", 1,
                                   "right")
    assert product_pairs.offer_text(wa) == "x 1 tvs acme"


def test_fingerprints_are_stable():
    # fixed values: a change here silently breaks every stored id and queue mask
    assert fingerprint_text("Sony  Bravia KDL-40 ") == fingerprint_text("sony bravia kdl-40") == 3127751274156030310
    assert fingerprint_bytes(b"abc") == 6393727014797677913
    assert fingerprint_text("a") != fingerprint_text("b") and fingerprint_text("a") > 0


def test_pairs_and_hard_negatives(tmp_path):
    inp = _fixture(tmp_path / "Bench")
    m = product_pairs.prepare(str(inp), str(tmp_path / "out"), seed=0)
    assert m.format == "product_pairs" and m.name == "Bench" and m.extra["sources"] == ["Bench"]
    rows = _pairs(str(tmp_path / "out"), "train")
    assert [r["line"] for r in rows] == [2, 4]
    a, b = rows
    assert a["query"] == "sony bravia kdl-40 tv 40 inch full hd lcd" and a["positive"] == "sony kdl40 bravia"
    assert a["negative"] in ("sony bravia kdl-46 tv 46 inch", "samsung ln40 tv")
    assert a["positive_id"] == fingerprint_text(a["positive"]) and a["negative_id"] == fingerprint_text(a["negative"])
    assert a["query_id"] == fingerprint_text(a["query"])
    # B's only label-0 partner is B itself (same text as the query): never used as its negative
    assert b["negative"] == "samsung ln40 tv"
    assert m.extra["stats"] == {"train_pairs": 2, "train_with_hard_negative": 2}
    # the choice among several candidates follows the seed, and is reproducible
    chosen = set()
    for seed in range(1, 9):
        product_pairs.prepare(str(inp), str(tmp_path / f"s{seed}"), seed=seed)
        chosen.add(_pairs(str(tmp_path / f"s{seed}"), "train")[0]["negative"])
    assert chosen == {"sony bravia kdl-46 tv 46 inch", "samsung ln40 tv"}
    product_pairs.prepare(str(inp), str(tmp_path / "again"), seed=0)
    assert _pairs(str(tmp_path / "again"), "train") == rows


def test_no_negative_and_parent_dir_merge(tmp_path):
    _fixture(tmp_path / "root" / "One", [_line(B, B_POS, 1)], split="test")
    _fixture(tmp_path / "root" / "Two", [_line(A, A_POS, 1), _line(A, A_NEG2, 0)], split="test")
    _fixture(tmp_path / "root" / "Two", [_line(A, A_POS, 1)], split="valid")
    m = product_pairs.prepare(str(tmp_path / "root"), str(tmp_path / "out"), allow_missing_train=True)
    assert m.extra["sources"] == ["One", "Two"] and sorted(m.components["pretrain/text_pairs"]) == ["test", "valid"]
    rows = _pairs(str(tmp_path / "out"), "test")
    assert [r["source"] for r in rows] == ["One", "Two"]
    assert rows[0]["negative"] == "" and rows[0]["negative_id"] == -1
    assert rows[1]["negative"] == "samsung ln40 tv"
    # the same offer text in two files gets the same id
    assert _pairs(str(tmp_path / "out"), "valid")[0]["positive_id"] == rows[1]["positive_id"]


@pytest.mark.parametrize("bad,where,field", [
    (_line(A, A_POS, 2), "line 2", "label"),
    (f"{A}\t{A_POS}\n", "line 2", "(record)"),
    (_line("name VAL x", A_POS, 1), "line 2", "left"),
    (_line(A, _offer(description="no title"), 0), "line 2", "right"),
    (_line(A, _offer(name="", description=""), 1), "line 2", "right"),
])
def test_malformed_lines_name_file_line_field(tmp_path, bad, where, field):
    inp = _fixture(tmp_path / "in", [_line(A, A_POS, 1), bad])
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as e:
        product_pairs.prepare(str(inp), str(out))
    assert e.value.path.endswith("train.txt") and e.value.where == where and e.value.field == field
    assert f"train.txt: {where}: field {field!r}: expected" in str(e.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_missing_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.txt"):
        product_pairs.prepare(str(tmp_path / "empty"), str(tmp_path / "out"))


# large (~15 s): the reader is tested through Python above; README's static check covers the flags
@pytest.mark.large
def test_command_line_end_to_end(tmp_path):
    inp = _fixture(tmp_path / "Bench")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mm_ads.data.prepare", "--format=product_pairs", f"--input={inp}",
           f"--output_dir={out}", "--seed=5", "--max_description_words=3", "--include_price"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "format product_pairs" in res.stdout and "pretrain/text_pairs: train=2" in res.stdout
    m = Manifest.load(str(out))
    assert m.provenance["flags"]["max_description_words"] == 3 and m.provenance["flags"]["include_price"] is True
    assert m.provenance["argv"][1:] == cmd[3:] and m.seed == 5
    assert _pairs(str(out), "train")[0]["query"] == "sony bravia kdl-40 tv 40 inch full price 999.0"
    # a second run refuses to replace the dataset without --overwrite, and reports it on stderr
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode != 0 and "--overwrite" in res.stderr
    bad = _fixture(tmp_path / "Bad", [_line(A, A_POS, 7)])
    cmd_bad = cmd[:4] + [f"--input={bad}", f"--output_dir={tmp_path / 'bad_out'}"]
    res = subprocess.run(cmd_bad, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode != 0 and "train.txt: line 1: field 'label': expected 0 or 1" in res.stderr
    assert not (tmp_path / "bad_out").exists()


def test_split_files_name_the_splits_and_other_files_are_reported(tmp_path, caplog):
    inp = _fixture(tmp_path / "Bench", [_line(B, B_POS, 1)], split="test")
    (inp / "train.txt.small").write_text(_line(A, A_POS, 1) + _line(A, A_NEG1, 0), encoding="utf-8")
    _fixture(inp, [_line(A, A_POS, 1), _line(B, B_POS, 1)], split="train")  # present, but not named below
    (inp / "notes.md").write_text("about the data\n")
    with caplog.at_level("WARNING"):
        m = product_pairs.prepare(str(inp), str(tmp_path / "out"), split_files="train=train.txt.small,test=test.txt")
    assert sorted(m.components["pretrain/text_pairs"]) == ["test", "train"]
    assert [r["line"] for r in _pairs(str(tmp_path / "out"), "train")] == [1]  # the one pair of train.txt.small
    assert m.provenance["split_files"] == {"train": "train.txt.small", "test": "test.txt"}
    assert m.provenance["ignored_files"] == {"Bench": ["notes.md", "train.txt"]}
    assert "ignoring ['notes.md', 'train.txt']" in caplog.text and str(inp) in caplog.text


def test_a_dataset_without_train_is_refused_unless_asked(tmp_path):
    inp = _fixture(tmp_path / "Bench", [_line(B, B_POS, 1)], split="test")
    (inp / "train.txt.small").write_text(_line(A, A_POS, 1), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as e:
        product_pairs.prepare(str(inp), str(out))
    message = str(e.value)
    assert message.startswith(f"{inp}: no train split (no file 'train.txt'; files found: ['test.txt', "
                              "'train.txt.small'])")
    assert "--split_files=train=FILE,valid=valid.txt,test=test.txt" in message and "--allow_missing_train" in message
    assert not out.exists()
    m = product_pairs.prepare(str(inp), str(out), allow_missing_train=True)
    assert sorted(m.components["pretrain/text_pairs"]) == ["test"]


@pytest.mark.parametrize("value,message", [
    ("train", "expected split=file entries"),
    ("train=a.txt,train=b.txt", "each split and each file may appear once"),
    ("train=a.txt,test=a.txt", "each split and each file may appear once"),
    ("tr ain=a.txt", "must be letters, digits or _"),
    ("train=sub/a.txt", "must name a file of the benchmark directory"),
    (" , ", "no split=file entry"),
])
def test_bad_split_files(value, message):
    with pytest.raises(ValueError, match=message):
        product_pairs.parse_split_files(value)


def test_command_line_split_files_and_missing_train(tmp_path):
    inp = _fixture(tmp_path / "Bench", [_line(A, A_POS, 1)], split="test")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mm_ads.data.prepare", "--format=product_pairs", f"--input={inp}",
           f"--output_dir={tmp_path / 'out'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode != 0 and "no train split" in res.stderr and "--allow_missing_train" in res.stderr
    assert not (tmp_path / "out").exists()
    res = subprocess.run(cmd + ["--split_files=train=test.txt"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pretrain/text_pairs: train=1" in res.stdout
    assert Manifest.load(str(tmp_path / "out")).provenance["flags"]["split_files"] == "train=test.txt"


# -- real benchmarks -------------------------------------------------------------------------------------------
def test_real_abt_buy(shared_data, tmp_path):
    src = os.path.join(shared_data, "product_matching", "Abt-Buy")
    if not os.path.isdir(src):
        pytest.skip(f"{src} is absent")
    m = product_pairs.prepare(src, str(tmp_path / "out"))
    for split in ("train", "valid", "test"):
        path = os.path.join(src, f"{split}.txt")
        lines = open(path, encoding="utf-8").read().splitlines()
        assert m.num_rows("pretrain/text_pairs", split) == sum(line.endswith("\t1") for line in lines)
        rows = _pairs(str(tmp_path / "out"), split)
        negatives_by_query = {}
        for i, line in enumerate(lines, start=1):
            left, right, label = line.split("\t")
            if label == "0":
                q = product_pairs.offer_text(product_pairs.parse_offer(left, path, i, "left"))
                n = product_pairs.offer_text(product_pairs.parse_offer(right, path, i, "right"))
                negatives_by_query.setdefault(q, set()).add(n)
        with_neg = 0
        for r in rows:
            assert lines[r["line"] - 1].endswith("\t1")
            assert r["positive_id"] == fingerprint_text(r["positive"]) > 0
            if r["negative_id"] != -1:
                with_neg += 1
                assert r["negative"] in negatives_by_query[r["query"]]
                assert r["negative_id"] == fingerprint_text(r["negative"]) != r["positive_id"]
        assert with_neg > 0.5 * len(rows)
        ids = {}
        for r in rows:  # one text → one id
            assert ids.setdefault(r["positive"], r["positive_id"]) == r["positive_id"]
    lengths = np.array([len(r["query"].split()) for r in _pairs(str(tmp_path / "out"), "train")])
    assert lengths.max() <= 60  # title + at most 32 description words
