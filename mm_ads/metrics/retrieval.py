"""Acc@N of the paper's eq. 6: does a query retrieve its own positive among all test positives?

`Acc@N = 1/D Σ_i I(p_i ∈ Top_N(q_i, S))` with `S = {p_1, ..., p_D}` the positives of the whole test
set and similarity the dot product of the representations (L2-normalise beforehand for cosine).

Exact and chunked: the score matrix is computed `chunk_size` queries at a time in float32
(`[chunk_size, |S|]`, 4 bytes per entry), so memory stays bounded for any D.

Tie rule (pessimistic): query i counts as correct at N when **fewer than N other candidates score
greater than or equal to** its positive, i.e. its positive ranks within the top N even if every tie is
broken against it. Ties are exact equality of the float32 scores (each query's own score is read
from the same matrix product as the others; BLAS kernels may in principle round mathematically
equal dot products differently in the last bit, so exact ties are guaranteed only for exactly
representable values such as small-integer vectors). Pessimism matters: a collapsed
encoder that maps every item to the same vector scores Acc@N = 0, not 1. `ties="optimistic"` counts
only strictly higher candidates (ties broken in favour of the positive), for comparison.

Duplicate positives (the same item is the positive of several queries): by default every query's
positive is its own candidate, so an identical copy of the positive ties with it and counts against
it under the pessimistic rule. Pass `positive_ids` to de-duplicate: the candidate set becomes the
distinct items (each represented by the vector of its first occurrence; an item encoder is
deterministic at evaluation time, so all occurrences share one vector) and query i is correct when
the candidate with id `positive_ids[i]` is within the top N of the distinct candidates.

Queries that are themselves catalogue items (e.g. "the movie a user liked next" pairs, whose query is the
previous movie's text): pass `exclude_ids` with the query's own item id and that candidate is left out of
the query's ranking. Otherwise an encoder finds the query's own item first (its text is the query), and Acc@1
measures nothing.

A fixed candidate set (e.g. every image of a catalogue, most of which are no test query's positive): pass
`candidate_vectors` and `candidate_ids` with `positive_ids`. The candidates are then the distinct ids of the
given candidates and the positives together (a positive missing from the given set is still ranked; an id in
both is represented by the given candidate's vector). With `candidate_groups` (e.g. the product of each
catalogue image, when a product has several), a query is correct at N when the best-scoring candidate of its
positive's group is within the top N of the candidates **outside** that group: another image of the right
product is a hit, not a competitor (a positive missing from the given candidates is a group of its own).
"""

import numpy as np

TIE_RULES = ("pessimistic", "optimistic")


def _vectors(name, value):
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"acc_at_n: {name} must be a 2-D [D, dim] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"acc_at_n: {name} contain {int((~np.isfinite(array)).sum())} non-finite value(s)")
    return array


def dedupe_by_id(positive_ids, positive_vectors):
    """Distinct candidate items of a test set whose positives repeat.

    Args:
        positive_ids: [D] item id of each query's positive.
        positive_vectors: [D, dim] positive representations.

    Returns:
        `(candidate_vectors [M, dim], target [D])`: the vector of each distinct item (its first
        occurrence), ids ascending, and the candidate index of each query's positive.

    Raises:
        ValueError: length mismatch.
    """
    positive_ids = np.asarray(positive_ids)
    positive_vectors = np.asarray(positive_vectors)
    if positive_ids.ndim != 1 or len(positive_ids) != len(positive_vectors):
        raise ValueError(
            f"dedupe_by_id: positive_ids (shape {positive_ids.shape}) must be 1-D with one id per row of "
            f"positive_vectors (n={len(positive_vectors)})"
        )
    _, first, target = np.unique(positive_ids, return_index=True, return_inverse=True)
    return positive_vectors[first], target.reshape(-1)


