"""Golden, hand-computed HR/NDCG cases; duplicates, padding and ties (DESIGN.md §2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ttds_ray.metrics import hr_ndcg, popularity_ranking, score_ranks, target_ranks, topk_from_scores


def test_hr_ndcg_golden_values():
    ranks = np.array([1, 3, 0, 11, 5])
    m = hr_ndcg(ranks)
    # HR@1: only rank 1 -> 1/5. HR@5: ranks 1, 3, 5 -> 3/5. HR@10: rank 11 is out -> still 3/5.
    assert m["HR@1"] == pytest.approx(0.2)
    assert m["HR@5"] == pytest.approx(0.6)
    assert m["HR@10"] == pytest.approx(0.6)
    # NDCG@1 = 1/log2(2) / 5 = 0.2
    assert m["NDCG@1"] == pytest.approx(0.2)
    # NDCG@5 = (1/log2(2) + 1/log2(4) + 1/log2(6)) / 5 = (1 + 0.5 + 0.38685280723454163) / 5
    assert m["NDCG@5"] == pytest.approx((1 + 0.5 + 0.38685280723454163) / 5)
    assert m["NDCG@5"] == pytest.approx(0.3773705614469083)
    # NDCG@10: rank 11 still out of the cutoff -> same as NDCG@5
    assert m["NDCG@10"] == pytest.approx(0.3773705614469083)
    assert m["n_users"] == 5
    assert set(m) == {"HR@1", "HR@5", "HR@10", "NDCG@1", "NDCG@5", "NDCG@10", "n_users"}


def test_hr_ndcg_rank_10_counts_at_10_not_at_5():
    m = hr_ndcg(np.array([10, 2]))
    assert m["HR@5"] == pytest.approx(0.5) and m["HR@10"] == pytest.approx(1.0)
    # (1/log2(3) + 1/log2(11)) / 2 = (0.6309297535714575 + 0.28906482631788766) / 2
    assert m["NDCG@10"] == pytest.approx((0.6309297535714575 + 0.28906482631788766) / 2)
    assert m["NDCG@5"] == pytest.approx(0.6309297535714575 / 2)


def test_hr_ndcg_rejects_empty_and_negative():
    with pytest.raises(ValueError):
        hr_ndcg(np.array([], dtype=np.int64))
    with pytest.raises(ValueError):
        hr_ndcg(np.array([-1, 2]))


def test_target_rank_counts_duplicates_once():
    # [7, 7, 3]: the second 7 does not push 3 down -> rank 2, not 3
    assert target_ranks(np.array([[7, 7, 3]]), np.array([3])).tolist() == [2]
    assert target_ranks(np.array([[7, 7, 3]]), np.array([7])).tolist() == [1]
    assert target_ranks(np.array([[5, 7, 5, 7, 9]]), np.array([9])).tolist() == [3]


def test_target_rank_absent_is_zero_and_padding_is_skipped():
    ranked = torch.tensor([[4, 2, 8], [-1, 6, -1], [1, -1, 0]])
    assert target_ranks(ranked, torch.tensor([9, 6, 0])).tolist() == [0, 1, 2]
    assert target_ranks(np.zeros((2, 0), dtype=np.int64), np.array([1, 2])).tolist() == [0, 0]
    ranks = target_ranks(ranked, torch.tensor([9, 6, 0]))
    assert ranks.dtype == np.int64


def test_target_rank_rejects_bad_input():
    with pytest.raises(ValueError):
        target_ranks(np.array([[1, 2]]), np.array([1, 2]))  # B mismatch
    with pytest.raises(ValueError):
        target_ranks(np.array([[1, 2]]), np.array([-1]))  # padding is not a target


def test_target_rank_matches_python_reference_on_random_lists():
    rng = np.random.default_rng(0)
    ranked = rng.integers(-1, 6, size=(200, 8))  # many repeats and paddings
    targets = rng.integers(0, 6, size=200)
    for row, target, rank in zip(ranked.tolist(), targets.tolist(), target_ranks(ranked, targets).tolist()):
        distinct = list(dict.fromkeys(i for i in row if i >= 0))
        assert rank == (distinct.index(target) + 1 if target in distinct else 0)


def test_topk_from_scores_breaks_ties_by_lower_item_idx():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_from_scores(scores, 3).tolist() == [[1, 3, 0], [0, 1, 2]]
    top = topk_from_scores(scores.numpy(), 5)
    assert top.dtype == torch.int64 and top.tolist() == [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]


def test_topk_from_scores_excludes_items_and_pads():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1],
                           [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert topk_from_scores(scores, 3, exclude=[[1], []]).tolist() == [[3, 0, 2], [0, 1, 2]]
    assert topk_from_scores(scores, 3, exclude=[[0, 1, 2, 3], [4]]).tolist() == [[4, -1, -1], [0, 1, 2]]
    with pytest.raises(ValueError):
        topk_from_scores(scores, 6)
    with pytest.raises(ValueError):
        topk_from_scores(scores, 2, exclude=[[1]])
    with pytest.raises(ValueError):
        topk_from_scores(torch.tensor([[float("nan"), 1.0]]), 1)


def test_popularity_ranking_most_popular_first_ties_by_idx():
    counts = np.array([3, 7, 7, 0, 3, 9], dtype=np.uint32)  # unsigned: negation must not wrap
    assert popularity_ranking(counts, 4).tolist() == [5, 1, 2, 0]
    assert popularity_ranking(counts, 6).tolist() == [5, 1, 2, 0, 4, 3]
    with pytest.raises(ValueError):
        popularity_ranking(counts, 7)


def test_topk_from_scores_rejects_excluded_items_out_of_range():
    with pytest.raises(ValueError, match="excluded item_idx"):
        topk_from_scores(torch.zeros(1, 4), 2, exclude=[[4]])


# ----------------------------------------------------------------------------- tie policy (pessimistic ranks)

def test_score_ranks_equals_topk_position_without_ties():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(50, 40)).astype(np.float32)  # continuous: no ties
    targets = rng.integers(0, 40, size=50)
    exclude = [rng.choice(40, size=int(rng.integers(0, 6)), replace=False).tolist() for _ in range(50)]
    for excl in (None, exclude):
        via_list = target_ranks(topk_from_scores(scores, 40, exclude=excl), targets)
        assert score_ranks(scores, targets, exclude=excl).tolist() == via_list.tolist()
        assert score_ranks(torch.from_numpy(scores), torch.from_numpy(targets), exclude=excl).tolist() == \
            via_list.tolist()


def test_score_ranks_puts_the_target_after_every_tied_item():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1],
                       [0.5, 0.9, 0.5, 0.9, 0.1],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    # item 1 ties with item 3 -> rank 2 (not 1); item 0 ties with 2 and follows 1, 3 -> rank 4; all tied -> 5
    assert score_ranks(scores, np.array([1, 0, 0])).tolist() == [2, 4, 5]
    # exclusion removes items from the count; an excluded target is not ranked (0), repeats count once
    assert score_ranks(scores, np.array([1, 0, 0]), exclude=[[3, 3], [0], [1, 2]]).tolist() == [1, 0, 3]
    assert score_ranks(scores, np.array([1, 0, 0]), exclude=[{3}, np.array([0]), (1, 2)]).tolist() == [1, 0, 3]


def test_score_ranks_shared_vector_is_each_user_against_the_whole_catalogue():
    counts = np.array([3, 7, 7, 0, 3, 9], dtype=np.uint32)  # popularity: count ties at 7 and at 3
    assert score_ranks(counts, np.array([5, 1, 2, 0, 4, 3])).tolist() == [1, 3, 3, 5, 5, 6]
    assert score_ranks(counts, np.array([0, 0]), exclude=[[4], []]).tolist() == [4, 5]
    assert score_ranks(counts, np.zeros(0, np.int64)).tolist() == []


def test_score_ranks_rejects_bad_input():
    with pytest.raises(ValueError, match="targets must be item_idx"):
        score_ranks(np.zeros((1, 3)), np.array([3]))
    with pytest.raises(ValueError, match="expected scores"):
        score_ranks(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="NaN"):
        score_ranks(np.array([[np.nan, 1.0]]), np.array([1]))
    with pytest.raises(ValueError, match="one collection per user"):
        score_ranks(np.zeros((2, 3)), np.array([0, 1]), exclude=[[1]])
    with pytest.raises(ValueError, match="excluded item_idx"):
        score_ranks(np.zeros((1, 3)), np.array([0]), exclude=[[-1]])


def test_target_ranks_with_list_scores_resolves_ties_against_the_target():
    ranked = np.array([[4, 2, 8, 6], [4, 2, 8, 6], [4, -1, 4, 2], [1, 1, 3, -1]])
    scores = np.array([[-1.0, -2.0, -2.0, -3.0],
                       [-1.0, -2.0, -2.0, -3.0],
                       [-1.0, -1.0, -5.0, -2.0],  # the pad's and the repeat's scores are ignored
                       [-1.0, -1.0, -1.0, -np.inf]])
    targets = np.array([2, 8, 2, 1])
    assert target_ranks(ranked, targets).tolist() == [2, 3, 2, 1]  # list order alone
    # 2 and 8 tie at -2 -> both rank 3; row 3: 1 and 3 tie (the repeated 1 counts once) -> 2
    assert target_ranks(ranked, targets, scores=scores).tolist() == [3, 3, 2, 2]
    assert target_ranks(ranked, np.array([9, 4, 4, 3]), scores=scores).tolist() == [0, 1, 1, 2]


def test_target_ranks_rejects_unsorted_or_nan_list_scores():
    ranked = np.array([[4, 2, 8]])
    with pytest.raises(ValueError, match="non-increasing"):
        target_ranks(ranked, np.array([2]), scores=np.array([[-2.0, -1.0, -3.0]]))
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(ranked, np.array([2]), scores=np.array([[-1.0, np.nan, -3.0]]))
    with pytest.raises(ValueError, match="shape"):
        target_ranks(ranked, np.array([2]), scores=np.zeros((1, 2)))
