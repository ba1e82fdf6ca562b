"""Stage 'llm' data side: tuning tasks -> token-id samples (DESIGN §1.4-1.5).

Reads the leave-one-out split (training items only), item/user semantic-ID tables and the
semantic-ID vocabulary. Writes nothing; returns samples ``{"input_ids", "labels"}`` (lists of
int) and evaluation prompts. The walking skeleton builds the seqrec task.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TasksConfig
from .llm import SIDVocab

#: seqrec prompt templates; ``{user}`` is replaced by the user's semantic-ID tokens.
SEQREC_TEMPLATES = (
    "User {user} interacted with these items in order:",
    "Purchase history of user {user}:",
    "Predict what user {user} picks next after:",
)


@dataclass(frozen=True)
class PromptPieces:
    """Token ids of each template, split around ``{user}``: ``(before, after)`` per template."""
    parts: tuple[tuple[list[int], list[int]], ...]

    @classmethod
    def build(cls, tok, templates=SEQREC_TEMPLATES) -> "PromptPieces":
        out = []
        for t in templates:
            before, after = t.split("{user}")
            out.append((tok.encode(before, add_special_tokens=False),
                        tok.encode(after, add_special_tokens=False)))
        return cls(tuple(out))


def seqrec_windows(n: int, *, max_history: int, stride: int, loss_on: str) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` over a training sequence of length ``n``.

    ``all_items``: windows of up to ``max_history + 1`` items ending at n, n - stride, ... (the
    last window starts at 0), loss on every item of each. ``target``: one window per target
    position j >= 1, holding up to ``max_history`` items before j plus j (loss on j only).
    """
    w = max_history + 1
    if loss_on == "target":
        return [(max(0, j - max_history), j + 1) for j in range(1, n)]
    out, end = [], n
    while end > 0:
        start = max(0, end - w)
        if end - start >= 2 or not out:
            out.append((start, end))
        if start == 0:
            break
        end -= stride
    return out


def _prompt(pieces: PromptPieces, t: int, user_tokens: list[int] | None) -> list[int]:
    before, after = pieces.parts[t]
    return before + (user_tokens or []) + after


def build_seqrec_samples(train_seqs: list[list[int]], item_tokens: np.ndarray, user_tokens: np.ndarray | None,
                         pieces: PromptPieces, cfg: TasksConfig, *, max_history: int, seed: int,
                         epoch: int = 0) -> list[dict]:
    """seqrec samples from training sequences only (never validation/test targets).

    Args:
        train_seqs: U lists of training item_idx (chronological).
        item_tokens: int64 ``(N, L)`` token ids of each item's semantic ID.
        user_tokens: int64 ``(U, L_u)`` or None (no user ID in the prompt).
        epoch: mixes into the template choice, so templates are re-sampled per epoch.

    Returns:
        Samples with ``input_ids`` and ``labels`` (-100 on prompt tokens).
    """
    rng = np.random.default_rng([seed, epoch])
    L = item_tokens.shape[1]
    out = []
    for u, seq in enumerate(train_seqs):
        if len(seq) < 2:
            continue
        utok = user_tokens[u].tolist() if (user_tokens is not None and cfg.use_user_sid) else None
        for start, end in seqrec_windows(len(seq), max_history=max_history, stride=cfg.window_stride,
                                         loss_on=cfg.seqrec_loss_on):
            prompt = _prompt(pieces, int(rng.integers(len(pieces.parts))), utok)
            items = item_tokens[seq[start:end]].reshape(-1).tolist()
            if cfg.seqrec_loss_on == "all_items":
                labels = [-100] * len(prompt) + items
            else:
                labels = [-100] * (len(prompt) + len(items) - L) + items[-L:]
            out.append({"input_ids": prompt + items, "labels": labels})
    return out


def build_eval_prompts(histories: list[list[int]], item_tokens: np.ndarray, user_tokens: np.ndarray | None,
                       pieces: PromptPieces, cfg: TasksConfig, *, max_history: int) -> list[list[int]]:
    """Prompt ids for next-item generation: template 0, user ID, last ``max_history`` history items.

    Args:
        histories: per evaluated user, the items before the target (for test: train + valid).
        user_tokens: rows aligned with ``histories``.
    """
    out = []
    for i, h in enumerate(histories):
        utok = user_tokens[i].tolist() if (user_tokens is not None and cfg.use_user_sid) else None
        out.append(_prompt(pieces, 0, utok) + item_tokens[h[-max_history:]].reshape(-1).tolist())
    return out


def collate(samples: list[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Left-pad samples into int64 ``(B, T)`` ``input_ids``, ``attention_mask``, ``labels``.

    Sequences longer than ``max_length`` keep their last ``max_length`` tokens.
    """
    ids = [list(s["input_ids"])[-max_length:] for s in samples]
    T = max(len(x) for x in ids)
    batch = {"input_ids": torch.full((len(ids), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(ids), T), dtype=torch.long)}
    if "labels" in samples[0]:
        batch["labels"] = torch.full((len(ids), T), -100, dtype=torch.long)
    for i, (s, x) in enumerate(zip(samples, ids)):
        batch["input_ids"][i, T - len(x):] = torch.tensor(x)
        batch["attention_mask"][i, T - len(x):] = 1
        if "labels" in batch:
            batch["labels"][i, T - len(x):] = torch.tensor(list(s["labels"])[-max_length:])
    return batch
