"""MovieLens input files: the CSV releases' and ml-100k's, parsed and checked (see `movielens` for the layouts).

Malformed input raises `DataFormatError` naming the file, the line, the field and what was expected.
"""

import csv
import dataclasses
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from absl import logging

from mm_ads.data.readers.common import DataFormatError

LAYOUTS = ("csv", "100k")
RATINGS = ("ratings.csv", ("userId", "movieId", "rating", "timestamp"))
MOVIES = ("movies.csv", ("movieId", "title", "genres"))
TAGS = ("tags.csv", ("userId", "movieId", "tag", "timestamp"))
RATINGS_100K = ("u.data", ("userId", "movieId", "rating", "timestamp"))
ITEMS_100K = "u.item"
GENRES_100K = "u.genre"
USERS_100K = "u.user"
OCCUPATIONS_100K = "u.occupation"
NO_GENRES = "(no genres listed)"
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups: <18, 18-24, ..., 56+
AGE_NAMES = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("F", "M")
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")


# -- delimited input ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """A delimited input file: its columns, their kinds ("int", "rating", "str") and its dialect."""

    path: str
    columns: tuple
    kinds: tuple
    delimiter: str = ","
    header: bool = True


def check_header(path, columns):
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    header = [h.strip().lstrip("\ufeff") for h in (header or [])]
    if header != list(columns):
        raise DataFormatError(path, "line 1", "header", f"the header {','.join(columns)}", ",".join(header))


def locate(src, record=None):
    """Finds the first bad record with the csv module (only called once something is known to be wrong).

    Raises the precise `DataFormatError`; `record` (0-based data record) is reported when nothing else is found.
    """
    with open(src.path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=src.delimiter)
        if src.header:
            next(reader, None)
        for i, row in enumerate(reader):
            where = f"line {reader.line_num}"
            if len(row) != len(src.columns):
                raise DataFormatError(src.path, where, "(record)",
                                      f"{len(src.columns)} fields {src.delimiter.join(src.columns)}",
                                      src.delimiter.join(row))
            for name, kind, value in zip(src.columns, src.kinds, row):
                if kind == "int":
                    try:
                        v = int(value)
                    except ValueError:
                        raise DataFormatError(src.path, where, name, "an integer", value) from None
                    if v < 0:
                        raise DataFormatError(src.path, where, name, "a non-negative integer", value)
                elif kind == "rating":
                    try:
                        v = float(value)
                    except ValueError:
                        raise DataFormatError(src.path, where, name, "a number of stars in [0, 5]", value) from None
                    if not 0.0 <= v <= 5.0:
                        raise DataFormatError(src.path, where, name, "a number of stars in [0, 5]", value)
            if record is not None and i == record:
                return where
    return None


