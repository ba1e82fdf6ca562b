"""Stage: eval / serve. Trie-constrained beam search that turns prompts into ranked items.

Reads: item SIDs (`ItemSIDs.codes`), the vocab ids of the SID tokens, a causal LM (optionally peft-wrapped).
Writes: nothing; returns :class:`BeamResult` (item_idx + summed log-probs) to metrics.py / serve.py.

Dimension letters: B batch (prompts), T prompt length, M SID levels, K codebook size, V vocab,
W beams, N items. A SID is M codes; level l code k is the vocab token `<i{l}_{k}>`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["SIDTrie", "BeamResult", "beam_search"]


class SIDTrie:
    """Prefix trie over the catalogue's SIDs, stored as dense tensors for vectorised decoding.

    Nodes are numbered level by level: node 0 is the root (empty prefix), then the depth-1 nodes,
    ..., then the depth-M nodes (the leaves, one per item). `children[n, k]` is the node reached
    from node `n` by code `k`, or -1 if no item's SID continues that way, so the set of codes allowed
    after a prefix is one row lookup (`children[nodes] >= 0`) for a whole batch of beams. This is
    what keeps decoding from emitting SIDs that belong to no item (style bug-log B05).

    Node ids are only valid until the next :meth:`add_items`, which rebuilds the tensors.

    Attributes:
        children: int64 `(n_nodes, K)`, child node id or -1.
        leaf_item: int64 `(n_nodes,)`, item_idx of a leaf node, -1 for inner nodes.
        level_token_ids: int64 `(M, K)`, vocab id of code k at level l.
        codes: int64 `(N, M)`, the SID of every item (row i is item_idx i).
    """

    root: int = 0

    def __init__(self, codes: np.ndarray, level_token_ids: Tensor) -> None:
        """Builds the trie.

        Args:
            codes: int `(N, M)`, unique rows, each value in [0, K); row i is the SID of item_idx i.
            level_token_ids: int `(M, K)`, vocab id of the token `<i{l}_{k}>` at `[l, k]`.

        Raises:
            ValueError: on a shape mismatch, a code outside [0, K), a vocab id used twice,
                or two items sharing a SID (the message names the SID and the items).
        """
        level_token_ids = torch.as_tensor(level_token_ids)
        if level_token_ids.ndim != 2 or level_token_ids.dtype.is_floating_point or level_token_ids.dtype == torch.bool:
            raise ValueError(f"level_token_ids must be an integer tensor of shape (M, K), got "
                             f"{level_token_ids.dtype} {tuple(level_token_ids.shape)}")
        n_levels, codebook_size = level_token_ids.shape
        if n_levels < 1 or codebook_size < 1:
            raise ValueError(f"level_token_ids must have M >= 1 levels and K >= 1 codes, got shape "
                             f"{tuple(level_token_ids.shape)}")
        if level_token_ids.min() < 0:
            raise ValueError("level_token_ids holds negative vocab ids; expected the ids of the SID tokens")
        if torch.unique(level_token_ids).numel() != level_token_ids.numel():
            raise ValueError("level_token_ids maps two (level, code) pairs to the same vocab id; every SID token "
                             "`<i{l}_{k}>` must have its own id")
        self.level_token_ids = level_token_ids.to(torch.int64).cpu()
        self.n_levels = int(n_levels)              # M
        self.codebook_size = int(codebook_size)    # K
        self.codes = np.zeros((0, self.n_levels), dtype=np.int64)
        self._rebuild(self._check_codes(codes, what="codes", first_item_idx=0))

    @property
    def n_items(self) -> int:
        """Number of items (leaves) in the trie."""
        return int(self.codes.shape[0])

    @property
    def n_nodes(self) -> int:
        """Number of nodes, root and leaves included."""
        return int(self.children.shape[0])

    def to(self, device: torch.device | str) -> "SIDTrie":
        """Moves the tensors to `device` in place (do it once, so beam_search does not copy per call)."""
        self.children = self.children.to(device)
        self.leaf_item = self.leaf_item.to(device)
        self.level_token_ids = self.level_token_ids.to(device)
        self.item_path = self.item_path.to(device)
        self.n_leaves = self.n_leaves.to(device)
        return self

    def root_nodes(self, batch_size: int) -> Tensor:
        """Returns int64 `(batch_size,)` filled with the root node id, on the trie's device."""
        return torch.full((batch_size,), self.root, dtype=torch.int64, device=self.children.device)

    def allowed(self, nodes: Tensor) -> Tensor:
        """Codes that continue each prefix towards at least one item.

        Args:
            nodes: int64 `(...)`, node ids of one level (-1 = dead beam).

        Returns:
            bool `(..., K)`: True where `children[node, k]` exists; all False for dead beams.
        """
        nodes = nodes.to(self.children.device)
        alive = nodes >= 0
        allowed = self.children[nodes.clamp(min=0)] >= 0  # (..., K)
        return allowed & alive.unsqueeze(-1)

    def step(self, nodes: Tensor, codes: Tensor) -> Tensor:
        """Follows one code from each node.

        Args:
            nodes: int64 `(...)`, node ids (-1 = dead).
            codes: int64 `(...)`, same shape, codes in [0, K).

        Returns:
            int64 `(...)`: child node ids, -1 where the node is dead or the code is not allowed.
        """
        nodes = nodes.to(self.children.device)
        codes = codes.to(self.children.device)
        child = self.children[nodes.clamp(min=0), codes]
        return torch.where(nodes >= 0, child, torch.full_like(child, -1))

    def item_of_leaf(self, nodes: Tensor) -> Tensor:
        """Maps leaf node ids to item_idx.

        Args:
            nodes: int64 `(...)`, node ids (-1 = dead).

        Returns:
            int64 `(...)`: item_idx of each leaf, -1 for dead beams and inner nodes.
        """
        nodes = nodes.to(self.leaf_item.device)
        item = self.leaf_item[nodes.clamp(min=0)]
        return torch.where(nodes >= 0, item, torch.full_like(item, -1))

    def add_items(self, new_codes: np.ndarray) -> np.ndarray:
        """Adds items (cold start, DESIGN.md §1.7): they become reachable without retraining the LM.

        Args:
            new_codes: int `(N_new, M)`, SIDs of the new items (e.g. from the item tower).

        Returns:
            int64 `(N_new,)`: the item_idx given to each new item (`n_items`, `n_items + 1`, ...).

        Raises:
            ValueError: as the constructor; also if a new SID equals an existing item's SID.
        """
        first = self.n_items
        new_codes = self._check_codes(new_codes, what="new_codes", first_item_idx=first)
        self._rebuild(np.concatenate([self.codes, new_codes], axis=0))
        return np.arange(first, self.n_items, dtype=np.int64)

    def _check_codes(self, codes: np.ndarray, *, what: str, first_item_idx: int) -> np.ndarray:
        codes = np.asarray(codes.cpu() if isinstance(codes, Tensor) else codes)
        if codes.ndim != 2 or codes.shape[1] != self.n_levels:
            raise ValueError(f"{what} must have shape (N, M={self.n_levels}) to match level_token_ids "
                             f"{tuple(self.level_token_ids.shape)}, got {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{what} must be integer codes, got dtype {codes.dtype}")
        codes = codes.astype(np.int64, copy=False)
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            row, level = np.argwhere(bad)[0]
            raise ValueError(f"{what} has {int(bad.sum())} codes outside [0, K={self.codebook_size}), e.g. item_idx "
                             f"{first_item_idx + int(row)} level {int(level)} = {int(codes[row, level])}")
        return codes

    def _rebuild(self, codes: np.ndarray) -> None:
        n_items, n_levels = codes.shape
        if n_items:
            _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)  # (N,); numpy 2.0.0 gave a 2-D inverse with axis=0
            if (counts > 1).any():
                dup_groups = np.flatnonzero(counts > 1)
                examples = []
                for g in dup_groups[:3]:
                    items = np.flatnonzero(inverse == g)
                    examples.append(f"{tuple(int(c) for c in codes[items[0]])} -> items {items.tolist()}")
                raise ValueError(f"{len(dup_groups)} SIDs are shared by several items ({'; '.join(examples)}); "
                                 "item SIDs must be unique (DESIGN.md §1.3): re-export them with the dedup level")
        # Level by level: unique prefixes of length l+1 are the depth-(l+1) nodes.
        parent = np.zeros(n_items, dtype=np.int64)  # (N,) node of each item's prefix at the current depth
        edges_parent, edges_code, edges_child = [], [], []
        item_path = np.zeros((n_items, n_levels), dtype=np.int64)  # (N, M) node of each item at depth l+1
        offset = 1
        for level in range(n_levels):
            if n_items == 0:
                break
            prefixes, first_row, inverse = np.unique(codes[:, : level + 1], axis=0, return_index=True,
                                                     return_inverse=True)
            node_ids = offset + np.arange(len(prefixes), dtype=np.int64)  # (n_prefixes,)
            edges_parent.append(parent[first_row])
            edges_code.append(prefixes[:, level])
            edges_child.append(node_ids)
            parent = offset + inverse.reshape(-1)  # (N,)
            item_path[:, level] = parent
            offset += len(prefixes)
        children = torch.full((offset, self.codebook_size), -1, dtype=torch.int64)
        leaf_item = torch.full((offset,), -1, dtype=torch.int64)
        if n_items:
            children[torch.from_numpy(np.concatenate(edges_parent)),
                     torch.from_numpy(np.concatenate(edges_code))] = torch.from_numpy(np.concatenate(edges_child))
            leaf_item[torch.from_numpy(parent)] = torch.arange(n_items, dtype=torch.int64)
        n_leaves = np.bincount(item_path.reshape(-1), minlength=offset).astype(np.int64)
        n_leaves[0] = n_items
        device = self.children.device if hasattr(self, "children") else torch.device("cpu")
        self.children = children.to(device)
        self.leaf_item = leaf_item.to(device)
        self.item_path = torch.from_numpy(item_path).to(device)     # (N, M)
        self.n_leaves = torch.from_numpy(n_leaves).to(device)       # (n_nodes,) items under each node
        self.codes = codes

    def unseen_counts(self, exclude: list, device: torch.device | str | None = None) -> Tensor:
        """Per prompt, the number of items under each node once that prompt's excluded items are removed.

        Args:
            exclude: B sequences of item_idx to leave out (repeats and ids >= n_items are ignored).

        Returns:
            int64 ``(B, n_nodes)``; a node with count 0 leads to no allowed item (the beam search masks it).
        """
        device = device or self.children.device
        counts = self.n_leaves.to(device).unsqueeze(0).repeat(len(exclude), 1)  # (B, n_nodes)
        rows, items = [], []
        for b, ex in enumerate(exclude):
            ex = np.unique(np.asarray(list(ex), dtype=np.int64))
            ex = ex[(ex >= 0) & (ex < self.n_items)]
            rows.append(np.full(len(ex), b, dtype=np.int64))
            items.append(ex)
        items_t = torch.from_numpy(np.concatenate(items)).to(device)
        if items_t.numel():
            rows_t = torch.from_numpy(np.concatenate(rows)).to(device)
            path = self.item_path.to(device)[items_t]                             # (S, M)
            counts.index_put_((rows_t.repeat_interleave(self.n_levels), path.reshape(-1)),
                              torch.full((path.numel(),), -1, dtype=torch.int64, device=device), accumulate=True)
            counts[:, 0] -= torch.bincount(rows_t, minlength=len(exclude))
        return counts


