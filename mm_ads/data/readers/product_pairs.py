"""Reader for the ER-Magellan / DeepMatcher product-matching layout (as stored in megagonlabs/ditto).

Input layout: `INPUT` is one benchmark directory, or a parent directory whose sub-directories are
benchmarks (then all are merged into one dataset, each row tagged with its benchmark in `source`):

```
BENCHMARK/                      e.g. Abt-Buy, Amazon-Google, Walmart-Amazon
  train.txt  valid.txt  test.txt       one dataset split per file; train.txt is required (see below)
```

Which file is which split: `split_files` (flag `--split_files`), comma-separated `split=file` entries, default
`train=train.txt,valid=valid.txt,test=test.txt`. It is the whole mapping: only the files it names are read
(e.g. `--split_files=train=train.txt.small,valid=valid.txt,test=test.txt` trains on a subsample), a split whose
file a benchmark lacks is left out, and every other file of a benchmark directory is reported in a warning
(and in the manifest's provenance, `ignored_files`), never read silently. A benchmark without its train file
is refused, naming the directory, the files found and the flags, unless `allow_missing_train`
(`--allow_missing_train`) asks for a dataset without a train split (e.g. an evaluation-only set).

Each line is `LEFT \\t RIGHT \\t LABEL` (UTF-8): LABEL is 1 when both offers are the same product, else 0,
and each offer is serialised as `COL <attr> VAL <value> COL <attr> VAL <value> ...` with the benchmark's
attributes (Abt-Buy: name, description, price; Amazon-Google: title, manufacturer, price; Walmart-Amazon:
title, category, brand, modelno, price). Values may be empty; every offer needs a `name` or `title`.

Output: `pretrain/text_pairs-{train,valid,test}.parquet`, one row per label-1 line:
  * query = the left offer's text, positive = the right offer's text;
  * negative = the right offer of a label-0 line with the same left offer in the same file (the benchmark's
    label-0 pairs are blocked candidates, i.e. offers with a similar title: hard negatives); when several
    exist one is drawn with the seed; candidates whose text equals the query's or one of that left
    offer's positives are never used; "" and negative_id = -1 when there is none;
  * positive_id / negative_id = `fingerprint_text` of the offer text (a stable non-negative int64 of the
    normalised text; identical offers share an id, so a contrastive queue can mask false negatives);
  * also `query_id`, `source` (benchmark name) and `line` (1-based line number in the input file).

Text of an offer (normalised: NFKC, lower case, single spaces): the title (`name`/`title`), then the
values of the other short attributes in file order (manufacturer, brand, modelno, category), then the
description cut to `max_description_words` words (with a leading copy of the title removed — Abt-Buy
descriptions usually start with the name). Prices are left out by default (`include_price=True` appends
"price <value>"): the same product is listed at different prices by the two shops, and a text encoder
should not learn to match or separate offers by price.
"""

import os
import re

import numpy as np
import pyarrow as pa
from absl import logging

from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.readers.common import DataFormatError, fingerprint_text, normalize_text

FORMAT = "product_pairs"
SPLIT_FILES = (("train", "train.txt"), ("valid", "valid.txt"), ("test", "test.txt"))
DEFAULT_SPLIT_FILES = ",".join(f"{split}={name}" for split, name in SPLIT_FILES)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
TITLE_ATTRS = ("name", "title")
_ATTR = re.compile(r"COL (\S+) VAL(?: |$)")


def parse_offer(text, path, line, side):
    """`COL a VAL x COL b VAL y` → [(a, x), (b, y)] (values stripped, possibly empty)."""
    s = text.strip()
    matches = list(_ATTR.finditer(s))
    if not s.startswith("COL ") or not matches or matches[0].start() != 0:
        raise DataFormatError(path, f"line {line}", side, "an offer serialised as 'COL <attr> VAL <value> ...'", text)
    out = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(s)
        out.append((m.group(1), s[m.end():end].strip()))
    return out


def offer_text(attrs, max_description_words=32, include_price=False, path="", line=0, side="left"):
    """The normalised text of a parsed offer (see the module docstring)."""
    values = dict(attrs)
    title_key = next((k for k in TITLE_ATTRS if k in values), None)
    if title_key is None:
        raise DataFormatError(path, f"line {line}", side, f"an offer with a {' or '.join(TITLE_ATTRS)} attribute",
                              [k for k, _ in attrs])
    title = normalize_text(values[title_key])
    parts = [title]
    for key, value in attrs:
        if key in TITLE_ATTRS or key in ("description", "price"):
            continue
        value = normalize_text(value)
        if value:
            parts.append(value)
    desc = normalize_text(values.get("description", ""))
    if title and desc.startswith(title):
        desc = desc[len(title):].strip()
    if desc and max_description_words > 0:
        parts.append(" ".join(desc.split()[:max_description_words]))
    price = normalize_text(values.get("price", ""))
    if include_price and price:
        parts.append(f"price {price}")
    text = " ".join(p for p in parts if p)
    if not text:
        raise DataFormatError(path, f"line {line}", side, "an offer with some text (all attributes are empty)",
                              attrs)
    return text


