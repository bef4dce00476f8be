r"""Converts public data layouts into the canonical mm_ads dataset layout.

```
python -m mm_ads.data.prepare --format=taobao_mm --input=../shared/data/taobao_mm_demo \
    --output_dir=/tmp/taobao_mm --on_missing_user=null
python -m mm_ads.data.prepare --format=movielens --input=ml-25m --output_dir=/tmp/ml25m \
    --min_rating=4 --negative_sampling=popularity
python -m mm_ads.data.prepare --format=movielens --input=../shared/data/movielens-100k --output_dir=/tmp/ml100k \
    --split=per_user --valid_fraction=0.1 --test_fraction=0.1
python -m mm_ads.data.prepare --format=product_pairs --input=../shared/data/product_matching/Abt-Buy \
    --output_dir=/tmp/abt_buy
python -m mm_ads.data.prepare --format=image_folder \
    --input=../shared/data/images/clothing-small-96px.tar.gz --output_dir=/tmp/clothing
python -m mm_ads.data.prepare --format=image_folder --input=photos --catalogue=catalogue --class_depth=2 \
    --output_dir=/tmp/shop
```

The input layouts, outputs and decisions of each format are documented in its reader module,
`mm_ads/data/readers/<format>.py`. The output directory is written atomically: on any error nothing is
left behind (and an existing directory is only replaced with `--overwrite`). Prints the dataset summary.

This module is the command line only (it defines flags on import); from Python call
`mm_ads.data.readers.prepare(format, input, output_dir, options)`.
"""

import sys

from absl import app, flags

from mm_ads.data.readers import FORMATS, DataFormatError, prepare
from mm_ads.data.readers.product_pairs import DEFAULT_SPLIT_FILES

