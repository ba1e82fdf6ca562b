"""Stage: eval. Full-catalogue HR@K / NDCG@K from ranked item lists or full score matrices (DESIGN.md §2).

Reads: ranked item_idx lists (beam search, with their scores), full-catalogue score matrices (SASRec,
popularity counts) and one target per user.
Writes: nothing; returns ranks and a metrics dict that the eval stage saves as eval/metrics.json.

Dimension letters: B users, W ranked list length, N items. One target per user; NDCG = 1/log2(rank+1);
a repeated item in a list counts once (style bug-log B07/B15/B16); -1 marks padding.

Tie policy (docs/DESIGN-NOTES.md, "Evaluation protocol and tie policy"): a tie is never resolved in the
target's favour. With scores, a target's rank is PESSIMISTIC: every item that scores the same as the
target counts as ranked above it, so its rank is the number of (distinct, not excluded) items whose score
is >= the target's, the target included. :func:`score_ranks` applies this over the whole catalogue (the
evaluation path for score-based rankers); :func:`target_ranks` applies it within a ranked list when the
list's scores are given (beam search), and otherwise takes the list's order as final. The fixed
lower-item_idx-first order of :func:`topk_from_scores` and :func:`popularity_ranking` is for serving
(deterministic output); it is independent of the target, but measured through the list alone it would
hand every tie at the cut-off to low item_idx, so evaluation never ranks a target by it.
No metric here samples negatives: ranks are over the full catalogue (or the full ranked list).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["target_ranks", "score_ranks", "hr_ndcg", "topk_from_scores", "popularity_ranking"]


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def target_ranks(ranked: Tensor | np.ndarray, targets: Tensor | np.ndarray,
                 scores: Tensor | np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each user's target among the DISTINCT items of their list.

    A repeated item keeps its first position and does not push later items down; -1 entries
    (padding, or items dropped by ``exclude_seen``) are skipped. So `[7, 7, 3]` with target 3 gives rank 2.

    Ties: without ``scores`` the list's order is final. With ``scores`` (the list's own scores, e.g. beam
    log-probs) a tie is resolved against the target: its rank is the number of counted (distinct, non-pad)
    entries whose score is >= the target's, so a target sharing its score with m other listed items ranks
    after all of them. Items outside the list are not seen, so a caller that wants the policy to hold at
    cut-off K must pass a list longer than K (a target tied with the list's last entry then ranks past K),
    or rank score-based models with :func:`score_ranks` over the full catalogue.

    Args:
        ranked: int `(B, W)`, item_idx best first, -1 = padding.
        targets: int `(B,)`, the held-out item_idx of each user (>= 0).
        scores: optional float `(B, W)`, the score of each list entry, non-increasing over the counted
            entries of a row (padding's scores are ignored, e.g. -inf).

    Returns:
        int64 `(B,)`: rank in [1, W], or 0 when the target is not in the list.

    Raises:
        ValueError: on shape mismatch, a negative target, NaN scores of counted entries, or counted
            entries whose scores increase along the list.
    """
    ranked = _as_numpy(ranked).astype(np.int64, copy=False)
    targets = _as_numpy(targets).astype(np.int64, copy=False)
    if ranked.ndim != 2 or targets.ndim != 1 or ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"expected ranked (B, W) and targets (B,), got {ranked.shape} and {targets.shape}")
    if (targets < 0).any():
        raise ValueError(f"targets must be item_idx >= 0, got {int((targets < 0).sum())} negative")
    if scores is not None:
        scores = _as_numpy(scores).astype(np.float64)
        if scores.shape != ranked.shape:
            raise ValueError(f"scores must have the shape of ranked {ranked.shape}, got {scores.shape}")
    n_users, width = ranked.shape
    if width == 0:
        return np.zeros(n_users, dtype=np.int64)
    # First occurrence of each item in its row: a stable sort keeps equal items in list order.
    order = np.argsort(ranked, axis=1, kind="stable")  # (B, W)
    in_order = np.take_along_axis(ranked, order, axis=1)  # (B, W) sorted items
    first_sorted = np.ones_like(in_order, dtype=bool)
    first_sorted[:, 1:] = in_order[:, 1:] != in_order[:, :-1]
    is_first = np.empty_like(first_sorted)
    np.put_along_axis(is_first, order, first_sorted, axis=1)  # (B, W) back in list order
    counted = is_first & (ranked >= 0)  # (B, W)
    hit = counted & (ranked == targets[:, None])  # (B, W) at most one True per row
    found = hit.any(axis=1)  # (B,)
    if scores is None:
        distinct_rank = np.cumsum(counted, axis=1)  # (B, W) rank of each counted entry
        return np.where(found, distinct_rank[np.arange(n_users), hit.argmax(axis=1)], 0).astype(np.int64)
    if np.isnan(scores[counted]).any():
        raise ValueError("scores of listed items contain NaN; the tie policy needs comparable scores")
    masked = np.where(counted, scores, np.inf)  # (B, W) padding and repeats never break the order
    if (counted & (masked > np.minimum.accumulate(masked, axis=1))).any():
        raise ValueError("scores must be non-increasing along each ranked list (best first)")
    target_score = scores[np.arange(n_users), hit.argmax(axis=1)]  # (B,) meaningful where found
    pessimistic = (counted & (scores >= target_score[:, None])).sum(axis=1)  # (B,) ties rank above the target
    return np.where(found, pessimistic, 0).astype(np.int64)


