"""Stage 'eval': full-catalogue HR@K / NDCG@K of TTDS, SASRec and popularity (DESIGN §2). No Ray import.

Reads ``data/``, ``cf/`` (SASRec), ``tokenizer/`` (ID tables) and ``llm/`` (adapter + tokenizer).
Writes ``eval/metrics.json`` (one block per model, each with ``n_users``) and ``eval/rankings.parquet``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TTDSConfig
from .data import Splits, history_for, train_item_counts
from .decoding import SIDTrie, beam_search
from .metrics import hr_ndcg, score_ranks, target_ranks
from .tasks import collate

log = logging.getLogger(__name__)


def select_eval_users(n_users: int, max_users: int | None, seed: int) -> np.ndarray:
    """Row indices of the evaluated users: all, or a seeded sample of ``max_users`` (sorted)."""
    if max_users is None or max_users >= n_users:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, size=max_users, replace=False))


def eval_histories(splits: Splits, rows: np.ndarray, split: str, max_history: int) -> list[np.ndarray]:
    """Histories (before the target) of the selected users for ``split`` ('valid' or 'test')."""
    return [history_for(splits, split, int(splits.user_idx[r]), max_history=max_history) for r in rows]


def targets_of(splits: Splits, rows: np.ndarray, split: str) -> np.ndarray:
    return (splits.test_target if split == "test" else splits.valid_target)[rows]


def _drop_seen(ranked: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    out = ranked.copy()
    for i, h in enumerate(histories):
        out[i, np.isin(out[i], h)] = -1
    return out


def _block(ranked: np.ndarray, targets: np.ndarray, ks, histories, exclude_seen: bool,
           scores: np.ndarray | None = None) -> dict:
    """HR/NDCG of ranked lists; with ``scores`` a tie is resolved against the target (``metrics.target_ranks``)."""
    if exclude_seen:
        ranked = _drop_seen(ranked, histories)
    return hr_ndcg(target_ranks(ranked, targets, scores=scores), ks=ks)


@dataclass
class TTDSRanker:
    """Generates top-W items for prompts with trie-constrained beam search (DESIGN §1.7)."""
    model: torch.nn.Module
    trie: SIDTrie
    pad_id: int
    n_beams: int
    max_length: int = 1024
    prior_beta: float = 0.0       # eval.popularity_correction (decoding.beam_search)

    @torch.inference_mode()
    def rank_with_scores(self, prompts: list[list[int]], batch_size: int, progress: bool = False,
                         exclude: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(item_idx int64 (U, W), scores float32 (U, W))`` per prompt, best first; -1 / -inf pad.
        Prompts are token-id lists; the beam search runs on the model's device. ``exclude``: per prompt, item
        rows masked in the trie for it (``decoding.beam_search``)."""
        idx_out, sc_out = [], []
        it = range(0, len(prompts), batch_size)
        for start in tqdm(it, desc="beam search", disable=not progress, unit="batch"):
            batch = collate([{"input_ids": p} for p in prompts[start:start + batch_size]], self.pad_id,
                            self.max_length)
            res = beam_search(self.model, self.trie, batch["input_ids"], batch["attention_mask"],
                              n_beams=self.n_beams, prior_beta=self.prior_beta,
                              exclude=None if exclude is None else exclude[start:start + batch_size])
            idx_out.append(res.item_idx.cpu().numpy())
            sc_out.append(res.scores.float().cpu().numpy())
        if not idx_out:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
        w = max(o.shape[1] for o in idx_out)
        return (np.concatenate([np.pad(o, ((0, 0), (0, w - o.shape[1])), constant_values=-1) for o in idx_out]),
                np.concatenate([np.pad(o, ((0, 0), (0, w - o.shape[1])), constant_values=-np.inf) for o in sc_out]))

    def rank(self, prompts: list[list[int]], batch_size: int, progress: bool = False) -> np.ndarray:
        """int64 ``(U, W)`` item_idx per prompt, best first (-1 pads)."""
        return self.rank_with_scores(prompts, batch_size, progress)[0]


def evaluate_popularity(splits: Splits, n_items: int, rows: np.ndarray, split: str, cfg: TTDSConfig) -> dict:
    """Popularity baseline: items ranked by training-split count over the full catalogue; an item with the
    target's count ranks above it (``metrics.score_ranks``, the tie policy of docs/DESIGN-NOTES.md)."""
    hist = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return hr_ndcg(score_ranks(train_item_counts(splits, n_items), targets_of(splits, rows, split), exclude=hist),
                   ks=cfg.eval.ks)


