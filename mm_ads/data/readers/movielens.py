"""Reader for the GroupLens MovieLens CSV layout (ml-latest-small, ml-25m, ml-32m, ml-latest).

Input layout (`INPUT` is the unzipped release directory; UTF-8, comma-separated, one header line):

```
INPUT/
  ratings.csv   userId,movieId,rating,timestamp     ints, a float (0.5..5 stars), Unix seconds
  movies.csv    movieId,title,genres                 title ends with "(YEAR)" for most movies and may hold
                                                     quoted commas; genres separated by "|", or
                                                     "(no genres listed)"
  tags.csv      userId,movieId,tag,timestamp        optional; free-text tags (quoted when needed)
```

Output (see `mm_ads.data.dataset`):

  * `ctr/{train,test}` implicit-feedback impressions with `FeatureSpec.default(S, 0, ...)`:
    - positives: every rating (or only ratings >= `min_rating`), label 1;
    - negatives: `negatives_per_positive` per positive, label 0, same user / time / history, drawn from
      the movies that already existed at that time (first rating <= the impression time) and that the user
      never rated at all, `uniform`ly or by `popularity` (number of ratings in the input); after 100
      rejection rounds a negative that cannot be found is dropped (counted as `negatives_dropped`);
    - history: the user's positives with a strictly earlier timestamp (ratings given in the same second
      have no known order and never see each other), the newest S, most recent last, left-padded with 0
      — the layout of the synthetic world; `hist_category_id` / `hist_brand_id` follow the items;
    - time split: the `test_fraction` latest positive timestamps form the test split: with cutoff t* =
      the timestamp at quantile 1 - test_fraction, train has time < t* and test time >= t*, so no test
      impression is earlier than any train impression; test histories include train-period positives;
    - ids are dense: users 1..U (sorted userId), items 1..N (sorted movieId of movies.csv), 0 = padding;
      `category_id` = the first listed genre (1..C, sorted names; "(no genres listed)" is a category);
      `brand_id` = the release year parsed from the title (1..Y in year order, Y+1 = no year in the title)
      — MovieLens has no brand; the year is the closest item attribute with many values;
    - meta `timestamp` = the rating time (a negative's is its positive's), `item_created_at` = the
      impression item's first rating time in the whole ratings file;
    - records are grouped by user in time order (each positive followed by its negatives): shuffle at
      input time.
  * `item_stats` from the train impressions (count and first time per item).
  * `items.parquet`: item_id, movie_id, title, genres, year, category_id, brand_id, created_at (null if never
    rated), num_ratings, text = "<title>. Genres: a, b. Tags: x, y." with the item's `max_tags_per_item`
    most-used tags (by distinct users, ties alphabetical).
  * with tags.csv, `pretrain/text_pairs-{train,test}`: one row per distinct (tag, movie); tags are
    lower-cased with whitespace collapsed. query = the tag; positive = the movie's text built *without*
    the query tag (so the pair cannot be solved by string matching); negative = the full text of a movie
    with the same first genre that nobody tagged with this tag (a hard negative; "" / -1 when none is
    found); ids = dense item ids; split by the pair's first tagging time against the same t*.

Everything is vectorised over the ratings (NumPy + pyarrow.csv); the per-record work left is the TFRecord
encoding in `DatasetWriter.write_ctr`. Deterministic for a given `seed`.
"""

import csv
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from absl import logging

from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.readers.common import CtrSplitWriter, DataFormatError, ItemCounter
from mm_ads.data.spec import FeatureSpec
from mm_ads.utils.progress import Progress

FORMAT = "movielens"
RATINGS = ("ratings.csv", ("userId", "movieId", "rating", "timestamp"))
MOVIES = ("movies.csv", ("movieId", "title", "genres"))
TAGS = ("tags.csv", ("userId", "movieId", "tag", "timestamp"))
NO_GENRES = "(no genres listed)"
SAMPLING = ("uniform", "popularity")
_CHUNK_POSITIVES = 20_000
_REJECTION_ROUNDS = 100
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")


# -- CSV input ----------------------------------------------------------------------------------------------
def _check_header(path, columns):
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    header = [h.strip().lstrip("\ufeff") for h in (header or [])]
    if header != list(columns):
        raise DataFormatError(path, "line 1", "header", f"the header {','.join(columns)}", ",".join(header))


