"""Stage 'llm' data side: the tuning tasks (DESIGN §1.4-1.5) -> samples, evaluation prompts, batches.

Reads the training split only (users' training prefixes; validation/test targets are never passed in),
item titles and item text. Writes nothing. A built sample is ``{"task", "ids", "resp"}``:

- ``ids``: token ids (>= 0) and placeholders, item i -> ``-1 - 2i`` and user u -> ``-2 - 2u``
  (:func:`item_ph`, :func:`user_ph`);
- ``resp``: 0/1 per element of ``ids``, 1 = response (gets the loss).

Samples hold placeholders, not semantic-ID tokens, because the dynamic-indexing rounds (DESIGN §1.6)
change item IDs mid-training: :func:`render_batch` expands them with the current ID tables per batch.
Evaluation prompts (:func:`build_eval_prompts`) are built already rendered.

Leakage: every interaction-derived sample (seqrec, title_history, user2items, co_interaction,
neighbour_users, user2profile) reads only ``train_seqs``. item2id / id2item draw from all N catalogue
items: a title is item metadata, not an interaction, so it reveals no held-out target.
"""
from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from scipy import sparse

from .config import TaskWeights, TasksConfig
from .data import _last_category

#: Tasks in TaskWeights order; a task's index seeds its rng, so switching one off leaves the others alone.
TASKS = tuple(TaskWeights.model_fields)

#: Prompt templates per task; ``{field}`` slots are filled with tokens or placeholders, the response
#: follows the prompt directly. Template 0 of seqrec is also the evaluation prompt.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "seqrec": ("User {user} interacted with these items in order:",
               "Purchase history of user {user}:",
               "Predict what user {user} picks next after:"),
    "item2id": ("Item titled {title} has ID", "ID of item {title}:", "Which item is {title}?"),
    "id2item": ("Title of item {item}:", "Item {item} is called", "What is item {item}?"),
    "title_history": ("After {titles}, the user bought", "History: {titles}. Next item:",
                      "Items so far: {titles}. Next:"),
    "user2items": ("User {user} bought", "An item user {user} interacted with:", "User {user} liked"),
    "co_interaction": ("Users who bought {item} also bought", "Often bought with {item}:",
                       "Item {item} goes with"),
    "neighbour_users": ("Users similar to {user} bought next", "Users like {user} then chose",
                        "A user similar to {user} picked next"),
    "user2profile": ("Main interests of user {user}:", "User {user} mostly buys", "Profile of user {user}:"),
}
SEQREC_TEMPLATES = TEMPLATES["seqrec"]
_USER_TASKS = {"user2items", "neighbour_users", "user2profile"}  # need a user ID: off without use_user_sid
_TITLE_SEP = "; "           # between titles in title_history prompts
_SCAN_USERS_PER_ITEM = 100  # neighbour_users: users of one item scanned for overlap (fixed-seed subset)
_MAX_NEIGHBOURS = 50        # neighbour_users: neighbours kept per user (largest overlap first)
_FACETS = {"brand": "whole", "categories": "last", "category": "last",  # item_text key -> how to read it
           "genre": "each", "genres": "each", "class": "each"}


def item_ph(i: int) -> int:
    """Placeholder of item ``i`` in a sample's ``ids``."""
    return -1 - 2 * int(i)


def item_phs(items: np.ndarray) -> np.ndarray:
    """:func:`item_ph` of every item in ``items`` at once: int64 ``(M,)``."""
    return -1 - 2 * np.asarray(items, dtype=np.int64)


def user_ph(u: int) -> int:
    """Placeholder of user ``u`` in a sample's ``ids``."""
    return -2 - 2 * int(u)


@dataclass(frozen=True)
class PromptPieces:
    """Token ids of each seqrec template, split around ``{user}``: ``(before, after)`` per template."""
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


# ----------------------------------------------------------------------------- sample assembly

Template = tuple  # compiled: literal token-id lists and field names (str), in prompt order


def _compile(tok, template: str) -> Template:
    """``"User {user} bought"`` -> ``([ids of 'User '], 'user', [ids of ' bought'])``."""
    parts = re.split(r"\{(\w+)\}", template)  # odd positions are field names
    return tuple(p if k % 2 else tok.encode(p, add_special_tokens=False)
                 for k, p in enumerate(parts) if p)