def evaluate_sasrec(model, splits: Splits, rows: np.ndarray, split: str, cfg: TTDSConfig) -> dict:
    """SASRec full-catalogue scores over the last ``cf.max_len`` history items."""
    from .cf import score_users

    hist = eval_histories(splits, rows, split, cfg.cf.max_len)
    scores = torch.as_tensor(np.asarray(score_users(model, [h.tolist() for h in hist], cfg.cf.max_len)))
    full = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return hr_ndcg(score_ranks(scores, targets_of(splits, rows, split), exclude=full), ks=cfg.eval.ks)


#: ``rank(histories, user_codes) -> (item_idx int64 (U, W), scores float32 (U, W))``: ranks users on several
#: workers (``train.RayBackend.rank``).
RankFn = Callable[[list[np.ndarray], "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


def evaluate_ttds(rec, splits: Splits, rows: np.ndarray, split: str, cfg: TTDSConfig,
                  progress: bool = False, rank: RankFn | None = None
                  ) -> tuple[dict, np.ndarray, np.ndarray]:
    """TTDS metrics, the ranked lists ``(U, W)`` and their beam scores float32 ``(U, W)`` (-inf pad) through
    :meth:`Recommender.rank` (the serving path), in this process or through ``rank`` (the same method on several
    workers).

    Raises:
        RuntimeError: ``rank`` returned another number of rows than users asked (every user counts once).
    """
    hist = eval_histories(splits, rows, split, cfg.data.max_history)
    user_codes = rec.known_user_codes(rows, split) if cfg.tasks.use_user_sid else None   # per eval.user_ids
    if rank is None:
        ranked, scores = rec.rank(hist, user_codes, n_beams=cfg.eval.n_beams, progress=progress)
    else:
        ranked, scores = rank(hist, user_codes)
        if len(ranked) != len(rows):
            raise RuntimeError(f"distributed ranking returned {len(ranked)} rows for {len(rows)} users")
    full = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return _block(ranked, targets_of(splits, rows, split), cfg.eval.ks, full, cfg.eval.exclude_seen,
                  scores=scores), ranked, scores


def evaluate_split(cfg: TTDSConfig, run, split: str = "test", *, max_users: int | None = None,
                   progress: bool = True, device: str | torch.device | None = None, rank: RankFn | None = None
                   ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """TTDS (trie beam search over the final item index, via :class:`~ttds_ray.recommender.Recommender`),
    SASRec and popularity on ``split`` of a run (DESIGN §2). Imports no Ray.

    Args:
        run: a :class:`~ttds_ray.artifacts.RunDir` with finished data, cf, tokenizer and llm stages.
        split: 'test' (reported results) or 'valid' (model selection: history = training items,
            target = the second-last item).
        max_users: seeded user sample (default ``eval.max_users``).
        device: default the GPU when ``ray.use_gpu`` and CUDA is available, else the CPU.
        rank: rank the TTDS users elsewhere (several Ray workers: ``train.RayBackend.rank``); default in-process.

    Returns:
        ``(metrics, rows, ranked, scores)``: the metrics dict, evaluated user rows ``(U,)``, TTDS rankings
        ``(U, W)`` and their beam scores float32 ``(U, W)`` (sum of log-probabilities of the ID tokens; -inf pad).

    Raises:
        ConfigError: bad split. StageMissing / ArtifactError: a stage or artifact is missing.
    """
    import time

    from .cf import load_sasrec
    from .data import Prepared, split_leave_one_out
    from .errors import ConfigError
    from .recommender import Recommender

    if split not in ("valid", "test"):
        raise ConfigError(f"split must be 'valid' or 'test', got {split!r}")
    if cfg.ray.torch_threads:
        torch.set_num_threads(cfg.ray.torch_threads)
    if device is None:
        device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
    t0 = time.time()
    prepared = Prepared.load(run.require("data"))
    splits = split_leave_one_out(prepared.sequences)
    n_items = len(prepared.items)
    max_users = cfg.eval.max_users if max_users is None else max_users
    rows = select_eval_users(len(splits), max_users, cfg.seed)
    rec = Recommender(cfg, run, device)
    ttds_m, ranked, scores = evaluate_ttds(rec, splits, rows, split, cfg, progress=progress, rank=rank)
    metrics = {
        "split": split, "protocol": "leave-one-out, full catalogue, nothing excluded"
        if not cfg.eval.exclude_seen else "leave-one-out, full catalogue, exclude_seen",
        "n_items": n_items, "n_users_total": len(splits), "n_users_evaluated": len(rows),
        "max_users": max_users, "n_beams": cfg.eval.n_beams, "backbone": cfg.llm.backbone,
        "static_index": cfg.dynamic.is_static,
        "models": {"TTDS": ttds_m, "SASRec": evaluate_sasrec(load_sasrec(run.require("cf")), splits, rows, split, cfg),
                   "Popularity": evaluate_popularity(splits, n_items, rows, split, cfg)},
    }
    metrics["eval_wall_s"] = round(time.time() - t0, 1)
    return metrics, rows, ranked, scores
