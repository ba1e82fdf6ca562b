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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from . import cf, data, embeddings, llm, recipes, tasks, towers
from .artifacts import Files, RunDir
from .catalogue import AddedItem, ColdStartStore
from .config import TTDSConfig, load_config
from .decoding import SIDTrie
from .evaluate import TTDSRanker
from .errors import ArtifactError, ConfigError, TTDSError, UnknownIdError
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


@dataclass(frozen=True)
class RecRequest:
    """One recommendation request: a known ``user_id`` or a raw ``history`` (item ids, oldest first).

    ``k`` items are returned (1 <= k); ``exclude_seen`` drops the history's items from them.
    """
    user_id: str | None = None
    history: Sequence[str] | None = None
    k: int = 10
    exclude_seen: bool = True


class InvalidRequest(TTDSError, ValueError):
    """A request is malformed (both or neither of user_id/history, an empty history, a bad k)."""


class DuplicateItemError(TTDSError, ValueError):
    """A cold-start item's id is already in the catalogue."""


class Recommender:
    """Final item index, user tower, LLM + tokenizer and prefix trie of one run, loaded once.

    Build with :meth:`from_run`. Item and user ids are the dataset's raw ids (strings). Items added
    after training (:meth:`add_item`, DESIGN §1.7) are persisted in the run directory
    (:mod:`ttds_ray.catalogue`) and picked up by every Recommender of the same run on its next call.
    Thread-safe: one lock guards the trie and the catalogue.

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
        self.base_sha256 = self.item_table.content_hash()
        self.vocab: SIDVocab = sid_vocab_from_tokenizer(self.tok, self.item_table.n_levels,
                                                        self.item_table.codebook_size, self.user_table.n_levels,
                                                        self.user_table.codebook_size)
        self.trie = self._base_trie()
        self.item_tokens = self.vocab.item_tokens(self.item_table.codes)        # (N, L) token ids
        self.user_tokens = self.vocab.user_tokens(self.user_table.codes)        # (U, L_u) token ids
        self.pieces = tasks.PromptPieces.build(self.tok)
        self.item_ids: list[str] = [str(i) for i in self.prepared.items["item_id"].tolist()]
        self.titles: list[str] = [str(t) for t in self.prepared.items["title"].tolist()]
        self.user_ids: list[str] = [str(u) for u in self.prepared.sequences["user_id"].tolist()]
        self.n_base_items = len(self.item_ids)
        self._item_row = {i: n for n, i in enumerate(self.item_ids)}
        self._user_row = {u: n for n, u in enumerate(self.user_ids)}
        self._item_sid = self.item_table.sid_strings("i")
        self._user_sid = self.user_table.sid_strings("u")
        self._user_tower = None                                       # loaded on first raw history
        self._item_tower = None                                       # loaded on first cold-start item
        self._lock = threading.RLock()
        self.store = ColdStartStore(run.root)
        self.added: list[AddedItem] = []
        self._stamp = None
        self.sync()

    def _base_trie(self) -> SIDTrie:
        """The trained catalogue's trie; with ``eval.popularity_correction`` > 0 it carries the item prior
        (training-split interaction counts + 1; cold-start items added later get the prior of an unseen item)."""
        trie = SIDTrie(self.item_table.codes, self.vocab.item_token_ids)
        if self.cfg.eval.popularity_correction:
            trie.set_item_prior(data.train_item_counts(self.splits, len(self.item_table.codes)) + 1.0)
        return trie.to(self.device)

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

    @property
    def n_items(self) -> int:
        """Catalogue size: trained items + cold-start items."""
        return len(self.item_ids)

    def id_table_sha256(self) -> str:
        """sha256 of the current item semantic-ID table (trained + cold-start items)."""
        return SIDTable(self.trie.codes, self.item_table.codebook_size).content_hash()

    def item(self, item_id: str) -> dict:
        """``{item_id, title, semantic_id, item_idx, cold_start, modalities}`` of a catalogue item.

        Raises:
            UnknownIdError: the id is not in the catalogue.
        """
        self.sync()
        row = self._item_rows([item_id])[0]
        cold = row >= self.n_base_items
        return {"item_id": self.item_ids[row], "title": self.titles[row], "semantic_id": self._item_sid[row],
                "item_idx": row, "cold_start": cold,
                "modalities": self.added[row - self.n_base_items].modalities if cold else ["text", "collaborative"]}

    def search(self, query: str, limit: int = 20) -> list[dict]:
        """Catalogue items whose title contains every word of ``query`` (case-insensitive), at most ``limit``,
        in catalogue order: the demo page's item picker."""
        self.sync()
        words = query.lower().split()
        out = []
        for row, title in enumerate(self.titles):
            t = title.lower()
            if all(w in t for w in words) or (words and self.item_ids[row].lower() == query.lower().strip()):
                out.append({"item_id": self.item_ids[row], "title": title, "semantic_id": self._item_sid[row]})
                if len(out) >= limit:
                    break
        return out

    def _item_rows(self, ids: Sequence) -> list[int]:
        unknown = [i for i in ids if str(i) not in self._item_row]
        if unknown:
            raise UnknownIdError("item", list(dict.fromkeys(unknown)))
        return [self._item_row[str(i)] for i in ids]

    def _user_rows(self, ids: Sequence) -> list[int]:
        unknown = [u for u in ids if str(u) not in self._user_row]
        if unknown:
            raise UnknownIdError("user", list(dict.fromkeys(unknown)))
        return [self._user_row[str(u)] for u in ids]

    def user_history(self, user_id: str, split: Literal["valid", "test"] | None = None) -> np.ndarray:
        """A known user's history (item rows, oldest first).

        Args:
            split: None: the whole logged history (training + validation + test items; what serving
                recommends after); 'test' / 'valid': the history before that split's target (the
                evaluation prompt), cut to ``data.max_history``.
        """
        r = self._user_rows([user_id])[0]
        if split is not None:
            return data.history_for(self.splits, split, int(self.splits.user_idx[r]),
                                    max_history=self.cfg.data.max_history)
        return np.concatenate([self.splits.train_items[r], [self.splits.valid_target[r],
                                                            self.splits.test_target[r]]]).astype(np.int64)

    def known_user_codes(self, rows: np.ndarray, split: Literal["valid", "test"] | None) -> np.ndarray:
        """Semantic IDs ``(B, L_u)`` of known users (rows of the split table) for prompts before ``split``'s
        target (None: after the whole logged history), per ``eval.user_ids``: 'training' = the tokenizer stage's
        table; 'history' = :meth:`_user_codes` of the user's whole history before that target (training items, plus
        the validation item for 'test', plus both held-out items for None), so the ID is as current as the item
        history it is prompted with. For 'valid' both are the same IDs (the tokenizer encodes the training history).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.cfg.eval.user_ids == "training":
            return self.user_table.codes[self.splits.user_idx[rows]]
        sp = self.splits
        tail = {"valid": [], "test": [sp.valid_target], None: [sp.valid_target, sp.test_target]}[split]
        hist = [np.concatenate([sp.train_items[r], [t[r] for t in tail]]).astype(np.int64) for r in rows]
        return self._user_codes(hist)

    # ------------------------------------------------------------------ user tower

    def _user_codes(self, histories: list[np.ndarray]) -> np.ndarray:
        """User semantic IDs ``(B, L_u)`` from raw histories (item rows) through the user tower
        (:class:`recipes.UserEncoder`; cold-start items count in the semantic input only)."""
        with self._lock:
            if self._user_tower is None:
                self._user_tower = recipes.UserEncoder.load(self.run, self.cfg, self.n_base_items)
        added = np.asarray([a.s for a in self.added], np.float32) if self.added else None
        return self._user_tower.codes(histories, added)

    def user_semantic_id(self, history: Sequence[str]) -> str:
        """Semantic-ID string of a user given only a raw history (item ids, oldest first).

        Raises:
            UnknownIdError: items not in the catalogue. ValueError: empty history.
        """
        if len(history) == 0:
            raise InvalidRequest("history is empty: give at least one item id")
        self.sync()
        codes = self._user_codes([np.asarray(self._item_rows(list(history)), np.int64)])[0]
        return "".join(f"<u{l + 1}_{k}>" for l, k in enumerate(codes.tolist()))

    # ------------------------------------------------------------------ ranking

    @torch.inference_mode()
    def rank(self, histories: list[np.ndarray], user_codes: np.ndarray | None, *, n_beams: int,
             batch_size: int | None = None, progress: bool = False,
             exclude: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Trie-constrained beam search for prompts built from item-row histories (the eval + serve path).

        Args:
            histories: B int arrays of item rows, oldest first (cut to the last ``data.max_history``).
            user_codes: int ``(B, L_u)`` user semantic IDs, or None when ``tasks.use_user_sid`` is off.
            n_beams: beam width W (also the number of items returned, capped at the catalogue).
            exclude: optional B collections of item rows masked in the trie for that prompt (exclude_seen).

        Returns:
            ``(item_idx int64 (B, W'), scores float32 (B, W'))``, best first; -1 / -inf pad.
        """
        mh = self.cfg.data.max_history
        user_tok = None
        if self.cfg.tasks.use_user_sid and user_codes is not None:
            user_tok = self.vocab.user_tokens(np.asarray(user_codes))
        with self._lock:
            prompts = tasks.build_eval_prompts([np.asarray(h)[-mh:].tolist() for h in histories], self.item_tokens,
                                               user_tok, self.pieces, self.cfg.tasks, max_history=mh,
                                               max_length=self.cfg.llm.max_length)
            ranker = TTDSRanker(self.model, self.trie, self.tok.pad_token_id, n_beams, self.cfg.llm.max_length,
                                prior_beta=self.cfg.eval.popularity_correction)
            return ranker.rank_with_scores(prompts, batch_size or self.cfg.eval.batch_size, progress=progress,
                                           exclude=exclude)

    def _prepare(self, req: RecRequest, split: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(history item rows, user codes ``(L_u,)`` or None) of one request; raises on bad input."""
        if (req.user_id is None) == (req.history is None):
            raise InvalidRequest("give exactly one of user_id / history")
        if not isinstance(req.k, int) or isinstance(req.k, bool) or req.k < 1:
            raise InvalidRequest(f"k must be an int >= 1, got {req.k!r}")
        if req.user_id is not None:
            row = self._user_rows([req.user_id])[0]
            codes = self.user_table.codes[row] if self.cfg.eval.user_ids == "training" else None  # else: batched
            return self.user_history(self.user_ids[row], split), codes
        if len(req.history) == 0:
            raise InvalidRequest("history is empty: give at least one item id")
        return np.asarray(self._item_rows(list(req.history)), np.int64), None

    def recommend_many(self, requests: Sequence[RecRequest], *, split: Literal["valid", "test"] | None = None,
                       batch_size: int | None = None, progress: bool = False) -> list[Recommendation | TTDSError]:
        """Top-k items for many requests at once; a bad request never fails the others.

        Requests are grouped by beam width (so a request's result never depends on what else is in the
        batch) and each group is ranked in batches of ``batch_size`` (default ``eval.batch_size``); the width is
        ``max(eval.n_beams, k)``. With ``exclude_seen`` the request's history items are masked in the trie for
        that request (``decoding.beam_search(exclude=)``), so k unseen items come back whenever the catalogue
        has them, at the same cost as without. Known users use their stored user semantic ID (or, with
        ``eval.user_ids=history``, one recomputed from their history, :meth:`known_user_codes`); raw histories
        get theirs from the user tower.

        Args:
            split: for known users, None = recommend after the whole logged history; 'test' / 'valid' =
                the evaluation prompt (history before that split's target), as ``ttds-ray evaluate``.

        Returns:
            One entry per request, in order: a :class:`Recommendation`, or the :class:`TTDSError`
            (``UnknownIdError``, ``InvalidRequest``) that request raised.
        """
        self.sync()
        out: list = [None] * len(requests)
        prepared = {}
        for i, req in enumerate(requests):
            try:
                prepared[i] = self._prepare(req, split)
            except TTDSError as e:
                out[i] = e
        raw = [i for i in prepared if requests[i].history is not None]
        if raw and self.cfg.tasks.use_user_sid:
            for i, codes in zip(raw, self._user_codes([prepared[i][0] for i in raw])):
                prepared[i] = (prepared[i][0], codes)
        known = [i for i in prepared if prepared[i][1] is None and requests[i].user_id is not None]
        if known and self.cfg.tasks.use_user_sid:            # eval.user_ids=history: one user-tower pass for all
            rows = np.array(self._user_rows([requests[i].user_id for i in known]))
            for i, codes in zip(known, self.known_user_codes(rows, split)):
                prepared[i] = (prepared[i][0], codes)
        mh, n_items = self.cfg.data.max_history, self.n_items
        groups: dict[int, list[int]] = {}
        for i in prepared:
            groups.setdefault(min(n_items, max(self.cfg.eval.n_beams, requests[i].k)), []).append(i)
        for width, members in groups.items():
            codes = [prepared[i][1] for i in members]
            seen = [set(prepared[i][0].tolist()) if requests[i].exclude_seen else set() for i in members]
            idx, scores = self.rank([prepared[i][0] for i in members],
                                    None if codes[0] is None else np.stack(codes), n_beams=width,
                                    batch_size=batch_size, progress=progress,
                                    exclude=seen if any(seen) else None)
            for b, i in enumerate(members):
                h, ucodes = prepared[i]
                keep = [j for j, it in enumerate(idx[b]) if it >= 0 and int(it) not in seen[b]][:requests[i].k]
                items = idx[b, keep]
                usid = None if ucodes is None else "".join(f"<u{l + 1}_{c}>" for l, c in
                                                            enumerate(np.asarray(ucodes).tolist()))
                out[i] = Recommendation(item_ids=[self.item_ids[j] for j in items], scores=scores[b, keep],
                                        semantic_ids=[self._item_sid[j] for j in items], user_semantic_id=usid,
                                        truncated_history=split is None and len(h) > mh,
                                        item_idx=items.astype(np.int64))
        return out

    def recommend(self, user_ids: Sequence[str] | None = None, histories: Sequence[Sequence[str]] | None = None,
                  k: int = 10, exclude_seen: bool = True,
                  split: Literal["valid", "test"] | None = None) -> list[Recommendation]:
        """Top-k items per request: give either known ``user_ids`` or raw ``histories`` (item ids, oldest first).

        A known user's prompt uses the whole logged history (or, with ``split``, the evaluation prompt of
        that split) and the user's stored semantic ID; a raw history gets its user semantic ID from the
        user tower. Histories longer than ``data.max_history`` keep the most recent items
        (``truncated_history``). With ``exclude_seen`` the history's items are masked in the trie for that
        request, so k unseen items come back whenever the catalogue has them.

        Raises:
            InvalidRequest (a ValueError): both or neither of user_ids/histories, k < 1, an empty history.
            UnknownIdError: unknown user or item ids (all of them named).
        """
        if (user_ids is None) == (histories is None):
            raise InvalidRequest("give exactly one of user_ids= or histories=")
        if user_ids is not None:
            self._user_rows(list(user_ids))
            reqs = [RecRequest(user_id=u, k=k, exclude_seen=exclude_seen) for u in user_ids]
        else:
            self.sync()
            self._item_rows([i for h in histories for i in h])
            reqs = [RecRequest(history=list(h), k=k, exclude_seen=exclude_seen) for h in histories]
        out = self.recommend_many(reqs, split=split)
        for r in out:
            if isinstance(r, TTDSError):
                raise r
        return out

    # ------------------------------------------------------------------ cold-start items

    def _load_item_tower(self):
        with self._lock:
            return self._load_item_tower_locked()

    def _load_item_tower_locked(self):
        if self._item_tower is None:
            llm_tower = self.run.require("llm") / Files.ITEM_TOWER     # refined by the dynamic rounds
            path = llm_tower if llm_tower.is_file() else self.run.require("tokenizer") / Files.ITEM_TOWER
            cf_items = recipes.item_cf_inputs(cf.CFEmbeddings.load(self.run.require("cf")).items, self.splits,
                                              self.cfg.tokenizer)              # as the tower was trained on
            self._item_tower = (towers.load_tower(path), cf_items)
        return self._item_tower

    def _apply(self, items: list[AddedItem]) -> None:
        """Put persisted cold-start items into the lookups and the trie (caller holds the lock).

        Raises:
            ArtifactError: an entry's semantic ID is malformed, out of range or already held.
        """
        if not items:
            return
        try:
            codes = np.asarray([a.codes for a in items], np.int64).reshape(len(items), self.item_table.n_levels)
            self.trie.add_items(codes)
        except ValueError as e:
            raise ArtifactError(f"{self.store.path}: a cold-start entry has an invalid semantic ID ({e}); restore "
                                "the file from a backup or delete it to drop the added items") from None
        self.item_tokens = np.concatenate([self.item_tokens, self.vocab.item_tokens(codes)])
        for a in items:
            self._item_row[a.item_id] = len(self.item_ids)
            self.item_ids.append(a.item_id)
            self.titles.append(a.title)
            self._item_sid.append("".join(f"<i{l + 1}_{k}>" for l, k in enumerate(a.codes)))
        self.added.extend(items)

    def _reset_cold_start(self) -> None:
        """Back to the trained catalogue (caller holds the lock): the persisted list was rewritten or deleted."""
        n = self.n_base_items
        for a in self.added:
            self._item_row.pop(a.item_id, None)
        del self.item_ids[n:], self.titles[n:], self._item_sid[n:]
        self.item_tokens = self.item_tokens[:n]
        self.trie = self._base_trie()
        self.added = []

    def sync(self) -> None:
        """Pick up cold-start items that this or another process persisted since the last call (one stat()
        when nothing changed). If the persisted list was rewritten (it no longer starts with the items this
        process loaded) or deleted, the catalogue is rebuilt from the trained items plus the list as it is now.

        Raises:
            ArtifactError: the persisted list is unreadable or holds an invalid entry (the catalogue is then
                the trained items only, until the file is fixed).
        """
        stamp = self.store.stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                stored = self.store.read()
                if [a.item_id for a in stored[:len(self.added)]] != [a.item_id for a in self.added]:
                    log.warning("%s was rewritten or deleted: reloading the cold-start items", self.store.path)
                    self._reset_cold_start()
                self._apply(stored[len(self.added):])
            except ArtifactError:
                self._reset_cold_start()
                self._stamp = None
                raise
            self._stamp = stamp

    def add_item(self, item_id: str, text: str, title: str | None = None,
                 co_items: Sequence[str] = ()) -> dict:
        """Add a cold-start item: the item tower gives it a unique semantic ID from the modalities it has
        (text; plus collaborative, the mean SASRec embedding of ``co_items``, when given), the trie is
        updated in place and the item is recommendable at once, without retraining (DESIGN §1.7).
        Persisted atomically in ``<run>/cold_start/``; safe against concurrent additions from other
        processes serving the same run (file lock).

        Args:
            item_id: a new raw id. text: the item's text (title, description, ...).
            title: display title (default: the first 80 characters of ``text``).
            co_items: ids of trained catalogue items co-interacted with the new one.

        Returns:
            :meth:`item` of the new item.

        Raises:
            InvalidRequest: an empty text; an empty id, or one with surrounding spaces, a control character or '/'.
            DuplicateItemError: the id exists.
            UnknownIdError: a co-item is unknown or itself a cold-start item (it has no collaborative
            embedding). CollisionError: no free ID under the item's prefix.
        """
        item_id, text = str(item_id), str(text).strip()
        if not item_id.strip():
            raise InvalidRequest("item_id is empty")
        if item_id != item_id.strip() or any(not ch.isprintable() for ch in item_id) or "/" in item_id:
            raise InvalidRequest(f"item_id {item_id!r} has leading/trailing spaces, a control character or '/'; "
                                 "use a plain id")
        if not text:
            raise InvalidRequest("text is empty: a new item needs text for its semantic ID")
        title = " ".join((title or "").split()) or " ".join(text[:80].split())
        co_rows = self._item_rows(list(co_items)) if co_items else []
        cold = [i for i, r in zip(co_items, co_rows) if r >= self.n_base_items]
        if cold:
            raise UnknownIdError("co-interacted trained item", cold)
        tower, cf_items = self._load_item_tower()
        s = embeddings.encode_with(self.cfg.embeddings, [data._text(title, {"description": text})])[0]
        c = cf_items[co_rows].mean(0) if co_rows else None
        with self._lock, self.store.locked():
            self.sync()
            if item_id in self._item_row:
                raise DuplicateItemError(f"item id {item_id!r} already exists ({self.titles[self._item_row[item_id]]!r})")
            taken = set(map(tuple, self.trie.codes.tolist()))
            codes = towers.cold_start_codes(tower, s, c, taken)
            entry = AddedItem(item_id=item_id, title=title, text=text, co_items=[str(i) for i in co_items],
                              codes=[int(x) for x in codes], s=[float(x) for x in s], created=time.time(),
                              modalities=["text", "collaborative"] if co_rows else ["text"])
            self.store.write(self.added + [entry])
            self._apply([entry])
            self._stamp = self.store.stamp()
        log.info("cold-start item %s -> %s (%s)", item_id, self._item_sid[-1], "+".join(entry.modalities))
        return self.item(item_id)


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


__all__ = ["Recommender", "Recommendation", "RecRequest", "InvalidRequest", "DuplicateItemError",
           "load_final_item_sids", "ConfigError"]
