"""Evaluation integrity (issue 12): golden HR/NDCG, repeated targets, ties never resolved in the target's
favour, users too short for the split, and full-catalogue ranking (no sampled negatives).

Protocol and tie policy: docs/DESIGN-NOTES.md, "Evaluation protocol and tie policy". Small synthetic
objects only (a 1,000-item score matrix, an untrained SASRec and a zero-logit tiny Llama); nothing is trained.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_ray.config import DataConfig, EvalConfig, TTDSConfig
from ttds_ray.data import (DataError, RawData, Splits, normalize_interactions_batch, prepare,
                           split_leave_one_out)
from ttds_ray.metrics import hr_ndcg, popularity_ranking, score_ranks, target_ranks, topk_from_scores

N_ITEMS = 1000   # catalogue of the tie tests
N_USERS = 500    # users of the tie tests
KS = (1, 5, 10)
DEPTH = max(KS) + 50  # a ranked-list depth past the largest cut-off


def _cfg(**eval_kw) -> TTDSConfig:
    return TTDSConfig(data=DataConfig(path="unused"), eval=EvalConfig(**eval_kw))


def _list_with_target_at(rank: int, target: int = 7, width: int = 20) -> np.ndarray:
    """int64 `(width,)`: distinct filler items, the target at 1-based ``rank`` (absent when rank > width)."""
    fillers = np.arange(100, 100 + width, dtype=np.int64)
    if rank <= width:
        fillers[rank - 1] = target
    return fillers


def _scored_list(scores: torch.Tensor, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The SASRec path's list (topk_from_scores, lower item_idx first among ties) and its own scores."""
    ranked = topk_from_scores(scores, depth)  # (B, depth)
    return ranked.numpy(), scores.gather(1, ranked).numpy()


# ----------------------------------------------------------------------------- golden values

@pytest.mark.parametrize("rank, ndcg10", [(1, 1.0), (2, 0.6309), (3, 0.5), (11, 0.0)])
def test_single_target_golden_ndcg_and_hr(rank, ndcg10):
    ranked, targets = _list_with_target_at(rank)[None, :], np.array([7])
    ranks = target_ranks(ranked, targets)
    assert ranks.tolist() == [rank]
    m = hr_ndcg(ranks, ks=KS)
    assert m["NDCG@10"] == pytest.approx(ndcg10, abs=1e-4)
    assert (m["HR@1"], m["HR@5"], m["HR@10"]) == (float(rank <= 1), float(rank <= 5), float(rank <= 10))
    assert m["NDCG@5"] == pytest.approx(ndcg10 if rank <= 5 else 0.0, abs=1e-4)
    assert m["n_users"] == 1
    # the full-catalogue score path gives the same rank: the target has the rank-th highest score
    scores = -np.arange(N_ITEMS, dtype=np.float32)  # item i has the (i+1)-th highest score
    assert score_ranks(np.tile(scores, (1, 1)), np.array([rank - 1])).tolist() == [rank]


def test_golden_values_averaged_over_users():
    ranked = np.stack([_list_with_target_at(r) for r in (1, 2, 3, 11)])
    m = hr_ndcg(target_ranks(ranked, np.full(4, 7)), ks=KS)
    assert m["NDCG@10"] == pytest.approx((1 + 0.6309 + 0.5 + 0) / 4, abs=1e-4)
    assert m["HR@10"] == pytest.approx(0.75) and m["HR@1"] == pytest.approx(0.25)
    assert m["n_users"] == 4


# ----------------------------------------------------------------------------- a target listed twice

