"""Photo → catalogue image pre-training pairs (`image_folder` with `catalogue=`): the image-search layout.

Two trees, each a directory or a `.tar` / `.tar.gz` / `.tgz` of one:

```
QUERY/<split>/<class path>/<name>.<ext>     users' photos; split in {train, validation, val, valid, test}
QUERY/<class path>/<name>.<ext>             no split folders: a seeded hash split (as image_folder's)
CATALOGUE/[<split>/]<class path>/<name>.<ext>
                                            one or a few reference images per product; split folders, if
                                            any, are pooled: the whole catalogue is every split's candidates
```

`<class path>` is one or more folders, e.g. `<department>/<product>/<variant>`. The **product key** of a
photo is its class path relative to the split folder (or the tree's root), cut to the first `class_depth`
folders when `class_depth > 0` (default 0: the whole parent path). A query photo matches the catalogue product
with the same key (exact, case-sensitive string equality of the `/`-joined folders). A single wrapping folder
(`QUERY/photos/train/...`) is skipped when its children are split folders. Split names are reserved at the
top of a tree: a tree with split folders must have every image under one.

Pairs (one per matched query photo, in every split):
  * query = the photo's bytes; positive = one catalogue image of its product (several: chosen by a seeded
    hash of the photo's path, so adding photos changes no existing pair); `pairs_need_augmentation = False`
    (query and positive are different photos; training-time augmentation stays an SCL option);
  * negative = a catalogue image of a **sibling** product, one whose key has the same parent path (same
    department), chosen by seeded hashes; without a sibling, any other catalogue product (counted:
    `<split>_negative_fallback`); b"" / -1 when the catalogue has a single product;
  * positive_id / negative_id = `fingerprint_bytes` of the catalogue image (its item id); class_id /
    negative_class_id = the products' indices in the sorted catalogue product keys (`manifest.extra
    ["classes"]`); positive_group_id = `product_id(key)`: SCL masks another image of the same product (in the
    batch or the queue) as a false negative instead of pushing it away.

A query photo whose product has no catalogue image is skipped with a warning (`on_unmatched="skip"`, counted
in the stats with its products listed) or raises `DataFormatError` (`"error"`). Catalogue products without any
query photo are still candidates.

Output (written atomically by `DatasetWriter`):
  * `items.parquet`: the catalogue, one row per distinct image (item_id, path, class_name = product key,
    class_id, image, width, height); `manifest.extra["candidates"]` names it (grouped by class_id), and SCL's
    Acc@N then ranks each query against every catalogue image instead of the split's distinct positives:
    `acc@N` = an image of the photo's product is within the top N of the other products' images (another
    image of the same product is a hit, not a competitor), `item_acc@N` = the pair's own positive image is
    within the top N of all catalogue images; `mm_ads.encode` encodes it;
  * `images-{split}.parquet`: the matched query photos (item_id = fingerprint of the photo, path, class_name,
    class_id, image, width, height);
  * `pretrain/image_pairs-{split}.parquet`: the pairs above;
  * `manifest.extra["stats"]`: per split pairs / fallbacks / pairs without negative, unmatched photos and
    products, catalogue images / products / duplicates, products without query photos, corrupt files.

Every image is fully decoded (`on_corrupt` as in image_folder). Both trees are held in memory.
"""

import hashlib
import os

import numpy as np
import pyarrow as pa
from absl import logging
from PIL import Image

from mm_ads.data.dataset import POSITIVE_GROUP_ID, DatasetWriter
from mm_ads.data.readers.common import DataFormatError, fingerprint_bytes
from mm_ads.data.readers.image_folder import IMAGE_EXTENSIONS, SPLIT_NAMES, decode, hash_split, iter_files

UNMATCHED_POLICIES = ("skip", "error")
CANDIDATES = {"component": "items", "column": "image", "group_column": "class_id", "modality": "image"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError)


def _hash(seed, tag, rel):
    return int.from_bytes(hashlib.blake2b(f"{seed}:{tag}:{rel}".encode(), digest_size=8).digest(), "big")


def product_id(key):
    """The id of a product (its key's `fingerprint_bytes` with a prefix, never an image's id by accident)."""
    return fingerprint_bytes(f"product:{key}".encode())


