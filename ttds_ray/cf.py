"""Stage `cf`: SASRec (Kang & McAuley 2018), the collaborative-embedding model (DESIGN §1.1).

Reads the training split (per-user chronological item_idx lists); writes `cf_items.npy`,
`cf_users.npy` (:class:`CFEmbeddings`) and `sasrec.safetensors` + `sasrec.json`. Pure torch, no Ray.

Dimensions: B batch, T sequence length (<= max_len), D hidden (= d_c), N items, U users.
Item ids: callers use item_idx in [0, N) and -1 for padding; the model shifts by +1 internally,
so row 0 of the embedding table is the padding row and row i+1 holds item_idx i.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load, save as st_save
from torch import nn

from ttds_ray.artifacts import Files, atomic_write_bytes
from ttds_ray.config import CFConfig

log = logging.getLogger(__name__)
PAD = -1


class SASRec(nn.Module):
    """Causal self-attention next-item model with a full-softmax head tied to the item table.

    Positions count from the first real item of the (left-padded) window, so padding never changes
    a real position's hidden state, and position t's state equals that of the prefix ending at t.

    Args:
        n_items: N, catalogue size.
        hidden: D. n_layers, n_heads, dropout: transformer shape. max_len: longest input T.
    """

    def __init__(self, n_items: int, *, hidden: int = 64, n_layers: int = 2, n_heads: int = 1,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        self.n_items, self.hidden, self.max_len = n_items, hidden, max_len
        self.n_layers, self.n_heads = n_layers, n_heads
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, n_heads, dim_feedforward=hidden, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(n_layers))  # FFN width D, as SASRec's point-wise feed-forward
        self.final_norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.item_emb.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_config(cls, cfg: CFConfig, n_items: int) -> "SASRec":
        return cls(n_items, hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                   max_len=cfg.max_len, dropout=cfg.dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Encode left-padded histories.

        Args:
            seq: int64 `(B, T)`, item_idx in [0, N), -1 = padding (left), T <= max_len.

        Returns:
            float32 `(B, T, D)`: hidden state after each item (after the final LayerNorm), zero at
            padded positions. `[:, t]` depends only on items at positions <= t.
        """
        B, T = seq.shape
        assert T <= self.max_len, f"sequence length {T} exceeds max_len {self.max_len}"
        real = seq >= 0                                                    # (B, T)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)                    # (B, T) from first real item
        x = self.item_emb(seq + 1) * math.sqrt(self.hidden) + self.pos_emb(pos)
        x = self.emb_drop(x) * real.unsqueeze(-1)                          # (B, T, D)
        # Query t may attend key s iff s <= t and s is real; every query also sees itself so that
        # all-padding rows stay finite (their outputs are zeroed and nothing real attends to them).
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        allowed = (causal & real.unsqueeze(1)) | torch.eye(T, dtype=torch.bool, device=seq.device)
        mask = torch.zeros(B, T, T, dtype=x.dtype, device=seq.device)
        mask = mask.masked_fill(~allowed, float("-inf"))                   # (B, T, T) additive
        mask = mask.repeat_interleave(self.n_heads, dim=0)                 # (B*H, T, T)
        for block in self.blocks:
            x = block(x, src_mask=mask) * real.unsqueeze(-1)
        return self.final_norm(x) * real.unsqueeze(-1)

    def score_all(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Args: hidden_last: `(B, D)`. Returns: logits `(B, N)` over item_idx 0..N-1."""
        return hidden_last @ self.item_emb.weight[1:].T


def _cut(items: list[int], max_len: int, stride: Optional[int]) -> list[list[int]]:
    """Windows of <= max_len+1 items ending at len, len-stride, ...; only the last if stride is None."""
    if stride is None:
        return [items[-(max_len + 1):]]
    out, end = [], len(items)
    while end >= 2:
        out.append(items[max(0, end - max_len - 1):end])
        if end <= max_len + 1:
            break
        end -= stride
    return out


def training_windows(train_seqs: Sequence[Sequence[int]], max_len: int, *,
                     stride: Optional[int] = None) -> dict[str, np.ndarray]:
    """Training rows: windows of max_len+1 items, input = [:-1], target = [1:] (dense targets).

    Args:
        train_seqs: per user, chronological training item_idx; users with < 2 items give nothing.
        max_len: T, input length.
        stride: None = one row per user, its last max_len+1 items. An int also cuts the earlier
            history into windows ending every `stride` items (stride = max_len trains every target
            exactly once; on ML-100K this lifts HR@10 ~0.11 -> ~0.13).

    Returns: {"seq": int64 `(R, T)`, "target": int64 `(R, T)`}, left-padded with -1.
    """
    if stride is not None and stride < 1:
        raise ValueError(f"window stride must be >= 1 or None, got {stride}")
    rows = [w for s in train_seqs if len(s) >= 2 for w in _cut(list(s), max_len, stride)]
    seq = np.full((len(rows), max_len), PAD, dtype=np.int64)
    target = np.full((len(rows), max_len), PAD, dtype=np.int64)
    for r, items in enumerate(rows):
        n = len(items) - 1
        seq[r, max_len - n:] = items[:-1]
        target[r, max_len - n:] = items[1:]
    return {"seq": seq, "target": target}


def window_rows(sequences: "pd.DataFrame", *, max_len: int, stride: Optional[int]) -> "pd.DataFrame":
    """Ray Data ``map_batches`` function: the SASRec training windows of a batch of users, one row each.

    Args:
        sequences: rows of ``data/sequences.parquet`` (``user_idx`` int64, ``items``: the user's full
            chronological item_idx sequence); the leave-one-out training part (all but the last two items,
            ``data.split_leave_one_out``) is cut into windows as :func:`training_windows` does.

    Returns:
        Columns ``user_idx``, ``win`` (int64; the pair is the row's unique, order-defining key), ``seq`` and
        ``target`` (int64 lists of length ``max_len``, left-padded with -1).
    """
    import pandas as pd

    out = {"user_idx": [], "win": [], "seq": [], "target": []}
    for u, items in zip(sequences["user_idx"].to_numpy(), sequences["items"]):
        train = list(np.asarray(items, dtype=np.int64)[:-2])
        if len(train) < 2:
            continue
        win = training_windows([train], max_len, stride=stride)
        for w in range(len(win["seq"])):
            out["user_idx"].append(int(u))
            out["win"].append(w)
            out["seq"].append(win["seq"][w])
            out["target"].append(win["target"][w])
    return pd.DataFrame({"user_idx": np.asarray(out["user_idx"], np.int64), "win": np.asarray(out["win"], np.int64),
                         "seq": out["seq"], "target": out["target"]})


def make_training_batches(train_seqs: Sequence[Sequence[int]], max_len: int, batch_size: int,
                          rng: np.random.Generator, *, stride: Optional[int] = None
                          ) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled batches of :func:`training_windows` (same args).

    Yields: {"seq": int64 `(B, max_len)`, "target": int64 `(B, max_len)`}, -1 = padding / no target.
    """
    win = training_windows(train_seqs, max_len, stride=stride)
    order = rng.permutation(len(win["seq"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {"seq": win["seq"][idx], "target": win["target"][idx]}


def make_optimizer(model: SASRec, cfg: CFConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.98))


def train_step(model: SASRec, opt: torch.optim.Optimizer, batch: dict) -> float:
    """One AdamW step of full-softmax cross-entropy at every position that has a target.

    Args:
        model: a SASRec, or one wrapped by DistributedDataParallel (`ray.train.torch.prepare_model`).
        batch: {"seq", "target"} int64 `(B, T)` tensors or arrays, -1 = padding / no target.
    Returns: the mean loss (nats) over the positions with a target.
    """
    device = next(model.parameters()).device
    seq = torch.as_tensor(batch["seq"], dtype=torch.long)
    target = torch.as_tensor(batch["target"], dtype=torch.long)
    model.train()
    start = int((seq != PAD).any(0).long().argmax())   # drop all-padding columns (pure speed-up, on the host)
    assert bool((target[:, start:] != PAD).any()), "batch has no targets"
    seq, target = seq[:, start:].to(device), target[:, start:].to(device)  # (B, T') on the model's device
    has_target = target != PAD                                             # (B, T')
    hidden = model(seq)[has_target]                                        # (P, D), P real targets
    base = getattr(model, "module", model)         # unwrap DistributedDataParallel (Ray Train)
    loss = F.cross_entropy(base.score_all(hidden), target[has_target])     # softmax over (P, N)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_epoch(model, opt: torch.optim.Optimizer, train_seqs: Sequence[Sequence[int]], cfg: CFConfig,
                rng: np.random.Generator) -> float:
    """One pass of :func:`train_step` over shuffled :func:`make_training_batches`; returns the mean loss
    (nats; NaN when there is no batch)."""
    losses = [train_step(model, opt, b) for b in
              make_training_batches(train_seqs, cfg.max_len, cfg.batch_size, rng, stride=cfg.window_stride)]
    return float(np.mean(losses)) if losses else float("nan")


def fit_sasrec(cfg: CFConfig, train_seqs: Sequence[Sequence[int]], n_items: int, *, seed: int,
               on_epoch: Optional[Callable[[int, float], None]] = None) -> SASRec:
    """Train SASRec on the training split for cfg.epochs epochs, in-process; seeded (torch global RNG +
    numpy). The pipeline trains it through ``recipes.SASRecRecipe`` (same epochs, checkpointed).

    Args:
        on_epoch: called as `on_epoch(epoch, mean_loss)` after each epoch (0-based epoch).
    Returns: the trained model, in eval mode.
    Raises: ValueError: no user has two training items.
    """
    if not any(len(s) >= 2 for s in train_seqs):
        raise ValueError(f"no user has >= 2 training items ({len(train_seqs)} users); nothing to train on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec.from_config(cfg, n_items)
    opt = make_optimizer(model, cfg)
    for epoch in range(cfg.epochs):
        t0 = time.time()
        mean_loss = train_epoch(model, opt, train_seqs, cfg, rng)
        log.info("sasrec epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, mean_loss, time.time() - t0)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    return model.eval()


@torch.no_grad()
def _last_hidden(model: SASRec, seqs: Sequence[Sequence[int]], max_len: int,
                 batch_size: int) -> torch.Tensor:
    """Final hidden state after the last item of each sequence: float32 `(U, D)`, zeros if empty."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs), model.hidden)
    for start in range(0, len(seqs), batch_size):
        chunk = [list(s[-max_len:]) for s in seqs[start:start + batch_size]]
        T = max(1, max(len(s) for s in chunk))
        seq = torch.full((len(chunk), T), PAD, dtype=torch.long)
        for r, s in enumerate(chunk):
            if s:
                seq[r, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        out[start:start + len(chunk)] = model(seq.to(device))[:, -1].float().cpu()  # (B, D)
    return out


def encode_users(model: SASRec, seqs: Sequence[Sequence[int]], max_len: int,
                 batch_size: int = 256) -> np.ndarray:
    """User collaborative embeddings: float32 `(U, D)`, SASRec's last hidden state (zeros if empty)."""
    return _last_hidden(model, seqs, max_len, batch_size).numpy()


def item_embeddings(model: SASRec) -> np.ndarray:
    """Item collaborative embeddings: float32 `(N, D)`, the item table without its padding row."""
    return model.item_emb.weight[1:].detach().float().cpu().numpy().copy()


@torch.no_grad()
def score_users(model: SASRec, seqs: Sequence[Sequence[int]], max_len: int,
                batch_size: int = 256) -> np.ndarray:
    """Next-item logits over the full catalogue: float32 `(U, N)` (nothing excluded)."""
    hidden = _last_hidden(model, seqs, max_len, batch_size).to(next(model.parameters()).device)
    return model.score_all(hidden).float().cpu().numpy()


def erase_popularity(emb: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Removes the direction of ``emb`` that co-varies with log(1 + training count): linear concept erasure.

    SASRec's item embeddings encode popularity: on Amazon Beauty a linear read-out of the 64-d vectors explains
    82 % of the variance of log(1 + count), and their norm falls with the count (Spearman -0.92). The twin towers
    then group items by popularity, and the first semantic-ID code of a rare item is shared with other rare items
    (docs/DESIGN-NOTES.md, *Popularity-free collaborative inputs*). With v = Cov(emb, log(1 + count)) / ||.||,
    the result emb - (emb v) v^T has zero covariance with log(1 + count) along every direction (no linear
    read-out of popularity remains); the zero vector stays zero.

    Args:
        emb: float `(N, D)` item embeddings.
        counts: `(N,)` training-split interaction counts (``data.train_item_counts``), >= 0.

    Returns:
        float32 `(N, D)`; ``emb`` unchanged (as float32) when the counts are constant.

    Raises:
        ValueError: shapes differ or a count is negative.
    """
    emb = np.asarray(emb, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if emb.ndim != 2 or counts.shape != (emb.shape[0],):
        raise ValueError(f"emb must be (N, D) and counts (N,), got {emb.shape} and {counts.shape}")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    y = np.log1p(counts)
    if y.size == 0 or np.ptp(y) == 0:                                  # constant counts: nothing to erase
        return emb.astype(np.float32)
    v = ((emb - emb.mean(0)) * (y - y.mean())[:, None]).mean(0)       # (D,) covariance with log(1 + count)
    norm = np.linalg.norm(v)
    if norm == 0:
        return emb.astype(np.float32)
    v /= norm
    return (emb - np.outer(emb @ v, v)).astype(np.float32)


@dataclass(frozen=True)
class CFEmbeddings:
    """Collaborative embeddings. `items[i]` belongs to item_idx i, `users[u]` to user_idx u."""
    items: np.ndarray  # float32 (N, D)
    users: np.ndarray  # float32 (U, D)

    FILES = (Files.CF_ITEMS, Files.CF_USERS)

    def save(self, dir: str | Path) -> None:
        for name, arr in zip(self.FILES, (self.items, self.users)):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
            atomic_write_bytes(Path(dir) / name, buf.getvalue())

    @classmethod
    def load(cls, dir: str | Path) -> "CFEmbeddings":
        """Raises: FileNotFoundError if a file is missing; ValueError on a bad dtype or shape."""
        arrs = []
        for name in cls.FILES:
            path = Path(dir) / name
            arr = np.load(path, allow_pickle=False)
            if arr.dtype != np.float32 or arr.ndim != 2:
                raise ValueError(f"{path}: expected float32 (n, D), got {arr.dtype} {arr.shape}; "
                                 "rerun stage 'cf'")
            arrs.append(arr)
        if arrs[0].shape[1] != arrs[1].shape[1]:
            raise ValueError(f"{Path(dir) / cls.FILES[1]}: dim {arrs[1].shape[1]} != item dim "
                             f"{arrs[0].shape[1]} in {cls.FILES[0]}; rerun stage 'cf'")
        return cls(items=arrs[0], users=arrs[1])


def cf_embeddings(model: SASRec, train_seqs: Sequence[Sequence[int]]) -> CFEmbeddings:
    """Item table + users' last hidden state over their training history (DESIGN §1.1)."""
    return CFEmbeddings(items=item_embeddings(model),
                        users=encode_users(model, train_seqs, model.max_len))


def save_sasrec(model: SASRec, cfg: CFConfig, n_items: int, dir: str | Path) -> None:
    """Write `sasrec.safetensors` (weights) and `sasrec.json` (shape), atomically, no pickle."""
    shape = (model.hidden, model.n_layers, model.n_heads, model.max_len, model.n_items)
    if shape != (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.max_len, n_items):
        raise ValueError(f"model (hidden, n_layers, n_heads, max_len, n_items) = {shape} does not match "
                         f"cfg/n_items {(cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.max_len, n_items)}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(dir) / Files.SASREC, st_save(state))
    meta = {"hidden": cfg.hidden, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "max_len": cfg.max_len, "n_items": n_items}
    atomic_write_bytes(Path(dir) / Files.SASREC_META, (json.dumps(meta, indent=2) + "\n").encode())


def load_sasrec(dir: str | Path) -> SASRec:
    """Rebuild a SASRec (eval mode) from :func:`save_sasrec`'s files."""
    meta = json.loads((Path(dir) / Files.SASREC_META).read_text())
    model = SASRec(meta["n_items"], hidden=meta["hidden"], n_layers=meta["n_layers"],
                   n_heads=meta["n_heads"], max_len=meta["max_len"])
    model.load_state_dict(st_load((Path(dir) / Files.SASREC).read_bytes()))
    return model.eval()