def read_split(path, max_description_words=32, include_price=False):
    """One split file → list of (line, left text, right text, label)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataFormatError(path, f"line {line_no}", "(record)",
                                      "3 tab-separated fields: left offer, right offer, label",
                                      f"{len(fields)} fields")
            label = fields[2].strip()
            if label not in ("0", "1"):
                raise DataFormatError(path, f"line {line_no}", "label", "0 or 1", fields[2])
            left = offer_text(parse_offer(fields[0], path, line_no, "left"), max_description_words, include_price,
                              path, line_no, "left")
            right = offer_text(parse_offer(fields[1], path, line_no, "right"), max_description_words, include_price,
                               path, line_no, "right")
            rows.append((line_no, left, right, int(label)))
    return rows


def build_pairs(rows, rng):
    """Label-1 rows → pair columns, each with a hard negative from the same left offer's label-0 rows."""
    fp = {}

    def fid(text):
        if text not in fp:
            fp[text] = fingerprint_text(text)
        return fp[text]

    positives_of, negatives_of = {}, {}
    for _, left, right, label in rows:
        (positives_of if label else negatives_of).setdefault(fid(left), []).append(right)
    out = {"query": [], "positive": [], "negative": [], "query_id": [], "positive_id": [], "negative_id": [],
           "line": []}
    for line, left, right, label in rows:
        if not label:
            continue
        qid = fid(left)
        blocked = {qid} | {fid(p) for p in positives_of[qid]}
        seen, candidates = set(), []
        for n in negatives_of.get(qid, []):  # distinct candidates, in file order
            if fid(n) not in blocked and n not in seen:
                seen.add(n)
                candidates.append(n)
        neg = candidates[int(rng.integers(len(candidates)))] if candidates else ""
        out["query"].append(left)
        out["positive"].append(right)
        out["negative"].append(neg)
        out["query_id"].append(qid)
        out["positive_id"].append(fid(right))
        out["negative_id"].append(fid(neg) if neg else -1)
        out["line"].append(line)
    return out


def parse_split_files(split_files):
    """`"train=a.txt,valid=b.txt"` (or a `{split: file}` mapping, or None for the default) → ((split, file), ...)."""
    if split_files is None:
        return SPLIT_FILES
    if isinstance(split_files, str):
        entries = [e.strip() for e in split_files.split(",") if e.strip()]
        pairs = []
        for entry in entries:
            split, sep, name = (p.strip() for p in entry.partition("="))
            if not sep:
                raise ValueError(f"--split_files: expected split=file entries, got {entry!r} in {split_files!r}")
            pairs.append((split, name))
    else:
        pairs = list(dict(split_files).items())
    splits = [s for s, _ in pairs]
    names = [n for _, n in pairs]
    if not pairs:
        raise ValueError(f"--split_files: no split=file entry in {split_files!r}")
    for split, name in pairs:
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"--split_files: split name {split!r} must be letters, digits or _")
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"--split_files: {split}={name!r} must name a file of the benchmark directory")
    if len(set(splits)) != len(splits) or len(set(names)) != len(names):
        raise ValueError(f"--split_files: each split and each file may appear once, got {split_files!r}")
    return tuple(pairs)


def _benchmarks(input_path, split_files):
    """[(name, dir)] — the directory itself if it holds split files, else its sub-directories that do."""
    def has_splits(d):
        return any(os.path.isfile(os.path.join(d, f)) for _, f in split_files)

    if has_splits(input_path):
        return [(os.path.basename(os.path.normpath(input_path)), input_path)]
    subs = sorted(d for d in os.listdir(input_path) if has_splits(os.path.join(input_path, d)))
    if not subs:
        raise FileNotFoundError(
            f"{input_path}: no {'/'.join(f for _, f in split_files)} here or in any sub-directory "
            f"(it has {sorted(os.listdir(input_path))}; expected the ER-Magellan layout, see "
            "mm_ads/data/readers/product_pairs.py, or name the files with --split_files=train=FILE,test=FILE)")
    others = sorted(set(os.listdir(input_path)) - set(subs))
    if others:
        logging.warning("product_pairs: %s: ignoring %s (not benchmark directories with %s)", input_path, others,
                        "/".join(f for _, f in split_files))
    return [(d, os.path.join(input_path, d)) for d in subs]