_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Input format; see mm_ads/data/readers/<format>.py.")
_INPUT = flags.DEFINE_string("input", None, "Input directory (or archive, for image_folder).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Dataset directory to create.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "Behaviour-history length S (taobao_mm, movielens).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice (negatives, splits).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing non-empty output directory.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (default: the input's base name).")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 200_000, "Impressions per TFRecord file (taobao_mm, "
                                       "movielens).", lower_bound=1)
_TEST_FRACTION = flags.DEFINE_float(
    "test_fraction", 0.1, "movielens: share of the latest positive timestamps (--split=global_time) or of each "
    "user's latest ratings (per_user) in test; image_folder without split folders: share of each class in test.",
    lower_bound=0.0, upper_bound=0.99)

# taobao_mm
_NUM_BUCKETS = flags.DEFINE_integer("num_buckets", 1 << 20, "taobao_mm: rows of every embedding table (raw "
                                    "hashed ids are bucketed by the model).", lower_bound=1)
_ON_MISSING_USER = flags.DEFINE_enum(
    "on_missing_user", "error", ("error", "skip", "null"),
    "taobao_mm: a sample whose user has no user-feature row: error, skip it, or keep it with ids 0 (null).")

# movielens
_MIN_RATING = flags.DEFINE_float("min_rating", 0.0, "movielens: ratings below this are not positives.")
_NEGATIVES = flags.DEFINE_integer("negatives_per_positive", 4, "movielens: sampled negatives per positive.",
                                  lower_bound=0)
_NEGATIVE_SAMPLING = flags.DEFINE_enum("negative_sampling", "uniform", ("uniform", "popularity"),
                                       "movielens: negative item distribution.")
_MAX_TAGS = flags.DEFINE_integer("max_tags_per_item", 10, "movielens: tags in an item's text.", lower_bound=0)
_SPLIT = flags.DEFINE_enum("split", "global_time", ("global_time", "per_user"),
                           "movielens: global_time = time cutoffs at quantiles of all positives; per_user = each "
                           "user's latest ratings are valid/test (the usual MovieLens CTR protocol).")
_VALID_FRACTION = flags.DEFINE_float("valid_fraction", 0.0, "movielens: share in the valid split, taken just before "
                                     "the test share (0 = no valid split).", lower_bound=0.0, upper_bound=0.99)
_PAIR_LIKE = flags.DEFINE_float("pair_like_rating", 4.0, "movielens without tags (ml-100k): ratings >= this are the "
                                "likes that form co-liked text pairs.")
_PAIR_DISLIKE = flags.DEFINE_float("pair_dislike_rating", 2.0, "movielens without tags: ratings <= this give a "
                                   "pair's disliked hard negative.")
_EXTRA_FEATURES = flags.DEFINE_list(
    "extra_features", [], "movielens: features beyond ids to add (default none: the standard layout): genres (every "
    "genre of the movie, a tags feature), age (the user's age, numeric, standardised; ml-100k), occupation (the "
    "user's occupation name, a hashed string id; ml-100k). See mm_ads/data/readers/movielens.py.")
_MAX_USERS = flags.DEFINE_integer("max_users", 0, "movielens: keep a seeded random subset of this many users "
                                  "(0 = all).", lower_bound=0)

# product_pairs
_MAX_DESCRIPTION_WORDS = flags.DEFINE_integer(
    "max_description_words", 32, "product_pairs: description words kept in an offer's text.", lower_bound=0)
_INCLUDE_PRICE = flags.DEFINE_boolean("include_price", False, "product_pairs: append the price to offer texts.")
_SPLIT_FILES = flags.DEFINE_string(
    "split_files", DEFAULT_SPLIT_FILES,
    "product_pairs: which file of a benchmark directory is which split, as split=file entries (the whole "
    "mapping: only these files are read; other files are named in a warning), e.g. "
    "train=train.txt.small,valid=valid.txt,test=test.txt.")
_ALLOW_MISSING_TRAIN = flags.DEFINE_boolean(
    "allow_missing_train", False, "product_pairs: write a dataset whose benchmark has no train file (by default "
    "refused, naming the files found).")

# image_folder
_ON_CORRUPT = flags.DEFINE_enum("on_corrupt", "skip", ("skip", "error"),
                                "image_folder: photos that do not decode: skip with a warning, or fail.")

_CATALOGUE = flags.DEFINE_string(
    "catalogue", None, "image_folder: the catalogue tree (directory or .tar/.tar.gz/.tgz) of reference images per "
    "product, [<split>/]<class path>/<file>; --input is then the tree of users' photos and the pairs are <photo, "
    "catalogue image of its product, catalogue image of a sibling product> (see "
    "mm_ads/data/readers/image_catalogue.py).")
_CLASS_DEPTH = flags.DEFINE_integer(
    "class_depth", 0, "image_folder with --catalogue: how many leading folders under the split (query tree) or "
    "the root (catalogue tree) name a product, e.g. 2 for <department>/<product>/<variant>/*.jpg "
    "(0 = the whole parent path).", lower_bound=0)
_ON_UNMATCHED = flags.DEFINE_enum(
    "on_unmatched", "skip", ("skip", "error"),
    "image_folder with --catalogue: photos whose product has no catalogue image: skip with a counted warning, "
    "or fail.")

_FORMAT_FLAGS = {
    "taobao_mm": (_SEQ_LEN, _NUM_BUCKETS, _ON_MISSING_USER, _ROWS_PER_SHARD),
    "movielens": (_SEQ_LEN, _MIN_RATING, _NEGATIVES, _NEGATIVE_SAMPLING, _SPLIT, _VALID_FRACTION, _TEST_FRACTION,
                  _MAX_TAGS, _PAIR_LIKE, _PAIR_DISLIKE, _MAX_USERS, _ROWS_PER_SHARD, _EXTRA_FEATURES),
    "product_pairs": (_MAX_DESCRIPTION_WORDS, _INCLUDE_PRICE, _SPLIT_FILES, _ALLOW_MISSING_TRAIN),
    "image_folder": (_TEST_FRACTION, _ON_CORRUPT, _CATALOGUE, _CLASS_DEPTH, _ON_UNMATCHED),
}

flags.mark_flags_as_required(["format", "input", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    fmt = _FORMAT.value
    options = {holder.name: holder.value for holder in _FORMAT_FLAGS[fmt]}
    provenance = {
        "argv": list(sys.argv),
        "flags": {"format": fmt, "input": _INPUT.value, "output_dir": _OUTPUT_DIR.value, "seed": _SEED.value,
                  "name": _NAME.value, "overwrite": _OVERWRITE.value, **options},
    }
    try:
        manifest = prepare(fmt, _INPUT.value, _OUTPUT_DIR.value, options, name=_NAME.value, seed=_SEED.value,
                       overwrite=_OVERWRITE.value, provenance=provenance)
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"prepare: {e}")
    print(f"wrote {_OUTPUT_DIR.value}")
    print(manifest.summary())


if __name__ == "__main__":
    app.run(main)
