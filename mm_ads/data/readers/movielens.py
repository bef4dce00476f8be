"""Reader for the GroupLens MovieLens releases: the CSV layout (ml-latest-small, ml-25m, ...) and ml-100k.

The layout is detected from the files present (`ratings.csv` → CSV, `u.data` → ml-100k); the files are
parsed and checked in `movielens_files`, and everything after that (splits, impressions, item text,
pre-training pairs) is shared.

CSV layout (`INPUT` is the unzipped release directory; UTF-8, comma-separated, one header line):

```
INPUT/
  ratings.csv   userId,movieId,rating,timestamp     ints, a float (0.5..5 stars), Unix seconds
  movies.csv    movieId,title,genres                 title ends with "(YEAR)" for most movies and may hold
                                                     quoted commas; genres separated by "|", or
                                                     "(no genres listed)"
  tags.csv      userId,movieId,tag,timestamp        optional; free-text tags (quoted when needed)
```

ml-100k layout (no header lines; see the release's README for its terms of use):

```
INPUT/
  u.data        user \t item \t rating \t timestamp            ints (1..5 stars), Unix seconds
  u.item        id|title|release date|video release date|IMDb URL|19 genre flags (0/1)   latin-1
  u.genre       name|index                                    the genre of each flag column
  u.user        id|age|gender|occupation|zip                  gender M/F; zip is not used
  u.occupation  one occupation per line                       optional (default: the sorted values)
```

Output (see `mm_ads.data.dataset`):

  * `ctr/{train,valid,test}` implicit-feedback impressions with `FeatureSpec.default(S, 0, ...)`
    (`valid` only with `valid_fraction > 0`):
    - positives: every rating (or only ratings >= `min_rating`), label 1;
    - negatives: `negatives_per_positive` per positive, label 0, same user / time / history, drawn from
      the movies that already existed at that time (first rating <= the impression time) and that the user
      had not rated at or before that time, `uniform`ly or by `popularity` (number of ratings in the train
      split); a draw is a pure function of (seed, user, positive item, time, slot), so a row's negatives
      depend on nothing later than the row; after 100 rejection rounds a negative that cannot be found is
      dropped (counted as `negatives_dropped`). (Excluding movies the user rates *later* would leak: the
      model could learn that a user's future positives are never among that user's training negatives.)
    - history: the user's positives with a strictly earlier timestamp (ratings given in the same second
      have no known order and never see each other), the newest S, most recent last, left-padded with 0
      — the layout of the synthetic world; `hist_category_id` / `hist_brand_id` follow the items; a
      valid/test row's history holds the user's earlier train (and valid) positives, never later ones;
    - splits (`split`):
      `global_time` — with t_test = the positive timestamp at quantile 1 - test_fraction and t_valid the
      one at 1 - test_fraction - valid_fraction: train has time < t_valid, valid t_valid <= time < t_test,
      test time >= t_test; no test impression is earlier than a train one, but most test users never
      appear in train (MovieLens users rate in a few sessions);
      `per_user` — the common CTR protocol for MovieLens: each user's ratings in (time, movie) order, the
      last floor(n·test_fraction) go to test, the floor(n·valid_fraction) before them to valid, the rest
      to train (n = the user's ratings); every test user has train rows;
    - ids are dense: users 1..U (sorted userId), items 1..N (sorted movieId), 0 = padding;
      `category_id` = the first listed genre (1..C, sorted names; "(no genres listed)" — ml-100k's
      "unknown" genre — is a category); `brand_id` = the release year parsed from the title (ml-100k:
      else from the release date; 1..Y in year order, Y+1 = no year) — MovieLens has no brand; the year is
      the closest item attribute with many values;
    - ml-100k user profile ids: `user_profile_0` = age group (MovieLens-1M's 7 groups: <18, 18-24, 25-34,
      35-44, 45-49, 50-55, 56+), `user_profile_1` = gender (F=1, M=2), `user_profile_2` = occupation
      (u.occupation order) — the synthetic world's age / gender / third-profile layout;
    - meta `timestamp` = the rating time (a negative's is its positive's), `item_created_at` = the
      impression item's first rating time (at or before the impression, so no later information);
    - records are grouped by user in time order (each positive followed by its negatives): shuffle at
      input time;
    - `extra_features` (opt-in; the default layout is unchanged) adds features of the kinds beyond ids
      (`mm_ads.data.spec`): `genres` — every genre of the impression's movie as an int64 `tags` item feature
      `[G]` (G = the most genres of one movie; ids 1..V over the sorted genre names of the catalogue, 0 = padding,
      table `genre`, mean-pooled), `age` — the user's age in years as a `numeric` user feature `user_age`
      standardised by the mean and std of the users' ages (`Feature.with_normalization`; ml-100k),
      `occupation` — the user's occupation name as a string id `user_occupation` hashed into 64 rows
      (ml-100k; `vocab` in the manifest lists the names).
  * `item_stats` from the train impressions (count and first time per item).
  * `items.parquet`: item_id, movie_id, title, genres, year, category_id, brand_id, created_at (null if never
    rated), num_ratings (ratings in the train split), text = "<title>. Genres: a, b. Tags: x, y." with the
    item's `max_tags_per_item` most-used *train-period* tags (by distinct users, ties alphabetical); ml-100k:
    "<title (year)>. Genres: a, b." (the year appended when the title lacks it). A tag is train-period when
    it is earlier than t_valid (`global_time`) or than the tagger's first valid/test rating (`per_user`).
  * with tags.csv, `pretrain/text_pairs-{train,valid,test}`: one row per distinct (tag, movie); tags are
    lower-cased with whitespace collapsed. query = the tag; positive = the movie's text built *without*
    the query tag (so the pair cannot be solved by string matching); negative = the full text of a movie
    with the same first genre that nobody had tagged with this tag by the pair's split ("" / -1 when none
    is found); ids = dense item ids; the split of a pair is the earliest split of its tag records;
    `num_taggers` counts the taggers up to that split.
  * without tags (ml-100k), co-liked pairs in `pretrain/text_pairs-{train,valid,test}`: "what its users
    consider the same thing" read from the ratings, the analogue of the paper's <search, bought item,
    clicked-not-bought item>: for each user, the movies they liked (rating >= `pair_like_rating`) in time
    order; every two consecutive likes form a pair, query = the earlier movie's text, positive = the later
    one's (liked by the same person, close in time); hard negative = a movie of the positive's first genre
    that the user rated <= `pair_dislike_rating` (watched, considered and rejected — the clicked-not-bought
    analogue; `negative_disliked` = True), else a movie of that genre the user had not rated, else "" / -1.
    A pair belongs to its positive's split and its negative is chosen among that user's ratings in that
    split or earlier: train pairs use train ratings only. Columns add query_id, user_id, timestamp, and
    `query_item_id` (= query_id): the query is a movie of the catalogue, so SCL leaves it out of its own
    negatives and Acc@N out of its own candidates (else its identical text is found first).

Measured on ml-100k (`python -m mm_ads.data.prepare --format=movielens --input=.../movielens-100k
--split=per_user --valid_fraction=0.1 --test_fraction=0.1`, 4 negatives per positive, seed 0, ~16 s):
100,000 ratings → 80,808 / 9,596 / 9,596 train / valid / test positives (403,976 / 47,980 / 47,980
impressions; 64 negatives dropped: early ratings, when few movies existed); 943 users in every split, all
943 test users have train rows (fraction 1.0). With `--split=global_time` and the same fractions: 79,999 /
10,001 / 10,000 positives from 751 / 197 / 166 users; only 69 of the 166 test users (42%) have train rows.
Co-liked pairs (likes = 4-5 stars), per-user split: 45,326 / 4,596 / 4,511, 71% of them with a disliked
hard negative, none without a negative. `tests/data/test_prepare_movielens_100k.py::test_real_ml100k`
checks the per-user counts.

Everything is vectorised over the ratings (NumPy + pyarrow.csv); the per-record work left is the TFRecord
encoding in `DatasetWriter.write_ctr`. Deterministic for a given `seed`.
"""

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mm_ads.data.dataset import QUERY_ITEM_ID, DatasetWriter
from mm_ads.data.readers.common import CtrSplitWriter, DataFormatError, ItemCounter, fingerprint_text
from mm_ads.data.readers.movielens_files import (
    LAYOUTS,  # noqa: F401 (re-exported)
    NO_GENRES,
    TAGS,
    Source,
    dense_ids,
    detect_layout,
    int_column,
    read_input,
    read_table,
)
from mm_ads.data.spec import Feature, FeatureSpec
from mm_ads.utils.progress import Progress

