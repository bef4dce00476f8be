"""Reader for class-per-subfolder photo collections (a directory, or a `.tar` / `.tar.gz` / `.tgz` of one).

Input layout — either with splits or without:

```
ROOT/<split>/<class>/<name>.<ext>     split in {train, validation, val, valid, test}; split names are kept
ROOT/<class>/<name>.<ext>             no splits: a deterministic train/test split is made (see below)
```

`<ext>` is one of jpg, jpeg, png, webp, bmp, gif (any case). Files elsewhere (e.g. ROOT/README.md,
ROOT/LICENSE) and hidden files (`.name`, macOS `._name`) are ignored. If everything sits under one
wrapping directory that is not a split name (`ROOT/clothing/train/...`), that directory is skipped.
Archives are read member by member with `tarfile`; nothing is extracted to disk.

Output:
  * `images-{split}.parquet`: item_id (`fingerprint_bytes` of the file's bytes: stable, non-negative int64,
    equal for byte-identical photos), path (relative to ROOT), class_name, class_id (0..C-1 over the sorted
    class names of all splits), image (the original encoded bytes), width, height;
  * `pretrain/image_pairs-{split}.parquet`: query = positive = the photo's bytes (the two views are
    augmented at training time: `manifest.extra["pairs_need_augmentation"] = True`), negative = another photo
    of the same class in the same split (a hard negative, drawn with the seed; never byte-identical to the
    query; b"" and -1 when the class has no other photo), positive_id / negative_id = their item ids, plus
    class_id.

Every image is fully decoded with Pillow; a file that does not decode is skipped with a warning naming it
(`on_corrupt="skip"`, counted in `manifest.extra["stats"]["corrupt_skipped"]`) or raises a `DataFormatError`
(`on_corrupt="error"`). Without split folders, a photo goes to test when a seeded hash of its relative path,
read as a number in [0, 1), is below `test_fraction`: each class gets about that share, and a photo's split
never depends on the other files (adding photos later moves none of the existing ones across splits).
All photos are held in memory while writing.

With a catalogue (`prepare(..., catalogue=PATH)`, `--catalogue`), the input is instead a tree of users' photos
in possibly nested class folders, matched to a second tree of reference images per product: pairs are <photo,
catalogue image of its product, catalogue image of a sibling product>, and Acc@N ranks against the whole
catalogue. See `mm_ads.data.readers.image_catalogue`.
"""

import hashlib
import io
import os
import tarfile
import warnings

import numpy as np
import pyarrow as pa
from absl import logging
from PIL import Image

from mm_ads.data.dataset import DatasetWriter
from mm_ads.data.readers.common import DataFormatError, fingerprint_bytes

FORMAT = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SPLIT_NAMES = ("train", "validation", "val", "valid", "test")
CORRUPT_POLICIES = ("skip", "error")