def _locate(path, columns, kinds, record=None):
    """Finds the first bad record with the csv module (only called once something is known to be wrong).

    Raises the precise `DataFormatError`; `record` (0-based data record) is reported when nothing else is found.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for i, row in enumerate(reader):
            where = f"line {reader.line_num}"
            if len(row) != len(columns):
                raise DataFormatError(path, where, "(record)", f"{len(columns)} fields {','.join(columns)}",
                                      ",".join(row))
            for name, kind, value in zip(columns, kinds, row):
                if kind == "int":
                    try:
                        v = int(value)
                    except ValueError:
                        raise DataFormatError(path, where, name, "an integer", value) from None
                    if v < 0:
                        raise DataFormatError(path, where, name, "a non-negative integer", value)
                elif kind == "rating":
                    try:
                        v = float(value)
                    except ValueError:
                        raise DataFormatError(path, where, name, "a number of stars in [0, 5]", value) from None
                    if not 0.0 <= v <= 5.0:
                        raise DataFormatError(path, where, name, "a number of stars in [0, 5]", value)
            if record is not None and i == record:
                return where
    return None


def _read_csv(path, columns, kinds, newlines_in_values=False):
    """Reads a MovieLens CSV with pyarrow; any malformed record is located and reported precisely."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (expected the MovieLens layout, see mm_ads/data/readers/"
                                "movielens.py; unzip the release first)")
    _check_header(path, columns)
    types = {"int": pa.int64(), "rating": pa.float64(), "str": pa.string()}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=newlines_in_values),
            convert_options=pacsv.ConvertOptions(
                column_types={c: types[k] for c, k in zip(columns, kinds)}, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        _locate(path, columns, kinds)
        raise DataFormatError(path, "somewhere", "(file)", "well-formed CSV", str(e)) from e
    for name, kind in zip(columns, kinds):
        col = table.column(name)
        if kind == "str":
            continue
        bad = pc.is_null(col)
        if kind == "int":
            bad = pc.or_(bad, pc.less(col, 0))
        else:
            bad = pc.or_(bad, pc.invert(pc.and_(pc.greater_equal(col, 0.0), pc.less_equal(col, 5.0))))
        bad = pc.fill_null(bad, True)
        if pc.any(bad).as_py():
            record = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            _locate(path, columns, kinds)
            raise DataFormatError(path, f"record {record + 1}", name, "a valid value")
    return table


def _ints(table, name):
    return table.column(name).to_numpy().astype(np.int64)


def read_movies(path):
    """movies.csv → (movie ids int64 [N] sorted, titles, genre lists, years (None if absent))."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (expected the MovieLens layout, see mm_ads/data/readers/"
                                "movielens.py)")
    _check_header(path, MOVIES[1])
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            where = f"line {reader.line_num}"
            if len(row) != 3:
                raise DataFormatError(path, where, "(record)", "3 fields movieId,title,genres (quote titles "
                                      "that contain commas)", ",".join(row))
            try:
                movie = int(row[0])
            except ValueError:
                raise DataFormatError(path, where, "movieId", "an integer", row[0]) from None
            title = row[1].strip()
            if not title:
                raise DataFormatError(path, where, "title", "a non-empty title", row[1])
            genres = [g.strip() for g in row[2].split("|") if g.strip()]
            if not genres:
                raise DataFormatError(path, where, "genres", f"genres separated by '|' or {NO_GENRES!r}", row[2])
            if movie in rows:
                raise DataFormatError(path, where, "movieId", "each movieId once", movie)
            m = _YEAR.search(title)
            rows[movie] = (title, genres, int(m.group(1)) if m else None)
    ids = np.array(sorted(rows), np.int64)
    titles = [rows[i][0] for i in ids.tolist()]
    genres = [rows[i][1] for i in ids.tolist()]
    years = [rows[i][2] for i in ids.tolist()]
    return ids, titles, genres, years


def _dense_items(movie_ids, raw, path, columns, kinds):
    """Raw movieIds → dense item ids 1..N; an unknown movieId is an error naming its line."""
    pos = np.clip(np.searchsorted(movie_ids, raw), 0, len(movie_ids) - 1)
    ok = movie_ids[pos] == raw
    if not ok.all():
        record = int(np.flatnonzero(~ok)[0])
        where = _locate(path, columns, kinds, record=record) or f"record {record + 1}"
        raise DataFormatError(path, where, "movieId", "a movieId listed in movies.csv", int(raw[record]))
    return pos.astype(np.int64) + 1


# -- attributes and text -----------------------------------------------------------------------------------------
def _vocab(values):
    """Sorted distinct values → (list, dense ids 1..V per input)."""
    names = sorted(set(values))
    index = {v: i + 1 for i, v in enumerate(names)}
    return names, np.array([index[v] for v in values], np.int64)


def item_text(title, genres, tags):
    """`"<title>. Genres: a, b. Tags: x, y."` (parts without content are left out)."""
    parts = [title.rstrip(".") + "."]
    shown = [g for g in genres if g != NO_GENRES]
    if shown:
        parts.append("Genres: " + ", ".join(shown) + ".")
    if tags:
        parts.append("Tags: " + ", ".join(tags) + ".")
    return " ".join(parts)


class _Tags:
    """Distinct (tag, item) pairs with their number of taggers and first tagging time."""

    def __init__(self, path, movie_ids):
        kinds = ("int", "int", "str", "int")
        table = _read_csv(path, TAGS[1], kinds, newlines_in_values=True)
        items = _dense_items(movie_ids, _ints(table, "movieId"), path, TAGS[1], kinds)
        tag = pc.utf8_lower(pc.replace_substring_regex(table.column("tag"), r"\s+", " "))
        tag = pc.utf8_trim_whitespace(tag)
        keep = pc.not_equal(tag, "").to_numpy(zero_copy_only=False)
        self.empty_tags = int((~keep).sum())
        enc = pc.dictionary_encode(tag).combine_chunks()
        self.names = enc.dictionary.to_pylist()
        t = enc.indices.to_numpy().astype(np.int64)[keep]
        u = _ints(table, "userId")[keep]
        i = items[keep]
        ts = _ints(table, "timestamp")[keep]
        order = np.lexsort((ts, u, i, t))
        t, i, u, ts = t[order], i[order], u[order], ts[order]
        # distinct (tag, item, user) → taggers per (tag, item); first time per (tag, item)
        new_pair = np.r_[True, (t[1:] != t[:-1]) | (i[1:] != i[:-1])] if len(t) else np.zeros(0, bool)
        new_triple = new_pair | np.r_[True, u[1:] != u[:-1]] if len(t) else np.zeros(0, bool)
        starts = np.flatnonzero(new_pair)
        self.tag = t[starts]
        self.item = i[starts]
        self.first_time = np.minimum.reduceat(ts, starts) if len(starts) else np.zeros(0, np.int64)
        self.taggers = np.add.reduceat(new_triple.astype(np.int64), starts) if len(starts) else starts
        # alphabetical rank of each tag name, for deterministic tie-breaking and output order
        rank = np.empty(len(self.names), np.int64)
        rank[np.argsort(np.array(self.names, dtype=object), kind="stable")] = np.arange(len(self.names))
        self.rank = rank
        self.num_records = int(table.num_rows)

    def top_tags(self, num_items, limit):
        """item → tag ids ordered by (-taggers, name), at most `limit` each (list of lists, index 0 unused)."""
        out = [[] for _ in range(num_items + 1)]
        order = np.lexsort((self.rank[self.tag], -self.taggers, self.item))
        for item, tag in zip(self.item[order].tolist(), self.tag[order].tolist()):
            lst = out[item]
            if len(lst) < limit:
                lst.append(tag)
        return out


# -- CTR impressions ----------------------------------------------------------------------------------------------
class _NegativeSampler:
    """Draws items that existed at a time and that a user never rated."""

    def __init__(self, created_at, popularity, interacted_keys, num_items, mode, rng):
        rated = np.flatnonzero(created_at >= 0)
        order = rated[np.argsort(created_at[rated], kind="stable")]
        self.items = order
        self.created = created_at[order]
        self.cum = np.cumsum(popularity[order].astype(np.float64)) if mode == "popularity" else None
        self.keys = interacted_keys
        self.stride = num_items + 1
        self.rng = rng

    def _draw(self, times):
        count = np.searchsorted(self.created, times, side="right")  # >= 1: the positive's item exists
        r = self.rng.random(len(times))
        if self.cum is None:
            j = np.minimum((r * count).astype(np.int64), count - 1)
        else:
            j = np.minimum(np.searchsorted(self.cum, r * self.cum[count - 1], side="right"), count - 1)
        return self.items[j]

    def _seen(self, users, items):
        keys = users * self.stride + items
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        return self.keys[pos] == keys

    def sample(self, users, times):
        """(items [n], ok bool [n]); not ok = no unseen item found in the rejection rounds."""
        items = self._draw(times)
        bad = np.flatnonzero(self._seen(users, items))
        for _ in range(_REJECTION_ROUNDS):
            if len(bad) == 0:
                break
            items[bad] = self._draw(times[bad])
            bad = bad[self._seen(users[bad], items[bad])]
        ok = np.ones(len(items), bool)
        ok[bad] = False
        return items, ok


def _histories(rows, tie_start, user_start, values, seq_len):
    """For positives `rows`: `values` of the user's strictly earlier positives, newest S, left-padded [n, S]."""
    idx = tie_start[rows][:, None] - seq_len + np.arange(seq_len)[None, :]  # [n, S]
    valid = idx >= user_start[rows][:, None]
    return np.where(valid, values[np.where(valid, idx, 0)], 0)


def _run_starts(new_run):
    """For a boolean 'a run starts here' vector: index of the start of each element's run."""
    starts = np.flatnonzero(new_run)
    return starts[np.cumsum(new_run) - 1]


# -- the reader ----------------------------------------------------------------------------------------------------
def prepare(input_path, output_dir, seq_len=50, min_rating=0.0, negatives_per_positive=4,
            negative_sampling="uniform", test_fraction=0.1, max_tags_per_item=10, max_users=0,
            rows_per_shard=200_000, name=None, seed=0, overwrite=False, provenance=None):
    """Converts a MovieLens directory into the canonical dataset layout.

    Args:
        input_path: directory holding ratings.csv, movies.csv and optionally tags.csv.
        output_dir: dataset directory to create (atomically).
        seq_len: history length S.
        min_rating: ratings below this are not positives (they still count as seen: never negatives).
        negatives_per_positive: sampled negatives per positive.
        negative_sampling: "uniform" or "popularity" (proportional to the number of ratings).
        test_fraction: fraction of the latest positive timestamps that form the test split (0 = no test).
        max_tags_per_item: tags in an item's text.
        max_users: keep a seeded random subset of this many users (0 = all).
        rows_per_shard: impressions per TFRecord file.
        name: dataset name (default: the input directory's name).
        seed: seed of every random choice (user subset, negatives, hard negatives).
        overwrite: replace an existing non-empty `output_dir`.
        provenance: extra provenance (e.g. the command line) merged into the manifest's.

    Returns:
        The written `Manifest`.
    """
    if negative_sampling not in SAMPLING:
        raise ValueError(f"negative_sampling must be one of {SAMPLING}, got {negative_sampling!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if negatives_per_positive < 0 or seq_len < 1 or max_tags_per_item < 0 or max_users < 0:
        raise ValueError(f"need negatives_per_positive >= 0, seq_len >= 1, max_tags_per_item >= 0 and "
                         f"max_users >= 0; got {negatives_per_positive}, {seq_len}, {max_tags_per_item}, "
                         f"{max_users}")
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"{input_path}: not a directory (expected the unzipped MovieLens release)")
    rng_users, rng_neg, rng_pairs = (np.random.default_rng([seed, k]) for k in range(3))
    ratings_path = os.path.join(input_path, RATINGS[0])
    movies_path = os.path.join(input_path, MOVIES[0])
    tags_path = os.path.join(input_path, TAGS[0])
    has_tags = os.path.exists(tags_path)

    # movies and their attributes
    movie_ids, titles, genres, years = read_movies(movies_path)
    num_items = len(movie_ids)
    category_names, category = _vocab([g[0] for g in genres])
    year_names = sorted({y for y in years if y is not None})
    year_index = {y: i + 1 for i, y in enumerate(year_names)}
    unknown_year = len(year_names) + 1
    brand = np.array([year_index[y] if y is not None else unknown_year for y in years], np.int64)
    brand_names = [str(y) for y in year_names] + (["unknown"] if any(y is None for y in years) else [])
    category = np.r_[0, category]  # index = dense item id
    brand = np.r_[0, brand]

    # ratings
    logging.info("movielens: reading %s", ratings_path)
    kinds = ("int", "int", "rating", "int")
    table = _read_csv(ratings_path, RATINGS[1], kinds)
    item = _dense_items(movie_ids, _ints(table, "movieId"), ratings_path, RATINGS[1], kinds)
    user_raw = _ints(table, "userId")
    rating = table.column("rating").to_numpy()
    ts = _ints(table, "timestamp")
    del table
    num_ratings_file = len(item)
    created_at = np.full(num_items + 1, -1, np.int64)
    if len(item):
        first = np.full(num_items + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, item, ts)
        created_at = np.where(first == np.iinfo(np.int64).max, -1, first)
    created_at[0] = -1

    users_all = np.unique(user_raw)
    if max_users and max_users < len(users_all):
        chosen = np.sort(rng_users.choice(users_all, size=max_users, replace=False))
        keep = np.isin(user_raw, chosen)
        user_raw, item, rating, ts = user_raw[keep], item[keep], rating[keep], ts[keep]
    user_ids, user = np.unique(user_raw, return_inverse=True)
    user = user.astype(np.int64) + 1
    num_users = len(user_ids)
    popularity = np.bincount(item, minlength=num_items + 1)
    interacted = np.unique(user * (num_items + 1) + item)

    # positives in (user, time, item) order; history boundaries
    pos_mask = rating >= min_rating
    order = np.lexsort((item[pos_mask], ts[pos_mask], user[pos_mask]))
    pu, pi, pt = user[pos_mask][order], item[pos_mask][order], ts[pos_mask][order]
    del user_raw, rating, order
    num_pos = len(pu)
    if num_pos == 0:
        raise DataFormatError(ratings_path, "all records", "rating", f"at least one rating >= {min_rating}")
    new_user = np.r_[True, pu[1:] != pu[:-1]]
    user_start = _run_starts(new_user)
    tie_start = _run_starts(new_user | np.r_[True, pt[1:] != pt[:-1]])
    if test_fraction > 0:
        cutoff = int(np.sort(pt)[min(int(math.floor((1.0 - test_fraction) * num_pos)), num_pos - 1)])
    else:
        cutoff = int(pt.max()) + 1
    is_test = pt >= cutoff

    spec = FeatureSpec.default(seq_len, 0, num_items=num_items, num_categories=len(category_names),
                               num_brands=len(brand_names), num_users=num_users)
    prov = {"input": os.path.abspath(input_path),
            "files": [RATINGS[0], MOVIES[0]] + ([TAGS[0]] if has_tags else [])}
    prov.update(provenance or {})
    name = name or os.path.basename(os.path.normpath(input_path))
    stats = {"ratings": num_ratings_file, "users": num_users, "items": num_items, "positives": num_pos,
             "test_cutoff_timestamp": cutoff}

    with DatasetWriter(output_dir, name=name, format=FORMAT, spec=spec, seed=seed, provenance=prov,
                       overwrite=overwrite) as w:
        sampler = _NegativeSampler(created_at, popularity, interacted, num_items, negative_sampling, rng_neg)
        progress = Progress("movielens impressions")
        writers = {"train": CtrSplitWriter(w, "train", rows_per_shard, progress),
                   "test": CtrSplitWriter(w, "test", rows_per_shard, progress)}
        counter = ItemCounter()
        dropped = 0
        k = int(negatives_per_positive)
        pos_progress = Progress("movielens positives processed", num_pos, every_seconds=30.0)
        for a in range(0, num_pos, _CHUNK_POSITIVES):
            rows = np.arange(a, min(a + _CHUNK_POSITIVES, num_pos))
            n = len(rows)
            neg_items, ok = sampler.sample(np.repeat(pu[rows], k), np.repeat(pt[rows], k))
            dropped += int((~ok).sum())
            items = np.concatenate([pi[rows][:, None], neg_items.reshape(n, k)], axis=1)  # [n, 1+K]
            keep = np.concatenate([np.ones((n, 1), bool), ok.reshape(n, k)], axis=1)
            labels = np.zeros((n, 1 + k), np.float32)
            labels[:, 0] = 1.0
            src = np.repeat(np.arange(n), keep.sum(axis=1))  # impression → row in the chunk
            imp_items = items[keep]
            hist = _histories(rows, tie_start, user_start, pi, seq_len)  # [n, S]
            cols = {
                "user_id": pu[rows][src],
                "item_id": imp_items,
                "category_id": category[imp_items],
                "brand_id": brand[imp_items],
                "hist_item_id": hist[src],
                "hist_category_id": category[hist][src],
                "hist_brand_id": brand[hist][src],
                "timestamp": pt[rows][src],
                "item_created_at": created_at[imp_items],
                "label": labels[keep],
            }
            test = is_test[rows][src]
            for split, mask in (("train", ~test), ("test", test)):
                if mask.any():
                    writers[split].add({c: v[mask] for c, v in cols.items()})
            counter.add(imp_items[~test], cols["timestamp"][~test])
            pos_progress.add(n)
        pos_progress.done()
        for split, sw in writers.items():
            stats[f"{split}_impressions"] = sw.close()
        progress.done()
        stats["negatives_dropped"] = dropped
        counter.write(w)

        # item catalogue and tag pairs
        tags = _Tags(tags_path, movie_ids) if has_tags else None
        top = tags.top_tags(num_items, max_tags_per_item + 1) if tags is not None else None
        texts = [item_text(titles[j], genres[j], [tags.names[t] for t in top[j + 1][:max_tags_per_item]]
                           if top else []) for j in range(num_items)]
        w.write_parquet("items", None, pa.table({
            "item_id": pa.array(np.arange(1, num_items + 1), pa.int64()),
            "movie_id": pa.array(movie_ids, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "genres": pa.array(["|".join(g) for g in genres], pa.string()),
            "year": pa.array(years, pa.int64()),
            "category_id": pa.array(category[1:], pa.int64()),
            "brand_id": pa.array(brand[1:], pa.int64()),
            "created_at": pa.array(created_at[1:], pa.int64(), mask=created_at[1:] < 0),
            "num_ratings": pa.array(popularity[1:], pa.int64()),
            "text": pa.array(texts, pa.string()),
        }))
        if tags is not None:
            _write_tag_pairs(w, tags, top, texts, titles, genres, category, cutoff, max_tags_per_item, rng_pairs,
                             stats)
        w.manifest.extra.update({
            "vocab": {"category": category_names, "brand": brand_names},
            "history": "strictly earlier positives of the user, newest S, most recent last, left-padded with 0",
            "negatives": {"per_positive": k, "sampling": negative_sampling, "min_rating": min_rating,
                          "pool": "movies first rated at or before the impression time, never rated by the user"},
            "split": {"test_fraction": test_fraction, "rule": "train: timestamp < cutoff, test: >= cutoff",
                      "cutoff": cutoff},
            "stats": stats,
        })
    return w.manifest


def _write_tag_pairs(w, tags, top, texts, titles, genres, category, cutoff, max_tags, rng, stats):
    """pretrain/text_pairs-{train,test}: (tag, movie text without that tag, same-genre untagged movie)."""
    num_items = len(texts)
    stride = num_items + 1
    tagged = np.unique(tags.tag * stride + tags.item)
    # candidate negatives grouped by first genre
    by_cat = np.argsort(category[1:], kind="stable") + 1
    cat_sorted = category[by_cat]
    cat_start = np.searchsorted(cat_sorted, np.arange(category.max() + 2))
    order = np.lexsort((tags.item, tags.rank[tags.tag]))
    t, i = tags.tag[order], tags.item[order]
    c = category[i]
    size = cat_start[c + 1] - cat_start[c]
    neg = np.full(len(t), -1, np.int64)
    todo = np.flatnonzero(size > 1)
    for _ in range(_REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        cand = by_cat[cat_start[c[todo]] + (rng.random(len(todo)) * size[todo]).astype(np.int64)]
        keys = t[todo] * stride + cand
        pos = np.clip(np.searchsorted(tagged, keys), 0, len(tagged) - 1)
        good = (tagged[pos] != keys) & (cand != i[todo])
        neg[todo[good]] = cand[good]
        todo = todo[~good]
    queries, positives, negatives = [], [], []
    for tag, item, n in zip(t.tolist(), i.tolist(), neg.tolist()):
        queries.append(tags.names[tag])
        others = [tags.names[x] for x in top[item] if x != tag][:max_tags]
        positives.append(item_text(titles[item - 1], genres[item - 1], others))
        negatives.append(texts[n - 1] if n > 0 else "")
    table = pa.table({
        "query": pa.array(queries, pa.string()),
        "positive": pa.array(positives, pa.string()),
        "negative": pa.array(negatives, pa.string()),
        "positive_id": pa.array(i, pa.int64()),
        "negative_id": pa.array(neg, pa.int64()),
        "num_taggers": pa.array(tags.taggers[order], pa.int64()),
        "first_tagged_at": pa.array(tags.first_time[order], pa.int64()),
    })
    test = tags.first_time[order] >= cutoff
    for split, mask in (("train", ~test), ("test", test)):
        part = table.filter(pa.array(mask))
        w.write_parquet("pretrain/text_pairs", split, part)
        stats[f"text_pairs_{split}"] = part.num_rows
    stats["text_pairs_without_negative"] = int((neg < 0).sum())
    stats["tag_records"] = tags.num_records
    stats["empty_tags_skipped"] = tags.empty_tags