FORMAT = "movielens"
SAMPLING = ("uniform", "popularity")
SPLITS = ("global_time", "per_user")
SPLIT_NAMES = ("train", "valid", "test")
EXTRA_FEATURES = ("genres", "age", "occupation")  # `prepare(extra_features=...)`
OCCUPATION_BUCKETS = 64  # rows the occupation names are hashed into (21 names in ml-100k)
_CHUNK_POSITIVES = 20_000
_REJECTION_ROUNDS = 100
# independent random streams of `_uniform`
_STREAM_NEGATIVES, _STREAM_TAG_NEGATIVES, _STREAM_PAIR_NEGATIVES, _STREAM_PAIR_UNRATED = 1, 2, 3, 4


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


# -- seeded randomness that depends only on the keys ------------------------------------------------------------
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    """SplitMix64's finaliser (uint64 arrays wrap around)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(seed, *keys):
    """Floats in [0, 1), each a pure function of (seed, its keys): a row's draws never depend on other rows."""
    arrays = [np.asarray(k).astype(np.uint64).reshape(-1) for k in keys]
    h = _mix(np.full(len(arrays[0]), seed & ((1 << 64) - 1), np.uint64))
    for a in arrays:
        h = _mix(h ^ a)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# -- splits -----------------------------------------------------------------------------------------------------