def test_a_target_listed_twice_counts_once_and_metrics_never_exceed_one():
    t, x = 7, 3
    tail = list(range(100, 117))
    ranked = np.array([[t, t, x, *tail], [x, t, t, *tail], [t] * 20, [x, x, t, *tail[:-1], t]])
    ranks = target_ranks(ranked, np.full(4, t))
    assert ranks.tolist() == [1, 2, 1, 2]  # the repeat neither adds a hit nor pushes the target down
    m = hr_ndcg(ranks, ks=KS)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == pytest.approx((1 + 0.6309 + 1 + 0.6309) / 4, abs=1e-4)
    # with list scores (beam search) a repeat does not tie with itself either
    scores = -np.arange(20, dtype=np.float64)[None, :].repeat(4, axis=0)
    assert target_ranks(ranked, np.full(4, t), scores=scores).tolist() == [1, 2, 1, 2]
    # heavy repetition everywhere: every metric stays in [0, 1]
    rng = np.random.default_rng(3)
    noisy = rng.integers(-1, 4, size=(300, 20))
    noisy_m = hr_ndcg(target_ranks(noisy, rng.integers(0, 4, size=300)), ks=KS)
    assert all(0.0 <= noisy_m[k] <= 1.0 for k in noisy_m if k != "n_users")
    assert noisy_m["NDCG@10"] <= noisy_m["HR@10"] <= 1.0


# ----------------------------------------------------------------------------- ties

@pytest.mark.parametrize("adversarial", [False, True])
def test_constant_scores_over_1000_items_give_no_hits(adversarial):
    """Constant scores: no ranker information, so HR@10 must be <= 10/1000 and no tie may go to the target.
    Adversarial: every target is item 0, which the lower-item_idx tie-break lists first."""
    rng = np.random.default_rng(0)
    targets = np.zeros(N_USERS, np.int64) if adversarial else rng.integers(0, N_ITEMS, N_USERS)
    scores = torch.zeros(N_USERS, N_ITEMS)
    full = hr_ndcg(score_ranks(scores, targets), ks=KS)
    assert full["HR@10"] <= 0.01 and full["HR@10"] == 0.0 and full["NDCG@10"] == 0.0
    assert (score_ranks(scores, targets) == N_ITEMS).all()  # every target after all 999 tied items
    ranked, list_scores = _scored_list(scores, DEPTH)
    listed = hr_ndcg(target_ranks(ranked, targets, scores=list_scores), ks=KS)
    assert listed["HR@10"] <= 0.01 and listed["HR@1"] == 0.0
    if adversarial:
        # the test can fail: ranking by the list's order alone hands every tie to item 0
        assert hr_ndcg(target_ranks(ranked, targets), ks=KS)["HR@1"] == 1.0


def test_a_target_tied_with_items_above_the_cutoff_ranks_after_them():
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.normal(size=(N_USERS, N_ITEMS)).astype(np.float32))
    targets = np.zeros(N_USERS, np.int64)
    best = scores[:, 12:].topk(9, dim=1).values  # (B, 9) best scores of the other items
    scores[:, :12] = ((best[:, 7] + best[:, 8]) / 2)[:, None]  # items 0..11 tie between the 8th and 9th best
    ranks = score_ranks(scores, targets)
    assert (ranks == 8 + 12).all()  # 8 strictly above + 11 tied items + the target
    ranked, list_scores = _scored_list(scores, DEPTH)
    assert (target_ranks(ranked, targets, scores=list_scores) == 20).all()
    assert (target_ranks(ranked, targets) == 9).all()  # list order alone would give a hit at 9


def test_popularity_ties_are_resolved_against_the_target():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 4, N_ITEMS)  # training counts: about 250 items share each count
    counts[:30] = counts.max()
    served = popularity_ranking(counts, DEPTH)
    assert served[:10].tolist() == list(range(10))  # the served list: fixed order, lower item_idx first
    n_top = int((counts == counts.max()).sum())
    targets = np.zeros(N_USERS, np.int64)  # item 0: the first of the most popular items
    ranks = score_ranks(counts, targets)
    assert (ranks == n_top).all() and n_top > 10
    assert hr_ndcg(ranks, ks=KS)["HR@10"] == 0.0
    random_targets = rng.integers(0, N_ITEMS, N_USERS)
    assert hr_ndcg(score_ranks(counts, random_targets), ks=KS)["HR@10"] <= 0.01


