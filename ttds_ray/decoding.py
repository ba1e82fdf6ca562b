"""Stage: eval / serve. Trie-constrained beam search that turns prompts into ranked items.

Reads: item SIDs (`ItemSIDs.codes`), the vocab ids of the SID tokens, a causal LM (optionally peft-wrapped).
Writes: nothing; returns :class:`BeamResult` (item_idx + summed log-probs) to metrics.py / serve.py.

Dimension letters: B batch (prompts), T prompt length, M SID levels, K codebook size, V vocab,
W beams, N items. A SID is M codes; level l code k is the vocab token `<i{l}_{k}>`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["SIDTrie", "ExcludedNodes", "BeamResult", "beam_search", "LOSS_VOCABS", "resolve_loss_vocab"]


class ExcludedNodes(NamedTuple):
    """Per prompt row, the trie nodes all of whose items that prompt excludes (:meth:`SIDTrie.excluded_nodes`).

    E entries, sorted by (node, row), so the entries of one depth are consecutive; the root is never one.
    Valid until the trie's next ``add_items``.

    Attributes:
        row: int64 `(E,)`, prompt row b.
        node: int64 `(E,)`, the excluded node.
        parent: int64 `(E,)`, its parent node.
        code: int64 `(E,)`, the code on the edge parent -> node.
        depth_start: M + 2 ints: the entries at depth d are `depth_start[d] : depth_start[d + 1]`.
    """

    row: Tensor
    node: Tensor
    parent: Tensor
    code: Tensor
    depth_start: list[int]


DENSE_MAX_ENTRIES = 1 << 20
"""Default of ``SIDTrie(dense_max_entries=)``: a depth whose (nodes x K) child table has at most this many
entries (8 MiB of int64) is also kept as a dense table, for a plain row gather when decoding that depth."""


class SIDTrie:
    """Prefix trie over the catalogue's SIDs, in compressed sparse rows so its memory grows with the items.

    Nodes are numbered level by level: node 0 is the root (empty prefix), then the depth-1 nodes, ...,
    then the depth-M nodes (the leaves, one per item); within a depth, nodes follow the lexicographic
    order of their prefixes. So the children of any node are consecutive ids, and the trie is stored
    as compressed sparse rows (CSR): the children of inner node `n` are the nodes
    `child_start[n] .. child_start[n + 1] - 1`, and `node_code[c]` is the code on the edge into `c`.
    The memory is O(nodes) = O(N * M), not O(nodes * K) as a dense child table (docs/DESIGN-NOTES.md,
    "Constrained decoding: the trie", has the layout and the measured sizes). Depths with few nodes
    (at most `dense_max_entries` node x code pairs; by default the root and, for K = 256, depth 1) also
    keep a dense `(nodes, K)` child table, so the widest steps of a beam search are one row gather.

    :meth:`children_of` is the one lookup a decoding step needs: the child of every (beam, code) pair
    for all beams at once, -1 where no item's SID continues that way (or the prompt excluded every item
    below), as torch ops on the trie's device (CPU or CUDA). That is what keeps decoding from emitting
    SIDs that belong to no item (style bug-log B05).

    Node ids are only valid until the next :meth:`add_items`, which rebuilds the arrays.

    Attributes:
        codes: int64 numpy `(N, M)`, the SID of every item (row i is item_idx i).
        level_token_ids: int64 `(M, K)`, vocab id of code k at level l.
        level_start: M + 2 ints: the first node id of each depth 0..M, then n_nodes.
        child_start: int64 `(n_inner + 1,)`, CSR row offsets over the inner nodes (depths 0..M-1,
            ids 0..n_inner-1): the children of inner node n are nodes child_start[n] .. child_start[n+1]-1.
        node_code: int16 (int32 if K > 32767) `(n_nodes,)`, the code on the edge into each node (0 at the root).
        leaf_to_item: int64 `(N,)`, item_idx of leaf node `level_start[M] + j` at j.
        item_path: int64 `(N, M)`, the node of item i at depth l + 1 at `[i, l]`.
        n_leaves: int64 `(n_nodes,)`, items under each node (n_leaves[root] = N).
        dense_children: M + 1 entries, one per parent depth: int64 `(nodes at that depth, K)` child id or
            -1 where the depth is small enough (see `dense_max_entries`), else None (always None at depth M).
        item_prior: float64 numpy `(N,)` or None: the item prior weights of :meth:`set_item_prior`.
        node_log_prior: float32 `(n_nodes,)` or None: log q(node's code | its prefix) under that prior
            (0 at the root), so the values along an item's path sum to log q(item).
    """

    root: int = 0
    _TENSORS = ("level_token_ids", "child_start", "node_code", "leaf_to_item", "item_path", "n_leaves")

    def __init__(self, codes: np.ndarray, level_token_ids: Tensor, *,
                 dense_max_entries: int = DENSE_MAX_ENTRIES) -> None:
        """Builds the trie (vectorised: one sort of the SIDs, then O(N) numpy work per level).

        Args:
            codes: int `(N, M)`, unique rows, each value in [0, K); row i is the SID of item_idx i.
            level_token_ids: int `(M, K)`, vocab id of the token `<i{l}_{k}>` at `[l, k]`.
            dense_max_entries: a depth with `nodes * K <= dense_max_entries` also gets a dense child table
                (speed only: results are the same for any value; 0 = CSR everywhere).

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
        self.dense_max_entries = int(dense_max_entries)
        self.codes = np.zeros((0, self.n_levels), dtype=np.int64)
        self.item_prior: np.ndarray | None = None
        self.node_log_prior: Tensor | None = None
        self._rebuild(self._check_codes(codes, what="codes", first_item_idx=0))

    @property
    def n_items(self) -> int:
        """Number of items (leaves) in the trie."""
        return int(self.codes.shape[0])

    @property
    def n_nodes(self) -> int:
        """Number of nodes, root and leaves included."""
        return self.level_start[-1]

    @property
    def n_inner(self) -> int:
        """Number of inner nodes (depths 0..M-1; the root counts even in an empty trie)."""
        return self.level_start[self.n_levels]

    @property
    def device(self) -> torch.device:
        """Device of the trie's tensors (set by :meth:`to`)."""
        return self.child_start.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the trie's arrays (its tensors and the `codes` array), on whatever device."""
        tensors = [getattr(self, name) for name in self._TENSORS] + [t for t in self.dense_children if t is not None]
        return int(self.codes.nbytes) + sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> "SIDTrie":
        """Moves the tensors to `device` in place (do it once, so beam_search does not copy per call)."""
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        self.dense_children = [None if t is None else t.to(device) for t in self.dense_children]
        if self.node_log_prior is not None:
            self.node_log_prior = self.node_log_prior.to(device)
        return self

    def set_item_prior(self, weights: np.ndarray | None) -> None:
        """Sets the item prior q(i) = weights[i] / sum(weights) that ``beam_search(prior_beta=)`` divides out.

        Stores :attr:`node_log_prior`: for every node, log Q(node) - log Q(parent), Q(node) = the prior mass of
        the items below it. Along an item's path these sum to log q(item), so adding -beta * node_log_prior at
        every level of a beam search ranks by log p(item | prompt) - beta * log q(item) exactly, level by level
        (the prefix masses are the marginals of q; docs/DESIGN-NOTES.md, *Popularity-corrected decoding*).
        Items added later by :meth:`add_items` get the smallest weight of the catalogue (an unseen item).

        Args:
            weights: float `(N,)`, finite and > 0 (e.g. training interaction counts + 1); None clears the prior.

        Raises:
            ValueError: wrong shape, or a weight that is not finite and > 0.
        """
        if weights is None:
            self.item_prior, self.node_log_prior = None, None
            return
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_items,):
            raise ValueError(f"item prior weights must have shape (N={self.n_items},), got {w.shape}")
        if w.size and not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("item prior weights must be finite and > 0 (add a smoothing count to unseen items)")
        self.item_prior = w
        self._set_node_log_prior()

    def _set_node_log_prior(self) -> None:
        path = self.item_path.cpu().numpy()                                  # (N, M)
        mass = np.zeros(self.n_nodes, dtype=np.float64)
        mass[self.root] = self.item_prior.sum()
        parent = np.zeros(self.n_nodes, dtype=np.int64)                      # root's parent: itself
        for level in range(self.n_levels):
            mass += np.bincount(path[:, level], weights=self.item_prior, minlength=self.n_nodes)
            if level:
                parent[path[:, level]] = path[:, level - 1]
        with np.errstate(divide="ignore", invalid="ignore"):                 # the root of an empty trie
            log_prior = np.nan_to_num(np.log(mass) - np.log(mass[parent]))
        self.node_log_prior = torch.from_numpy(log_prior.astype(np.float32)).to(self.device)

    def root_nodes(self, batch_size: int) -> Tensor:
        """Returns int64 `(batch_size,)` filled with the root node id, on the trie's device."""
        return torch.full((batch_size,), self.root, dtype=torch.int64, device=self.device)

    def children_of(self, nodes: Tensor, level: int | None = None, excluded: ExcludedNodes | None = None) -> Tensor:
        """The child reached by every code from every node: the one trie lookup of a decoding step.

        Args:
            nodes: int64 `(B, ...)`, node ids (-1 = dead beam); with `excluded`, dim 0 is the prompt row.
            level: depth of all `nodes` if known (beam_search passes it): picks the dense table of that
                depth where there is one, and bounds the CSR gather by that depth's largest fan-out.
                Nodes not at that depth then count as dead. None = any depth (CSR, bound K).
            excluded: from :meth:`excluded_nodes` for the same B prompts, or None. Cost O(E * nodes/B) on top.

        Returns:
            int64 `(B, ..., K)` on the trie's device: the child node id, or -1 where the node is dead,
            a leaf, has no child by that code, or (with `excluded`) leads only to excluded items.
        """
        nodes = nodes.to(self.device)
        n_codes = self.codebook_size
        table = self.dense_children[level] if level is not None else None
        if table is not None:  # dense depth: one row gather
            local = nodes - self.level_start[level]
            here = (local >= 0) & (local < table.shape[0])
            child = table[local.clamp(0, table.shape[0] - 1)].masked_fill(~here.unsqueeze(-1), -1)  # (B, ..., K)
            return self._drop_excluded(child, nodes, level, excluded)
        # CSR: gather up to `fan` consecutive children per node and scatter them to their codes
        fan = self._max_fanout[level] if level is not None else n_codes
        inner = (nodes >= 0) & (nodes < self.n_inner)
        if level is not None:
            inner &= (nodes >= self.level_start[level]) & (nodes < self.level_start[level + 1])
        row = nodes.clamp(0, self.n_inner - 1)
        start = self.child_start[row]                                        # (B, ...) first child
        end = torch.where(inner, self.child_start[row + 1], start)           # (B, ...) one past the last
        offsets = torch.arange(fan, dtype=torch.int64, device=self.device)
        # past the last child, repeat the last child: duplicate writes of equal values to one place
        cand = torch.minimum(start.unsqueeze(-1) + offsets, (end - 1).unsqueeze(-1))  # (B, ..., fan) >= 0
        value = cand.masked_fill((end == start).unsqueeze(-1), -1)           # no children: write -1 somewhere
        child = torch.full((*nodes.shape, n_codes), -1, dtype=torch.int64, device=self.device)
        child.scatter_(-1, self.node_code[cand].long(), value)
        return self._drop_excluded(child, nodes, level, excluded)

    def _drop_excluded(self, child: Tensor, nodes: Tensor, level: int | None, excluded: ExcludedNodes | None) -> Tensor:
        """child: int64 `(B, ..., K)` of `nodes` `(B, ...)` -> -1 where (row b, parent node, code) is excluded.

        A join, not a search per (beam, code): excluded entry e hits the beams of its row whose node is its
        parent, and blocks its code there. O(E * P) for P = nodes per row, whatever K and the catalogue size.
        """
        if excluded is None or (level is not None and level >= self.n_levels):  # leaves have no children
            return child
        first, stop = (0, None) if level is None else excluded.depth_start[level + 1: level + 3]  # child depth
        if stop == first:
            return child
        batch, n_codes = nodes.shape[0], self.codebook_size
        per_row = nodes.reshape(batch, -1)                                   # (B, P)
        row, parent, code = (t[first:stop].to(self.device) for t in (excluded.row, excluded.parent, excluded.code))
        hit = per_row[row] == parent.unsqueeze(1)                            # (E, P); dead beams (-1) never hit
        slot = (row.unsqueeze(1) * per_row.shape[1] + torch.arange(per_row.shape[1], device=self.device)) \
            * n_codes + code.unsqueeze(1)                                    # (E, P) flat (b, p, k)
        # min(child, -1) at hits, min(child, n_nodes) = child at misses: order-free, so deterministic
        src = torch.where(hit, -1, self.n_nodes)                             # (E, P)
        return child.reshape(-1).scatter_reduce_(0, slot.reshape(-1), src.reshape(-1), reduce="amin").view(child.shape)

    def allowed(self, nodes: Tensor) -> Tensor:
        """Codes that continue each prefix towards at least one item.

        Args:
            nodes: int64 `(...)`, node ids of any depth (-1 = dead beam).

        Returns:
            bool `(..., K)`: True where node has a child by code k; all False for dead beams and leaves.
        """
        return self.children_of(nodes.reshape(-1)).view(*nodes.shape, self.codebook_size) >= 0

    def step(self, nodes: Tensor, codes: Tensor) -> Tensor:
        """Follows one code from each node.

        Args:
            nodes: int64 `(...)`, node ids (-1 = dead).
            codes: int64 `(...)`, same shape, codes in [0, K).

        Returns:
            int64 `(...)`: child node ids, -1 where the node is dead or the code is not allowed.
        """
        child = self.children_of(nodes.reshape(-1))                          # (R, K)
        codes = codes.to(self.device).reshape(-1, 1)
        return child.gather(1, codes).view(nodes.shape)

    def item_of_leaf(self, nodes: Tensor) -> Tensor:
        """Maps leaf node ids to item_idx.

        Args:
            nodes: int64 `(...)`, node ids (-1 = dead).

        Returns:
            int64 `(...)`: item_idx of each leaf, -1 for dead beams and inner nodes.
        """
        nodes = nodes.to(self.device)
        if self.n_items == 0:
            return torch.full_like(nodes, -1)
        leaf = nodes - self.level_start[self.n_levels]
        item = self.leaf_to_item[leaf.clamp(0, self.n_items - 1)]
        return torch.where((leaf >= 0) & (nodes < self.n_nodes), item, torch.full_like(item, -1))

    def add_items(self, new_codes: np.ndarray) -> np.ndarray:
        """Adds items (cold start, DESIGN.md §1.7): they become reachable without retraining the LM.

        The arrays are rebuilt on the trie's device (one sort of all N + N_new SIDs: 1-2 s per million
        items on a 2-core CPU, bench/trie.py); node ids from before the call are invalid after it.

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
        if self.item_prior is not None:
            fill = self.item_prior.min(initial=1.0)
            self.item_prior = np.concatenate([self.item_prior, np.full(len(new_codes), fill)])
            self._set_node_log_prior()
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
        """Builds every array from `codes` (N, M), checked; raises ValueError on a shared SID, keeping the old trie."""
        n_items, n_levels = codes.shape
        order = _lexicographic_order(codes, self.codebook_size)     # (N,) item_idx in SID order
        sorted_codes = codes[order]                                   # (N, M)
        # is_new[j]: sorted row j starts a new depth-(l+1) prefix; a prefix is new once any earlier level differs
        is_new = np.zeros(n_items, dtype=bool)
        is_new[:1] = True
        level_start = [0, 1]                 # first node id of each depth, then n_nodes
        path_sorted = np.empty((n_items, n_levels), dtype=np.int64)  # node of sorted row j at depth l + 1
        parent = np.zeros(n_items, dtype=np.int64)                   # node of sorted row j at depth l
        fanouts, node_codes, n_leaves = [], [np.zeros(1, np.int64)], [np.array([n_items])]
        dense: list[Tensor | None] = []      # per parent depth
        for level in range(n_levels):
            col = sorted_codes[:, level]
            is_new[1:] |= col[1:] != col[:-1]
            starts = np.flatnonzero(is_new)                          # (n_level,) first sorted row of each new node
            node = level_start[-1] - 1 + np.cumsum(is_new)           # (N,) node id at depth l + 1
            path_sorted[:, level] = node
            edge_parent = parent[starts] - level_start[level]        # (n_level,) parent's rank within its depth
            n_parents = level_start[level + 1] - level_start[level]
            fanouts.append(np.bincount(edge_parent, minlength=n_parents))
            node_codes.append(col[starts])
            n_leaves.append(np.diff(starts, append=n_items))
            dense.append(None)
            if n_parents * self.codebook_size <= self.dense_max_entries:
                dense[-1] = torch.full((n_parents, self.codebook_size), -1, dtype=torch.int64)
                dense[-1][torch.from_numpy(edge_parent), torch.from_numpy(col[starts])] = torch.from_numpy(node[starts])
            parent = node
            level_start.append(level_start[-1] + len(starts))
        if n_items > 1 and not is_new[1:].all():
            _raise_shared_sids(sorted_codes, order, is_new)
        item_path = np.empty_like(path_sorted)
        item_path[order] = path_sorted
        child_start = np.concatenate([[1], 1 + np.cumsum(np.concatenate(fanouts))]).astype(np.int64)
        dense.append(None)  # the leaves have no children
        code_dtype = torch.int16 if self.codebook_size <= torch.iinfo(torch.int16).max + 1 else torch.int32
        device = self.device if hasattr(self, "child_start") else torch.device("cpu")
        self.level_start = level_start                                        # M + 2 ints
        self._max_fanout = [int(f.max(initial=0)) for f in fanouts] + [0]    # per parent depth 0..M
        self.child_start = torch.from_numpy(child_start).to(device)          # (n_inner + 1,)
        self.node_code = torch.from_numpy(np.concatenate(node_codes)).to(code_dtype).to(device)  # (n_nodes,)
        self.leaf_to_item = torch.from_numpy(order.astype(np.int64)).to(device)  # (N,)
        self.item_path = torch.from_numpy(item_path).to(device)              # (N, M)
        self.n_leaves = torch.from_numpy(np.concatenate(n_leaves).astype(np.int64)).to(device)  # (n_nodes,)
        self.dense_children = [None if t is None else t.to(device) for t in dense]
        self.codes = codes

    def _exclusion_pairs(self, exclude: list) -> tuple[np.ndarray, np.ndarray]:
        """(row, item_idx) pairs, int64 `(S,)` each: per prompt row its distinct excluded items in [0, N)."""
        rows, items = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for b, ex in enumerate(exclude):
            ex = np.unique(np.asarray(list(ex), dtype=np.int64))
            ex = ex[(ex >= 0) & (ex < self.n_items)]
            rows.append(np.full(len(ex), b, dtype=np.int64))
            items.append(ex)
        return np.concatenate(rows), np.concatenate(items)

    def excluded_nodes(self, exclude: list, device: torch.device | str | None = None) -> ExcludedNodes:
        """Per prompt, the nodes all of whose items that prompt excludes, for :meth:`children_of`'s `excluded`.

        O(S * M log) for S excluded (prompt, item) pairs, whatever the catalogue size (the former dense
        `(B, n_nodes)` counts of :meth:`unseen_counts` grew with the catalogue).

        Args:
            exclude: B sequences of item_idx to leave out (repeats and ids outside [0, N) are ignored).
            device: where to build the tensors (default: the trie's device).

        Returns:
            :class:`ExcludedNodes`: every (prompt row, node) whose items are all excluded for that row, at
            most S * M entries (the root is left out: if a row excludes everything, all its children are in).
            Building it reads M + 2 indices back to the host (one sync on CUDA), so the decoding steps need none.
        """
        device = device or self.device
        rows, items = self._exclusion_pairs(exclude)
        n_rows = max(len(exclude), 1)
        path = self.item_path.to(device)[torch.from_numpy(items).to(device)]              # (S, M)
        keys = (path * n_rows + torch.from_numpy(rows).to(device).unsqueeze(1)).reshape(-1)  # (S * M,) node-major
        keys, hits = torch.unique(keys, sorted=True, return_counts=True)
        keys = keys[hits == self.n_leaves.to(device)[keys // n_rows]]       # all items under the node excluded
        node = keys // n_rows
        parent = torch.searchsorted(self.child_start.to(device), node, right=True) - 1  # child_start[p] <= node
        bounds = torch.tensor(self.level_start, dtype=torch.int64, device=device)
        return ExcludedNodes(row=keys % n_rows, node=node, parent=parent, code=self.node_code.to(device)[node].long(),
                             depth_start=torch.searchsorted(node, bounds).tolist())  # one host sync per call

    def unseen_counts(self, exclude: list, device: torch.device | str | None = None) -> Tensor:
        """Per prompt, the number of items under each node once that prompt's excluded items are removed.

        Dense, O(B * n_nodes) memory: for inspection and tests; beam_search uses :meth:`excluded_nodes`.

        Args:
            exclude: B sequences of item_idx to leave out (repeats and ids >= n_items are ignored).

        Returns:
            int64 ``(B, n_nodes)``; a node with count 0 leads to no allowed item (the beam search masks it).
        """
        device = device or self.device
        counts = self.n_leaves.to(device).unsqueeze(0).repeat(len(exclude), 1)  # (B, n_nodes)
        rows, items = self._exclusion_pairs(exclude)
        if items.size:
            rows_t = torch.from_numpy(rows).to(device)
            path = self.item_path.to(device)[torch.from_numpy(items).to(device)]  # (S, M)
            counts.index_put_((rows_t.repeat_interleave(self.n_levels), path.reshape(-1)),
                              torch.full((path.numel(),), -1, dtype=torch.int64, device=device), accumulate=True)
            counts[:, 0] -= torch.bincount(rows_t, minlength=len(exclude))
        return counts


def _lexicographic_order(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """int64 `(N,)`: the stable order of the rows of `codes` `(N, M)` by SID (level 0 first).

    One argsort of the SIDs packed into int64 keys when M * bits(K) <= 63 (4 x 256: 32 bits), else lexsort.
    """
    n_items, n_levels = codes.shape
    bits = max(1, (codebook_size - 1).bit_length())
    if bits * n_levels > 63:
        return np.lexsort(codes.T[::-1]).astype(np.int64)
    packed = np.zeros(n_items, dtype=np.int64)
    for level in range(n_levels):  # M vector ops
        packed = (packed << bits) | codes[:, level]
    return np.argsort(packed, kind="stable").astype(np.int64)


def _raise_shared_sids(sorted_codes: np.ndarray, order: np.ndarray, is_new: np.ndarray) -> None:
    """Raises the ValueError that names up to 3 SIDs shared by several items (is_new: depth-M flags)."""
    heads = np.flatnonzero(is_new[:-1] & ~is_new[1:])           # sorted row starting each shared SID
    examples = []
    for head in heads[:3]:
        stop = head + 1 + int(np.argmax(np.append(is_new[head + 1:], True)))
        items = sorted(order[head:stop].tolist())
        examples.append(f"{tuple(int(c) for c in sorted_codes[head])} -> items {items}")
    raise ValueError(f"{len(heads)} SIDs are shared by several items ({'; '.join(examples)}); "
                     "item SIDs must be unique (DESIGN.md §1.3): re-export them with the dedup level")


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


LOSS_VOCABS = ("full", "sid")
"""Scorings :func:`beam_search` knows, named as ``llm.loss_vocab``: the softmax the model was trained with."""


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


class _StepScorer:
    """One LM call of a decoding step, and the log-probs of one level's K SID tokens, normalised over the rows
    the training loss normalised over (:func:`ttds_ray.llm.lm_loss`, config ``llm.loss_vocab``).

    - 'full': the model's own forward with ``logits_to_keep=1``, `(R, V)` logits and a log-softmax over all V
      (2 * D * V FLOPs per row and step), on beams that each hold a copy of their prompt's KV cache: the
      pre-issue-12 path, unchanged to the bit.
    - 'sid': the decoder alone (the last hidden state, `(R, D)`), times the M * K item-SID rows of the LM head
      (copied once per call, :func:`ttds_ray.llm.head_rows`), log-softmax over those M * K rows: the softmax
      ``lm_loss`` trains SID labels with. The beams share their prompt's KV cache (``tree``: see
      :func:`_tree_mask`). Models without a separate decoder, a linear head, or an attention implementation
      that takes a 4D mask (:data:`ttds_ray.llm.MASK_4D_ATTENTION_IMPLEMENTATIONS`) get the same numbers the slow way: full
      logits indexed at those rows, per-beam cache copies.

    Args:
        model: the causal LM (HF or peft-wrapped).
        level_token_ids: int64 `(M, K)` on the model's device: the trie's SID token ids (= the training loss's
            ``sid_ids``, ``SIDVocab.item_token_ids``, up to order).
        loss_vocab: 'full' or 'sid'.

    Attributes:
        tree: True on the 'sid' fast path: the step inputs are `(B, width)` sibling beams per prompt with a 4D
            tree mask; False: `(B * width, 1)` rows with their own cache copy and a 2D mask.
    """

    def __init__(self, model: torch.nn.Module, level_token_ids: Tensor, loss_vocab: str) -> None:
        self.model, self.level_token_ids, self.loss_vocab = model, level_token_ids, loss_vocab
        self.sid_rows = level_token_ids.reshape(-1)             # (M * K,)
        self.decoder, self.head, attn = None, None, None
        if loss_vocab == "sid" and hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings"):
            from . import llm

            decoder = model.get_decoder()
            attn = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
            if decoder is not None and decoder is not model and attn in llm.MASK_4D_ATTENTION_IMPLEMENTATIONS:
                self.head = llm.head_rows(model, self.sid_rows)
                self.decoder = decoder if self.head is not None else None
        self.tree = self.decoder is not None
        self.attn = attn

    def forward(self, **inputs) -> tuple[Tensor, object]:
        """Runs the model on `inputs` (input_ids, attention_mask, position_ids, cache). Returns `(state, cache)`:
        `state` is what :meth:`level_logprobs` reads, one row per beam (prompt row before the first step): the
        hidden state `(R, D)` of the new tokens on the 'sid' fast path, else the last position's logits `(R, V)`."""
        if self.tree:
            out = self.decoder(**inputs, use_cache=True)
            hidden = out.last_hidden_state                      # (B, T or width, D)
            return (hidden[:, -1] if inputs["cache"] is None else hidden.reshape(-1, hidden.shape[-1])), out.cache
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.cache

    def level_logprobs(self, state: Tensor, level: int) -> Tensor:
        """float32 `(R, K)`: log p(code k of `level` | beam) for each row of `state` (see :meth:`forward`)."""
        n_levels, n_codes = self.level_token_ids.shape
        if self.loss_vocab == "full":
            return _level_logprobs(state, self.level_token_ids[level])
        logits = self.head.logits(state) if self.tree else state[:, self.sid_rows]  # (R, M * K)
        logp = logits.float().log_softmax(-1)
        return logp.view(-1, n_levels, n_codes)[:, level]

    def tree_mask(self, prompt_mask: Tensor, seen: Tensor, dtype: torch.dtype) -> Tensor:
        """The 4D attention mask of one tree step (:func:`_tree_mask`) in the form the attention takes."""
        from .llm import mask_4d_for

        return mask_4d_for(self.attn, _tree_mask(prompt_mask, seen), dtype)