def _run_starts(new_run):
    """For a boolean 'a run starts here' vector: index of the start of each element's run."""
    starts = np.flatnonzero(new_run)
    return starts[np.cumsum(new_run) - 1]


def _quantile_time(times, fraction):
    """The timestamp at quantile 1 - fraction of `times` (sorted); max + 1 when fraction is 0."""
    if fraction <= 0:
        return int(times[-1]) + 1
    return int(times[min(int(math.floor((1.0 - fraction) * len(times))), len(times) - 1)])


def _assign_splits(user, ts, is_pos, method, valid_fraction, test_fraction):
    """Ratings sorted by (user, time, item) → split codes int8 [n] (0 train, 1 valid, 2 test) and the rule."""
    if method == "global_time":
        times = np.sort(ts[is_pos])
        t_test = _quantile_time(times, test_fraction)
        t_valid = _quantile_time(times, test_fraction + valid_fraction) if valid_fraction > 0 else t_test
        split = (ts >= t_valid).astype(np.int8) + (ts >= t_test).astype(np.int8)
        return split, {"cutoff": t_test, "valid_cutoff": t_valid,
                       "rule": "train: timestamp < valid_cutoff, valid: valid_cutoff <= timestamp < cutoff, "
                               "test: timestamp >= cutoff (cutoffs at quantiles of the positive timestamps)"}
    n = len(user)
    new_user = np.r_[True, user[1:] != user[:-1]]
    starts = np.flatnonzero(new_user)
    count = np.diff(np.r_[starts, n])[np.cumsum(new_user) - 1]
    position = np.arange(n) - _run_starts(new_user)
    n_test = np.floor(count * test_fraction + 1e-9).astype(np.int64)
    n_valid = np.floor(count * valid_fraction + 1e-9).astype(np.int64)
    split = (position >= count - n_test - n_valid).astype(np.int8) + (position >= count - n_test).astype(np.int8)
    return split, {"rule": "each user's ratings in (time, movie) order: the last floor(n*test_fraction) test, "
                           "the floor(n*valid_fraction) before them valid, the rest train"}


def _record_splits(method, split_info, user, ts, rating_user, rating_ts, rating_split, user_ids):
    """Split codes of other timed records (tags) by the same rule: by time (`global_time`) or by the record's
    user's first valid / test rating time (`per_user`; users without ratings: train)."""
    if method == "global_time":
        return (ts >= split_info["valid_cutoff"]).astype(np.int8) + (ts >= split_info["cutoff"]).astype(np.int8)
    big = np.iinfo(np.int64).max
    bounds = np.full((len(user_ids) + 1, 3), big, np.int64)
    for code in (1, 2):
        mask = rating_split >= code
        np.minimum.at(bounds[:, code], rating_user[mask], rating_ts[mask])
    pos = np.clip(np.searchsorted(user_ids, user), 0, len(user_ids) - 1)
    dense = np.where(user_ids[pos] == user, pos + 1, 0)
    return (ts >= bounds[dense, 1]).astype(np.int8) + (ts >= bounds[dense, 2]).astype(np.int8)


class _Keys:
    """Sorted distinct int64 keys with a value each (min over duplicates): `lookup(keys)` → (found, value)."""

    def __init__(self, keys, values):
        order = np.lexsort((values, keys))
        keys, values = keys[order], values[order]
        first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
        self.keys, self.values = keys[first], values[first]

    def lookup(self, keys):
        if len(self.keys) == 0:
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        pos = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        return self.keys[pos] == keys, self.values[pos]


