import numpy as np
import pytest

from mm_ads.metrics import acc_at_n, dedupe_by_id


def _naive_acc(queries, candidates, target, ns, ties="pessimistic"):
    """Per query: full argsort of all candidate scores (float64), the positive placed after (pessimistic)
    or before (optimistic) the candidates it ties with; correct when its position is < N."""
    hits = {n: 0 for n in ns}
    for i, q in enumerate(queries.astype(np.float64)):
        scores = candidates.astype(np.float64) @ q
        is_own = np.arange(len(candidates)) == target[i]
        tie_key = is_own if ties == "pessimistic" else ~is_own
        order = np.lexsort((tie_key, -scores))  # descending score, then the tie rule
        position = int(np.flatnonzero(order == target[i])[0])
        for n in ns:
            hits[n] += position < n
    return {f"acc@{n}": hits[n] / len(queries) for n in ns}


def _integer_vectors(d, dim, seed, low=-2, high=3):
    """Small integer vectors: dot products are exact in float32 and tie often."""
    rng = np.random.default_rng(seed)
    positives = rng.integers(low, high, size=(d, dim)).astype(np.float32)
    queries = positives + rng.integers(-1, 2, size=(d, dim))
    return queries.astype(np.float32), positives


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_matches_naive_argsort_with_ties_and_chunks(chunk_size, ties):
    queries, positives = _integer_vectors(50, 3, seed=0)
    ns = (1, 2, 5, 10)
    result = acc_at_n(queries, positives, ns=ns, chunk_size=chunk_size, ties=ties)
    expected = _naive_acc(queries, positives, np.arange(50), ns, ties=ties)
    assert result == pytest.approx(expected, abs=0)
    assert list(result) == ["acc@1", "acc@2", "acc@5", "acc@10"]


def test_ties_actually_occur_and_rules_differ():
    queries, positives = _integer_vectors(50, 3, seed=0)
    pessimistic = acc_at_n(queries, positives, ns=(1, 5))
    optimistic = acc_at_n(queries, positives, ns=(1, 5), ties="optimistic")
    assert pessimistic["acc@1"] < optimistic["acc@1"]


def test_float_vectors_match_naive():
    rng = np.random.default_rng(1)
    positives = rng.normal(size=(120, 16)).astype(np.float32)
    queries = (positives + 0.8 * rng.normal(size=positives.shape)).astype(np.float32)
    result = acc_at_n(queries, positives, ns=(1, 5, 20), chunk_size=32)
    assert result == pytest.approx(_naive_acc(queries, positives, np.arange(120), (1, 5, 20)), abs=0)
    assert 0 < result["acc@1"] < result["acc@5"] < result["acc@20"] < 1


def test_hand_example():
    positives = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    queries = np.array([[1, 0], [1, 0], [1, 1]], np.float32)
    # q0: scores [1, 0, 1] → positive 0 ties with 2 → rank 2 (pessimistic)
    # q1: scores [1, 0, 1] → positive 1 below two others → rank 3
    # q2: scores [1, 1, 2] → rank 1
    assert acc_at_n(queries, positives, ns=(1, 2, 3)) == {"acc@1": 1 / 3, "acc@2": 2 / 3, "acc@3": 1.0}
    assert acc_at_n(queries, positives, ns=(1,), ties="optimistic") == {"acc@1": 2 / 3}


def test_collapsed_encoder_scores_zero():
    vectors = np.ones((10, 4), np.float32)
    assert acc_at_n(vectors, vectors, ns=(1, 9, 10)) == {"acc@1": 0.0, "acc@9": 0.0, "acc@10": 1.0}


def test_dedupe_by_id_matches_naive_on_distinct_items():
    rng = np.random.default_rng(2)
    items = rng.integers(-2, 3, size=(15, 3)).astype(np.float32)
    item_ids = np.arange(15) * 3 + 100
    pick = rng.integers(0, 15, 60)  # 60 queries over 15 items: positives repeat
    positives, positive_ids = items[pick], item_ids[pick]
    queries = (positives + rng.integers(-1, 2, size=positives.shape)).astype(np.float32)
    candidates, target = dedupe_by_id(positive_ids, positives)
    present = np.unique(pick)
    np.testing.assert_array_equal(candidates, items[present])
    np.testing.assert_array_equal(item_ids[present][target], positive_ids)
    for chunk_size in (7, 60):
        result = acc_at_n(queries, positives, ns=(1, 3), chunk_size=chunk_size, positive_ids=positive_ids)
        assert result == pytest.approx(_naive_acc(queries, candidates, target, (1, 3)), abs=0)


