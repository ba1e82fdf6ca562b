"""Dynamic semantic indexing (DESIGN §1.6): the rounds that re-index items while the LLM trains.

Pure torch/numpy (train.py runs it inside the LLM stage's Ray Train worker). One round:
(1) the frozen LLM scores ``dynamic.guide_samples`` seqrec targets of the training split (hidden state
and level-1 item-token distribution at the position that predicts the target's first code);
(2) the item tower is refined with its own loss plus the two recommender-guided terms
(towers.refine_item_tower); (3) items are re-indexed (unique IDs as in §1.3, or with a switching cost
and a cap when ``dynamic.reindex=sticky``: towers.sticky_item_sids) and the number of items whose ID
changed is counted. The LLM segments between rounds are trained by the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import llm, towers
from .config import DynamicConfig, TokenizerConfig


def reindex_steps(total_steps: int, cfg: DynamicConfig) -> list[int]:
    """Optimiser steps after which a round runs: ``r·(1−final_freeze)·T/R`` for r = 1..R.

    Empty when the index is static (``dynamic.static_index`` or ``rounds == 0``), so static and dynamic
    runs share the LLM budget T exactly. Steps are distinct and in ``[1, T)``.
    """
    if cfg.is_static or total_steps < 2:
        return []
    span = (1.0 - cfg.final_freeze) * total_steps
    steps = sorted({min(total_steps - 1, max(1, round(r * span / cfg.rounds))) for r in range(1, cfg.rounds + 1)})
    return steps


def guidance_prompts(train_seqs: list[list[int]], n: int, *, max_history: int, seed: int
                     ) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Sample ``n`` (user, target position) pairs from the training split only.

    Args:
        train_seqs: U lists of training item_idx (chronological).

    Returns:
        ``(user_rows (M,), histories (M lists, ≤ max_history items before the target), targets (M,))``
        with M ≤ n (users with ≥ 2 training items; positions j ≥ 1 drawn uniformly).
    """
    rng = np.random.default_rng(seed)
    users = np.array([u for u, s in enumerate(train_seqs) if len(s) >= 2])
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=np.int64)
    pick = rng.choice(users, size=n, replace=len(users) < n)
    hist, tgt = [], []
    for u in pick:
        s = train_seqs[u]
        j = int(rng.integers(1, len(s)))
        hist.append(list(s[max(0, j - max_history):j]))
        tgt.append(s[j])
    return pick.astype(np.int64), hist, np.asarray(tgt, dtype=np.int64)


@dataclass
class RoundResult:
    """Outcome of one re-indexing round."""
    tower: towers.Tower
    table: towers.SIDTable
    stats: dict


def run_round(model: nn.Module, tower: towers.Tower, table: towers.SIDTable, *, prompts: list[list[int]],
              targets: np.ndarray, pad_id: int, level1_token_ids: torch.Tensor, item_s: np.ndarray,
              item_c: np.ndarray, tok_cfg: TokenizerConfig, dyn_cfg: DynamicConfig, seed: int,
              item_names: list[str] | None = None) -> RoundResult:
    """One tokenizer step + re-index with the LLM frozen (DESIGN §1.6 steps 1–2).

    Args:
        model: the recommender LM (not modified; run in eval mode, no grad).
        tower / table: the current item tower and item ID table ``(N, L)``.
        prompts: M rendered seqrec prompts ending right before each target's first SID token.
        targets: int64 ``(M,)`` item_idx of the targets.
        level1_token_ids: int64 ``(K,)`` vocab ids of ``<i1_k>``.
        item_s / item_c: float32 ``(N, D_s)`` / ``(N, D_c)`` tower inputs.

    Returns:
        The refined tower, the new unique ID table, and stats: ``changed`` (items whose ID changed),
        collision counts, guided terms, wall seconds.

    Raises:
        CollisionError: re-indexing cannot give unique IDs (names the prefix).
    """
    t0 = time.time()
    was_training = model.training
    hidden, p1 = llm.llm_guidance(model, prompts, pad_id, level1_token_ids)
    model.train(was_training)
    guide = towers.Guidance(target_idx=np.asarray(targets, dtype=np.int64), hidden=hidden.numpy(),
                            p_level1=p1.numpy())
    t_guide = time.time() - t0
    new_tower, _, terms = towers.refine_item_tower(
        tower, tok_cfg, item_s, item_c, guide, epochs=dyn_cfg.tokenizer_epochs, lr=dyn_cfg.tokenizer_lr,
        gamma_kl=dyn_cfg.gamma_kl, gamma_nce=dyn_cfg.gamma_nce, tau=dyn_cfg.tau, seed=seed)
    if dyn_cfg.reindex == "sticky":
        new_table, stats = towers.sticky_item_sids(new_tower, item_s, item_c, table.codes,
                                                   margin=dyn_cfg.switch_margin, max_changed=dyn_cfg.max_changed)
    else:
        new_table, stats = towers.export_item_sids(new_tower, item_s, item_c, tok_cfg, item_names=item_names)
    stats = {"changed": towers.count_changed(table.codes, new_table.codes),
             "changed_per_level": (table.codes != new_table.codes).sum(0).tolist(), "n_items": len(new_table.codes),
             "guide_examples": len(prompts), "terms": terms, "guide_wall_s": round(t_guide, 1),
             "wall_s": round(time.time() - t0, 1),
             **{k: stats[k] for k in ("collisions_greedy", "collisions_sinkhorn", "collisions_final", "wanted",
                                      "capped", "kept_full_prefix") if k in stats}}
    return RoundResult(new_tower, new_table, stats)