# -- tags --------------------------------------------------------------------------------------------------------
class _Tags:
    """Distinct (tag, item) pairs: their split, taggers up to that split, first time; train-period top tags."""

    def __init__(self, path, movie_ids, split_of):
        kinds = ("int", "int", "str", "int")
        src = Source(path, TAGS[1], kinds)
        table = read_table(src, newlines_in_values=True)
        items = dense_ids(movie_ids, int_column(table, "movieId"), src, "movieId", "a movieId listed in movies.csv")
        tag = pc.utf8_lower(pc.replace_substring_regex(table.column("tag"), r"\s+", " "))
        tag = pc.utf8_trim_whitespace(tag)
        keep = pc.not_equal(tag, "").to_numpy(zero_copy_only=False)
        self.empty_tags = int((~keep).sum())
        enc = pc.dictionary_encode(tag).combine_chunks()
        self.names = enc.dictionary.to_pylist()
        t = enc.indices.to_numpy().astype(np.int64)[keep]
        u = int_column(table, "userId")[keep]
        i = items[keep]
        ts = int_column(table, "timestamp")[keep]
        s = split_of(u, ts)
        order = np.lexsort((ts, u, i, t))
        t, i, u, ts, s = t[order], i[order], u[order], ts[order], s[order]
        new_pair = np.r_[True, (t[1:] != t[:-1]) | (i[1:] != i[:-1])] if len(t) else np.zeros(0, bool)
        starts = np.flatnonzero(new_pair)
        pair_of = np.cumsum(new_pair) - 1
        self.tag = t[starts]
        self.item = i[starts]
        self.split = np.minimum.reduceat(s, starts) if len(starts) else np.zeros(0, np.int8)
        self.first_time = np.minimum.reduceat(ts, starts) if len(starts) else np.zeros(0, np.int64)
        self.taggers = self._distinct_users(pair_of, u, s <= self.split[pair_of])
        self.train_taggers = self._distinct_users(pair_of, u, s == 0)
        # alphabetical rank of each tag name, for deterministic tie-breaking and output order
        rank = np.empty(len(self.names), np.int64)
        rank[np.argsort(np.array(self.names, dtype=object), kind="stable")] = np.arange(len(self.names))
        self.rank = rank
        self.hash = np.array([fingerprint_text(n) for n in self.names], np.int64)  # stable random keys
        self.num_records = int(table.num_rows)

    def _distinct_users(self, pair_of, u, mask):
        """Distinct users among the records of each pair that pass `mask` (records sorted by pair, user)."""
        out = np.zeros(len(self.tag), np.int64)
        p, uu = pair_of[mask], u[mask]
        new = np.r_[True, (p[1:] != p[:-1]) | (uu[1:] != uu[:-1])] if len(p) else np.zeros(0, bool)
        np.add.at(out, p[new], 1)
        return out

    def top_tags(self, num_items, limit):
        """item → train-period tag ids ordered by (-taggers, name), at most `limit` each (index 0 unused)."""
        out = [[] for _ in range(num_items + 1)]
        have = np.flatnonzero(self.train_taggers > 0)
        order = have[np.lexsort((self.rank[self.tag[have]], -self.train_taggers[have], self.item[have]))]
        for item, tag in zip(self.item[order].tolist(), self.tag[order].tolist()):
            lst = out[item]
            if len(lst) < limit:
                lst.append(tag)
        return out


# -- CTR impressions ----------------------------------------------------------------------------------------------
class _NegativeSampler:
    """Draws items that existed at a time and that a user had not rated at or before that time.

    Args:
        created_at: [N + 1] first rating time per item (-1 = never rated).
        popularity: [N + 1] weights for `popularity` sampling (train-split ratings).
        rated: `_Keys` of user * (N + 1) + item → the user's first rating time of the item.
        mode: "uniform" or "popularity".
        seed: seed of `_uniform`.
    """

    def __init__(self, created_at, popularity, rated, num_items, mode, seed):
        existing = np.flatnonzero(created_at >= 0)
        order = existing[np.argsort(created_at[existing], kind="stable")]
        self.items = order
        self.created = created_at[order]
        self.cum = np.cumsum(popularity[order].astype(np.float64)) if mode == "popularity" else None
        self.rated = rated
        self.stride = num_items + 1
        self.seed = seed

    def _draw(self, times, r):
        count = np.searchsorted(self.created, times, side="right")  # >= 1: the positive's item exists
        if self.cum is None:
            j = np.minimum((r * count).astype(np.int64), count - 1)
        else:
            j = np.minimum(np.searchsorted(self.cum, r * self.cum[count - 1], side="right"), count - 1)
        return self.items[j]

    def _seen(self, users, items, times):
        found, first = self.rated.lookup(users * self.stride + items)
        return found & (first <= times)

    def sample(self, users, positives, times, slots):
        """(items [n], ok bool [n]); not ok = no unseen item found in the rejection rounds."""
        key = (users, positives, times, slots)
        items = self._draw(times, _uniform(self.seed, _STREAM_NEGATIVES, *key, np.zeros_like(users)))
        bad = np.flatnonzero(self._seen(users, items, times))
        for round_ in range(1, _REJECTION_ROUNDS + 1):
            if len(bad) == 0:
                break
            r = _uniform(self.seed, _STREAM_NEGATIVES, *(k[bad] for k in key), np.full(len(bad), round_))
            items[bad] = self._draw(times[bad], r)
            bad = bad[self._seen(users[bad], items[bad], times[bad])]
        ok = np.ones(len(items), bool)
        ok[bad] = False
        return items, ok