def parse_tree(source, files, role, class_depth):
    """[(split or None, product key, relative path, bytes)] of a tree's images, and a layout description.

    Raises `DataFormatError` naming `source` and the member when a path fits neither layout.
    """
    if not files:
        raise DataFormatError(source, "all members", "image",
                              f"image files ({', '.join(IMAGE_EXTENSIONS)}) in the {role} tree")
    parts = [rel.split("/") for rel, _ in files]
    prefix = ""
    firsts = {p[0] for p in parts}
    if (len(firsts) == 1 and next(iter(firsts)).lower() not in SPLIT_NAMES
            and all(len(p) >= 3 and p[1].lower() in SPLIT_NAMES for p in parts)):
        prefix = next(iter(firsts)) + "/"
        parts = [p[1:] for p in parts]
    has_splits = any(p[0].lower() in SPLIT_NAMES for p in parts)
    where = "the split folder" if has_splits else "the root"
    shape = "<split>/<class path>/<file>" if has_splits else "<class path>/<file>"
    records = []
    for (rel, data), p in zip(files, parts):
        if has_splits and p[0].lower() not in SPLIT_NAMES:
            raise DataFormatError(source, f"member {rel!r}", "path",
                                  f"{prefix}<split>/<class path>/<file> with split in {'/'.join(SPLIT_NAMES)} "
                                  f"(the {role} tree has split folders, so every image must be under one)", rel)
        split, cls = (p[0], p[1:-1]) if has_splits else (None, p[:-1])
        if not cls:
            raise DataFormatError(source, f"member {rel!r}", "path",
                                  f"{prefix}{shape}: a class folder under {where} of the {role} tree", rel)
        if class_depth and len(cls) < class_depth:
            raise DataFormatError(source, f"member {rel!r}", "path",
                                  f"at least {class_depth} class folder(s) under {where} of the {role} tree "
                                  f"(class_depth={class_depth})", rel)
        key = "/".join(cls[:class_depth] if class_depth else cls)
        records.append((split, key, rel, data))
    return records, f"{prefix}{shape}"


def _decoded(source, records, on_corrupt, corrupt):
    out = []
    for rec in records:
        try:
            width, height = decode(rec[3])
        except _DECODE_ERRORS as e:
            if on_corrupt == "error":
                raise DataFormatError(source, f"member {rec[2]!r}", "image", "a decodable image", str(e)) from e
            logging.warning("image_folder: skipping %s in %s: does not decode (%s)", rec[2], source, e)
            corrupt.append(f"{source}:{rec[2]}")
            continue
        out.append(rec + (width, height))
    return out


def _split_order(name):
    return (SPLIT_NAMES.index(name.lower()) if name.lower() in SPLIT_NAMES else 99, name)


