"""Dynamic semantic indexing (DESIGN §1.6): the rounds that re-index items while the LLM trains.

Pure torch/numpy (train.py runs it inside the LLM stage's Ray Train worker). One round:
(1) the frozen LLM scores ``dynamic.guide_samples`` seqrec targets of the training split (hidden state
and level-1 item-token distribution at the position that predicts the target's first code);
(2) the item tower is refined with its own loss plus the two recommender-guided terms
(towers.refine_item_tower); (3) items are re-indexed (unique IDs as in §1.3, or with a switching cost
and a cap when ``dynamic.reindex=sticky``: towers.sticky_item_sids) and the number of items whose ID
changed is counted; with ``dynamic.accept=llm`` (4) only the moves the frozen LLM itself finds more likely are
made (:func:`likelihood_gate`). The LLM segments between rounds are trained by the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import llm, towers
from .config import DynamicConfig, TokenizerConfig
from .tasks import item_phs, prefix_row


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


def _id_row(u: int, j: int, prefix_off: np.ndarray | None) -> int:
    """Row of the user-ID table a prompt for user u's target at position j uses: u (the stored ID), or with
    ``prefix_off`` (:func:`ttds_ray.tasks.prefix_user_rows`) the ID of the items before j."""
    return u if prefix_off is None else prefix_row(prefix_off, u, j)


def guidance_prompts(train_seqs: list[list[int]], n: int, *, max_history: int, seed: int,
                     prefix_off: np.ndarray | None = None) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Sample ``n`` (user, target position) pairs from the training split only.

    Args:
        train_seqs: U lists of training item_idx (chronological).
        prefix_off: with ``tasks.seqrec_user_ids=prefix``, :func:`ttds_ray.tasks.prefix_user_rows`; the returned
            rows then name each prompt's per-prefix user ID (the items before the target), as in training.

    Returns:
        ``(user_rows (M,), histories (M lists, ≤ max_history items before the target), targets (M,))``
        with M ≤ n (users with ≥ 2 training items; positions j ≥ 1 drawn uniformly).
    """
    rng = np.random.default_rng(seed)
    users = np.array([u for u, s in enumerate(train_seqs) if len(s) >= 2])
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=np.int64)
    pick = rng.choice(users, size=n, replace=len(users) < n)
    hist, tgt, rows = [], [], []
    for u in pick:
        s = train_seqs[u]
        j = int(rng.integers(1, len(s)))
        hist.append(list(s[max(0, j - max_history):j]))
        tgt.append(s[j])
        rows.append(_id_row(int(u), j, prefix_off))
    return np.asarray(rows, dtype=np.int64), hist, np.asarray(tgt, dtype=np.int64)