def _histories(rows, tie_start, user_start, values, seq_len):
    """For positives `rows`: `values` of the user's strictly earlier positives, newest S, left-padded [n, S]."""
    idx = tie_start[rows][:, None] - seq_len + np.arange(seq_len)[None, :]  # [n, S]
    valid = idx >= user_start[rows][:, None]
    return np.where(valid, values[np.where(valid, idx, 0)], 0)


def _by_category(category):
    """(items sorted by category, start offset of each category 0..C+1) for drawing same-genre items."""
    by_cat = np.argsort(category[1:], kind="stable") + 1
    return by_cat, np.searchsorted(category[by_cat], np.arange(category.max() + 2))


# -- the reader ----------------------------------------------------------------------------------------------------
def prepare(input_path, output_dir, seq_len=50, min_rating=0.0, negatives_per_positive=4,
            negative_sampling="uniform", split="global_time", valid_fraction=0.0, test_fraction=0.1,
            max_tags_per_item=10, pair_like_rating=4.0, pair_dislike_rating=2.0, max_users=0,
            rows_per_shard=200_000, extra_features=(), name=None, seed=0, overwrite=False, provenance=None):
    """Converts a MovieLens directory (CSV or ml-100k layout, detected) into the canonical dataset layout.

    Args:
        input_path: directory holding ratings.csv, movies.csv and optionally tags.csv; or ml-100k's u.* files.
        output_dir: dataset directory to create (atomically).
        seq_len: history length S.
        min_rating: ratings below this are not positives (they still count as seen: never negatives).
        negatives_per_positive: sampled negatives per positive.
        negative_sampling: "uniform" or "popularity" (proportional to the number of train-split ratings).
        split: "global_time" (time cutoffs at quantiles) or "per_user" (each user's latest ratings).
        valid_fraction: share for the valid split (0 = no valid split).
        test_fraction: share for the test split (0 = an empty test split).
        max_tags_per_item: tags in an item's text.
        pair_like_rating: co-liked pairs (no tags): ratings >= this are likes.
        pair_dislike_rating: co-liked pairs: ratings <= this make a disliked hard negative.
        max_users: keep a seeded random subset of this many users (0 = all).
        rows_per_shard: impressions per TFRecord file.
        extra_features: names among `EXTRA_FEATURES` to add (module docstring); "age" and "occupation" need
            ml-100k's u.user.
        name: dataset name (default: the input directory's name).
        seed: seed of every random choice (user subset, negatives, hard negatives).
        overwrite: replace an existing non-empty `output_dir`.
        provenance: extra provenance (e.g. the command line) merged into the manifest's.

    Returns:
        The written `Manifest`.
    """
    if negative_sampling not in SAMPLING:
        raise ValueError(f"negative_sampling must be one of {SAMPLING}, got {negative_sampling!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= valid_fraction < 1.0 and valid_fraction + test_fraction < 1.0):
        raise ValueError(f"test_fraction and valid_fraction must be in [0, 1) with a sum below 1, got "
                         f"{test_fraction} and {valid_fraction}")
    if negatives_per_positive < 0 or seq_len < 1 or max_tags_per_item < 0 or max_users < 0:
        raise ValueError(f"need negatives_per_positive >= 0, seq_len >= 1, max_tags_per_item >= 0 and "
                         f"max_users >= 0; got {negatives_per_positive}, {seq_len}, {max_tags_per_item}, "
                         f"{max_users}")
    extra_features = tuple(extra_features or ())
    unknown = [f for f in extra_features if f not in EXTRA_FEATURES]
    if unknown:
        raise ValueError(f"extra_features must be among {EXTRA_FEATURES}, got {unknown}")
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"{input_path}: not a directory (expected the unzipped MovieLens release)")
    layout = detect_layout(input_path)
    rng_users = np.random.default_rng([seed, 0])
    tags_path = os.path.join(input_path, TAGS[0])
    has_tags = layout == "csv" and os.path.exists(tags_path)

    cat, ratings_src, item, user_raw, rating, ts, profiles, files = read_input(input_path, layout)
    num_items = len(cat.movie_ids)
    category_names, category = _vocab([g[0] for g in cat.genres])
    year_names = sorted({y for y in cat.years if y is not None})
    year_index = {y: i + 1 for i, y in enumerate(year_names)}
    unknown_year = len(year_names) + 1
    brand = np.array([year_index[y] if y is not None else unknown_year for y in cat.years], np.int64)
    brand_names = [str(y) for y in year_names] + (["unknown"] if any(y is None for y in cat.years) else [])
    category = np.r_[0, category].astype(np.int64)  # index = dense item id
    brand = np.r_[0, brand].astype(np.int64)

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
    user = user.astype(np.int64).reshape(-1) + 1
    num_users = len(user_ids)
    profile = None
    if profiles is not None:  # [U + 1, 3], row = dense user id
        profile = np.r_[np.zeros((1, 3), np.int64), profiles.values[np.searchsorted(profiles.user_ids, user_ids)]]

    # every rating in (user, time, item) order with its split; positives and their history boundaries
    order = np.lexsort((item, ts, user))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    del user_raw, order
    pos_mask = rating >= min_rating
    if not pos_mask.any():
        raise DataFormatError(ratings_src.path, "all records", "rating", f"at least one rating >= {min_rating}")
    rating_split, split_info = _assign_splits(user, ts, pos_mask, split, valid_fraction, test_fraction)
    popularity = np.bincount(item[rating_split == 0], minlength=num_items + 1)  # train-split ratings
    rated = _Keys(user * (num_items + 1) + item, ts)
    pu, pi, pt, ps = user[pos_mask], item[pos_mask], ts[pos_mask], rating_split[pos_mask]
    num_pos = len(pu)
    new_user = np.r_[True, pu[1:] != pu[:-1]]
    user_start = _run_starts(new_user)
    tie_start = _run_starts(new_user | np.r_[True, pt[1:] != pt[:-1]])
    splits = [s for s in SPLIT_NAMES if s != "valid" or valid_fraction > 0]

    spec = FeatureSpec.default(seq_len, 0, num_items=num_items, num_categories=len(category_names),
                               num_brands=len(brand_names), num_users=num_users,
                               profile_buckets=() if profiles is None else tuple(map(len, profiles.names.values())))
    extra_columns, extra_vocab = {}, {}
    if extra_features:
        spec, extra_columns, extra_vocab = _extra_features(spec, extra_features, cat, profiles, user_ids, layout)
    prov = {"input": os.path.abspath(input_path), "layout": layout, "files": files + ([TAGS[0]] if has_tags else [])}
    prov.update(provenance or {})
    name = name or os.path.basename(os.path.normpath(input_path))
    stats = {"ratings": num_ratings_file, "users": num_users, "items": num_items, "positives": num_pos}
    if split == "global_time":
        stats["test_cutoff_timestamp"] = split_info["cutoff"]

    with DatasetWriter(output_dir, name=name, format=FORMAT, spec=spec, seed=seed, provenance=prov,
                       overwrite=overwrite) as w:
        sampler = _NegativeSampler(created_at, popularity, rated, num_items, negative_sampling, seed)
        progress = Progress("movielens impressions")
        counter = ItemCounter()
        dropped = 0
        k = int(negatives_per_positive)
        pos_progress = Progress("movielens positives processed", num_pos, every_s=30.0)
        split_users = {}
        for code, split_name in enumerate(SPLIT_NAMES):
            if split_name not in splits:
                continue
            writer = CtrSplitWriter(w, split_name, rows_per_shard, progress)
            in_split = np.flatnonzero(ps == code)
            split_users[split_name] = np.unique(pu[in_split])
            stats[f"{split_name}_positives"] = len(in_split)
            stats[f"{split_name}_users"] = len(split_users[split_name])
            for a in range(0, len(in_split), _CHUNK_POSITIVES):
                rows = in_split[a:a + _CHUNK_POSITIVES]
                n = len(rows)
                neg_items, ok = sampler.sample(np.repeat(pu[rows], k), np.repeat(pi[rows], k),
                                               np.repeat(pt[rows], k), np.tile(np.arange(k), n))
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
                if profile is not None:
                    for j in range(profile.shape[1]):
                        cols[f"user_profile_{j}"] = profile[pu[rows][src], j]
                for feature, (key, table) in extra_columns.items():
                    cols[feature] = table[imp_items if key == "item" else pu[rows][src]]
                writer.add(cols)
                if code == 0:
                    counter.add(imp_items, cols["timestamp"])
                pos_progress.add(n)
            stats[f"{split_name}_impressions"] = writer.close()
        pos_progress.done()
        progress.done()
        stats["negatives_dropped"] = dropped
        stats["test_users_seen_in_train"] = int(np.isin(split_users["test"], split_users["train"]).sum())
        stats["test_users_seen_in_train_fraction"] = round(
            stats["test_users_seen_in_train"] / max(len(split_users["test"]), 1), 4)
        counter.write(w)

        # item catalogue (text from train-period tags only) and pre-training pairs
        tags = None
        if has_tags:
            tags = _Tags(tags_path, cat.movie_ids, lambda u, t: _record_splits(
                split, split_info, u, t, user, ts, rating_split, user_ids))
        top = tags.top_tags(num_items, max_tags_per_item + 1) if tags is not None else None
        texts = [item_text(cat.text_titles[j], cat.genres[j],
                           [tags.names[t] for t in top[j + 1][:max_tags_per_item]] if top else [])
                 for j in range(num_items)]
        w.write_parquet("items", None, pa.table({
            "item_id": pa.array(np.arange(1, num_items + 1), pa.int64()),
            "movie_id": pa.array(cat.movie_ids, pa.int64()),
            "title": pa.array(cat.titles, pa.string()),
            "genres": pa.array(["|".join(g) for g in cat.genres], pa.string()),
            "year": pa.array(cat.years, pa.int64()),
            "category_id": pa.array(category[1:], pa.int64()),
            "brand_id": pa.array(brand[1:], pa.int64()),
            "created_at": pa.array(created_at[1:], pa.int64(), mask=created_at[1:] < 0),
            "num_ratings": pa.array(popularity[1:], pa.int64()),
            "text": pa.array(texts, pa.string()),
        }))
        if tags is not None:
            _write_tag_pairs(w, tags, top, texts, cat, category, max_tags_per_item, seed, splits, stats)
        else:
            _write_coliked_pairs(w, user, item, rating, ts, rating_split, category, texts, pair_like_rating,
                                 pair_dislike_rating, seed, splits, stats)
        w.manifest.extra.update({
            "layout": layout,
            "vocab": {"category": category_names, "brand": brand_names,
                      **(profiles.names if profiles is not None else {}), **extra_vocab},
            "history": "strictly earlier positives of the user, newest S, most recent last, left-padded with 0",
            "negatives": {"per_positive": k, "sampling": negative_sampling, "min_rating": min_rating,
                          "pool": "movies first rated at or before the impression time, not rated by the user "
                                  "at or before it"},
            "split": {"method": split, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
                      **split_info},
            "stats": stats,
        })
    return w.manifest