def _tree_mask(prompt_mask: Tensor, seen: Tensor) -> Tensor:
    """Which keys each beam's new token attends to, when the W beams of a prompt share its KV cache.

    The cache of prompt b holds its T prompt tokens, then one block per decoding step with that step's tokens
    of all its beams (block widths w_0, w_1, ...). The token of beam j sees the real prompt tokens, the tokens of
    its own ancestors (`seen[b, j]`) and itself, so it computes exactly what it would with a private cache copy
    holding [prompt, its SID prefix] (position ids are passed explicitly, so the gaps do not shift positions).

    Args:
        prompt_mask: int `(B, T)`, 1 for real prompt tokens.
        seen: bool `(B, w, S)`, S = tokens of the earlier blocks: True where the key is an ancestor of beam j.

    Returns:
        bool `(B, 1, w, T + S + w)`: True = attend (HF's 4D mask, used as-is by sdpa / eager attention).
    """
    batch, width = seen.shape[:2]
    eye = torch.eye(width, dtype=torch.bool, device=seen.device).expand(batch, width, width)
    prompt = prompt_mask.bool().unsqueeze(1).expand(batch, width, prompt_mask.shape[1])
    return torch.cat([prompt, seen, eye], dim=-1).unsqueeze(1)


def resolve_loss_vocab(model: torch.nn.Module, loss_vocab: str | None) -> str:
    """The scoring :func:`beam_search` uses: `loss_vocab` if given, else the model's ``ttds_loss_vocab`` attribute
    (set by :func:`ttds_ray.llm.load_llm` from the run's ``llm.loss_vocab``), else 'full'.

    Raises:
        ValueError: the value is not one of :data:`LOSS_VOCABS`.
    """
    from .llm import DECODE_SCORING_ATTR

    value = loss_vocab if loss_vocab is not None else getattr(model, DECODE_SCORING_ATTR, None) or "full"
    if value not in LOSS_VOCABS:
        source = "loss_vocab" if loss_vocab is not None else f"the model's {DECODE_SCORING_ATTR} attribute"
        raise ValueError(f"{source} must be one of {LOSS_VOCABS} (llm.loss_vocab), got {value!r}")
    return value


