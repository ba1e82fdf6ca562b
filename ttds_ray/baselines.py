"""Baselines in the evaluation protocol of the eval stage (DESIGN §2), on a finished run directory. No Ray import.

- **TIGER-style** (Rajput et al., NeurIPS 2023): the item semantic IDs of the run's tokenizer stage, frozen,
  and a small transformer trained FROM SCRATCH to generate the next item's ID from the IDs of the history items.
  No LLM, no text, no user ID, the seqrec task only. TIGER is a T5 encoder-decoder (4 + 4 layers, d=128); this
  is a decoder-only Llama of the same width and depth (:class:`TigerConfig`) whose vocabulary holds only the
  M x K item-SID tokens and three specials, so that it runs through the same trie-constrained beam search as
  TTDS (:func:`ttds_ray.decoding.beam_search`, which takes a causal LM). With the history as a prefix, a causal
  decoder reads the same input and is trained on the same next-ID likelihood; what differs is that the history
  positions are encoded causally instead of bidirectionally, and that the decoder also learns from every item of
  a window (teacher forcing along the history, as the seqrec task of the LLM does, DESIGN §1.4). The epoch is
  chosen on the VALIDATION split (NDCG@10 on a seeded user sample), never on test.
- **Popularity** and **SASRec**: the eval stage already scores them (``eval/metrics.json``); :func:`score_baseline_ranks`
  gives their per-user ranks on the same users (for paired comparisons), with the same functions and tie policy.

Protocol, the same as ``evaluate.evaluate_split``: leave-one-out split, the last ``data.max_history`` items as
history, full-catalogue ranking by beam search of ``eval.n_beams`` beams, ``eval.max_users`` users drawn by
``evaluate.select_eval_users`` with the run's seed, pessimistic ties (``metrics.target_ranks(scores=)``,
``metrics.score_ranks``).

Reads a run's ``data/``, ``tokenizer/`` (item IDs), ``cf/`` (SASRec) and ``eval/rankings.parquet``.
Writes ``<run>/baselines/tiger/``: ``model.safetensors``, ``ranks.parquet`` (per-user test ranks) and
``result.json`` (settings, per-epoch validation curve, chosen epoch, test metrics, wall times), the last one
written last; a later call with the same settings and the same upstream stages loads it instead of retraining.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from . import llm, recipes, tasks
from .artifacts import Files, RunDir, atomic_write_bytes, read_json, write_json
from .config import TTDSConfig, _Section
from .data import Splits, train_item_counts
from .decoding import SIDTrie
from .errors import ArtifactError, ConfigError
from .evaluate import TTDSRanker, eval_histories, select_eval_users, targets_of
from .metrics import hr_ndcg, score_ranks, target_ranks

log = logging.getLogger("ttds_ray")

#: Where :func:`run_tiger` keeps its artifacts, relative to the run directory.
TIGER_DIR = Path("baselines") / "tiger"
#: The metric the TIGER epoch is chosen by (on the validation split).
SELECT_METRIC = "NDCG@10"


class TigerConfig(_Section):
    """The TIGER-style model and its training budget. The defaults are the size of the ``tiny`` LLM backbone
    (d=128, 4 layers, 4 heads, MLP 256), which is also TIGER's width and depth (T5, d=128, 4 + 4 layers)."""
    hidden: int = Field(128, ge=8, description="Model width d.")
    layers: int = Field(4, ge=1, description="Decoder layers (TIGER: 4 encoder + 4 decoder layers).")
    heads: int = Field(4, ge=1, description="Attention heads (must divide hidden).")
    intermediate: int = Field(256, ge=8, description="MLP width (the tiny backbone's 2 x hidden).")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention weights (TIGER: 0.1; 0 as "
                                     "the tiny backbone, and sdpa's fused CPU kernel needs 0).")
    epochs: int = Field(20, ge=1, description="Most passes over the training windows.")
    patience: int | None = Field(3, ge=1, description="Stop after this many epochs without a better validation "
                                 "NDCG@10; None = train every epoch.")
    batch_size: int = Field(64, ge=1, description="Windows per optimiser step.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate (warm-up, then linear decay to 10 %).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Steps of linear learning-rate warm-up.")
    valid_users: int = Field(300, ge=1, description="Seeded validation users the epoch is chosen on.")

    def check(self) -> "TigerConfig":
        if self.hidden % self.heads:
            raise ConfigError(f"tiger.hidden={self.hidden} must be a multiple of tiger.heads={self.heads}")
        return self