def _splits(n_users: int, n_items: int, test_target: int | np.ndarray, seed: int = 0) -> Splits:
    """Every item exactly once in the training split (equal counts), given test targets."""
    rng = np.random.default_rng(seed)
    train = np.empty(n_users, dtype=object)
    train[:] = np.array_split(rng.permutation(n_items), n_users)
    return Splits(user_idx=np.arange(n_users, dtype=np.int64), train_items=train,
                  valid_target=rng.integers(0, n_items, n_users),
                  test_target=np.broadcast_to(np.asarray(test_target, np.int64), (n_users,)).copy())


def test_eval_stage_popularity_does_not_give_ties_to_the_target():
    from ttds_ray.evaluate import evaluate_popularity
    splits = _splits(200, N_ITEMS, test_target=0)  # equal training counts; every target is item 0
    m = evaluate_popularity(splits, N_ITEMS, np.arange(200), "test", _cfg())
    assert m["HR@10"] <= 0.01


def test_eval_stage_sasrec_does_not_give_ties_to_the_target():
    from ttds_ray.cf import SASRec
    from ttds_ray.evaluate import evaluate_sasrec
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, hidden=8, n_layers=1, max_len=10).eval()
    with torch.no_grad():
        model.item_emb.weight.zero_()  # every logit 0: constant scores
    splits = _splits(200, N_ITEMS, test_target=0)
    m = evaluate_sasrec(model, splits, np.arange(200), "test", _cfg())
    assert m["HR@10"] <= 0.01


def test_eval_stage_ttds_does_not_give_ties_to_the_target():
    from ttds_ray.evaluate import evaluate_ttds

    def rank(histories, user_codes, *, n_beams, progress=False):  # a beam search whose beams all tie
        b = len(histories)
        return np.tile(np.arange(n_beams, dtype=np.int64), (b, 1)), np.full((b, n_beams), -3.0, np.float32)

    rec = SimpleNamespace(rank=rank, known_user_codes=lambda rows, split: np.zeros((len(rows), 2), np.int64))
    m, _, _ = evaluate_ttds(rec, _splits(200, N_ITEMS, test_target=0), np.arange(200), "test", _cfg())
    assert m["HR@10"] <= 0.01


# ----------------------------------------------------------------------------- users too short for the split

def _raw(lengths: dict[str, int]) -> RawData:
    rows = [(u, f"i{j}", j) for u, n in lengths.items() for j in range(n)]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(order=np.arange(len(rows)))
    ids = sorted({r[1] for r in rows})
    return RawData(normalize_interactions_batch(log),
                   pd.DataFrame({"item_id": ids, "title": ids, "text": [f"title: {i}" for i in ids]}))


def test_users_shorter_than_the_split_never_reach_it_and_are_counted():
    """Rule: leave-one-out needs >= 3 items (>= 1 training item + valid + test); shorter users are dropped by
    prepare (after the k-core filter) and counted in stats['n_dropped_short_users']."""
    prep = prepare(_raw({"one": 1, "two": 2, "three": 3, "five": 5}), kcore=0, seed=0)
    assert sorted(prep.sequences["user_id"]) == ["five", "three"]
    assert prep.stats["n_dropped_short_users"] == 2 and prep.stats["n_users"] == 2
    splits = split_leave_one_out(prep.sequences)
    assert len(splits) == 2 and all(len(t) >= 1 for t in splits.train_items)
    short = pd.DataFrame({"user_idx": [0, 1], "user_id": ["a", "b"],
                          "items": [np.array([1, 2, 3]), np.array([4, 5])]})
    with pytest.raises(DataError, match="< 3 items"):
        split_leave_one_out(short)  # sequences built without prepare() are refused, not silently cut