@torch.inference_mode()
def beam_search(model: torch.nn.Module, trie: SIDTrie, input_ids: Tensor, attention_mask: Tensor, *,
                n_beams: int = 20, exclude: list | None = None, loss_vocab: str | None = None,
                prior_beta: float = 0.0) -> BeamResult:
    """Trie-constrained beam search over SID tokens; every result is an existing, distinct item.

    One forward over the prompts fills the KV cache, then each of the M - 1 first levels feeds one token per
    beam. With 'full' scoring the cache is expanded to W beams and reordered by the surviving beams at every
    step; on the 'sid' fast path the W beams of a prompt share its cache, each new token attending to the
    prompt, its ancestors and itself through a 4D tree mask (no per-beam copy of the prompt's keys and values).
    All SIDs have the same length M, so no length penalty is applied. With W >= n_items the search
    is exhaustive (every prefix survives), i.e. it returns every item ranked by exact log-prob.

    Scoring (`loss_vocab`, docs/DESIGN-NOTES.md "Decoding speed"): a SID's score is the sum of its M tokens'
    log-probs, each normalised as the model was trained (``llm.loss_vocab``): 'full' = log-softmax over the
    whole vocabulary (the model's full logits at every step); 'sid' = log-softmax over the M * K item-SID
    tokens only, computed from the last hidden state and those M * K rows of the LM head (no `(R, V)` logits).

    Profiling: the phases run inside ``torch.profiler.record_function`` ranges ``decode.prefill``,
    ``decode.step_forward``, ``decode.logprobs``, ``decode.constraint`` (trie lookups + masking),
    ``decode.select`` (top-k), ``decode.cache_reorder`` ('full') or ``decode.tree_mask`` ('sid'); bench/decode.py
    reads them.

    Args:
        model: causal LM (HF or peft-wrapped), called as `model(input_ids=, attention_mask=,
            position_ids=, cache=, use_cache=True, logits_to_keep=1)` (`cache` is transformers 5.x's
            name for `past_key_values`, deprecated there); with 'sid' scoring its decoder
            (`model.get_decoder()`) is called the same way without `logits_to_keep`. Put in eval mode for the
            call, then restored.
        trie: the catalogue; call `trie.to(device)` once to avoid a copy per call.
        input_ids: int64 `(B, T)`, LEFT-padded prompt token ids, on any device: moved to the model's.
        attention_mask: int64 `(B, T)`, 1 for real tokens, 0 for padding.
        n_beams: W, beams kept per prompt; also the number of items returned (capped at n_items).
        exclude: optional B sequences of item_idx that prompt b must not get (e.g. the user's seen items).
            They are masked in the trie for that prompt: a prefix is allowed only while it still leads to an
            item not excluded (:meth:`SIDTrie.excluded_nodes`), so no beam is spent on excluded items and
            W distinct allowed items come back whenever there are W; otherwise the row is padded with -1.
        loss_vocab: 'full' or 'sid' (see Scoring); None = the model's ``ttds_loss_vocab`` attribute, which
            :func:`ttds_ray.llm.load_llm` sets from the run's config, else 'full'.
        prior_beta: popularity correction beta >= 0 (``eval.popularity_correction``): rank by
            log p(item | prompt) - beta * log q(item), q the trie's item prior (:meth:`SIDTrie.set_item_prior`),
            applied at every level through the prefix marginals, so the beams keep the corrected best prefixes.
            The returned scores are the corrected ones. 0 = plain log-probs (no prior needed).

    Returns:
        BeamResult with `item_idx` int64 `(B, W')` sorted by score descending and `scores`
        float32 `(B, W')`, W' = min(W, n_items).

    Raises:
        ValueError: if n_beams < 1, shapes differ, a prompt is empty or right-padded, `loss_vocab` is unknown,
            or prior_beta is negative, or > 0 on a trie without an item prior.
    """
    if n_beams < 1:
        raise ValueError(f"n_beams must be >= 1, got {n_beams}")
    if not prior_beta >= 0:
        raise ValueError(f"prior_beta must be >= 0, got {prior_beta}")
    if prior_beta and trie.node_log_prior is None:
        raise ValueError("prior_beta > 0 needs an item prior on the trie (SIDTrie.set_item_prior)")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0 or bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("every prompt must be non-empty and LEFT-padded (attention_mask[:, -1] == 1); "
                         "set tokenizer.padding_side = 'left'")
    loss_vocab = resolve_loss_vocab(model, loss_vocab)
    device = next(model.parameters()).device        # decode on the model's device (CPU or GPU)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch_size = input_ids.shape[0]
    n_out = min(n_beams, trie.n_items)  # W'
    if n_out == 0 or batch_size == 0:
        return BeamResult(torch.full((batch_size, n_out), -1, dtype=torch.int64, device=device),
                          torch.full((batch_size, n_out), float("-inf"), device=device))
    if exclude is not None and len(exclude) != batch_size:
        raise ValueError(f"exclude must hold one sequence per prompt: {len(exclude)} for {batch_size} prompts")
    excluded = trie.excluded_nodes(exclude, device) if exclude is not None else None  # ExcludedNodes or None
    level_token_ids = trie.level_token_ids.to(device)  # (M, K)
    n_codes = trie.codebook_size
    record = torch.profiler.record_function

    was_training = model.training
    model.eval()
    try:
        scorer = _StepScorer(model, level_token_ids, loss_vocab)
        attention_mask = attention_mask.to(torch.int64)
        # HF Llama derives positions from the cache length, not the mask, outside generate(): pass them.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        with record("decode.prefill"):
            state, cache = scorer.forward(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=None)  # state: R = B * width rows
        next_pos = position_ids[:, -1] + 1  # (B,)
        beam_mask = attention_mask  # (R, T + level)

        width = 1
        nodes = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)  # (B, width) root
        scores = torch.zeros(batch_size, 1, dtype=torch.float32, device=device)  # (B, width)
        row_base = torch.arange(batch_size, device=device).unsqueeze(1)  # (B, 1)
        seen = torch.zeros(batch_size, 1, 0, dtype=torch.bool, device=device)  # (B, width, S) tree path: ancestors
        for level in range(trie.n_levels):
            with record("decode.logprobs"):
                logp = scorer.level_logprobs(state, level).view(batch_size, width, n_codes)  # (B, width, K)
            with record("decode.constraint"):
                # the one trie lookup of the step; with exclude, only prefixes that still lead to an allowed item
                child = trie.children_of(nodes, level, excluded).to(device)  # (B, width, K) node, -1 = not allowed
                allowed = child >= 0  # (B, width, K)
                if prior_beta:  # - beta * log q(code | prefix): the corrected score of every child
                    logp = logp - prior_beta * trie.node_log_prior.to(device)[child.clamp(min=0)]
                cand = (scores.unsqueeze(-1) + logp).masked_fill(~allowed, float("-inf"))  # (B, width, K)
            with record("decode.select"):
                new_width = min(n_beams, width * n_codes)
                scores, flat = cand.view(batch_size, width * n_codes).topk(new_width, dim=-1)  # (B, W)
                parent, code = flat // n_codes, flat % n_codes  # (B, W)
            with record("decode.constraint"):
                valid = allowed.view(batch_size, -1).gather(1, flat) & torch.isfinite(scores)  # (B, W)
                nodes = child.view(batch_size, -1).gather(1, flat)  # (B, W)
                nodes = torch.where(valid, nodes, torch.full_like(nodes, -1))
                scores = scores.masked_fill(~valid, float("-inf"))
            if level == trie.n_levels - 1:
                break
            tokens = level_token_ids[level][code]  # (B, W)
            if scorer.tree:  # the W beams of a prompt share its cache; each sees its own ancestors (_tree_mask)
                with record("decode.tree_mask"):
                    seen = seen.gather(1, parent.unsqueeze(-1).expand(-1, -1, seen.shape[-1]))  # (B, W, S)
                    mask = scorer.tree_mask(attention_mask, seen, state.dtype)  # (B, 1, W, T + S + W)
                    seen = torch.cat([seen, torch.eye(new_width, dtype=torch.bool, device=device)
                                      .expand(batch_size, -1, -1)], dim=-1)  # (B, W, S + W)
                width = new_width
                pos = (next_pos + level).unsqueeze(1).expand(-1, width)  # (B, W): all at depth `level`
                with record("decode.step_forward"):
                    state, cache = scorer.forward(input_ids=tokens, attention_mask=mask, position_ids=pos,
                                                  cache=cache)  # state (B * W, D)
                continue
            with record("decode.cache_reorder"):
                rows = (row_base * width + parent).view(-1)  # (B*W,) rows of the previous beams to keep
                cache.reorder_cache(rows)  # also expands the B prompt rows into B*W beams at level 0
                beam_mask = torch.cat([beam_mask[rows], beam_mask.new_ones(rows.numel(), 1)], dim=1)  # (B*W, T+l+1)
            width = new_width
            pos = (next_pos + level).repeat_interleave(width).view(-1, 1)  # (B*W, 1)
            with record("decode.step_forward"):
                state, cache = scorer.forward(input_ids=tokens.view(-1, 1), attention_mask=beam_mask, position_ids=pos,
                                              cache=cache)
    finally:
        model.train(was_training)

    item_idx = trie.item_of_leaf(nodes).to(device)  # (B, W), -1 for dead beams
    assert bool((item_idx[nodes >= 0] >= 0).all()), "a live beam ended on a non-leaf node"
    item_idx, scores = item_idx[:, :n_out], scores[:, :n_out]
    valid = item_idx >= 0
    sorted_items = torch.where(valid, item_idx, -1 - torch.arange(n_out, device=device)).sort(dim=1).values
    assert bool((sorted_items[:, 1:] != sorted_items[:, :-1]).all()), "beam search returned an item twice"
    n_short = int((~valid).any(dim=1).sum())
    if n_short and exclude is None:  # with exclusions, fewer than W allowed items is expected
        logger.warning("beam_search: %d of %d prompts got fewer than %d finite-scored items; padded with -1",
                       n_short, batch_size, n_out)
    return BeamResult(item_idx=item_idx, scores=scores)