def test_duplicates_count_against_the_positive_unless_deduped():
    rng = np.random.default_rng(3)
    item = rng.normal(size=(1, 8)).astype(np.float32)
    positives = np.repeat(item, 5, axis=0)
    queries = positives + 0.01
    assert acc_at_n(queries, positives, ns=(1, 5))["acc@1"] == 0.0
    assert acc_at_n(queries, positives, ns=(1, 5), positive_ids=np.full(5, 42)) == {"acc@1": 1.0, "acc@5": 1.0}


def test_exclude_ids_leaves_the_query_item_out_of_its_own_ranking():
    # query i is the text of item q_i (every item is also a candidate); its positive is the item liked next
    items = {10: [1.0, 0.0, 0.0, 0.0], 20: [0.8, 0.6, 0.0, 0.0], 30: [0.0, 0.0, 1.0, 0.0], 40: [0.0, 0.0, 0.8, 0.6]}
    query_item = np.array([10, 20, 30, 40])
    positive_ids = np.array([20, 10, 40, 30])
    queries = np.array([items[i] for i in query_item], np.float32)  # the query's own item scores 1.0
    positives = np.array([items[i] for i in positive_ids], np.float32)
    assert acc_at_n(queries, positives, ns=(1, 2), positive_ids=positive_ids) == {"acc@1": 0.0, "acc@2": 1.0}
    excluded = acc_at_n(queries, positives, ns=(1, 2), positive_ids=positive_ids, exclude_ids=query_item)
    assert excluded == {"acc@1": 1.0, "acc@2": 1.0}
    # naive reference: rank the positive among the candidates other than the query's item, pessimistic ties
    for i, q in enumerate(queries):
        others = [k for k in items if k != query_item[i]]
        scores = {k: float(np.dot(q, items[k])) for k in others}
        assert sum(s >= scores[positive_ids[i]] for k, s in scores.items() if k != positive_ids[i]) == 0
    # an id that is not a candidate, -1, or the positive itself excludes nothing
    for ids in ([99] * 4, [-1] * 4, list(positive_ids)):
        assert acc_at_n(queries, positives, ns=(1, 2), positive_ids=positive_ids, exclude_ids=ids) == {
            "acc@1": 0.0, "acc@2": 1.0}
    with pytest.raises(ValueError, match="exclude_ids needs positive_ids"):
        acc_at_n(queries, positives, exclude_ids=query_item)
    with pytest.raises(ValueError, match="one id per query"):
        acc_at_n(queries, positives, positive_ids=positive_ids, exclude_ids=[10])


def test_fixed_candidates_rank_each_query_against_the_whole_set():
    # 2 queries whose positives are items 1 and 2; the catalogue also holds items 3 and 4 that no query wants
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    positives = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)
    ids = np.array([1, 2])
    assert acc_at_n(queries, positives, ns=(1, 2), positive_ids=ids) == {"acc@1": 1.0, "acc@2": 1.0}
    catalogue_ids = np.array([4, 1, 3, 2])
    catalogue = np.array([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.1, 0.9]], np.float32)  # item 4 beats query 0's
    result = acc_at_n(queries, positives, ns=(1, 2, 3), positive_ids=ids, candidate_vectors=catalogue,
                      candidate_ids=catalogue_ids)
    assert result == {"acc@1": 0.5, "acc@2": 1.0, "acc@3": 1.0}
    # naive reference: rank of each positive among the 4 distinct catalogue items, pessimistic ties
    for q, pid in zip(queries, ids):
        scores = dict(zip(catalogue_ids.tolist(), (catalogue @ q).tolist()))
        rank = sum(s >= scores[pid] for k, s in scores.items() if k != pid)
        assert rank == (1 if pid == 1 else 0)
    # an id in both sets is represented by the candidate's vector: a positive copy that differs does not count
    moved = acc_at_n(queries, np.array([[1.0, 0.0], [0.1, 0.9]], np.float32), ns=(1,), positive_ids=ids,
                     candidate_vectors=catalogue, candidate_ids=catalogue_ids)
    assert moved == {"acc@1": 0.5}
    # a positive missing from the given candidates is still ranked
    only_others = acc_at_n(queries, positives, ns=(1, 3), positive_ids=ids, candidate_vectors=catalogue[[0, 2]],
                           candidate_ids=[4, 3])
    assert only_others == {"acc@1": 0.5, "acc@3": 1.0}
    # exclude_ids reaches the fixed candidates too: leaving item 4 out of query 0's ranking
    assert acc_at_n(queries, positives, ns=(1,), positive_ids=ids, candidate_vectors=catalogue,
                    candidate_ids=catalogue_ids, exclude_ids=[4, -1]) == {"acc@1": 1.0}
    with pytest.raises(ValueError, match="go together"):
        acc_at_n(queries, positives, positive_ids=ids, candidate_vectors=catalogue)
    with pytest.raises(ValueError, match="candidate_ids needs positive_ids"):
        acc_at_n(queries, positives, candidate_vectors=catalogue, candidate_ids=catalogue_ids)
    with pytest.raises(ValueError, match="one id per row"):
        acc_at_n(queries, positives, positive_ids=ids, candidate_vectors=catalogue, candidate_ids=[1, 2])