def _extra_features(spec, names, cat, profiles, user_ids, layout):
    """(spec with the `extra_features`, {feature: ("item" | "user", values indexed by dense id)}, vocab entries)."""
    feats, columns, vocab = list(spec), {}, {}
    if "genres" in names:
        genre_names, _ = _vocab([g for genres in cat.genres for g in genres])
        index = {g: i + 1 for i, g in enumerate(genre_names)}
        width = max(len(g) for g in cat.genres)
        table = np.zeros((len(cat.genres) + 1, width), np.int64)  # row = dense item id, 0 = padding
        for j, genres in enumerate(cat.genres):
            table[j + 1, :len(genres)] = [index[g] for g in genres]
        feats.append(Feature("genres", "item", shape=(width,), table="genre", num_buckets=len(genre_names) + 1,
                             kind="tags"))
        columns["genres"] = ("item", table)
        vocab["genre"] = genre_names
    user_side = [n for n in names if n in ("age", "occupation")]
    if user_side and (profiles is None or profiles.ages is None):
        raise ValueError(f"extra_features {user_side} need the users' profiles (ml-100k's u.user); the {layout} "
                         "layout has none")
    rows = np.searchsorted(profiles.user_ids, user_ids) if user_side else None  # dense user id - 1 → profile row
    if "age" in names:
        ages = profiles.ages[rows].astype(np.float32)
        feats.append(Feature("user_age", "user", "float32", kind="numeric").with_normalization(ages))
        columns["user_age"] = ("user", np.r_[np.float32(0.0), ages])
    if "occupation" in names:
        occupations = profiles.names["user_profile_2"]
        by_user = [""] + [occupations[v - 1] for v in profiles.values[rows, 2].tolist()]
        feats.append(Feature("user_occupation", "user", "string", table="occupation",
                             num_buckets=OCCUPATION_BUCKETS))
        columns["user_occupation"] = ("user", np.array(by_user, object))
    return FeatureSpec(feats, spec.seq_len, spec.vector_dim), columns, vocab


