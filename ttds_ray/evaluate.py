"""Stage 'eval': full-catalogue HR@K / NDCG@K of TTDS, SASRec and popularity (DESIGN §2).

Reads ``data/``, ``cf/`` (SASRec), ``tokenizer/`` (ID tables) and ``llm/`` (adapter + tokenizer).
Writes ``eval/metrics.json`` (one block per model, each with ``n_users``) and ``eval/rankings.parquet``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TTDSConfig
from .data import Splits, history_for, train_item_counts
from .decoding import SIDTrie, beam_search
from .metrics import hr_ndcg, popularity_ranking, target_ranks, topk_from_scores
from .tasks import PromptPieces, build_eval_prompts, collate

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


def _block(ranked: np.ndarray, targets: np.ndarray, ks, histories, exclude_seen: bool) -> dict:
    if exclude_seen:
        ranked = _drop_seen(ranked, histories)
    return hr_ndcg(target_ranks(ranked, targets), ks=ks)


@dataclass
class TTDSRanker:
    """Generates top-W items for prompts with trie-constrained beam search (DESIGN §1.7)."""
    model: torch.nn.Module
    trie: SIDTrie
    pad_id: int
    n_beams: int
    max_length: int = 1024

    @torch.inference_mode()
    def rank(self, prompts: list[list[int]], batch_size: int, progress: bool = False) -> np.ndarray:
        """int64 ``(U, W)`` item_idx per prompt, best first (-1 pads)."""
        out = []
        it = range(0, len(prompts), batch_size)
        for start in tqdm(it, desc="beam search", disable=not progress, unit="batch"):
            batch = collate([{"input_ids": p} for p in prompts[start:start + batch_size]], self.pad_id,
                            self.max_length)
            res = beam_search(self.model, self.trie, batch["input_ids"], batch["attention_mask"],
                              n_beams=self.n_beams)
            out.append(res.item_idx.cpu().numpy())
        width = max(o.shape[1] for o in out)
        return np.concatenate([np.pad(o, ((0, 0), (0, width - o.shape[1])), constant_values=-1) for o in out])


def evaluate_popularity(splits: Splits, n_items: int, rows: np.ndarray, split: str, cfg: TTDSConfig) -> dict:
    """Popularity baseline: the training split's most frequent items, same list for everyone."""
    top = popularity_ranking(train_item_counts(splits, n_items), max(cfg.eval.ks) + 50)
    ranked = np.tile(top, (len(rows), 1))
    hist = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return _block(ranked, targets_of(splits, rows, split), cfg.eval.ks, hist, cfg.eval.exclude_seen)


def evaluate_sasrec(model, splits: Splits, rows: np.ndarray, split: str, cfg: TTDSConfig) -> dict:
    """SASRec full-catalogue scores over the last ``cf.max_len`` history items."""
    from .cf import score_users

    hist = eval_histories(splits, rows, split, cfg.cf.max_len)
    scores = torch.as_tensor(np.asarray(score_users(model, [h.tolist() for h in hist], cfg.cf.max_len)))
    ranked = np.asarray(topk_from_scores(scores, max(cfg.eval.ks) + 50))
    full = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return _block(ranked, targets_of(splits, rows, split), cfg.eval.ks, full, cfg.eval.exclude_seen)


def evaluate_ttds(ranker: TTDSRanker, splits: Splits, rows: np.ndarray, split: str, cfg: TTDSConfig,
                  item_tokens: np.ndarray, user_tokens: np.ndarray | None, pieces: PromptPieces,
                  progress: bool = False) -> tuple[dict, np.ndarray]:
    """TTDS metrics and the ranked lists ``(U, W)``."""
    hist = eval_histories(splits, rows, split, cfg.data.max_history)
    prompts = build_eval_prompts([h.tolist() for h in hist], item_tokens,
                                 None if user_tokens is None else user_tokens[splits.user_idx[rows]],
                                 pieces, cfg.tasks, max_history=cfg.data.max_history)
    ranked = ranker.rank(prompts, cfg.eval.batch_size, progress=progress)
    full = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    return _block(ranked, targets_of(splits, rows, split), cfg.eval.ks, full, cfg.eval.exclude_seen), ranked