def test_denominator_is_every_evaluated_user_even_with_short_or_empty_lists():
    ranked = np.array([[7, 1, 2, 3, 4, 5, 6, 8, 9, 10],  # hit at 1
                       [1, 7, -1, -1, -1, -1, -1, -1, -1, -1],  # list shorter than K, hit at 2
                       [1, 2, 3, -1, -1, -1, -1, -1, -1, -1],  # list shorter than K, miss
                       [-1] * 10])  # nothing ranked (e.g. everything excluded)
    m = hr_ndcg(target_ranks(ranked, np.full(4, 7)), ks=KS)
    assert m["n_users"] == 4 and m["HR@10"] == pytest.approx(2 / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 0.6309) / 4, abs=1e-4)


def test_eval_stage_blocks_count_every_evaluated_user():
    from ttds_ray.evaluate import evaluate_popularity, select_eval_users
    n_items, n_users = 12, 30
    splits = _splits(n_users, n_items, test_target=np.arange(n_users) % n_items)
    splits.train_items[0] = np.arange(n_items)  # user 0 has seen everything: exclude_seen leaves no list
    rows = select_eval_users(n_users, 17, seed=0)
    assert len(rows) == 17 and len(np.unique(rows)) == 17
    for exclude_seen in (False, True):
        m = evaluate_popularity(splits, n_items, rows, "test", _cfg(exclude_seen=exclude_seen))
        assert m["n_users"] == len(rows)
    everyone = evaluate_popularity(splits, n_items, np.arange(n_users), "test", _cfg(exclude_seen=True))
    assert everyone["n_users"] == n_users


# ----------------------------------------------------------------------------- no sampled negatives

def test_score_based_ranking_covers_the_whole_catalogue():
    from ttds_ray.cf import SASRec, score_users
    n_items = 300
    torch.manual_seed(0)
    model = SASRec(n_items, hidden=8, n_layers=1, max_len=10).eval()
    scores = torch.as_tensor(score_users(model, [[1, 2, 3], [4], [5, 6]], max_len=10))
    assert scores.shape == (3, n_items)  # one score per catalogue item: nothing sampled
    # a target anywhere in the catalogue gets its exact rank, also beyond the baselines' list depth
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    deepest = order[:, -1].numpy()
    assert score_ranks(scores, deepest).tolist() == [n_items] * 3


def test_ttds_trie_holds_and_ranks_every_item():
    """The trie is built from every item's SID; beam search with W >= N returns all N items (exhaustive),
    and with a constant LM (all beams tied) no listed target gets a hit from the tie."""
    import transformers

    from ttds_ray.decoding import SIDTrie, beam_search
    n_levels, n_codes, n_items = 3, 4, 60
    rng = np.random.default_rng(0)
    flat = rng.choice(n_codes ** n_levels, size=n_items, replace=False)
    codes = np.stack([flat // n_codes ** 2, flat // n_codes % n_codes, flat % n_codes], axis=1)
    token_ids = 50 + torch.arange(n_levels * n_codes).view(n_levels, n_codes)
    trie = SIDTrie(codes, token_ids)
    assert trie.n_items == n_items
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: every item has the same score
    prompts = torch.randint(0, 50, (4, 5))
    mask = torch.ones_like(prompts)
    full = beam_search(model, trie, prompts, mask, n_beams=n_items)
    assert all(sorted(row) == list(range(n_items)) for row in full.item_idx.tolist())
    narrow = beam_search(model, trie, prompts, mask, n_beams=20)
    ranked, scores = narrow.item_idx.numpy(), narrow.scores.numpy()
    assert (scores == scores[:, :1]).all()  # all 20 beams tie
    targets = ranked[:, 0]  # adversarial: the item the search happened to list first
    assert target_ranks(ranked, targets).tolist() == [1] * 4  # list order alone: a hit at 1
    assert target_ranks(ranked, targets, scores=scores).tolist() == [20] * 4
    assert hr_ndcg(target_ranks(ranked, targets, scores=scores), ks=KS)["HR@10"] == 0.0