def _write_split_pairs(w, table, pair_split, splits, stats):
    for code, split_name in enumerate(SPLIT_NAMES):
        if split_name not in splits:
            continue
        part = table.filter(pa.array(pair_split == code))
        w.write_parquet("pretrain/text_pairs", split_name, part)
        stats[f"text_pairs_{split_name}"] = part.num_rows


def _write_tag_pairs(w, tags, top, texts, cat, category, max_tags, seed, splits, stats):
    """pretrain/text_pairs-<split>: (tag, movie text without that tag, same-genre movie not tagged with it)."""
    num_items = len(texts)
    stride = num_items + 1
    tagged = _Keys(tags.tag * stride + tags.item, tags.split.astype(np.int64))  # (tag, item) → first split
    by_cat, cat_start = _by_category(category)
    order = np.lexsort((tags.item, tags.rank[tags.tag]))
    t, i, s = tags.tag[order], tags.item[order], tags.split[order]
    c = category[i]
    size = cat_start[c + 1] - cat_start[c]
    neg = np.full(len(t), -1, np.int64)
    todo = np.flatnonzero(size > 1)
    for round_ in range(_REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        r = _uniform(seed, _STREAM_TAG_NEGATIVES, tags.hash[t[todo]], i[todo], np.full(len(todo), round_))
        cand = by_cat[cat_start[c[todo]] + (r * size[todo]).astype(np.int64)]
        found, first_split = tagged.lookup(t[todo] * stride + cand)
        good = ~(found & (first_split <= s[todo])) & (cand != i[todo])
        neg[todo[good]] = cand[good]
        todo = todo[~good]
    queries, positives, negatives = [], [], []
    for tag, item, n in zip(t.tolist(), i.tolist(), neg.tolist()):
        queries.append(tags.names[tag])
        others = [tags.names[x] for x in top[item] if x != tag][:max_tags]
        positives.append(item_text(cat.text_titles[item - 1], cat.genres[item - 1], others))
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
    _write_split_pairs(w, table, s, splits, stats)
    stats["text_pairs_without_negative"] = int((neg < 0).sum())
    stats["tag_records"] = tags.num_records
    stats["empty_tags_skipped"] = tags.empty_tags


def _write_coliked_pairs(w, user, item, rating, ts, split, category, texts, like, dislike, seed, splits, stats):
    """pretrain/text_pairs-<split> from ratings sorted by (user, time, item): consecutive likes of a user
    (query, positive), hard negative = a same-genre movie the user disliked, else one they had not rated."""
    num_items = len(texts)
    stride = num_items + 1
    liked = rating >= like
    lu, li, lt, ls = user[liked], item[liked], ts[liked], split[liked]
    same = (lu[1:] == lu[:-1]) & (li[1:] != li[:-1]) if len(lu) else np.zeros(0, bool)
    q, p, u, t, s = li[:-1][same], li[1:][same], lu[1:][same], lt[1:][same], ls[1:][same].astype(np.int64)
    c = category[p]
    num_cat = int(category.max()) + 1
    # disliked movies grouped by (user, genre, split): those of splits <= s are a prefix of the group
    d = rating <= dislike
    dkey = (user[d] * num_cat + category[item[d]]) * 3 + split[d]
    order = np.argsort(dkey, kind="stable")
    dkey, ditem = dkey[order], item[d][order]
    group = (u * num_cat + c) * 3
    start = np.searchsorted(dkey, group, side="left")
    count = np.searchsorted(dkey, group + s, side="right") - start
    r = _uniform(seed, _STREAM_PAIR_NEGATIVES, u, q, p)
    disliked = count > 0
    neg = np.full(len(p), -1, np.int64)
    neg[disliked] = ditem[start[disliked] + np.minimum((r[disliked] * count[disliked]).astype(np.int64),
                                                       count[disliked] - 1)]
    # otherwise a movie of the genre the user had not rated by the pair's split
    rated = _Keys(user * stride + item, split.astype(np.int64))
    by_cat, cat_start = _by_category(category)
    size = cat_start[c + 1] - cat_start[c]
    todo = np.flatnonzero(~disliked & (size > 0))
    for round_ in range(_REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        r = _uniform(seed, _STREAM_PAIR_UNRATED, u[todo], q[todo], p[todo], np.full(len(todo), round_))
        cand = by_cat[cat_start[c[todo]] + (r * size[todo]).astype(np.int64)]
        found, first_split = rated.lookup(u[todo] * stride + cand)
        good = ~(found & (first_split <= s[todo])) & (cand != q[todo]) & (cand != p[todo])
        neg[todo[good]] = cand[good]
        todo = todo[~good]
    table = pa.table({
        "query": pa.array([texts[x - 1] for x in q.tolist()], pa.string()),
        "positive": pa.array([texts[x - 1] for x in p.tolist()], pa.string()),
        "negative": pa.array([texts[x - 1] if x > 0 else "" for x in neg.tolist()], pa.string()),
        "query_id": pa.array(q, pa.int64()),
        QUERY_ITEM_ID: pa.array(q, pa.int64()),  # the query is a movie: not a candidate or negative for itself
        "positive_id": pa.array(p, pa.int64()),
        "negative_id": pa.array(neg, pa.int64()),
        "negative_disliked": pa.array(disliked, pa.bool_()),
        "user_id": pa.array(u, pa.int64()),
        "timestamp": pa.array(t, pa.int64()),
    })
    _write_split_pairs(w, table, s, splits, stats)
    stats["text_pairs_disliked_negative"] = int(disliked.sum())
    stats["text_pairs_without_negative"] = int((neg < 0).sum())