def read_table(src, newlines_in_values=False):
    """Reads a delimited file with pyarrow; any malformed record is located and reported precisely."""
    if not os.path.exists(src.path):
        raise FileNotFoundError(f"{src.path} not found (expected the MovieLens layout, see mm_ads/data/readers/"
                                "movielens.py; unzip the release first)")
    if src.header:
        check_header(src.path, src.columns)
    types = {"int": pa.int64(), "rating": pa.float64(), "str": pa.string()}
    try:
        table = pacsv.read_csv(
            src.path,
            read_options=pacsv.ReadOptions(block_size=1 << 24,
                                           column_names=None if src.header else list(src.columns)),
            parse_options=pacsv.ParseOptions(delimiter=src.delimiter, newlines_in_values=newlines_in_values,
                                             quote_char='"' if src.delimiter == "," else False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: types[k] for c, k in zip(src.columns, src.kinds)}, strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        locate(src)
        raise DataFormatError(src.path, "somewhere", "(file)", "well-formed delimited text", str(e)) from e
    for name, kind in zip(src.columns, src.kinds):
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
            locate(src)
            raise DataFormatError(src.path, f"record {record + 1}", name, "a valid value")
    return table


def int_column(table, name):
    return table.column(name).to_numpy().astype(np.int64)


def dense_ids(ids, raw, src, field, expected):
    """Raw ids → dense ids 1..N by position in the sorted `ids`; an unknown id is an error naming its line."""
    pos = np.clip(np.searchsorted(ids, raw), 0, max(len(ids) - 1, 0))
    ok = ids[pos] == raw if len(ids) else np.zeros(len(raw), bool)
    if not ok.all():
        record = int(np.flatnonzero(~ok)[0])
        where = locate(src, record=record) or f"record {record + 1}"
        raise DataFormatError(src.path, where, field, expected, int(raw[record]))
    return pos.astype(np.int64) + 1


# -- catalogue and users -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Catalogue:
    """Movies sorted by id: titles, the title shown in the text, genre lists, years (None if unknown)."""

    movie_ids: np.ndarray
    titles: list
    text_titles: list
    genres: list
    years: list


@dataclasses.dataclass
class Profiles:
    """User profile ids of the sorted raw user ids: `values` [U, 3] (age group, gender, occupation), and the ages
    in years [U] (ml-100k's u.user)."""

    user_ids: np.ndarray
    values: np.ndarray
    names: dict
    ages: np.ndarray | None = None


def read_movies(path):
    """movies.csv → (movie ids int64 [N] sorted, titles, genre lists, years (None if absent))."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (expected the MovieLens layout, see mm_ads/data/readers/"
                                "movielens.py)")
    check_header(path, MOVIES[1])
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


def text_lines(path, encoding="utf-8"):
    """(line number, stripped line) of the non-empty lines of a small text file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (expected the MovieLens ml-100k layout, see "
                                "mm_ads/data/readers/movielens.py)")
    with open(path, encoding=encoding) as f:
        return [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]


def read_100k_genres(path):
    """u.genre (`name|index`) → genre names in flag-column order."""
    out = {}
    for n, line in text_lines(path):
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise DataFormatError(path, f"line {n}", "(record)", "name|index", line)
        out[int(index)] = name.strip()
    if sorted(out) != list(range(len(out))):
        raise DataFormatError(path, "all lines", "index", "indexes 0..G-1 once each", sorted(out))
    return [out[i] for i in range(len(out))]


def read_100k_items(path, genre_names):
    """u.item (latin-1, `|`-separated, 5 fields + one 0/1 flag per genre) → a `Catalogue`.

    The ml-100k genre "unknown" is not a genre: a movie with no other flag gets `NO_GENRES`.
    """
    width = 5 + len(genre_names)
    rows = {}
    for n, line in text_lines(path, encoding="latin-1"):
        where = f"line {n}"
        f = line.split("|")
        if len(f) != width:
            raise DataFormatError(path, where, "(record)", f"{width} '|'-separated fields (id, title, release date, "
                                  f"video release date, IMDb URL, {len(genre_names)} genre flags)", line)
        try:
            movie = int(f[0])
        except ValueError:
            raise DataFormatError(path, where, "movie id", "an integer", f[0]) from None
        if movie in rows:
            raise DataFormatError(path, where, "movie id", "each movie id once", movie)
        flags = f[5:]
        if any(x not in ("0", "1") for x in flags):
            raise DataFormatError(path, where, "genre flags", "0 or 1", "|".join(flags))
        genres = [g for g, x in zip(genre_names, flags) if x == "1" and g.lower() != "unknown"] or [NO_GENRES]
        title = f[1].strip()
        m = _YEAR.search(title) or _DATE_YEAR.search(f[2])
        year = int(m.group(1)) if m else None
        text_title = title if _YEAR.search(title) or year is None else f"{title} ({year})"
        rows[movie] = (title, text_title, genres, year)
    ids = np.array(sorted(rows), np.int64)
    cols = list(zip(*(rows[i] for i in ids.tolist()))) or [[], [], [], []]
    return Catalogue(ids, list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]))