def target_contexts(train_seqs: list[list[int]], items: np.ndarray, per_item: int, *, max_history: int, seed: int,
                    prefix_off: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Up to ``per_item`` training contexts of each item: (user, position j >= 1) with the item at j, drawn
    uniformly without replacement (seeded) from all its occurrences in the training split.

    Args:
        train_seqs: U lists of training item_idx (chronological).
        items: int ``(n,)`` item_idx to find contexts for.
        prefix_off: as in :func:`guidance_prompts` (user rows of per-prefix IDs).

    Returns:
        ``(item_pos (R,), user_rows (R,), histories (R lists, the <= max_history items before the target))``:
        ``item_pos`` indexes ``items``; items never seen after a first interaction get no row.

    Raises:
        ValueError: ``per_item`` or ``max_history`` < 1.
    """
    if per_item < 1 or max_history < 1:
        raise ValueError(f"per_item and max_history must be >= 1; got {per_item}, {max_history}")
    where = {int(i): k for k, i in enumerate(np.asarray(items).tolist())}
    occ: list[list[tuple[int, int]]] = [[] for _ in where]
    for u, s in enumerate(train_seqs):
        for j in range(1, len(s)):
            k = where.get(int(s[j]))
            if k is not None:
                occ[k].append((u, j))
    rng = np.random.default_rng(seed)
    pos, users, hist = [], [], []
    for k, o in enumerate(occ):
        for t in (rng.choice(len(o), size=per_item, replace=False) if len(o) > per_item else range(len(o))):
            u, j = o[int(t)]
            pos.append(k)
            users.append(_id_row(u, j, prefix_off))
            hist.append(list(train_seqs[u][max(0, j - max_history):j]))
    return np.asarray(pos, dtype=np.int64), np.asarray(users, dtype=np.int64), hist


def accept_moves(old: np.ndarray, proposed: np.ndarray, accepted: np.ndarray) -> tuple[np.ndarray, int]:
    """Apply only the accepted moves of a re-index and keep the ID table unique.

    An accepted item takes its proposed ID, every other item keeps its old one. A proposed ID can still be held
    by an item whose own move was not accepted (IDs swap and chain in a fresh re-index); such an accepted item
    is reverted too, repeatedly, until the table is unique (it terminates: each pass reverts at least one item,
    and with no accepted move the table is ``old``).

    Args:
        old / proposed: int ``(N, L)`` unique ID tables before and after the round.
        accepted: bool ``(N,)``; rows where ``old == proposed`` are moves of nothing and may be either.

    Returns:
        ``(codes (N, L) unique, reverted)``: ``reverted`` = accepted movers put back to their old ID.

    Raises:
        ValueError: shapes differ or either table repeats an ID.
    """
    old, proposed = np.asarray(old, dtype=np.int64), np.asarray(proposed, dtype=np.int64)
    if old.shape != proposed.shape or old.ndim != 2 or np.shape(accepted) != (len(old),):
        raise ValueError(f"old {old.shape}, proposed {proposed.shape} and accepted {np.shape(accepted)} do not match")
    for name, t in (("old", old), ("proposed", proposed)):
        if len(np.unique(t, axis=0)) != len(t):
            raise ValueError(f"the {name} ID table repeats a semantic ID")
    live = np.asarray(accepted, dtype=bool) & (old != proposed).any(1)
    codes, reverted = np.where(live[:, None], proposed, old), 0
    while True:
        _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        clash = live & (counts[inv.reshape(-1)] > 1)
        if not clash.any():
            return codes, reverted
        codes[clash], live[clash] = old[clash], False
        reverted += int(clash.sum())


def moved_items(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """int64 ``(M,)`` indices of the items whose ID differs between the ``(N, L)`` tables ``old`` and ``new``."""
    return np.flatnonzero((np.asarray(old) != np.asarray(new)).any(1)).astype(np.int64)


def rewarm_batches(ids: np.ndarray, resp: np.ndarray, moved: np.ndarray, *, steps: int, batch_size: int,
                   seed: int) -> tuple[np.ndarray, int]:
    """Row batches for re-warming after a round (``dynamic.rewarm_steps``, docs/DESIGN-NOTES.md 'Re-warming
    moved items'): ``steps`` batches of ``batch_size`` rows drawn (seeded, without replacement within a batch
    where the pool allows) from the epoch's samples with one of the ``moved`` items (``tasks.item_phs``) among
    their loss-bearing elements: the samples that train the LLM to generate a moved item's new ID (seqrec targets,
    item2id, user2items, co-interaction). Prompts are not matched: nearly every history holds some moved item
    after a plain round, so the pool would be the whole epoch. Every worker must run the same number of steps
    (DDP), so a worker whose shard holds no such sample draws from all its rows instead.

    Args:
        ids / resp: object arrays ``(R,)`` of per-sample element lists (the epoch's ``ids`` column: token ids and
            placeholders) and their 0/1 loss masks (``resp``, same lengths; ``tasks._sample``).
        moved: int ``(M,)`` item indices the round moved (:func:`moved_items`).

    Returns:
        int64 ``(steps, min(batch_size, pool))`` row indices, and the pool size (rows carrying a moved item).
    """
    if steps <= 0 or len(ids) == 0:
        return np.zeros((0, 0), dtype=np.int64), 0
    ph = item_phs(moved)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in ids])
    mask = np.concatenate([np.asarray(x, dtype=bool).ravel() for x in resp])
    if len(mask) != len(flat):
        raise ValueError(f"rewarm_batches: the loss masks hold {len(mask)} elements, the samples {len(flat)}")
    carries = np.zeros(len(ids), dtype=bool)           # (R,) a loss-bearing element is a moved item's placeholder
    carries[np.repeat(np.arange(len(ids)), lens)[np.isin(flat, ph) & mask]] = True
    pool = np.flatnonzero(carries)
    n_pool = len(pool)
    if n_pool == 0:
        pool = np.arange(len(ids))
    rng = np.random.default_rng([seed, 8111])
    k = min(batch_size, len(pool))
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(steps)]).astype(np.int64), n_pool


def moved_only_loss(ids: np.ndarray, resp: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """The 0/1 loss mask ``resp`` of one sample ``(E,)`` kept only on the elements of ``ids`` ``(E,)`` that are a
    ``moved`` item's placeholder: a re-warming step (``dynamic.rewarm_steps``) trains the new IDs of the moved
    items and nothing else (the prompt and the other items stay as context)."""
    ph = item_phs(moved)
    return (np.asarray(resp, dtype=bool) & np.isin(np.asarray(ids, dtype=np.int64), ph)).astype(np.int8)


@dataclass
class GateInputs:
    """What the likelihood gate (``dynamic.accept=llm``) reads from the LLM stage.

    Attributes:
        train_seqs: U lists of training item_idx (the contexts are drawn from them only).
        render: ``(histories, user_rows) -> prompts``: seqrec prompts with the index as it is before the round
            (``tasks.build_eval_prompts``), each ending right before the target's first ID token.
        item_token_ids: int64 ``(L, K)`` vocab id of item token (level l, code k).
        sid_ids: the SID softmax's vocab ids (``llm.loss_vocab=sid``), or None for the full vocabulary.
        max_history: items of history per context (``data.max_history``).
        prefix_off: per-prefix user-ID rows (:func:`guidance_prompts`), or None for the stored IDs.
    """
    train_seqs: list[list[int]]
    render: Callable[[list[list[int]], np.ndarray], list[list[int]]]
    item_token_ids: torch.Tensor
    sid_ids: torch.Tensor | None
    max_history: int
    prefix_off: np.ndarray | None = None


def likelihood_gate(model: nn.Module, old: np.ndarray, proposed: np.ndarray, gate: GateInputs, *, pad_id: int,
                    contexts: int, margin: float, seed: int) -> tuple[np.ndarray, dict]:
    """Keep a proposed move only where the frozen LLM already prefers the new ID (docs/DESIGN-NOTES.md,
    'Likelihood-gated re-indexing'; issue 13: "an item moves only when the objective improves by a margin").

    For each item whose ID the round would change, ``contexts`` of its training contexts (history -> item) are
    scored teacher-forced under the old and the new ID (:func:`ttds_ray.llm.code_logprobs`); the item moves when
    the mean gain ``log p(new | h) - log p(old | h)`` exceeds ``margin`` nats, so a round does not raise the LLM's
    loss on the moved items' targets (their appearances inside histories are not scored). Items without a
    training context keep their ID. Conflicts are resolved by :func:`accept_moves`.

    Args:
        old / proposed: int ``(N, L)`` unique ID tables before the round and as the re-index proposes.

    Returns:
        ``(codes (N, L), stats)``; stats: ``proposed`` (items the re-index would move), ``scored`` (of those, with a
        context), ``accepted`` (gain > margin), ``reverted`` (accepted but put back by a conflict), ``gain_mean``
        / ``gain_accepted_mean`` (nats per context), ``gate_wall_s``.
    """
    t0 = time.time()
    movers = np.flatnonzero((old != proposed).any(1))
    pos, users, hist = target_contexts(gate.train_seqs, movers, contexts, max_history=gate.max_history, seed=seed,
                                       prefix_off=gate.prefix_off)
    gain = np.full(len(movers), np.nan)
    if len(pos):
        prompts = gate.render(hist, users)
        ids = gate.item_token_ids.numpy()
        lv = np.arange(ids.shape[0])[None, :]
        lp = llm.code_logprobs(model, prompts, np.stack([ids[lv, t[movers[pos]]] for t in (old, proposed)]), pad_id,
                               sid_ids=gate.sid_ids).numpy()                            # (2, contexts)
        n = np.bincount(pos, minlength=len(movers))
        seen = n > 0
        gain[seen] = np.bincount(pos, weights=lp[1] - lp[0], minlength=len(movers))[seen] / n[seen]
    accepted = np.zeros(len(old), dtype=bool)
    accepted[movers] = np.nan_to_num(gain, nan=-np.inf) > margin
    codes, reverted = accept_moves(old, proposed, accepted)
    finite = gain[np.isfinite(gain)]
    ok = gain[np.nan_to_num(gain, nan=-np.inf) > margin]
    return codes, {"proposed": int(len(movers)), "scored": int(len(finite)), "accepted": int(accepted.sum()),
                   "reverted": reverted, "gain_mean": float(finite.mean()) if len(finite) else None,
                   "gain_accepted_mean": float(ok.mean()) if len(ok) else None,
                   "gate_wall_s": round(time.time() - t0, 1)}


@torch.no_grad()
def llm_item_ids(model: nn.Module, old: np.ndarray, gate: GateInputs, *, pad_id: int, contexts: int, seed: int
                 ) -> tuple[np.ndarray, dict]:
    """IDs proposed by the frozen LLM itself (``dynamic.reindex=llm``, docs/DESIGN-NOTES.md, 'Likelihood-gated
    re-indexing'): for every item with a training context, level by level, the code with the highest mean
    log-probability over up to ``contexts`` of its contexts given the codes chosen above it (greedy, one LM pass
    per level and context, the softmax over that level's K tokens). At the last level only IDs no other item holds
    are allowed (every old ID stays reserved for its item this round), taken in item order, so the table stays
    unique; an item without a free last-level code under its chosen prefix, or without a context, keeps its ID.

    Args:
        old: int ``(N, L)`` unique ID table before the round.

    Returns:
        ``(proposed (N, L) unique, stats)``; stats: ``scored`` (items with a context), ``kept_full_prefix``,
        ``propose_wall_s``. :func:`likelihood_gate` then keeps only the moves that raise the exact likelihood.
    """
    t0 = time.time()
    old = np.asarray(old, dtype=np.int64)
    n, n_levels = old.shape
    ids = torch.as_tensor(gate.item_token_ids)                               # (L, K)
    pos, users, hist = target_contexts(gate.train_seqs, np.arange(n), contexts, max_history=gate.max_history,
                                       seed=seed, prefix_off=gate.prefix_off)
    proposed = old.copy()
    if not len(pos):
        return proposed, {"scored": 0, "kept_full_prefix": 0, "propose_wall_s": round(time.time() - t0, 1)}
    prompts = gate.render(hist, users)
    items = np.unique(pos)
    count = np.bincount(pos, minlength=n)[items]                            # contexts per scored item
    chosen = np.zeros((n, n_levels), dtype=np.int64)
    for lvl in range(n_levels):
        prefix = ids[torch.arange(lvl)[None, :], torch.as_tensor(chosen[pos, :lvl])].tolist() if lvl else None
        ext = [p + prefix[r] for r, p in enumerate(prompts)] if lvl else prompts
        _, probs = llm.llm_guidance(model, ext, pad_id, ids[lvl])          # (R, K)
        logp = probs.clamp_min(1e-30).log().numpy()
        mean = np.stack([np.bincount(pos, weights=logp[:, k], minlength=n) for k in range(logp.shape[1])], 1)
        mean = mean[items] / count[:, None]                                 # (n_scored, K)
        if lvl < n_levels - 1:
            chosen[items, lvl] = mean.argmax(1)
            continue
        taken = {tuple(r) for r in old.tolist()}
        kept_full = 0
        for row, i in enumerate(items.tolist()):
            pre = tuple(int(x) for x in chosen[i, :-1])
            own = tuple(int(x) for x in old[i])
            pick = next((int(k) for k in np.argsort(-mean[row], kind="stable")
                         if pre + (int(k),) not in taken or pre + (int(k),) == own), None)
            if pick is None:
                kept_full += 1
                continue
            proposed[i] = [*pre, pick]
            if tuple(proposed[i].tolist()) != own:
                taken.add(tuple(int(x) for x in proposed[i]))
    assert len(np.unique(proposed, axis=0)) == n, "LLM-proposed IDs are not unique"
    return proposed, {"scored": int(len(items)), "kept_full_prefix": kept_full,
                      "propose_wall_s": round(time.time() - t0, 1)}


@dataclass
class RoundResult:
    """Outcome of one re-indexing round."""
    tower: towers.Tower
    table: towers.SIDTable
    stats: dict


def run_round(model: nn.Module, tower: towers.Tower, table: towers.SIDTable, *, prompts: list[list[int]],
              targets: np.ndarray, pad_id: int, level1_token_ids: torch.Tensor, item_s: np.ndarray,
              item_c: np.ndarray, tok_cfg: TokenizerConfig, dyn_cfg: DynamicConfig, seed: int,
              item_names: list[str] | None = None, gate: GateInputs | None = None) -> RoundResult:
    """One tokenizer step + re-index with the LLM frozen (DESIGN §1.6 steps 1–2).

    Args:
        model: the recommender LM (not modified; run in eval mode, no grad).
        tower / table: the current item tower and item ID table ``(N, L)``.
        prompts: M rendered seqrec prompts ending right before each target's first SID token.
        targets: int64 ``(M,)`` item_idx of the targets.
        level1_token_ids: int64 ``(K,)`` vocab ids of ``<i1_k>``.
        item_s / item_c: float32 ``(N, D_s)`` / ``(N, D_c)`` tower inputs.
        gate: required when ``dyn_cfg.accept == 'llm'`` (:func:`likelihood_gate`). With ``dyn_cfg.accept ==
            'guided'`` only items among ``targets`` may change ID (:func:`accept_moves`).

    Returns:
        The refined tower, the new unique ID table, and stats: ``changed`` (items whose ID changed),
        collision counts, guided terms, wall seconds, and the gate's stats under ``gate`` (``accept='llm'``) or
        ``guided`` (``accept='guided'``: guided items, proposed moves, proposed moves of guided items, reverted).

    Raises:
        CollisionError: re-indexing cannot give unique IDs (names the prefix).
        ValueError: ``dyn_cfg.accept == 'llm'`` without ``gate``.
    """
    if dyn_cfg.accept == "llm" and gate is None:
        raise ValueError("dynamic.accept=llm needs the gate's inputs (run_round(..., gate=GateInputs(...)))")
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
    if dyn_cfg.reindex == "llm":
        codes, propose_stats = llm_item_ids(model, table.codes, gate, pad_id=pad_id, contexts=dyn_cfg.accept_contexts,
                                            seed=seed + 7919)
        new_table, stats = towers.SIDTable(codes, table.codebook_size), propose_stats
    elif dyn_cfg.reindex == "sticky":
        new_table, stats = towers.sticky_item_sids(new_tower, item_s, item_c, table.codes,
                                                   margin=dyn_cfg.switch_margin, max_changed=dyn_cfg.max_changed,
                                                   keep_levels=dyn_cfg.keep_levels)
    else:
        new_table, stats = towers.export_item_sids(new_tower, item_s, item_c, tok_cfg, item_names=item_names)
    gate_stats = guided_stats = None
    if dyn_cfg.accept == "llm":
        codes, gate_stats = likelihood_gate(model, table.codes, new_table.codes, gate, pad_id=pad_id,
                                            contexts=dyn_cfg.accept_contexts, margin=dyn_cfg.accept_margin, seed=seed)
        new_table = towers.SIDTable(codes, new_table.codebook_size)
    elif dyn_cfg.accept == "guided":
        guided = np.zeros(len(table.codes), dtype=bool)
        guided[np.asarray(targets, dtype=np.int64)] = True
        codes, reverted = accept_moves(table.codes, new_table.codes, guided)
        guided_stats = {"guided_items": int(guided.sum()),
                        "proposed": towers.count_changed(table.codes, new_table.codes),
                        "proposed_guided": int((guided & (table.codes != new_table.codes).any(1)).sum()),
                        "reverted": reverted}
        new_table = towers.SIDTable(codes, new_table.codebook_size)
    stats = {"changed": towers.count_changed(table.codes, new_table.codes),
             "changed_per_level": (table.codes != new_table.codes).sum(0).tolist(), "n_items": len(new_table.codes),
             "guide_examples": len(prompts), "terms": terms, "guide_wall_s": round(t_guide, 1),
             "wall_s": round(time.time() - t0, 1),
             **{k: stats[k] for k in ("collisions_greedy", "collisions_sinkhorn", "collisions_final", "wanted",
                                      "capped", "kept_full_prefix", "propose_wall_s") if k in stats},
             **({"gate": gate_stats} if gate_stats else {}), **({"guided": guided_stats} if guided_stats else {})}
    return RoundResult(new_tower, new_table, stats)