def _sample(task: str, tpl: Template, fields: dict[str, list[int]], resp: list[int],
            mask: list[int] | None = None) -> dict:
    """Fill ``tpl``'s fields, append the response; ``mask`` marks which response elements get the loss."""
    ids = [x for seg in tpl for x in (fields[seg] if isinstance(seg, str) else seg)]
    return {"task": task, "ids": ids + resp, "resp": [0] * len(ids) + (mask or [1] * len(resp))}


def _join(lists: list[list[int]], sep: list[int]) -> list[int]:
    out = []
    for k, x in enumerate(lists):
        out += (sep if k else []) + x
    return out


def _draw_windows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` window indices out of ``n``: every window ``k // n`` times plus a random subset, in order."""
    if n == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.tile(np.arange(n), k // n), rng.choice(n, k % n, replace=False)]))


# ----------------------------------------------------------------------------- precomputed tables

def _unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and their counts (sort-based: np.unique's hash path is far slower here)."""
    a = np.sort(a)
    first = np.flatnonzero(np.r_[True, a[1:] != a[:-1]]) if len(a) else np.zeros(0, np.int64)
    return a[first], np.diff(np.r_[first, len(a)])


def cooccurrence(train_seqs: list[list[int]], n_items: int, *, window: int, topk: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-item co-occurrence over the training split, top ``topk`` per item, as CSR.

    count(i, j) = number of users in whose training sequence the distinct items i and j occur at
    most ``window`` positions apart (the task uses ``window = max_history``: the context seqrec sees).

    Returns:
        ``(ptr, nbr, cnt)``: int64 ``(N + 1,)``, ``(nnz,)``, ``(nnz,)``; item i's neighbours are
        ``nbr[ptr[i]:ptr[i+1]]``, largest count first (ties: smaller item index first).
    """
    lens = np.array([len(s) for s in train_seqs], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, np.int64) for s in train_seqs] + [np.zeros(0, np.int64)])
    user = np.repeat(np.arange(len(train_seqs)), lens)
    keys = []
    for d in range(1, window + 1):
        same = user[:-d] == user[d:]
        a, b, u = flat[:-d][same], flat[d:][same], user[:-d][same]
        keep = a != b
        a, b, u = a[keep], b[keep], u[keep]
        keys += [(u * n_items + a) * n_items + b, (u * n_items + b) * n_items + a]
    pairs = _unique(np.concatenate(keys + [np.zeros(0, np.int64)]))[0] % (n_items * n_items)  # once per user
    pair, cnt = _unique(pairs)
    i, j = pair // n_items, pair % n_items
    order = np.lexsort((j, -cnt, i))
    i, j, cnt = i[order], j[order], cnt[order]
    starts = np.searchsorted(i, np.arange(n_items + 1))
    keep = np.arange(len(i)) - starts[i] < topk
    i, j, cnt = i[keep], j[keep], cnt[keep]
    return np.searchsorted(i, np.arange(n_items + 1)), j, cnt.astype(np.int64)


def neighbour_users(train_seqs: list[list[int]], *, min_overlap: int, scan: int = _SCAN_USERS_PER_ITEM,
                    keep: int = _MAX_NEIGHBOURS, chunk: int = 1024) -> list[np.ndarray]:
    """Per user u, users v != u sharing >= ``min_overlap`` distinct training items with u, of which at
    least one is followed by another item in v's sequence (so v has a "next item" to give).

    Work is capped for large logs: each item's user list is cut to a fixed-seed random ``scan`` users
    before counting overlaps (sparse products over ``chunk`` users at a time), and the ``keep``
    largest overlaps (ties: smaller index) are kept.

    Returns:
        U int64 arrays of neighbour user indices.
    """
    U = len(train_seqs)
    lens = np.array([len(s) for s in train_seqs], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, np.int64) for s in train_seqs] + [np.zeros(0, np.int64)])
    user = np.repeat(np.arange(U), lens)
    has_next = (np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)) < np.repeat(lens - 1, lens)
    n_items = int(flat.max()) + 1 if len(flat) else 1
    key = user * n_items + flat
    pair = _unique(key)[0]                                            # distinct (user, item)
    nxt = np.isin(pair, key[has_next]).astype(np.int64)               # ... followed by an item there
    pu, pi = pair // n_items, pair % n_items
    a = sparse.csr_matrix((np.ones(len(pair), np.int64), (pu, pi)), shape=(U, n_items))
    # capped inverted index: per item, a fixed-seed random subset of `scan` users
    by_item = np.lexsort((np.random.default_rng(0).random(len(pair)), pi))
    rank = np.arange(len(pair)) - np.searchsorted(pi[by_item], pi[by_item])
    kept = by_item[rank < scan]
    big = 1 << 32                                                     # value = 1 + big * has_next
    b_t = sparse.csr_matrix((1 + big * nxt[kept], (pi[kept], pu[kept])), shape=(n_items, U))
    out = []
    for lo in range(0, U, chunk):
        c = (a[lo:lo + chunk] @ b_t).tocoo()
        r, v, val = c.row + lo, c.col, c.data
        ok = (val % big >= min_overlap) & (val >= big) & (v != r)
        r, v, overlap = r[ok], v[ok], val[ok] % big
        srt = np.lexsort((v, -overlap, r))
        r, v = r[srt], v[srt]
        starts = np.searchsorted(r, np.arange(lo, min(lo + chunk, U) + 1))
        out += [v[starts[k]:min(starts[k + 1], starts[k] + keep)] for k in range(len(starts) - 1)]
    return out


def item_facets(text: str) -> list[str]:
    """Brand / category facets of one item's ``text`` ("title: ...; brand: ...; categories: ...").

    ``brand``: the whole value; ``categories``/``category``: the most specific one (last element of
    the path, split on '>', '|' or ','; the top level, e.g. 'Beauty', is shared by all items);
    ``genre(s)``/``class`` (MovieLens): every entry (split on ',' or '|', else on spaces, RecBole
    token_seq). HTML entities are unescaped; duplicates dropped.
    """
    out = []
    for part in html.unescape(text).split("; "):   # unescape first: 'Johnson &amp; Johnson'
        key, _, val = part.partition(": ")
        kind, val = _FACETS.get(key.strip().lower()), val.strip()
        if not kind or not val:
            continue
        if kind == "whole":
            out.append(val)
        elif kind == "last":
            out.append(_last_category(val))
        else:
            out += re.split(r"\s*[,|]\s*" if re.search(r"[,|]", val) else r"\s+", val)
    return list(dict.fromkeys(t for t in out if t))


def user_profiles(train_seqs: list[list[int]], facets: list[list[str]], *, terms: int) -> list[list[str]]:
    """Each user's ``terms`` most frequent facets over the training history (brands and categories
    ranked together; ties: earliest in the history). ``[]`` for users without facets."""
    return [[f for f, _ in Counter(f for it in seq for f in facets[it]).most_common(terms)] for seq in train_seqs]


# ----------------------------------------------------------------------------- context

@dataclass(eq=False)
class TaskContext:
    """Everything the task builders read, plus tables computed once from it (never per epoch).

    Args:
        train_seqs: U users' chronological training item_idx (the leave-one-out training split).
        titles: N item titles, by item_idx.
        item_text: N item ``text`` strings (data._text format), for user2profile facets.
        tok: tokenizer with ``encode(text, add_special_tokens=False)`` and ``eos_token_id``.
        max_history: history items in a seqrec window; also the co-occurrence window.
        use_user_sid: put user placeholders in seqrec prompts; user tasks (user2items,
            neighbour_users, user2profile) are skipped without it.
    """
    train_seqs: list[list[int]]
    titles: list[str]
    item_text: list[str]
    tok: object
    max_history: int
    use_user_sid: bool
    _memo: dict = field(default_factory=dict, init=False, repr=False)

    def _cached(self, key: tuple, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    @cached_property
    def templates(self) -> dict[str, list[Template]]:
        """TEMPLATES compiled with ``tok``."""
        return {k: [_compile(self.tok, t) for t in v] for k, v in TEMPLATES.items()}

    @cached_property
    def title_sep(self) -> list[int]:
        return self.tok.encode(_TITLE_SEP, add_special_tokens=False)

    def title_ids(self, max_tokens: int) -> list[list[int]]:
        """N title token-id lists, cut to ``max_tokens``."""
        full = self._cached(("titles",), lambda: [self.tok.encode(t, add_special_tokens=False)
                                                  for t in self.titles])
        return self._cached(("titles", max_tokens), lambda: [t[:max_tokens] for t in full])

    def windows(self, cfg: TasksConfig) -> list[tuple[int, int, int]]:
        """All seqrec windows ``(user, start, end)`` (users with < 2 training items have none)."""
        return self._cached(("windows", cfg.window_stride, cfg.seqrec_loss_on), lambda: [
            (u, s, e) for u, seq in enumerate(self.train_seqs) if len(seq) >= 2
            for s, e in seqrec_windows(len(seq), max_history=self.max_history, stride=cfg.window_stride,
                                       loss_on=cfg.seqrec_loss_on)])

    @cached_property
    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(user, j)`` int64 arrays over every training position j >= 1 (title_history anchors)."""
        pairs = [(u, j) for u, seq in enumerate(self.train_seqs) for j in range(1, len(seq))]
        return tuple(np.array(pairs, dtype=np.int64).reshape(-1, 2).T)

    @cached_property
    def prefix_rows(self) -> np.ndarray:
        """:func:`prefix_user_rows` of the training split."""
        return prefix_user_rows(self.train_seqs)

    def cooccurrence(self, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`cooccurrence` CSR over the training split, window ``max_history``."""
        return self._cached(("co", topk), lambda: cooccurrence(self.train_seqs, len(self.titles),
                                                                window=self.max_history, topk=topk))

    def neighbours(self, min_overlap: int) -> list[np.ndarray]:
        """:func:`neighbour_users` of every user."""
        return self._cached(("nb", min_overlap), lambda: neighbour_users(self.train_seqs, min_overlap=min_overlap))

    def profiles(self, terms: int) -> list[list[int]]:
        """Per user, the user2profile response ids (facets joined by ', ' + eos); [] = no facets."""
        def build():
            facets = [item_facets(t) for t in self.item_text]
            return [self.tok.encode(", ".join(p), add_special_tokens=False) + [self.tok.eos_token_id] if p else []
                    for p in user_profiles(self.train_seqs, facets, terms=terms)]
        return self._cached(("profile", terms), build)

    def prepare(self, cfg: TasksConfig) -> "TaskContext":
        """Compute every table the active tasks need now (else on first use); returns self."""
        active = cfg.weights.active()
        self.title_ids(cfg.max_title_tokens)
        self.windows(cfg)
        if "co_interaction" in active:
            self.cooccurrence(cfg.co_topk)
        if "neighbour_users" in active and self.use_user_sid:
            self.neighbours(cfg.neighbour_min_overlap)
        if "user2profile" in active and self.use_user_sid:
            self.profiles(cfg.profile_terms)
        return self


# ----------------------------------------------------------------------------- task builders
# Each: (ctx, cfg, rng, k) -> k samples (fewer when the task has no anchors).

def prefix_user_rows(train_seqs: list[list[int]]) -> np.ndarray:
    """Layout of the per-prefix user IDs (``tasks.seqrec_user_ids=prefix``): the ID of user u from its first
    k training items (1 <= k < len) is row ``U + off[u] + k - 1`` of the user table prompts are rendered with
    (rows 0..U-1 stay the tokenizer stage's IDs). Returns ``off``: int64 ``(U + 1,)``, ``off[U]`` = P rows."""
    n = np.array([max(len(s) - 1, 0) for s in train_seqs], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(n)]).astype(np.int64)


def prefix_row(off: np.ndarray, u: int, k: int) -> int:
    """Row of user u's ID from its first k training items in the prompt user table (:func:`prefix_user_rows`)."""
    return len(off) - 1 + int(off[u]) + k - 1


def _seqrec_samples(seqs, windows, tpls, use_user: bool, loss_on: str, rng, k: int,
                    prefix_off: np.ndarray | None = None) -> list[dict]:
    """Seqrec samples of ``k`` drawn windows. With ``prefix_off`` (:func:`prefix_user_rows`) the user ID is the
    one of the items before a cut c (drawn in [max(start, 1), end - 1]; the last item for loss_on=target) and
    only items from c on get the loss, so no target is part of its prompt's user ID."""
    idx = _draw_windows(rng, len(windows), k)
    out = []
    for w, t in zip(idx, rng.integers(len(tpls), size=len(idx))):
        u, s, e = windows[w]
        items = [item_ph(i) for i in seqs[u][s:e]]
        mask = None if loss_on == "all_items" else [0] * (len(items) - 1) + [1]
        user = [user_ph(u)] if use_user else []
        if prefix_off is not None:
            c = e - 1 if loss_on == "target" else int(rng.integers(max(s, 1), e))
            mask = [int(s + i >= c) for i in range(e - s)]
            user = [user_ph(prefix_row(prefix_off, u, c))]
        out.append(_sample("seqrec", tpls[t], {"user": user}, items, mask))
    return out


def _seqrec(ctx, cfg, rng, k):
    prefix = ctx.use_user_sid and cfg.seqrec_user_ids == "prefix"
    return _seqrec_samples(ctx.train_seqs, ctx.windows(cfg), ctx.templates["seqrec"], ctx.use_user_sid,
                           cfg.seqrec_loss_on, rng, k, ctx.prefix_rows if prefix else None)


def _pick(rng, pool, k: int, n_tpl: int):
    """``k`` anchors drawn uniformly from ``pool`` (with replacement) and a template index for each."""
    pool = np.asarray(pool, dtype=np.int64)
    if not len(pool):
        return []
    return list(zip(pool[rng.integers(len(pool), size=k)].tolist(), rng.integers(n_tpl, size=k).tolist()))


def _titled(ctx, cfg):
    titles = ctx.title_ids(cfg.max_title_tokens)
    return titles, [i for i, t in enumerate(titles) if t]


def _item2id(ctx, cfg, rng, k):
    tpls, (titles, pool) = ctx.templates["item2id"], _titled(ctx, cfg)
    return [_sample("item2id", tpls[t], {"title": titles[i]}, [item_ph(i)]) for i, t in _pick(rng, pool, k, len(tpls))]


def _id2item(ctx, cfg, rng, k):
    tpls, (titles, pool), eos = ctx.templates["id2item"], _titled(ctx, cfg), ctx.tok.eos_token_id
    return [_sample("id2item", tpls[t], {"item": [item_ph(i)]}, titles[i] + [eos])
            for i, t in _pick(rng, pool, k, len(tpls))]


def _title_history(ctx, cfg, rng, k):
    tpls, titles, (users, js) = ctx.templates["title_history"], ctx.title_ids(cfg.max_title_tokens), ctx.positions
    out = []
    for p, t in _pick(rng, range(len(users)), k, len(tpls)):
        seq, j = ctx.train_seqs[users[p]], int(js[p])
        hist = _join([titles[i] for i in seq[max(0, j - cfg.title_history_len):j]], ctx.title_sep)
        out.append(_sample("title_history", tpls[t], {"titles": hist}, [item_ph(seq[j])]))
    return out


def _user2items(ctx, cfg, rng, k):
    tpls, seqs = ctx.templates["user2items"], ctx.train_seqs
    picks = _pick(rng, [u for u, s in enumerate(seqs) if s], k, len(tpls))
    return [_sample("user2items", tpls[t], {"user": [user_ph(u)]}, [item_ph(seqs[u][rng.integers(len(seqs[u]))])])
            for u, t in picks]


def _co_interaction(ctx, cfg, rng, k):
    """Anchor i uniform over items with co-occurring items, then j with probability ∝ count(i, j)."""
    tpls, (ptr, nbr, cnt) = ctx.templates["co_interaction"], ctx.cooccurrence(cfg.co_topk)
    picks = _pick(rng, np.flatnonzero(np.diff(ptr)), k, len(tpls))
    if not picks:
        return []
    cum = np.concatenate([[0], np.cumsum(cnt)])
    anchors = np.array([i for i, _ in picks])
    lo, hi = cum[ptr[anchors]], cum[ptr[anchors + 1]]
    js = nbr[np.searchsorted(cum, lo + rng.random(len(picks)) * (hi - lo), side="right") - 1]
    return [_sample("co_interaction", tpls[t], {"item": [item_ph(i)]}, [item_ph(j)]) for (i, t), j in zip(picks, js)]


def _neighbour_users(ctx, cfg, rng, k):
    """Anchor u uniform over users with neighbours, v uniform among them, then uniformly one of the
    items that follow, in v's training sequence, an item u also has."""
    tpls, seqs, nbs = ctx.templates["neighbour_users"], ctx.train_seqs, ctx.neighbours(cfg.neighbour_min_overlap)
    out = []
    for u, t in _pick(rng, [u for u, n in enumerate(nbs) if len(n)], k, len(tpls)):
        v_seq, mine = seqs[nbs[u][rng.integers(len(nbs[u]))]], set(seqs[u])
        nxt = [v_seq[p + 1] for p in range(len(v_seq) - 1) if v_seq[p] in mine]
        out.append(_sample("neighbour_users", tpls[t], {"user": [user_ph(u)]}, [item_ph(nxt[rng.integers(len(nxt))])]))
    return out


def _user2profile(ctx, cfg, rng, k):
    tpls, prof = ctx.templates["user2profile"], ctx.profiles(cfg.profile_terms)
    return [_sample("user2profile", tpls[t], {"user": [user_ph(u)]}, prof[u])
            for u, t in _pick(rng, [u for u, p in enumerate(prof) if p], k, len(tpls))]


_BUILDERS = {"seqrec": _seqrec, "item2id": _item2id, "id2item": _id2item, "title_history": _title_history,
             "user2items": _user2items, "co_interaction": _co_interaction, "neighbour_users": _neighbour_users,
             "user2profile": _user2profile}
assert set(_BUILDERS) == set(TASKS)


def build_task_samples(ctx: TaskContext, cfg: TasksConfig, *, seed: int, epoch: int) -> list[dict]:
    """One epoch of tuning-task samples, all active tasks, from the training split only.

    Task t contributes ``round(weights.t * n_windows)`` samples (n_windows = number of seqrec windows;
    seqrec at 1.0 = every window once); anchors and one template per sample are drawn from
    ``np.random.default_rng([seed, epoch, TASKS.index(t)])``, so an epoch is reproducible and
    templates are re-sampled per epoch. User tasks are skipped when ``ctx.use_user_sid`` is False.

    Returns:
        Samples ``{"task": str, "ids": list[int], "resp": list[int]}`` (see module docstring), grouped
        by task in TASKS order.
    """
    n_windows = len(ctx.windows(cfg))
    out = []
    for t, (name, w) in enumerate(cfg.weights.model_dump().items()):
        k = round(w * n_windows)
        if k and (ctx.use_user_sid or name not in _USER_TASKS):
            out += _BUILDERS[name](ctx, cfg, np.random.default_rng([seed, epoch, t]), k)
    return out


# ----------------------------------------------------------------------------- rendering

def render_batch(samples: list[dict], item_tokens: np.ndarray, user_tokens: np.ndarray | None) -> list[dict]:
    """Expand placeholders into semantic-ID tokens.

    Args:
        samples: dicts with ``ids`` and ``resp`` (lists or 1-D arrays), e.g. from build_task_samples.
        item_tokens: int64 ``(N, L)`` token ids of each item's semantic ID.
        user_tokens: int64 ``(U, L_u)``, or None when no sample holds a user placeholder.

    Returns:
        Per sample ``{"input_ids": list[int], "labels": list[int]}``: labels = the token id on
        response elements, -100 elsewhere.
    """
    if not samples:
        return []
    ids = np.concatenate([np.asarray(s["ids"], dtype=np.int64) for s in samples])
    resp = np.concatenate([np.asarray(s["resp"], dtype=bool) for s in samples])
    is_item, is_user = (ids < 0) & (ids % 2 == 1), (ids < 0) & (ids % 2 == 0)
    if is_user.any() and user_tokens is None:
        raise ValueError("samples hold user placeholders but user_tokens is None")
    L, Lu = item_tokens.shape[1], (user_tokens.shape[1] if user_tokens is not None else 1)
    width = _widths(ids, L, Lu)
    ends = np.cumsum(width)
    starts = ends - width
    out = np.repeat(ids, width)
    out[starts[is_item][:, None] + np.arange(L)] = np.asarray(item_tokens)[(-1 - ids[is_item]) // 2]
    if is_user.any():
        out[starts[is_user][:, None] + np.arange(Lu)] = np.asarray(user_tokens)[(-2 - ids[is_user]) // 2]
    labels = np.where(np.repeat(resp, width), out, -100)
    cuts = ends[np.cumsum([len(s["ids"]) for s in samples])[:-1] - 1]
    return [{"input_ids": a.tolist(), "labels": b.tolist()}
            for a, b in zip(np.split(out, cuts), np.split(labels, cuts))]


def _widths(ids: np.ndarray, item_levels: int, user_levels: int) -> np.ndarray:
    """Rendered tokens per element of ``ids``: L for an item placeholder, L_u for a user placeholder, else 1."""
    is_item, is_user = (ids < 0) & (ids % 2 == 1), (ids < 0) & (ids % 2 == 0)
    return np.where(is_item, item_levels, np.where(is_user, user_levels, 1))


def element_offsets(ids, item_levels: int, user_levels: int) -> np.ndarray:
    """int64 ``(len(ids),)``: the token index at which each element of one sample's ``ids`` starts once rendered
    (:func:`render_batch` with L = ``item_levels`` and L_u = ``user_levels`` tokens per placeholder)."""
    width = _widths(np.asarray(ids, dtype=np.int64), item_levels, user_levels)
    return np.cumsum(width) - width


def render(sample: dict, item_tokens: np.ndarray, user_tokens: np.ndarray | None) -> dict:
    """One sample of :func:`render_batch`."""
    return render_batch([sample], item_tokens, user_tokens)[0]


def task_stats(samples: list[dict], item_levels: int, user_levels: int) -> dict[str, dict]:
    """Per task ``{"n": samples, "mean_tokens": mean rendered length}`` (an item placeholder counts
    ``item_levels`` tokens, a user placeholder ``user_levels``), in first-seen task order."""
    lens: dict[str, list[int]] = {}
    for s in samples:
        ids = np.asarray(s["ids"])
        n_item = int(((ids < 0) & (ids % 2 == 1)).sum())
        n_user = int((ids < 0).sum()) - n_item
        lens.setdefault(s["task"], []).append(len(ids) + n_item * (item_levels - 1) + n_user * (user_levels - 1))
    return {t: {"n": len(v), "mean_tokens": float(np.mean(v))} for t, v in lens.items()}


def example_text(sample: dict, tok, item_tokens: np.ndarray, user_tokens: np.ndarray | None) -> str:
    """The rendered sample decoded for the run log: ``'<prompt> ||| <response>'``."""
    r = render(sample, item_tokens, user_tokens)
    first = next((k for k, lab in enumerate(r["labels"]) if lab != -100), len(r["labels"]))
    return f"{tok.decode(r['input_ids'][:first])} ||| {tok.decode(r['input_ids'][first:])}"


# ----------------------------------------------------------------------------- seqrec / eval / batches

def build_seqrec_samples(train_seqs: list[list[int]], item_tokens: np.ndarray, user_tokens: np.ndarray | None,
                         pieces: PromptPieces, cfg: TasksConfig, *, max_history: int, seed: int,
                         epoch: int = 0) -> list[dict]:
    """Rendered seqrec samples (every window once), from training sequences only.

    Args:
        train_seqs: U lists of training item_idx (chronological).
        item_tokens: int64 ``(N, L)`` token ids of each item's semantic ID.
        user_tokens: int64 ``(U, L_u)`` or None (no user ID in the prompt).
        epoch: mixes into the template choice, so templates are re-sampled per epoch.

    Returns:
        Samples with ``input_ids`` and ``labels`` (-100 on prompt tokens).
    """
    if cfg.seqrec_user_ids == "prefix":
        raise ValueError("build_seqrec_samples renders with the stored user IDs only; tasks.seqrec_user_ids=prefix "
                         "needs the per-prefix ID table (LLMRecipe)")
    tpls = [(before, "user", after) for before, after in pieces.parts]
    windows = [(u, s, e) for u, seq in enumerate(train_seqs) if len(seq) >= 2
               for s, e in seqrec_windows(len(seq), max_history=max_history, stride=cfg.window_stride,
                                          loss_on=cfg.seqrec_loss_on)]
    use_user = user_tokens is not None and cfg.use_user_sid
    samples = _seqrec_samples(train_seqs, windows, tpls, use_user, cfg.seqrec_loss_on,
                              np.random.default_rng([seed, epoch]), len(windows))
    return render_batch(samples, item_tokens, user_tokens)


def build_eval_prompts(histories: list[list[int]], item_tokens: np.ndarray, user_tokens: np.ndarray | None,
                       pieces: PromptPieces, cfg: TasksConfig, *, max_history: int,
                       max_length: int | None = None) -> list[list[int]]:
    """Prompt ids for next-item generation: seqrec template 0, user ID, last ``max_history`` history items.

    Args:
        histories: per evaluated user, the items before the target (for test: train + valid).
        user_tokens: rows aligned with ``histories``.
        max_length: token budget of a prompt (``llm.max_length``): when the prompt would be longer, the
            oldest history items are dropped (whole items), never the instruction or the user ID.

    Raises:
        ValueError: the instruction and user ID alone do not fit ``max_length`` (with one history item).
    """
    out = []
    n_levels = item_tokens.shape[1]
    for i, h in enumerate(histories):
        before, after = pieces.parts[0]
        utok = user_tokens[i].tolist() if (user_tokens is not None and cfg.use_user_sid) else []
        keep = min(len(h), max_history)
        if max_length is not None:
            room = (max_length - len(before) - len(utok) - len(after)) // n_levels
            if room < 1 and keep > 0:
                raise ValueError(f"llm.max_length={max_length} cannot hold the prompt's instruction and user ID "
                                 "plus one history item; raise llm.max_length")
            keep = min(keep, room)
        items = list(h[len(h) - keep:]) if keep > 0 else []
        out.append(before + utok + after + item_tokens[items].reshape(-1).tolist())
    return out


def pack(samples: list[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Pack rendered samples into fewer rows of one padded width (``llm.pack``, docs/DESIGN-NOTES.md, 'Sample
    packing'): the same tokens and labels as :func:`collate`, without most of its padding.

    Each sample (truncated to its last ``max_length`` tokens, as :func:`collate` does) goes whole into the first
    row with room, longest first (first-fit decreasing), so no row is wider than the longest sample. A row holds
    several samples back to back; the 4D mask lets each token see only the earlier tokens of its own sample and
    the position ids restart at 0 for each sample, so every token's hidden state, and so the loss and its
    gradient, equal those of the padded batch (up to float rounding). The label of a sample's first token is
    -100, as there it has no prediction from inside its sample.

    Args:
        samples: ``{"input_ids", "labels"}`` lists (:func:`render_batch`), optionally ``"soft"`` (per token, the
            row of its soft target, -1 = none; :meth:`ttds_ray.distill.CFTeacher.attach`), moved like the labels.

    Returns:
        int64 ``input_ids``, ``labels``, ``position_ids`` (and ``soft`` when given) ``(R, T)`` and bool ``attention_mask`` ``(R, 1, T, T)``
        (True = attend; HF's 4D mask form). A padding slot attends to itself only, so no softmax row is empty.

    Raises:
        ValueError: no samples, or an empty sample.
    """
    if not samples or any(len(x["input_ids"]) == 0 for x in samples):
        raise ValueError("pack: needs at least one sample and no empty sample")
    ids = [list(x["input_ids"])[-max_length:] for x in samples]
    labels = [list(x["labels"])[-max_length:] for x in samples]
    soft = [list(x["soft"])[-max_length:] for x in samples] if "soft" in samples[0] else None
    width = max(len(x) for x in ids)
    rows: list[list[int]] = []                  # sample indices per row
    room: list[int] = []
    for i in sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i)):
        r = next((r for r, free in enumerate(room) if free >= len(ids[i])), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= len(ids[i])
    n = len(rows)
    out = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
           "labels": torch.full((n, width), -100, dtype=torch.long),
           "position_ids": torch.zeros((n, width), dtype=torch.long)}
    if soft is not None:
        out["soft"] = torch.full((n, width), -1, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            k = len(ids[i])
            out["input_ids"][r, at:at + k] = torch.tensor(ids[i])
            out["labels"][r, at + 1:at + k] = torch.tensor(labels[i][1:])
            if soft is not None:
                out["soft"][r, at + 1:at + k] = torch.tensor(soft[i][1:])
            out["position_ids"][r, at:at + k] = torch.arange(k)
            segment[r, at:at + k] = i
            at += k
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    out["attention_mask"] = ((same & causal) | torch.eye(width, dtype=torch.bool)).unsqueeze(1)
    return out


def collate(samples: list[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Left-pad samples into int64 ``(B, T)`` ``input_ids``, ``attention_mask``, ``labels`` (and ``soft``, -1 padded,
    when the samples have it; see :func:`pack`).

    Sequences longer than ``max_length`` keep their last ``max_length`` tokens.
    """
    ids = [list(s["input_ids"])[-max_length:] for s in samples]
    T = max(len(x) for x in ids)
    batch = {"input_ids": torch.full((len(ids), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(ids), T), dtype=torch.long)}
    extra = {k: fill for k, fill in (("labels", -100), ("soft", -1)) if k in samples[0]}
    for k, fill in extra.items():
        batch[k] = torch.full((len(ids), T), fill, dtype=torch.long)
    for i, (s, x) in enumerate(zip(samples, ids)):
        batch["input_ids"][i, T - len(x):] = torch.tensor(x)
        batch["attention_mask"][i, T - len(x):] = 1
        for k in extra:
            batch[k][i, T - len(x):] = torch.tensor(list(s[k])[-max_length:])
    return batch