def read_100k_users(path, occupations_path):
    """u.user (`id|age|gender|occupation|zip`) → `Profiles` (age group, gender, occupation ids, 1-based)."""
    occupations = None
    if os.path.exists(occupations_path):
        occupations = [line.strip() for _, line in text_lines(occupations_path)]
    rows = {}
    for n, line in text_lines(path, encoding="latin-1"):
        where = f"line {n}"
        f = line.split("|")
        if len(f) != 5:
            raise DataFormatError(path, where, "(record)", "5 fields id|age|gender|occupation|zip", line)
        try:
            user, age = int(f[0]), int(f[1])
        except ValueError:
            raise DataFormatError(path, where, "id/age", "integers", f"{f[0]}|{f[1]}") from None
        if f[2] not in GENDERS:
            raise DataFormatError(path, where, "gender", f"one of {GENDERS}", f[2])
        if occupations is not None and f[3] not in occupations:
            raise DataFormatError(path, where, "occupation", f"an occupation listed in {OCCUPATIONS_100K}", f[3])
        if user in rows:
            raise DataFormatError(path, where, "id", "each user id once", user)
        rows[user] = (age, f[2], f[3])
    occupations = occupations or sorted({r[2] for r in rows.values()})
    ids = np.array(sorted(rows), np.int64)
    occ = {o: i + 1 for i, o in enumerate(occupations)}
    values = np.array([[int(np.searchsorted(AGE_EDGES, rows[u][0], side="right")) + 1,
                        GENDERS.index(rows[u][1]) + 1, occ[rows[u][2]]] for u in ids.tolist()],
                      np.int64).reshape(len(ids), 3)
    names = {"user_profile_0": list(AGE_NAMES), "user_profile_1": list(GENDERS), "user_profile_2": occupations}
    ages = np.array([rows[u][0] for u in ids.tolist()], np.int64)
    return Profiles(ids, values, names, ages)


def detect_layout(input_path):
    """"csv" when `ratings.csv` is present, "100k" when `u.data` is; an error naming both otherwise."""
    csv_layout = os.path.exists(os.path.join(input_path, RATINGS[0]))
    ml100k = os.path.exists(os.path.join(input_path, RATINGS_100K[0]))
    if csv_layout == ml100k:
        raise FileNotFoundError(f"{input_path}: expected exactly one MovieLens layout: {RATINGS[0]} (CSV releases) "
                                f"or {RATINGS_100K[0]} (ml-100k); found {'both' if csv_layout else 'neither'}")
    return "csv" if csv_layout else "100k"


def read_input(input_path, layout):
    """(catalogue, ratings source, dense items, raw users, ratings, times, profiles or None, files read)."""
    if layout == "csv":
        movie_ids, titles, genres, years = read_movies(os.path.join(input_path, MOVIES[0]))
        cat = Catalogue(movie_ids, titles, list(titles), genres, years)
        src = Source(os.path.join(input_path, RATINGS[0]), RATINGS[1], ("int", "int", "rating", "int"))
        files, profiles, expected = [RATINGS[0], MOVIES[0]], None, "a movieId listed in movies.csv"
    else:
        genre_names = read_100k_genres(os.path.join(input_path, GENRES_100K))
        cat = read_100k_items(os.path.join(input_path, ITEMS_100K), genre_names)
        profiles = read_100k_users(os.path.join(input_path, USERS_100K), os.path.join(input_path, OCCUPATIONS_100K))
        src = Source(os.path.join(input_path, RATINGS_100K[0]), RATINGS_100K[1], ("int", "int", "rating", "int"),
                      delimiter="\t", header=False)
        files = [RATINGS_100K[0], ITEMS_100K, GENRES_100K, USERS_100K] + (
            [OCCUPATIONS_100K] if os.path.exists(os.path.join(input_path, OCCUPATIONS_100K)) else [])
        expected = f"a movie id listed in {ITEMS_100K}"
    logging.info("movielens: reading %s", src.path)
    table = read_table(src)
    item = dense_ids(cat.movie_ids, int_column(table, "movieId"), src, "movieId", expected)
    user_raw = int_column(table, "userId")
    if profiles is not None:
        dense_ids(profiles.user_ids, user_raw, src, "userId", f"a user id listed in {USERS_100K}")
    return cat, src, item, user_raw, table.column("rating").to_numpy(), int_column(table, "timestamp"), profiles, files