def score_ranks(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray,
                exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Pessimistic 1-based rank of each target in a FULL-catalogue score matrix (no sampled negatives).

    rank = the number of items, target included, that are not excluded and score >= the target's score.
    Every item tied with the target therefore counts as ranked above it, whatever its item_idx: with
    constant scores over N items every target ranks N. Without ties this equals the target's position in
    :func:`topk_from_scores` (after the same exclusion), with no cut-off depth.

    Args:
        scores: float or int `(B, N)` (one row per user, e.g. SASRec logits) or `(N,)` shared by all users
            (e.g. popularity = training counts); higher is better; NaN is not allowed. Tensor or array.
        targets: int `(B,)`, the held-out item_idx of each user, in [0, N).
        exclude: optional per-user item_idx collections left out of the ranking (``exclude_seen``);
            `len(exclude) == B`; repeats are ignored. A user whose target is excluded gets rank 0.

    Returns:
        int64 `(B,)`: rank in [1, N], or 0 when the target is excluded.

    Raises:
        ValueError: on a bad shape, a target outside [0, N), an exclude length other than B, an excluded
            item_idx outside [0, N), or NaN scores.
    """
    scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.to(torch.int64)  # counts: torch compares few unsigned dtypes
    targets = torch.as_tensor(_as_numpy(targets).astype(np.int64, copy=False)).to(scores.device)
    shared = scores.ndim == 1
    grid = scores.unsqueeze(0) if shared else scores  # (1 or B, N)
    if grid.ndim != 2 or targets.ndim != 1 or (not shared and grid.shape[0] != targets.shape[0]):
        raise ValueError(f"expected scores (B, N) or (N,) and targets (B,), got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    n_users, n_items = targets.shape[0], grid.shape[1]
    if n_users and not bool(((targets >= 0) & (targets < n_items)).all()):
        raise ValueError(f"targets must be item_idx in [0, N={n_items}), got min {int(targets.min())} "
                         f"max {int(targets.max())}")
    if grid.is_floating_point() and bool(torch.isnan(grid).any()):
        raise ValueError("scores contain NaN; a NaN target score has no rank")
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude must hold one collection per user: {len(exclude)} for {n_users} users")
    out = np.zeros(n_users, dtype=np.int64)
    chunk = max(1, (1 << 24) // max(n_items, 1))  # users per block: bounds the (b, N) comparison to 16M cells
    for start in range(0, n_users, chunk):
        rows = slice(start, min(start + chunk, n_users))
        block = grid if shared else grid[rows]  # (1 or b, N)
        tgt = targets[rows]  # (b,)
        tgt_score = block[0, tgt] if shared else block.gather(1, tgt[:, None])[:, 0]  # (b,)
        at_least = block >= tgt_score[:, None]  # (b, N) the target and everything tied with or above it
        if exclude is not None:
            excluded = _exclusion_mask(exclude[rows], n_items, scores.device)  # (b, N)
            at_least &= ~excluded
            at_least[excluded.gather(1, tgt[:, None])[:, 0]] = False  # an excluded target is not ranked
        out[rows] = at_least.sum(dim=1).cpu().numpy()
    return out


def _exclusion_mask(exclude: Sequence[Sequence[int]], n_items: int, device: torch.device) -> Tensor:
    """bool `(len(exclude), n_items)`: True at each row's excluded item_idx (each row: a list, set or 1-D array).

    Raises:
        ValueError: an item_idx outside [0, n_items).
    """
    mask = torch.zeros(len(exclude), n_items, dtype=torch.bool, device=device)
    lengths = [len(items) for items in exclude]
    if sum(lengths):
        cols = torch.as_tensor(np.concatenate([np.fromiter(items, np.int64, len(items)) for items in exclude]),
                               device=device)
        if bool(((cols < 0) | (cols >= n_items)).any()):
            raise ValueError(f"excluded item_idx must be in [0, N={n_items})")
        mask[torch.repeat_interleave(torch.arange(len(exclude), device=device),
                                     torch.as_tensor(lengths, device=device)), cols] = True
    return mask


def hr_ndcg(ranks: np.ndarray | Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
    """Hit rate and NDCG at each cutoff, averaged over users (one target each).

    Args:
        ranks: int `(B,)`, from :func:`target_ranks` or :func:`score_ranks`: 1-based rank, 0 = target not
            ranked. Every user counts in the mean, so the denominator is B, the users evaluated.
        ks: cutoffs.

    Returns:
        `{"HR@k": float, "NDCG@k": float for k in ks, "n_users": B}`, where HR@k = mean(1 <= rank <= k)
        and NDCG@k = mean(1/log2(rank+1) if 1 <= rank <= k else 0). The default ks give HR@1, HR@5,
        HR@10, NDCG@1, NDCG@5, NDCG@10.

    Raises:
        ValueError: if ranks is empty, not 1-D, negative, or a k is < 1.
    """
    ranks = _as_numpy(ranks).astype(np.int64, copy=False)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty (B,) array, got shape {ranks.shape}")
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 0 (0 = target not ranked)")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"cutoffs must be >= 1, got {list(ks)}")
    gain = np.zeros(ranks.shape, dtype=np.float64)
    found = ranks >= 1
    gain[found] = 1.0 / np.log2(ranks[found] + 1.0)
    metrics: dict[str, float | int] = {}
    for k in ks:
        in_k = found & (ranks <= k)
        metrics[f"HR@{k}"] = float(in_k.mean())
    for k in ks:
        in_k = found & (ranks <= k)
        metrics[f"NDCG@{k}"] = float(np.where(in_k, gain, 0.0).mean())
    metrics["n_users"] = int(ranks.size)
    return metrics


def topk_from_scores(scores: Tensor | np.ndarray, k: int, exclude: list[list[int]] | None = None) -> Tensor:
    """Top-k items per row of a full-catalogue score matrix, with a deterministic tie-break.

    The tie-break (lower item_idx first) is a fixed order that does not depend on any target; it makes
    served lists reproducible. For evaluation, rank a target with :func:`score_ranks` on the same scores
    (or pass the listed scores to :func:`target_ranks` with k > max K), so a tie is never resolved in
    the target's favour because of its item_idx (module docstring, "Tie policy").

    Args:
        scores: float `(B, N)`, higher is better; NaN is not allowed.
        k: items to return per row (<= N).
        exclude: optional per-row item_idx lists to leave out (e.g. the user's history for the
            `exclude_seen` option, DESIGN.md §2); `len(exclude) == B`; each in [0, N).

    Returns:
        int64 `(B, k)`: item_idx, best first; equal scores go lower item_idx first. -1 pads a row
        only when fewer than k items are left after exclusion.

    Raises:
        ValueError: on a bad shape, k, exclude length, an excluded item_idx out of range, or NaN scores.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    n_users, n_items = scores.shape
    if not 0 <= k <= n_items:
        raise ValueError(f"k must be in [0, N={n_items}], got {k}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; rankings would depend on the sort implementation")
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude must hold one list per row: {len(exclude)} lists for {n_users} rows")
    # Stable descending sort keeps the index order among equal scores: lower item_idx first.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, N)
    if exclude is None:
        return order[:, :k].to(torch.int64)
    excluded = _exclusion_mask(exclude, n_items, scores.device)  # (B, N)
    excluded_sorted = excluded.gather(1, order)  # (B, N) in rank order
    # Second stable sort moves excluded items to the end, keeping everyone else's order.
    keep_first = torch.sort(excluded_sorted.to(torch.int8), dim=1, stable=True).indices  # (B, N)
    top = order.gather(1, keep_first)[:, :k]  # (B, k)
    top_excluded = excluded_sorted.gather(1, keep_first)[:, :k]  # (B, k)
    return torch.where(top_excluded, torch.full_like(top, -1), top).to(torch.int64)


def popularity_ranking(train_counts: np.ndarray | Tensor, k: int) -> np.ndarray:
    """Most popular items first (the popularity baseline's served list).

    Items with equal training counts follow a fixed order, lower item_idx first, independent of any
    target. Evaluation ranks a target with ``score_ranks(train_counts, targets)`` instead, which puts it
    after every item with the same count (pessimistic; module docstring, "Tie policy").

    Args:
        train_counts: int or float `(N,)`, interactions per item_idx in the training split.
        k: items to return (<= N).

    Returns:
        int64 `(k,)`: item_idx by count descending, ties by lower item_idx.

    Raises:
        ValueError: if train_counts is not 1-D or k is outside [0, N].
    """
    counts = _as_numpy(train_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_counts must be (N,), got shape {counts.shape}")
    if not 0 <= k <= counts.size:
        raise ValueError(f"k must be in [0, N={counts.size}], got {k}")
    return np.argsort(-counts.astype(np.float64), kind="stable")[:k].astype(np.int64)