@dataclass(frozen=True)
class BeamResult:
    """Items found by :func:`beam_search`, best first.

    Attributes:
        item_idx: int64 `(B, W')`, W' = min(W, n_items); distinct per row. -1 pads a row only if
            fewer than W' items got a finite score (the LM gave -inf to a token; not expected in practice).
        scores: float32 `(B, W')`, summed log-probs (nats) of the M SID tokens; -inf where item_idx is -1.
    """

    item_idx: Tensor
    scores: Tensor


def _level_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log_softmax over the FULL vocab, restricted to one level's K tokens.

    Args:
        logits: float `(R, V)`.
        token_ids: int64 `(K,)`.

    Returns:
        float32 `(R, K)`; equals `logits.log_softmax(-1)[:, token_ids]` without materialising `(R, V)` twice.
    """
    logits = logits.float()
    return logits[:, token_ids] - torch.logsumexp(logits, dim=-1, keepdim=True)


@torch.inference_mode()
def beam_search(model: torch.nn.Module, trie: SIDTrie, input_ids: Tensor, attention_mask: Tensor, *,
                n_beams: int = 20, exclude: list | None = None) -> BeamResult:
    """Trie-constrained beam search over SID tokens; every result is an existing, distinct item.

    One forward over the prompts fills the KV cache; the cache is then expanded to W beams and
    each of the M levels feeds one token per beam, reordering the cache by the surviving beams.
    All SIDs have the same length M, so no length penalty is applied. With W >= n_items the search
    is exhaustive (every prefix survives), i.e. it returns every item ranked by exact log-prob.

    Args:
        model: causal LM (HF or peft-wrapped), called as `model(input_ids=, attention_mask=,
            position_ids=, cache=, use_cache=True, logits_to_keep=1)` (`cache` is transformers 5.x's
            name for `past_key_values`, deprecated there). Put in eval mode for the call, then restored.
        trie: the catalogue; call `trie.to(device)` once to avoid a copy per call.
        input_ids: int64 `(B, T)`, LEFT-padded prompt token ids, on any device: moved to the model's.
        attention_mask: int64 `(B, T)`, 1 for real tokens, 0 for padding.
        n_beams: W, beams kept per prompt; also the number of items returned (capped at n_items).
        exclude: optional B sequences of item_idx that prompt b must not get (e.g. the user's seen items).
            They are masked in the trie for that prompt: a prefix is allowed only while it still leads to an
            item not excluded (:meth:`SIDTrie.unseen_counts`), so no beam is spent on excluded items and
            W distinct allowed items come back whenever there are W; otherwise the row is padded with -1.

    Returns:
        BeamResult with `item_idx` int64 `(B, W')` sorted by score descending and `scores`
        float32 `(B, W')`, W' = min(W, n_items).

    Raises:
        ValueError: if n_beams < 1, shapes differ, or a prompt is empty or right-padded.
    """
    if n_beams < 1:
        raise ValueError(f"n_beams must be >= 1, got {n_beams}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0 or bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("every prompt must be non-empty and LEFT-padded (attention_mask[:, -1] == 1); "
                         "set tokenizer.padding_side = 'left'")
    device = next(model.parameters()).device        # decode on the model's device (CPU or GPU)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch_size = input_ids.shape[0]
    n_out = min(n_beams, trie.n_items)  # W'
    if n_out == 0 or batch_size == 0:
        return BeamResult(torch.full((batch_size, n_out), -1, dtype=torch.int64, device=device),
                          torch.full((batch_size, n_out), float("-inf"), device=device))
    if exclude is not None and len(exclude) != batch_size:
        raise ValueError(f"exclude must hold one sequence per prompt: {len(exclude)} for {batch_size} prompts")
    counts = trie.unseen_counts(exclude, device) if exclude is not None else None  # (B, n_nodes) or None
    children = trie.children.to(device)
    leaf_item = trie.leaf_item.to(device)
    level_token_ids = trie.level_token_ids.to(device)  # (M, K)
    n_codes = trie.codebook_size

    was_training = model.training
    model.eval()
    try:
        attention_mask = attention_mask.to(torch.int64)
        # HF Llama derives positions from the cache length, not the mask, outside generate(): pass them.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=None, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1]  # (R, V), R = B * width rows; width = 1 before the first step
        next_pos = position_ids[:, -1] + 1  # (B,)
        beam_mask = attention_mask  # (R, T + level)

        width = 1
        nodes = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)  # (B, width) root
        scores = torch.zeros(batch_size, 1, dtype=torch.float32, device=device)  # (B, width)
        row_base = torch.arange(batch_size, device=device).unsqueeze(1)  # (B, 1)
        for level in range(trie.n_levels):
            logp = _level_logprobs(logits, level_token_ids[level]).view(batch_size, width, n_codes)  # (B, width, K)
            alive = nodes >= 0  # (B, width)
            child = children[nodes.clamp(min=0)]  # (B, width, K)
            allowed = (child >= 0) & alive.unsqueeze(-1)  # (B, width, K)
            if counts is not None:  # only prefixes that still lead to an item this prompt may get
                allowed &= counts.gather(1, child.clamp(min=0).view(batch_size, -1)).view_as(child) > 0
            cand = (scores.unsqueeze(-1) + logp).masked_fill(~allowed, float("-inf"))  # (B, width, K)
            new_width = min(n_beams, width * n_codes)
            scores, flat = cand.view(batch_size, width * n_codes).topk(new_width, dim=-1)  # (B, W)
            parent, code = flat // n_codes, flat % n_codes  # (B, W)
            valid = allowed.view(batch_size, -1).gather(1, flat) & torch.isfinite(scores)  # (B, W)
            nodes = children[nodes.gather(1, parent).clamp(min=0), code]  # (B, W)
            nodes = torch.where(valid, nodes, torch.full_like(nodes, -1))
            scores = scores.masked_fill(~valid, float("-inf"))
            if level == trie.n_levels - 1:
                break
            rows = (row_base * width + parent).view(-1)  # (B*W,) rows of the previous beams to keep
            cache.reorder_cache(rows)  # also expands the B prompt rows into B*W beams at level 0
            beam_mask = torch.cat([beam_mask[rows], beam_mask.new_ones(rows.numel(), 1)], dim=1)  # (B*W, T+level+1)
            width = new_width
            tokens = level_token_ids[level][code].view(-1, 1)  # (B*W, 1)
            pos = (next_pos + level).repeat_interleave(width).view(-1, 1)  # (B*W, 1)
            out = model(input_ids=tokens, attention_mask=beam_mask, position_ids=pos, cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[:, -1]  # (B*W, V)
    finally:
        model.train(was_training)

    item_idx = torch.where(nodes >= 0, leaf_item[nodes.clamp(min=0)], torch.full_like(nodes, -1))  # (B, W)
    item_idx, scores = item_idx[:, :n_out], scores[:, :n_out]
    valid = item_idx >= 0
    assert bool((leaf_item[nodes.clamp(min=0)][:, :n_out][valid] >= 0).all()), "a live beam ended on a non-leaf node"
    sorted_items = torch.where(valid, item_idx, -1 - torch.arange(n_out, device=device)).sort(dim=1).values
    assert bool((sorted_items[:, 1:] != sorted_items[:, :-1]).all()), "beam search returned an item twice"
    n_short = int((~valid).any(dim=1).sum())
    if n_short and exclude is None:  # with exclusions, fewer than W allowed items is expected
        logger.warning("beam_search: %d of %d prompts got fewer than %d finite-scored items; padded with -1",
                       n_short, batch_size, n_out)
    return BeamResult(item_idx=item_idx, scores=scores)