def is_archive(path):
    return os.path.isfile(path) and path.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _is_image(rel):
    base = rel.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def iter_files(path):
    """Yields (relative path with '/', bytes) of the image files under a directory or inside an archive."""
    if is_archive(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    rel = member.name
                    while rel.startswith("./"):
                        rel = rel[2:]
                    rel = rel.lstrip("/")
                    if member.isfile() and _is_image(rel):
                        yield rel, tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise DataFormatError(path, "archive", "(archive)", "a readable tar / tar.gz archive", str(e)) from e
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither a directory nor a .tar/.tar.gz/.tgz archive")
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if _is_image(rel):
                with open(full, "rb") as f:
                    yield rel, f.read()


def split_shop(images_path, output_dir, per_class):
    """Splits a class-per-folder photo collection (a directory or archive with split folders `train/`, ...) into a
    shop for `prepare(..., catalogue=output_dir/catalogue)`: the first `per_class` train photos of each class (by
    path) become `catalogue/<class>/`, every other photo `photos/<split>/<class>/`. Written once, atomically (a
    finished `output_dir` is reused); returns it. Used to cut a photo → catalogue benchmark from photos that have
    no catalogue of their own (README, Table 2's `catalogue` benchmark)."""
    import shutil

    if os.path.exists(os.path.join(output_dir, "photos")):
        return output_dir
    files = sorted(iter_files(images_path))
    keyed = []
    for rel, data in files:
        parts = rel.split("/")
        if len(parts) < 3:
            raise ValueError(f"{images_path}: {rel} is not <split>/<class>/<file> (a catalogue is cut from the "
                             "train split's class folders)")
        keyed.append((parts[-3], parts[-2], parts[-1], data))
    if not any(split == "train" for split, *_ in keyed):
        raise ValueError(f"{images_path}: no train/<class>/ photos to cut a catalogue from")
    tmp = f"{output_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    taken = {}
    for split, cls, name, data in keyed:
        n = taken[split, cls] = taken.get((split, cls), 0) + 1
        path = (os.path.join(tmp, "catalogue", cls, name) if split == "train" and n <= per_class
                else os.path.join(tmp, "photos", split, cls, name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.replace(tmp, output_dir)
    return output_dir


def layout(rel_paths, source):
    """(prefix to strip, has_splits) from the image paths; raises on paths that fit neither layout."""
    parts = [p.split("/") for p in rel_paths]
    prefix = ""
    firsts = {p[0] for p in parts}
    if len(firsts) == 1 and all(len(p) >= 3 for p in parts) and next(iter(firsts)).lower() not in SPLIT_NAMES:
        prefix = next(iter(firsts)) + "/"
        parts = [p[1:] for p in parts]
    has_splits = all(p[0].lower() in SPLIT_NAMES for p in parts if len(p) == 3)
    has_splits = has_splits and any(len(p) == 3 for p in parts)
    want = 3 if has_splits else 2
    for rel, p in zip(rel_paths, parts):
        if len(p) != want or (has_splits and p[0].lower() not in SPLIT_NAMES):
            expected = ("<split>/<class>/<file> with split in " + "/".join(SPLIT_NAMES)) if has_splits \
                else "<class>/<file>"
            raise DataFormatError(source, f"member {rel!r}", "path", expected, rel)
    return prefix, has_splits


def decode(data):
    """(width, height) after a full decode; raises OSError/ValueError/SyntaxError on a corrupt image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size


def hash_split(paths, test_fraction, seed):
    """Boolean 'is test' per path: a seeded BLAKE2b of the path, as a number in [0, 1), below `test_fraction`."""
    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest(), "big") for p in paths]
    return np.array([k / 2.0**64 < test_fraction for k in keys], bool)


def _hard_negatives(class_ids, item_ids, rng, rounds=20):
    """Index of another photo of the same class (not byte-identical), or -1."""
    n = len(class_ids)
    neg = np.full(n, -1, np.int64)
    order = np.argsort(class_ids, kind="stable")
    sorted_c = class_ids[order]
    start = np.searchsorted(sorted_c, class_ids, side="left")
    size = np.searchsorted(sorted_c, class_ids, side="right") - start
    todo = np.flatnonzero(size > 1)
    for _ in range(rounds):
        if len(todo) == 0:
            break
        cand = order[start[todo] + (rng.random(len(todo)) * size[todo]).astype(np.int64)]
        good = item_ids[cand] != item_ids[todo]
        neg[todo[good]] = cand[good]
        todo = todo[~good]
    return neg


def prepare(input_path, output_dir, test_fraction=0.1, on_corrupt="skip", name=None, seed=0, overwrite=False,
            provenance=None, catalogue=None, class_depth=0, on_unmatched="skip"):
    """Converts a class-per-subfolder photo collection into image tables and image pre-training pairs.

    With `catalogue` (a second tree of reference images per product), `input_path` is the tree of users'
    photos and the pairs are <photo, its product's catalogue image, a sibling product's catalogue image>:
    see `mm_ads.data.readers.image_catalogue` (nested class folders, `class_depth`, `on_unmatched`).

    Args:
        input_path: a directory or a .tar/.tar.gz/.tgz archive with the layout in the module docstring.
        output_dir: dataset directory to create (atomically).
        test_fraction: expected share of photos in test when the input has no split folders.
        on_corrupt: "skip" (warn and count) or "error" for photos that do not decode.
        name: dataset name (default: the input's base name without the archive extension).
        seed: seed of the split (without split folders) and of the hard negatives.
        overwrite: replace an existing non-empty `output_dir`.
        provenance: extra provenance (e.g. the command line) merged into the manifest's.
        catalogue: optional catalogue tree (directory or archive); switches to photo → catalogue pairs.
        class_depth: with `catalogue`: leading class folders that name a product (0 = the whole parent path).
        on_unmatched: with `catalogue`: "skip" (warn and count) or "error" for photos of products that have
            no catalogue image.

    Returns:
        The written `Manifest`.
    """
    if on_corrupt not in CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt must be one of {CORRUPT_POLICIES}, got {on_corrupt!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if catalogue:
        from mm_ads.data.readers.image_catalogue import prepare_catalogue

        return prepare_catalogue(input_path, catalogue, output_dir, class_depth=class_depth,
                                 on_unmatched=on_unmatched, test_fraction=test_fraction, on_corrupt=on_corrupt,
                                 name=name, seed=seed, overwrite=overwrite, base_provenance=provenance)
    if class_depth:
        raise ValueError(f"class_depth={class_depth} needs a catalogue: without one, classes are the folders "
                         "right under the split (or the root)")
    files = sorted(iter_files(input_path))
    if not files:
        raise FileNotFoundError(f"{input_path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    prefix, has_splits = layout([rel for rel, _ in files], input_path)
    records, corrupt = [], []
    for rel, data in files:
        parts = rel[len(prefix):].split("/")
        split, cls = (parts[0], parts[1]) if has_splits else (None, parts[0])
        try:
            width, height = decode(data)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            if on_corrupt == "error":
                raise DataFormatError(input_path, f"member {rel!r}", "image", "a decodable image", str(e)) from e
            logging.warning("image_folder: skipping %s in %s: does not decode (%s)", rel, input_path, e)
            corrupt.append(rel)
            continue
        records.append((split, cls, rel, data, width, height))
    if not records:
        raise DataFormatError(input_path, "all members", "image", "at least one decodable image")
    class_names = sorted({r[1] for r in records})
    class_index = {c: i for i, c in enumerate(class_names)}
    if not has_splits:
        is_test = hash_split([r[2] for r in records], test_fraction, seed)
        records = [("test" if t else "train",) + r[1:] for r, t in zip(records, is_test)]
    split_names = [s for s in dict.fromkeys(r[0] for r in records)]
    split_names.sort(key=lambda s: (SPLIT_NAMES.index(s.lower()) if s.lower() in SPLIT_NAMES else 99, s))

    rng = np.random.default_rng(seed)
    prov = {"input": os.path.abspath(input_path)}
    prov.update(provenance or {})
    base = os.path.basename(os.path.normpath(input_path))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    stats = {"images": len(records), "corrupt_skipped": len(corrupt), "classes": len(class_names)}
    with DatasetWriter(output_dir, name=name or base, format=FORMAT, seed=seed, provenance=prov,
                       overwrite=overwrite) as w:
        for split in split_names:
            rows = [r for r in records if r[0] == split]
            data = [r[3] for r in rows]
            item_ids = np.array([fingerprint_bytes(d) for d in data], np.int64)
            class_ids = np.array([class_index[r[1]] for r in rows], np.int64)
            w.write_parquet("images", split, pa.table({
                "item_id": pa.array(item_ids, pa.int64()),
                "path": pa.array([r[2] for r in rows], pa.string()),
                "class_name": pa.array([r[1] for r in rows], pa.string()),
                "class_id": pa.array(class_ids, pa.int64()),
                "image": pa.array(data, pa.binary()),
                "width": pa.array([r[4] for r in rows], pa.int32()),
                "height": pa.array([r[5] for r in rows], pa.int32()),
            }), row_group_size=1024)
            neg = _hard_negatives(class_ids, item_ids, rng)
            w.write_parquet("pretrain/image_pairs", split, pa.table({
                "query": pa.array(data, pa.binary()),
                "positive": pa.array(data, pa.binary()),
                "negative": pa.array([data[j] if j >= 0 else b"" for j in neg.tolist()], pa.binary()),
                "positive_id": pa.array(item_ids, pa.int64()),
                "negative_id": pa.array(np.where(neg >= 0, item_ids[np.maximum(neg, 0)], -1), pa.int64()),
                "class_id": pa.array(class_ids, pa.int64()),
            }), row_group_size=1024)
            stats[f"{split}_images"] = len(rows)
            stats[f"{split}_duplicate_images"] = int(len(item_ids) - len(np.unique(item_ids)))
            stats[f"{split}_without_negative"] = int((neg < 0).sum())
        w.manifest.extra.update({
            "pairs_need_augmentation": True,
            "classes": class_names,
            "layout": "ROOT/<split>/<class>/<file>" if has_splits else "ROOT/<class>/<file> (split made here)",
            "corrupt_files": corrupt[:100],
            "stats": stats,
        })
    return w.manifest