def _check_files(bench_dir, split_files, allow_missing_train):
    """The files of `bench_dir` that no split names (warned about); refuses a benchmark without its train file."""
    found = sorted(f for f in os.listdir(bench_dir) if os.path.isfile(os.path.join(bench_dir, f)))
    known = {name for _, name in split_files}
    ignored = [f for f in found if f not in known]
    if ignored:
        logging.warning("product_pairs: %s: ignoring %s (no split names them; see --split_files)", bench_dir,
                        ignored)
    train = dict(split_files).get("train")
    if not allow_missing_train and (train is None or train not in found):
        raise FileNotFoundError(
            f"{bench_dir}: no train split (" + (f"no file {train!r}" if train else "--split_files names none") +
            f"; files found: {found}): name the training file with --split_files=train=FILE,"
            f"{','.join(f'{s}={n}' for s, n in split_files if s != 'train')}, or pass --allow_missing_train to "
            "write a dataset without a train split")
    return ignored


def prepare(input_path, output_dir, max_description_words=32, include_price=False, name=None, seed=0,
            overwrite=False, provenance=None, split_files=DEFAULT_SPLIT_FILES, allow_missing_train=False):
    """Converts one ER-Magellan benchmark (or a directory of them, merged) into text pre-training pairs.

    Args:
        input_path: a benchmark directory, or a directory of benchmark directories.
        output_dir: dataset directory to create (atomically).
        max_description_words: words of the description kept in an offer's text (0 = none).
        include_price: append "price <value>" to offer texts.
        name: dataset name (default: the input directory's name).
        seed: seed of the hard-negative choice.
        overwrite: replace an existing non-empty `output_dir`.
        provenance: extra provenance (e.g. the command line) merged into the manifest's.
        split_files: which file is which split: `"split=file,..."` or a `{split: file}` mapping (see the
            module docstring); only these files are read.
        allow_missing_train: write the dataset even when a benchmark has no train file (else refused).

    Returns:
        The written `Manifest`.
    """
    if max_description_words < 0:
        raise ValueError(f"max_description_words must be >= 0, got {max_description_words}")
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"{input_path}: not a directory (expected the ER-Magellan layout)")
    split_files = parse_split_files(split_files)
    benchmarks = _benchmarks(input_path, split_files)
    ignored = {}
    for bench, bench_dir in benchmarks:  # every benchmark is checked before any is read
        for f in _check_files(bench_dir, split_files, allow_missing_train):
            ignored.setdefault(bench, []).append(f)
    rng = np.random.default_rng(seed)
    tables, files = {}, []
    for bench, bench_dir in benchmarks:
        for split, fname in split_files:
            path = os.path.join(bench_dir, fname)
            if not os.path.isfile(path):
                continue
            files.append(os.path.relpath(path, input_path))
            rows = read_split(path, max_description_words, include_price)
            cols = build_pairs(rows, rng)
            cols["source"] = [bench] * len(cols["query"])
            tables.setdefault(split, []).append(cols)
            logging.info("product_pairs: %s: %d lines → %d pairs", path, len(rows), len(cols["query"]))
    prov = {"input": os.path.abspath(input_path), "files": files, "split_files": dict(split_files),
            "ignored_files": ignored}
    prov.update(provenance or {})
    name = name or os.path.basename(os.path.normpath(input_path))
    stats = {}
    with DatasetWriter(output_dir, name=name, format=FORMAT, seed=seed, provenance=prov, overwrite=overwrite) as w:
        for split, parts in tables.items():
            merged = {k: sum((p[k] for p in parts), []) for k in parts[0]}
            table = pa.table({
                "query": pa.array(merged["query"], pa.string()),
                "positive": pa.array(merged["positive"], pa.string()),
                "negative": pa.array(merged["negative"], pa.string()),
                "positive_id": pa.array(merged["positive_id"], pa.int64()),
                "negative_id": pa.array(merged["negative_id"], pa.int64()),
                "query_id": pa.array(merged["query_id"], pa.int64()),
                "source": pa.array(merged["source"], pa.string()),
                "line": pa.array(merged["line"], pa.int64()),
            })
            w.write_parquet("pretrain/text_pairs", split, table)
            stats[f"{split}_pairs"] = table.num_rows
            stats[f"{split}_with_hard_negative"] = int(sum(1 for n in merged["negative_id"] if n != -1))
        w.manifest.extra.update({
            "sources": [b for b, _ in benchmarks],
            "text": {"max_description_words": max_description_words, "include_price": include_price},
            "ids": "fingerprint_text: BLAKE2b-64 of the normalised offer text, masked non-negative",
            "stats": stats,
        })
    return w.manifest