def test_candidate_groups_count_any_image_of_the_right_product():
    # catalogue: product 0 has images 10 and 11, product 1 has image 20, product 2 has image 30
    catalogue_ids = np.array([10, 11, 20, 30])
    groups = np.array([0, 0, 1, 2])
    catalogue = np.array([[1.0, 0.0], [0.7, 0.7], [0.8, 0.6], [0.0, 1.0]], np.float32)
    queries = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    positive_ids = np.array([11, 20])  # query 0's positive is product 0's second image
    kwargs = dict(positive_ids=positive_ids, candidate_vectors=catalogue, candidate_ids=catalogue_ids)
    positives = catalogue[[1, 2]]
    # per image: query 0 sees 10 (1.0) and 20 (0.8) above 11 (0.7): rank 2; query 1 sees 11 (0.98) above 20 (0.96)
    assert acc_at_n(queries, positives, ns=(1, 2, 3), **kwargs) == {"acc@1": 0.0, "acc@2": 0.5, "acc@3": 1.0}
    # per product: query 0's best product-0 image (10, 1.0) beats all others: rank 0; query 1: 11 (0.98, another
    # product) beats 20 (0.96): rank 1
    assert acc_at_n(queries, positives, ns=(1, 2), candidate_groups=groups, **kwargs) == {"acc@1": 0.5, "acc@2": 1.0}
    # naive reference
    for q, pid, want in zip(queries, positive_ids, (0, 1)):
        scores = catalogue @ q
        mine = groups == groups[list(catalogue_ids).index(pid)]
        assert int((scores[~mine] >= scores[mine].max()).sum()) == want
    with pytest.raises(ValueError, match="one group per candidate"):
        acc_at_n(queries, positives, candidate_groups=[0, 1], **kwargs)
    with pytest.raises(ValueError, match="candidate_groups needs"):
        acc_at_n(queries, positives, positive_ids=positive_ids, candidate_groups=groups)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query_vectors=np.zeros((3, 2)), positive_vectors=np.zeros((4, 2))), "same shape"),
        (dict(query_vectors=np.zeros((3,)), positive_vectors=np.zeros((3,))), "2-D"),
        (dict(query_vectors=np.zeros((0, 2)), positive_vectors=np.zeros((0, 2))), "empty"),
        (dict(query_vectors=np.full((2, 2), np.nan), positive_vectors=np.zeros((2, 2))), "non-finite"),
        (dict(query_vectors=np.zeros((2, 2)), positive_vectors=np.zeros((2, 2)), ns=(0,)), "ns"),
        (dict(query_vectors=np.zeros((2, 2)), positive_vectors=np.zeros((2, 2)), chunk_size=0), "chunk_size"),
        (dict(query_vectors=np.zeros((2, 2)), positive_vectors=np.zeros((2, 2)), ties="random"), "ties"),
        (dict(query_vectors=np.zeros((2, 2)), positive_vectors=np.zeros((2, 2)), positive_ids=[1]), "positive_ids"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        acc_at_n(**kwargs)
