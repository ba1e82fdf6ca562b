"""Stage: eval. Full-catalogue HR@K / NDCG@K from ranked item lists (DESIGN.md §2).

Reads: ranked item_idx lists (beam search, score-based baselines, popularity) and one target per user.
Writes: nothing; returns ranks and a metrics dict that the eval stage saves as eval/metrics.json.

Dimension letters: B users, W ranked list length, N items. One target per user; NDCG = 1/log2(rank+1);
a repeated item in a list counts once (style bug-log B07/B15/B16); -1 marks padding.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["target_ranks", "hr_ndcg", "topk_from_scores", "popularity_ranking"]


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def target_ranks(ranked: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> np.ndarray:
    """1-based rank of each user's target among the DISTINCT items of their list.

    A repeated item keeps its first position and does not push later items down; -1 entries
    (padding) are skipped. So `[7, 7, 3]` with target 3 gives rank 2.

    Args:
        ranked: int `(B, W)`, item_idx best first, -1 = padding.
        targets: int `(B,)`, the held-out item_idx of each user (>= 0).

    Returns:
        int64 `(B,)`: rank in [1, W], or 0 when the target is not in the list.

    Raises:
        ValueError: on shape mismatch or a negative target.
    """
    ranked = _as_numpy(ranked).astype(np.int64, copy=False)
    targets = _as_numpy(targets).astype(np.int64, copy=False)
    if ranked.ndim != 2 or targets.ndim != 1 or ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"expected ranked (B, W) and targets (B,), got {ranked.shape} and {targets.shape}")
    if (targets < 0).any():
        raise ValueError(f"targets must be item_idx >= 0, got {int((targets < 0).sum())} negative")
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
    distinct_rank = np.cumsum(counted, axis=1)  # (B, W) rank of each counted entry
    hit = counted & (ranked == targets[:, None])  # (B, W) at most one True per row
    return np.where(hit.any(axis=1), distinct_rank[np.arange(n_users), hit.argmax(axis=1)], 0).astype(np.int64)


def hr_ndcg(ranks: np.ndarray | Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
    """Hit rate and NDCG at each cutoff, averaged over users (one target each).

    Args:
        ranks: int `(B,)`, from :func:`target_ranks`: 1-based rank, 0 = target not ranked.
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

    Args:
        scores: float `(B, N)`, higher is better; NaN is not allowed.
        k: items to return per row (<= N).
        exclude: optional per-row item_idx lists to leave out (e.g. the user's history for the
            `exclude_seen` option, DESIGN.md §2); `len(exclude) == B`.

    Returns:
        int64 `(B, k)`: item_idx, best first; equal scores go lower item_idx first. -1 pads a row
        only when fewer than k items are left after exclusion.

    Raises:
        ValueError: on a bad shape, k, exclude length, or NaN scores.
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
    excluded = torch.zeros(n_users, n_items, dtype=torch.bool, device=scores.device)
    for row, items in enumerate(exclude):
        if len(items):
            excluded[row, torch.as_tensor(items, dtype=torch.int64, device=scores.device)] = True
    excluded_sorted = excluded.gather(1, order)  # (B, N) in rank order
    # Second stable sort moves excluded items to the end, keeping everyone else's order.
    keep_first = torch.sort(excluded_sorted.to(torch.int8), dim=1, stable=True).indices  # (B, N)
    top = order.gather(1, keep_first)[:, :k]  # (B, k)
    top_excluded = excluded_sorted.gather(1, keep_first)[:, :k]  # (B, k)
    return torch.where(top_excluded, torch.full_like(top, -1), top).to(torch.int64)


def popularity_ranking(train_counts: np.ndarray | Tensor, k: int) -> np.ndarray:
    """Most popular items first (the popularity baseline).

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