def acc_at_n(query_vectors, positive_vectors, ns=(1, 5), chunk_size=256, positive_ids=None, ties="pessimistic",
             exclude_ids=None, candidate_vectors=None, candidate_ids=None, candidate_groups=None):
    """Exact Acc@N (paper eq. 6) by dot product against all test positives.

    Args:
        query_vectors: [D, dim] query representations q_i (cast to float32).
        positive_vectors: [D, dim] positive representations p_i, row i the positive of query i.
        ns: the N values to report.
        chunk_size: queries per matrix product; memory ≈ chunk_size × num_candidates × 5 bytes.
        positive_ids: optional [D] item ids of the positives; de-duplicates the candidate set
            (see the module docstring and `dedupe_by_id`).
        ties: "pessimistic" (default: a tie counts against the positive) or "optimistic".
        exclude_ids: optional [D] item id per query (needs `positive_ids`): that candidate is left out of
            query i's ranking (the query's own item, when queries are items); ids not among the candidates,
            negative ids and an id equal to the query's positive exclude nothing.
        candidate_vectors: optional [M, dim] further candidates (needs `positive_ids` and `candidate_ids`):
            every query is ranked against them and the positives, deduplicated by id.
        candidate_ids: optional [M] item ids of `candidate_vectors`.
        candidate_groups: optional [M] int group of each given candidate (needs `candidate_ids`): the query's
            positive group counts as one (see the module docstring).

    Returns:
        dict `{"acc@N": float}` for each N in `ns`.

    Raises:
        ValueError: empty input, mismatched shapes, non-finite vectors, bad `ns`, `chunk_size` or
            `ties`.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"acc_at_n: ties must be one of {TIE_RULES}, got {ties!r}")
    ns = [int(n) for n in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"acc_at_n: ns must be a non-empty list of positive integers, got {ns}")
    if int(chunk_size) < 1:
        raise ValueError(f"acc_at_n: chunk_size must be >= 1, got {chunk_size}")
    queries = _vectors("query_vectors", query_vectors)
    positives = _vectors("positive_vectors", positive_vectors)
    if queries.shape != positives.shape:
        raise ValueError(
            f"acc_at_n: query_vectors {queries.shape} and positive_vectors {positives.shape} must have the same "
            "shape (one positive per query)"
        )
    if len(queries) == 0:
        raise ValueError("acc_at_n: empty input (no queries)")
    if (candidate_vectors is None) != (candidate_ids is None):
        raise ValueError("acc_at_n: candidate_vectors and candidate_ids go together")
    if positive_ids is None:
        if exclude_ids is not None:
            raise ValueError("acc_at_n: exclude_ids needs positive_ids (the candidates' item ids)")
        if candidate_ids is not None:
            raise ValueError("acc_at_n: candidate_ids needs positive_ids (the positives' item ids)")
        candidates, target = positives, np.arange(len(queries))
        distinct = None
    elif candidate_ids is None:
        candidates, target = dedupe_by_id(positive_ids, positives)
        distinct = np.unique(positive_ids)  # the candidates' ids, in candidate order
    else:
        extra = _vectors("candidate_vectors", candidate_vectors)
        candidate_ids = np.asarray(candidate_ids)
        if candidate_ids.shape != (len(extra),) or extra.shape[1:] != positives.shape[1:]:
            raise ValueError(f"acc_at_n: candidate_ids (shape {candidate_ids.shape}) must hold one id per row of "
                             f"candidate_vectors {extra.shape}, of the positives' width {positives.shape[1:]}")
        all_ids = np.concatenate([candidate_ids.astype(np.int64), np.asarray(positive_ids).astype(np.int64)])
        dedup, inverse = dedupe_by_id(all_ids, np.concatenate([extra, positives]))
        candidates, target = dedup, inverse[len(extra):]
        distinct = np.unique(all_ids)
    group = None
    if candidate_groups is not None:
        if candidate_ids is None:
            raise ValueError("acc_at_n: candidate_groups needs candidate_vectors and candidate_ids")
        candidate_groups = np.asarray(candidate_groups).astype(np.int64)
        if candidate_groups.shape != candidate_ids.shape:
            raise ValueError(f"acc_at_n: candidate_groups (shape {candidate_groups.shape}) must hold one group per "
                             f"candidate (n={len(candidate_ids)})")
        # the group of each distinct candidate (positives outside the given set: a new group each)
        fresh = candidate_groups.max(initial=0) + 1 + np.arange(len(positive_ids), dtype=np.int64)
        all_groups = np.concatenate([candidate_groups, fresh])
        _, first = np.unique(all_ids, return_index=True)
        group = all_groups[first]  # [M'] in candidate order
    excluded = None
    if exclude_ids is not None:
        exclude_ids = np.asarray(exclude_ids)
        if exclude_ids.shape != (len(queries),):
            raise ValueError(f"acc_at_n: exclude_ids (shape {exclude_ids.shape}) must hold one id per query "
                             f"(n={len(queries)})")
        where = np.minimum(np.searchsorted(distinct, exclude_ids), len(distinct) - 1)
        excluded = np.where((distinct[where] == exclude_ids) & (where != target), where, -1)  # [D], -1: none
    candidates_t = np.ascontiguousarray(candidates.T)  # [dim, M]
    ranks = np.empty(len(queries), np.int64)  # other candidates scoring >= (or >) the positive
    for start in range(0, len(queries), int(chunk_size)):
        stop = min(start + int(chunk_size), len(queries))
        scores = queries[start:stop] @ candidates_t  # [c, M]
        own = scores[np.arange(stop - start), target[start:stop]][:, None]  # [c, 1]
        if excluded is not None:
            rows = np.flatnonzero(excluded[start:stop] >= 0)
            scores[rows, excluded[start:stop][rows]] = -np.inf
        if group is not None:  # the best of the positive's group against the candidates outside it
            same = group[None, :] == group[target[start:stop]][:, None]  # [c, M]
            own = np.where(same, scores, -np.inf).max(axis=1, keepdims=True)
            scores = np.where(same, -np.inf, scores)
            ranks[start:stop] = (np.count_nonzero(scores >= own, axis=1) if ties == "pessimistic"
                                 else np.count_nonzero(scores > own, axis=1))
        elif ties == "pessimistic":
            ranks[start:stop] = np.count_nonzero(scores >= own, axis=1) - 1  # minus the positive itself
        else:
            ranks[start:stop] = np.count_nonzero(scores > own, axis=1)
    return {f"acc@{n}": float(np.mean(ranks < n)) for n in ns}