@dataclass(frozen=True)
class TigerVocab:
    """Token ids of the TIGER-style model: PAD=0, BOS=1, EOS=2, then item-SID token (level l, code k) at
    ``3 + l * K + k``. The model never sees a text token."""
    n_levels: int
    codebook_size: int
    PAD = 0
    BOS = 1
    EOS = 2
    OFFSET = 3

    @property
    def size(self) -> int:
        return self.OFFSET + self.n_levels * self.codebook_size

    @property
    def level_token_ids(self) -> torch.Tensor:
        """int64 ``(M, K)``: the vocab id of code k at level l (the trie's and the beam search's)."""
        return self.OFFSET + torch.arange(self.n_levels * self.codebook_size).view(self.n_levels, self.codebook_size)

    @property
    def sid_ids(self) -> torch.Tensor:
        """int64 ``(M * K,)``: every SID token (the softmax of the loss and of the decoding scores)."""
        return self.level_token_ids.reshape(-1)

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """int64 ``(N, M)`` token ids of the items' semantic IDs ``codes`` ``(N, M)``."""
        codes = np.asarray(codes, dtype=np.int64)
        return self.OFFSET + np.arange(self.n_levels) * self.codebook_size + codes


def build_tiger(vocab: TigerVocab, tcfg: TigerConfig, max_history: int, *, seed: int):
    """A randomly initialised (seeded) Llama over ``vocab`` only, scored as it is trained (SID softmax).

    Returns:
        ``transformers.LlamaForCausalLM`` in float32 on the CPU, sdpa attention (the beam search's shared-cache
        fast path), tagged ``ttds_loss_vocab='sid'``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=vocab.size, hidden_size=tcfg.hidden, intermediate_size=tcfg.intermediate,
                       num_hidden_layers=tcfg.layers, num_attention_heads=tcfg.heads,
                       num_key_value_heads=tcfg.heads, attention_dropout=tcfg.attention_dropout,
                       max_position_embeddings=max(64, 1 + (max_history + 1) * vocab.n_levels),
                       tie_word_embeddings=True, bos_token_id=vocab.BOS, eos_token_id=vocab.EOS,
                       pad_token_id=vocab.PAD, attn_implementation="sdpa")
    model = LlamaForCausalLM(conf)
    setattr(model, llm.DECODE_SCORING_ATTR, "sid")
    return model


def training_windows(train_seqs: list[np.ndarray], item_tokens: np.ndarray, *, max_history: int, stride: int
                     ) -> list[dict]:
    """Teacher-forcing samples from the TRAINING split only: every window of up to ``max_history + 1`` items
    (``tasks.seqrec_windows``, loss on every item) as ``[BOS] + the items' SID tokens``.

    Returns:
        Per window ``{"input_ids": list[int], "labels": list[int]}`` (labels -100 at BOS), in (user, window) order.
    """
    out = []
    for seq in train_seqs:
        for s, e in tasks.seqrec_windows(len(seq), max_history=max_history, stride=stride, loss_on="all_items"):
            toks = item_tokens[np.asarray(seq[s:e], dtype=np.int64)].reshape(-1).tolist()
            out.append({"input_ids": [TigerVocab.BOS] + toks, "labels": [-100] + toks})
    return out


def prompts_for(histories: list[np.ndarray], item_tokens: np.ndarray, max_history: int) -> list[list[int]]:
    """Decoding prompts ``[BOS] + SID tokens of the last max_history history items`` (one per user)."""
    return [[TigerVocab.BOS] + item_tokens[np.asarray(h, dtype=np.int64)[-max_history:]].reshape(-1).tolist()
            for h in histories]


@dataclass
class TigerModel:
    """A TIGER-style model with what decoding needs: its vocabulary and the catalogue's prefix trie."""
    model: torch.nn.Module
    vocab: TigerVocab
    item_tokens: np.ndarray      # int64 (N, M)
    trie: SIDTrie

    def rank(self, histories: list[np.ndarray], *, n_beams: int, batch_size: int, max_history: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """``(item_idx int64 (U, W), scores float32 (U, W))`` best first, by trie-constrained beam search
        (``evaluate.TTDSRanker``, the eval stage's ranker); every item exists and none repeats in a row."""
        prompts = prompts_for(histories, self.item_tokens, max_history)
        ranker = TTDSRanker(self.model, self.trie, self.vocab.PAD, n_beams,
                            self.model.config.max_position_embeddings)
        return ranker.rank_with_scores(prompts, batch_size)


def evaluate_ranker(rank_fn, splits: Splits, rows: np.ndarray, split: str, cfg: TTDSConfig
                    ) -> tuple[dict, np.ndarray]:
    """Metrics and per-user ranks ``(U,)`` of a beam-search ranker on ``split`` for the users ``rows``.

    ``rank_fn(histories) -> (item_idx (U, W), scores (U, W))``; ties against the target (``target_ranks(scores=)``).
    """
    hist = eval_histories(splits, rows, split, cfg.data.max_history)
    ranked, scores = rank_fn(hist)
    if cfg.eval.exclude_seen:
        full = eval_histories(splits, rows, split, 10 ** 9)
        ranked = ranked.copy()
        for i, h in enumerate(full):
            ranked[i, np.isin(ranked[i], h)] = -1
    ranks = target_ranks(ranked, targets_of(splits, rows, split), scores=scores)
    return hr_ndcg(ranks, ks=cfg.eval.ks), ranks


def _settings_key(cfg: TTDSConfig, run: RunDir, tcfg: TigerConfig) -> str:
    """What a TIGER result depends on: the data and tokenizer stages it read, the model settings, the protocol."""
    parts = {"stages": {s: run.manifest(s)["digest"] for s in ("data", "tokenizer")}, "tiger": tcfg.model_dump(),
             "seed": cfg.seed, "max_history": cfg.data.max_history, "window_stride": cfg.tasks.window_stride,
             "eval": cfg.eval.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def fit_tiger(cfg: TTDSConfig, run: RunDir, tcfg: TigerConfig, *, progress: bool = True
              ) -> tuple[TigerModel, dict]:
    """Train a TIGER-style model on the training split of ``run``; keep the epoch with the best validation NDCG@10.

    Args:
        cfg: the run's config (seed, ``data.max_history``, ``tasks.window_stride``, ``eval.*``, ``ray.torch_threads``).
        run: a run with finished data and tokenizer stages (the item IDs of ``tokenizer/``: the static index).

    Returns:
        ``(model at the chosen epoch, info)``; info holds ``history`` (per epoch: loss, validation metrics,
        wall), ``best_epoch``, ``steps``, ``train_wall_s``, ``n_windows``.

    Raises:
        StageMissing: a needed stage has not finished. ConfigError: a bad TIGER setting.
    """
    tcfg.check()
    if cfg.ray.torch_threads:
        torch.set_num_threads(cfg.ray.torch_threads)
    t0 = time.time()
    _, splits = recipes.load_splits(run)
    item_t, _ = recipes.load_sid_tables(run)
    vocab = TigerVocab(item_t.n_levels, item_t.codebook_size)
    item_tokens = vocab.item_tokens(item_t.codes)
    trie = SIDTrie(item_t.codes, vocab.level_token_ids)
    mh = cfg.data.max_history
    windows = training_windows(list(splits.train_items), item_tokens, max_history=mh,
                               stride=cfg.tasks.window_stride)
    if not windows:
        raise ConfigError("TIGER: the training split has no window of 1 or more items")
    model = build_tiger(vocab, tcfg, mh, seed=cfg.seed)
    tiger = TigerModel(model, vocab, item_tokens, trie)
    steps_per_epoch = max(1, len(windows) // tcfg.batch_size)
    opt, sched = llm.make_optimizer(model, tcfg, steps_per_epoch * tcfg.epochs)
    valid_rows = select_eval_users(len(splits), tcfg.valid_users, cfg.seed)

    def rank_fn(hist):
        return tiger.rank(hist, n_beams=cfg.eval.n_beams, batch_size=cfg.eval.batch_size, max_history=mh)

    history, best, best_state, step = [], None, None, 0
    max_len = 1 + (mh + 1) * vocab.n_levels
    for epoch in range(tcfg.epochs):
        te = time.time()
        losses = [llm.train_step(model, opt, sched, tasks.collate([windows[j] for j in idx], vocab.PAD, max_len),
                                 sid_ids=vocab.sid_ids)
                  for idx in recipes.epoch_batches(len(windows), steps_per_epoch, tcfg.batch_size, cfg.seed, epoch)]
        step += steps_per_epoch
        valid, _ = evaluate_ranker(rank_fn, splits, valid_rows, "valid", cfg)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "steps": step,
                        "valid": {k: v for k, v in valid.items() if "@" in k}, "wall_s": round(time.time() - te, 2)})
        if progress:
            log.info("tiger: epoch %d loss %.4f valid NDCG@10 %.4f HR@10 %.4f (%.1f s)", epoch, history[-1]["loss"],
                     valid.get("NDCG@10", float("nan")), valid.get("HR@10", float("nan")), history[-1]["wall_s"])
        if best is None or valid[SELECT_METRIC] > history[best]["valid"][SELECT_METRIC]:
            best, best_state = epoch, copy.deepcopy(model.state_dict())
        elif tcfg.patience is not None and epoch - best >= tcfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return tiger, {"history": history, "best_epoch": best, "epochs_run": len(history), "steps": step,
                   "steps_per_epoch": steps_per_epoch, "n_windows": len(windows),
                   "n_valid_users": int(len(valid_rows)), "train_wall_s": round(time.time() - t0, 2)}


def run_tiger(cfg: TTDSConfig, run: RunDir, tcfg: TigerConfig | None = None, *, force: bool = False,
              progress: bool = True) -> dict:
    """Train (:func:`fit_tiger`) and test the TIGER-style baseline on ``run``, or load the stored result.

    The test users are those of the eval stage (``evaluate.select_eval_users(len(splits), eval.max_users, seed)``).

    Returns:
        The result dict (also ``<run>/baselines/tiger/result.json``): ``metrics`` (test, like a block of
        eval/metrics.json), ``valid_at_best``, ``history``, ``best_epoch``, ``train_wall_s``, ``eval_wall_s``,
        ``settings_key``; ``user_idx`` and ``ranks`` (per-user test ranks, int64 ``(U,)``) are added in memory.

    Raises:
        StageMissing: the data or tokenizer stage has not finished.
    """
    from safetensors.torch import save

    tcfg = tcfg or TigerConfig()
    out = run.root / TIGER_DIR
    key = _settings_key(cfg, run, tcfg)
    if not force and (out / "result.json").is_file():
        res = read_json(out / "result.json")
        if res.get("settings_key") == key:
            ranks = pd.read_parquet(out / "ranks.parquet")
            return {**res, "user_idx": ranks["user_idx"].to_numpy(), "ranks": ranks["rank"].to_numpy()}
    tiger, info = fit_tiger(cfg, run, tcfg, progress=progress)
    te = time.time()
    _, splits = recipes.load_splits(run)
    rows = select_eval_users(len(splits), cfg.eval.max_users, cfg.seed)
    metrics, ranks = evaluate_ranker(
        lambda h: tiger.rank(h, n_beams=cfg.eval.n_beams, batch_size=cfg.eval.batch_size,
                             max_history=cfg.data.max_history), splits, rows, "test", cfg)
    res = {"system": "TIGER-style", "settings_key": key, "tiger": tcfg.model_dump(), "seed": cfg.seed,
           "metrics": metrics, "valid_at_best": info["history"][info["best_epoch"]]["valid"],
           "n_params": sum(p.numel() for p in tiger.model.parameters()), "vocab_size": tiger.vocab.size,
           "item_sids": {"n_levels": tiger.vocab.n_levels, "codebook_size": tiger.vocab.codebook_size,
                         "source": "tokenizer/ (static index)"},
           **info, "eval_wall_s": round(time.time() - te, 2)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)         # the marker goes last: no stale result over new files
    atomic_write_bytes(out / "model.safetensors", save({k: v.detach().clone().contiguous() for k, v in
                                                         tiger.model.state_dict().items()}))  # head tied: copies
    user_idx = splits.user_idx[rows]
    ranks_tmp = out / ".ranks.parquet.tmp"
    pd.DataFrame({"user_idx": user_idx, "target": targets_of(splits, rows, "test"), "rank": ranks}
                 ).to_parquet(ranks_tmp)
    ranks_tmp.replace(out / "ranks.parquet")
    write_json(out / "result.json", res)
    log.info("tiger: test %s (epoch %d chosen on validation)", json.dumps({k: round(v, 4) for k, v in metrics.items()
                                                                          if "@" in k}), info["best_epoch"])
    return {**res, "user_idx": user_idx, "ranks": ranks}


# ----------------------------------------------------------------------------- per-user ranks of the other systems

def eval_rows(cfg: TTDSConfig, splits: Splits) -> np.ndarray:
    """Row indices of the users the eval stage evaluates (seeded sample of ``eval.max_users``)."""
    return select_eval_users(len(splits), cfg.eval.max_users, cfg.seed)


def score_baseline_ranks(cfg: TTDSConfig, run: RunDir, split: str = "test") -> dict[str, np.ndarray]:
    """Per-user ranks ``(U,)`` of Popularity and SASRec on the eval stage's users, as ``evaluate.evaluate_popularity``
    and ``evaluate.evaluate_sasrec`` rank them (full catalogue, ``metrics.score_ranks``: ties against the target).

    Returns:
        ``{"user_idx": (U,), "Popularity": (U,), "SASRec": (U,)}``.
    """
    from .cf import load_sasrec, score_users

    prepared, splits = recipes.load_splits(run)
    rows = eval_rows(cfg, splits)
    targets = targets_of(splits, rows, split)
    full = eval_histories(splits, rows, split, 10 ** 9) if cfg.eval.exclude_seen else None
    pop = score_ranks(train_item_counts(splits, len(prepared.items)), targets, exclude=full)
    hist = eval_histories(splits, rows, split, cfg.cf.max_len)
    sasrec = score_ranks(score_users(load_sasrec(run.require("cf")), [h.tolist() for h in hist], cfg.cf.max_len),
                         targets, exclude=full)
    return {"user_idx": splits.user_idx[rows], "Popularity": pop, "SASRec": sasrec}


def ttds_ranks(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """``(user_idx (U,), rank (U,))`` of TTDS from the eval stage's ``eval/rankings.parquet``.

    The beam scores are used for the tie policy when the file holds them (a ``scores`` column); otherwise the
    list order is taken as final (``metrics.target_ranks``), which can only differ from the eval stage's
    metrics where two listed items have bit-equal scores; callers compare with ``eval/metrics.json``.

    Raises:
        ArtifactError: the file lacks the columns ``user_idx``, ``target``, ``ranked``.
    """
    df = pd.read_parquet(run.require("eval") / Files.RANKINGS)
    if not {"user_idx", "target", "ranked"} <= set(df.columns):
        raise ArtifactError(f"{run.require('eval') / Files.RANKINGS} lacks user_idx/target/ranked columns")
    width = max((len(r) for r in df["ranked"]), default=0)
    ranked = np.full((len(df), width), -1, dtype=np.int64)
    for i, r in enumerate(df["ranked"]):
        ranked[i, :len(r)] = r
    scores = None
    if "scores" in df.columns:
        scores = np.full((len(df), width), -np.inf, dtype=np.float64)
        for i, s in enumerate(df["scores"]):
            scores[i, :len(s)] = s
    return df["user_idx"].to_numpy(np.int64), target_ranks(ranked, df["target"].to_numpy(np.int64), scores=scores)