def prepare_catalogue(input_path, catalogue_path, output_dir, class_depth=0, on_unmatched="skip",
                      test_fraction=0.1, on_corrupt="skip", name=None, seed=0, overwrite=False, base_provenance=None):
    """Builds <photo, catalogue image of its product, a sibling product's catalogue image> pairs.

    Args:
        input_path: the query tree (users' photos), a directory or an archive.
        catalogue_path: the catalogue tree, a directory or an archive.
        output_dir: dataset directory to create (atomically).
        class_depth: leading class folders that name a product (0 = the whole parent path).
        on_unmatched: "skip" (warn and count) or "error" for photos whose product is not in the catalogue.
        test_fraction, on_corrupt, name, seed, overwrite: as `image_folder.prepare`.
        base_provenance: provenance merged into the manifest's.

    Returns:
        The written `Manifest`.
    """
    if on_unmatched not in UNMATCHED_POLICIES:
        raise ValueError(f"on_unmatched must be one of {UNMATCHED_POLICIES}, got {on_unmatched!r}")
    if class_depth < 0:
        raise ValueError(f"class_depth must be >= 0, got {class_depth}")
    corrupt = []
    query_records, query_layout = parse_tree(input_path, sorted(iter_files(input_path)), "query", class_depth)
    cat_records, cat_layout = parse_tree(catalogue_path, sorted(iter_files(catalogue_path)), "catalogue",
                                         class_depth)
    cat_records = _decoded(catalogue_path, cat_records, on_corrupt, corrupt)
    if not cat_records:
        raise DataFormatError(catalogue_path, "all members", "image", "at least one decodable catalogue image")
    query_records = _decoded(input_path, query_records, on_corrupt, corrupt)
    if not query_records:
        raise DataFormatError(input_path, "all members", "image", "at least one decodable query photo")

    # the catalogue: distinct images (first path wins), grouped by product
    products = sorted({r[1] for r in cat_records})
    product_index = {k: i for i, k in enumerate(products)}
    items, seen, duplicates = [], {}, 0
    for _, key, rel, data, width, height in cat_records:
        item_id = fingerprint_bytes(data)
        if item_id in seen:
            duplicates += 1
            continue
        seen[item_id] = len(items)
        items.append((item_id, rel, key, data, width, height))
    by_product = {k: [] for k in products}
    for _, key, rel, data, _, _ in cat_records:  # a duplicate image still serves each product it is filed under
        by_product[key].append((seen[fingerprint_bytes(data)], rel))
    siblings = {}
    for k in products:
        siblings.setdefault(k.rpartition("/")[0], []).append(k)

    # the query photos: match, split
    matched, unmatched = [], {}
    for rec in query_records:
        if rec[1] in product_index:
            matched.append(rec)
            continue
        if on_unmatched == "error":
            raise DataFormatError(input_path, f"member {rec[2]!r}", "class path",
                                  f"a product of the catalogue {catalogue_path} (on_unmatched='error'; "
                                  f"class_depth={class_depth})", rec[1])
        unmatched.setdefault(rec[1], []).append(rec[2])
    if unmatched:
        logging.warning("image_folder: %d photo(s) of %d product(s) have no catalogue image in %s and are skipped, "
                        "e.g. %s", sum(map(len, unmatched.values())), len(unmatched), catalogue_path,
                        ", ".join(sorted(unmatched)[:5]))
    if not matched:
        raise DataFormatError(input_path, "all members", "class path",
                              f"query photos whose product (class path, class_depth={class_depth}) is in the "
                              f"catalogue {catalogue_path}", sorted(unmatched)[:5])
    if not any(r[0] for r in matched):
        is_test = hash_split([r[2] for r in matched], test_fraction, seed)
        matched = [("test" if t else "train",) + r[1:] for r, t in zip(matched, is_test)]
    split_names = sorted({r[0] for r in matched}, key=_split_order)

    prov = {"input": os.path.abspath(input_path), "catalogue": os.path.abspath(catalogue_path)}
    prov.update(base_provenance or {})
    base = os.path.basename(os.path.normpath(input_path))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    stats = {
        "query_photos": len(matched), "unmatched_skipped": sum(map(len, unmatched.values())),
        "unmatched_products": len(unmatched), "catalogue_images": len(items),
        "catalogue_duplicate_images": duplicates, "catalogue_products": len(products),
        "catalogue_products_without_query": len(set(products) - {r[1] for r in matched}),
        "corrupt_skipped": len(corrupt),
    }
    with DatasetWriter(output_dir, name=name or base, format="image_folder", seed=seed, provenance=prov,
                       overwrite=overwrite) as w:
        w.write_parquet("items", None, pa.table({
            "item_id": pa.array([it[0] for it in items], pa.int64()),
            "path": pa.array([it[1] for it in items], pa.string()),
            "class_name": pa.array([it[2] for it in items], pa.string()),
            "class_id": pa.array([product_index[it[2]] for it in items], pa.int64()),
            "image": pa.array([it[3] for it in items], pa.binary()),
            "width": pa.array([it[4] for it in items], pa.int32()),
            "height": pa.array([it[5] for it in items], pa.int32()),
        }), row_group_size=1024)
        for split in split_names:
            rows = [r for r in matched if r[0] == split]
            pos, neg, neg_keys, fallback = [], [], [], 0
            for _, key, rel, _, _, _ in rows:
                images = by_product[key]
                pos.append(images[_hash(seed, "positive", rel) % len(images)][0])
                options = [k for k in siblings[key.rpartition("/")[0]] if k != key]
                if not options:
                    options = [k for k in products if k != key]
                    fallback += bool(options)
                j, j_key = -1, None
                start = _hash(seed, "negative", rel)
                for step in range(len(options)):  # the first drawn product whose image is not the positive's
                    other_key = options[(start + step) % len(options)]
                    other = by_product[other_key]
                    cand = other[_hash(seed, f"negative_image{step}", rel) % len(other)][0]
                    if cand != pos[-1]:
                        j, j_key = cand, other_key
                        break
                neg.append(j)
                neg_keys.append(j_key)
            w.write_parquet("images", split, pa.table({
                "item_id": pa.array([fingerprint_bytes(r[3]) for r in rows], pa.int64()),
                "path": pa.array([r[2] for r in rows], pa.string()),
                "class_name": pa.array([r[1] for r in rows], pa.string()),
                "class_id": pa.array([product_index[r[1]] for r in rows], pa.int64()),
                "image": pa.array([r[3] for r in rows], pa.binary()),
                "width": pa.array([r[4] for r in rows], pa.int32()),
                "height": pa.array([r[5] for r in rows], pa.int32()),
            }), row_group_size=1024)
            w.write_parquet("pretrain/image_pairs", split, pa.table({
                "query": pa.array([r[3] for r in rows], pa.binary()),
                "positive": pa.array([items[i][3] for i in pos], pa.binary()),
                "negative": pa.array([items[i][3] if i >= 0 else b"" for i in neg], pa.binary()),
                "positive_id": pa.array([items[i][0] for i in pos], pa.int64()),
                "negative_id": pa.array([items[i][0] if i >= 0 else -1 for i in neg], pa.int64()),
                "class_id": pa.array([product_index[r[1]] for r in rows], pa.int64()),
                POSITIVE_GROUP_ID: pa.array([product_id(r[1]) for r in rows], pa.int64()),
                "negative_class_id": pa.array([-1 if k is None else product_index[k] for k in neg_keys],
                                              pa.int64()),
            }), row_group_size=1024)
            stats[f"{split}_pairs"] = len(rows)
            stats[f"{split}_negative_fallback"] = fallback
            stats[f"{split}_without_negative"] = int(np.sum(np.array(neg) < 0))
        w.manifest.extra.update({
            "pairs_need_augmentation": False,
            "classes": products,
            "candidates": dict(CANDIDATES),
            "class_depth": int(class_depth),
            "layout": {"query": query_layout, "catalogue": cat_layout,
                       "query_splits": "folders" if any(r[0] for r in query_records) else "seeded hash split"},
            "unmatched": {k: len(v) for k, v in sorted(unmatched.items())[:100]},
            "corrupt_files": corrupt[:100],
            "stats": stats,
        })
    return w.manifest
