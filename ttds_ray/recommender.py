"""One loaded TTDS model over a finished run directory: the single preprocessing + decoding path that
evaluation, batch scoring and serving share (DESIGN §1.7; docs/METHOD.md).

Reads ``<run>/config.yaml``, ``data/`` (item table, sequences), ``embeddings/item_text.npy``, ``cf/``
(SASRec, for the user tower's collaborative input), ``tokenizer/`` (user tower, user semantic IDs) and
``llm/`` (backbone + adapter, tokenizer, the final item index). Writes nothing. Imports no Ray.

Example::

    from ttds_ray import Recommender
    rec = Recommender.from_run("runs/quickstart-ml100k")
    rec.recommend(user_ids=["196"], k=10)[0].item_ids
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import cf, data, embeddings, llm, tasks, towers
from .artifacts import Files, RunDir
from .config import TTDSConfig, load_config
from .decoding import SIDTrie
from .evaluate import TTDSRanker
from .errors import ArtifactError, ConfigError, UnknownIdError
from .sids import SIDTable, SIDVocab, sid_vocab_from_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """Ranked items for one request, best first.

    Attributes:
        item_ids: raw item ids (as in the dataset), ``len <= k``.
        scores: float32 ``(len(item_ids),)``, summed log-probabilities (nats) of each item's semantic-ID
            tokens under the LLM; higher is better.
        semantic_ids: the items' semantic-ID strings, e.g. ``'<i1_3><i2_17><i3_0>'``.
        user_semantic_id: the user's semantic-ID string used in the prompt (None if the run has no user IDs).
        truncated_history: True if the history was longer than ``data.max_history`` and only its most
            recent items were used.
    """
    item_ids: list[str]
    scores: np.ndarray
    semantic_ids: list[str]
    user_semantic_id: str | None
    truncated_history: bool = False
    item_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class Recommender:
    """Final item index, user tower, LLM + tokenizer and prefix trie of one run, loaded once.

    Build with :meth:`from_run`. Item and user ids are the dataset's raw ids (strings).

    Args:
        cfg: the run's resolved config; run: its :class:`RunDir`; device: torch device for the LLM,
            the user tower and the beam search.
    """

    def __init__(self, cfg: TTDSConfig, run: RunDir, device: str | torch.device = "cpu"):
        self.cfg, self.run, self.device = cfg, run, torch.device(device)
        self.prepared = data.Prepared.load(run.require("data"))
        self.splits = data.split_leave_one_out(self.prepared.sequences)
        self.model, self.tok, self.meta = llm.load_llm(run.require("llm"), cfg.llm)
        self.model.to(self.device).eval()
        tok_dir = run.require("tokenizer")
        self.user_table = SIDTable.load(tok_dir / Files.USER_SIDS)
        self.item_table = load_final_item_sids(run)
        self.vocab: SIDVocab = sid_vocab_from_tokenizer(self.tok, self.item_table.n_levels,
                                                        self.item_table.codebook_size, self.user_table.n_levels,
                                                        self.user_table.codebook_size)
        self.trie = SIDTrie(self.item_table.codes, self.vocab.item_token_ids).to(self.device)
        self.item_tokens = self.vocab.item_tokens(self.item_table.codes)        # (N, L) token ids
        self.user_tokens = self.vocab.user_tokens(self.user_table.codes)        # (U, L_u) token ids
        self.pieces = tasks.PromptPieces.build(self.tok)
        self.item_ids: list[str] = [str(i) for i in self.prepared.items["item_id"].tolist()]
        self.user_ids: list[str] = [str(u) for u in self.prepared.sequences["user_id"].tolist()]
        self._item_row = {i: n for n, i in enumerate(self.item_ids)}
        self._user_row = {u: n for n, u in enumerate(self.user_ids)}
        self._item_sid = self.item_table.sid_strings("i")
        self._user_sid = self.user_table.sid_strings("u")
        self._user_tower = None                                       # loaded on first raw history

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu",
                 cfg: TTDSConfig | None = None) -> "Recommender":
        """Load a finished run (its ``llm`` stage must be complete).

        Args:
            run_dir: ``<output_dir>/<name>``. device: 'cpu', 'cuda', 'cuda:1', ...
            cfg: the run's config; default: ``run_dir/config.yaml``.

        Raises:
            ArtifactError / StageMissing: a stage or artifact is missing; ConfigError: bad config.yaml.
        """
        run_dir = Path(run_dir)
        return cls(cfg if cfg is not None else load_run_config(run_dir), RunDir(run_dir), device)

    # ------------------------------------------------------------------ lookups

    def item(self, item_id: str) -> dict:
        """``{item_id, title, semantic_id, item_idx}`` of a catalogue item.

        Raises:
            UnknownIdError: the id is not in the catalogue.
        """
        row = self._item_rows([item_id])[0]
        return {"item_id": self.item_ids[row], "title": str(self.prepared.items["title"].iloc[row]),
                "semantic_id": self._item_sid[row], "item_idx": row}

    def _item_rows(self, ids: Sequence) -> list[int]:
        unknown = [i for i in ids if str(i) not in self._item_row]
        if unknown:
            raise UnknownIdError("item", unknown)
        return [self._item_row[str(i)] for i in ids]

    def _user_rows(self, ids: Sequence) -> list[int]:
        unknown = [u for u in ids if str(u) not in self._user_row]
        if unknown:
            raise UnknownIdError("user", unknown)
        return [self._user_row[str(u)] for u in ids]

    def user_history(self, user_id: str) -> np.ndarray:
        """A known user's whole logged history (item rows, oldest first): training + validation + test items."""
        r = self._user_rows([user_id])[0]
        return np.concatenate([self.splits.train_items[r], [self.splits.valid_target[r],
                                                            self.splits.test_target[r]]]).astype(np.int64)

    # ------------------------------------------------------------------ user tower

    def _user_codes(self, histories: list[np.ndarray]) -> np.ndarray:
        """User semantic IDs ``(B, L_u)`` from raw histories (item rows) through the user tower (DESIGN §1.2):
        semantic input = mean item text embedding, collaborative input = SASRec's last hidden state."""
        if self._user_tower is None:
            item_s = embeddings.load_npy(self.run.require("embeddings") / Files.ITEM_TEXT,
                                         rows=len(self.item_ids))
            sasrec = cf.load_sasrec(self.run.require("cf"))
            tower = towers.load_tower(self.run.require("tokenizer") / Files.USER_TOWER, item_s.shape[1],
                                      sasrec.hidden, self.cfg.tokenizer.user)
            self._user_tower = (item_s, sasrec, tower)
        item_s, sasrec, tower = self._user_tower
        s = towers.user_semantic_embeddings(item_s, [h.tolist() for h in histories])
        c = cf.encode_users(sasrec, [h.tolist() for h in histories], self.cfg.cf.max_len)
        codes, _ = towers.encode_codes(tower, s, c)
        return codes

    def user_semantic_id(self, history: Sequence[str]) -> str:
        """Semantic-ID string of a user given only a raw history (item ids, oldest first).

        Raises:
            UnknownIdError: items not in the catalogue. ValueError: empty history.
        """
        if len(history) == 0:
            raise ValueError("history is empty: give at least one item id")
        codes = self._user_codes([np.asarray(self._item_rows(list(history)), np.int64)])[0]
        return "".join(f"<u{l + 1}_{k}>" for l, k in enumerate(codes.tolist()))

    # ------------------------------------------------------------------ ranking

    @torch.inference_mode()
    def rank(self, histories: list[np.ndarray], user_codes: np.ndarray | None, *, n_beams: int,
             batch_size: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Trie-constrained beam search for prompts built from item-row histories (the eval + serve path).

        Args:
            histories: B int arrays of item rows, oldest first (cut to the last ``data.max_history``).
            user_codes: int ``(B, L_u)`` user semantic IDs, or None when ``tasks.use_user_sid`` is off.
            n_beams: beam width W (also the number of items returned, capped at the catalogue).

        Returns:
            ``(item_idx int64 (B, W'), scores float32 (B, W'))``, best first; -1 / -inf pad.
        """
        mh = self.cfg.data.max_history
        user_tok = None
        if self.cfg.tasks.use_user_sid and user_codes is not None:
            user_tok = self.vocab.user_tokens(np.asarray(user_codes))
        prompts = tasks.build_eval_prompts([np.asarray(h)[-mh:].tolist() for h in histories], self.item_tokens,
                                           user_tok, self.pieces, self.cfg.tasks, max_history=mh,
                                           max_length=self.cfg.llm.max_length)
        ranker = TTDSRanker(self.model, self.trie, self.tok.pad_token_id, n_beams, self.cfg.llm.max_length)
        return ranker.rank_with_scores(prompts, batch_size or self.cfg.eval.batch_size, progress=progress)

    def recommend(self, user_ids: Sequence[str] | None = None, histories: Sequence[Sequence[str]] | None = None,
                  k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        """Top-k items per request: give either known ``user_ids`` or raw ``histories`` (item ids, oldest first).

        A known user's prompt uses the whole logged history and the user's stored semantic ID; a raw
        history gets its user semantic ID from the user tower. Histories longer than ``data.max_history``
        keep the most recent items (``truncated_history``). With ``exclude_seen`` the beam is widened to
        ``max(eval.n_beams, k + |seen|)`` (capped at the catalogue) so that k unseen items come back
        whenever the catalogue has them.

        Raises:
            ValueError: both or neither of user_ids/histories, k < 1, an empty history.
            UnknownIdError: unknown user or item ids (all of them named).
        """
        if (user_ids is None) == (histories is None):
            raise ValueError("give exactly one of user_ids= or histories=")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if user_ids is not None:
            rows = self._user_rows(list(user_ids))
            hists = [self.user_history(self.user_ids[r]) for r in rows]
            user_codes = self.user_table.codes[rows]
        else:
            if any(len(h) == 0 for h in histories):
                raise ValueError("a history is empty: give at least one item id per request")
            unknown = [i for h in histories for i in h if str(i) not in self._item_row]
            if unknown:
                raise UnknownIdError("item", list(dict.fromkeys(unknown)))
            hists = [np.asarray(self._item_rows(list(h)), np.int64) for h in histories]
            user_codes = self._user_codes(hists) if self.cfg.tasks.use_user_sid else None
        mh = self.cfg.data.max_history
        n_items = len(self.item_ids)
        seen = [set(h.tolist()) if exclude_seen else set() for h in hists]
        width = min(n_items, max(self.cfg.eval.n_beams, k + max((len(s) for s in seen), default=0)))
        idx, scores = self.rank(hists, user_codes, n_beams=width)
        out = []
        for b, h in enumerate(hists):
            keep = [j for j, i in enumerate(idx[b]) if i >= 0 and int(i) not in seen[b]][:k]
            items = idx[b, keep]
            usid = None if user_codes is None else "".join(f"<u{l + 1}_{c}>" for l, c in
                                                              enumerate(np.asarray(user_codes[b]).tolist()))
            out.append(Recommendation(item_ids=[self.item_ids[i] for i in items], scores=scores[b, keep],
                                      semantic_ids=[self._item_sid[i] for i in items], user_semantic_id=usid,
                                      truncated_history=len(h) > mh, item_idx=items.astype(np.int64)))
        return out


def load_run_config(run_dir: str | Path) -> TTDSConfig:
    """The resolved config a run was trained with (``<run_dir>/config.yaml``), pointed at ``run_dir``
    wherever the directory now lives.

    Raises:
        ArtifactError: ``run_dir`` has no config.yaml. ConfigError: the file is not a valid config.
    """
    run_dir = Path(run_dir)
    if not (run_dir / Files.CONFIG).is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no {Files.CONFIG}); pass runs/<name>")
    return load_config(run_dir / Files.CONFIG, [f"output_dir={run_dir.parent}", f"name={run_dir.name}"])


def load_final_item_sids(run: RunDir) -> SIDTable:
    """The item index the LLM was trained with last: ``llm/item_sids.parquet`` (after the dynamic rounds;
    equal to the tokenizer's table under ``dynamic.static_index``). No fallback to another table.

    Raises:
        StageMissing: the llm stage has not finished. ArtifactError: the table is missing or modified.
    """
    return SIDTable.load(run.require("llm") / Files.ITEM_SIDS)


__all__ = ["Recommender", "Recommendation", "load_final_item_sids", "ConfigError"]
