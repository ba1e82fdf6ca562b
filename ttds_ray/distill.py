"""Stage 'llm': distilling the pipeline's own SASRec into the semantic-ID generator (``llm.distill_cf``).

TTDS trains the LLM with one-hot next-token targets: the codes of the item that came next. On a long-tailed
catalogue that teaches the generator little about rare items (docs/RESULTS.md, 'Where TTDS loses to SASRec: the
long tail'): a rare item is a target a handful of times, and its deeper codes are learnt from those few. The
SASRec of the ``cf`` stage, which the tokenizer already reads, ranks rare items better. With
``llm.distill_cf = lambda > 0`` every item of a seqrec window after the first also gets a soft target: SASRec's
next-item distribution given the same window prefix, summed onto the codes of each level given the true codes
of the levels before (level l: ``q_l(c) = sum of p(j) over items j whose first l codes are the target's and whose
code l is c``, renormalised). The LLM's loss at that token becomes ``(1 - lambda) * CE(one-hot) + lambda *
CE(q_l)`` (:func:`ttds_ray.llm.lm_loss`). Knowledge distillation as in Hinton et al. (2015), with the teacher's
item distribution marginalised onto the trie of semantic IDs; docs/DESIGN-NOTES.md, 'Distilling SASRec into the
generator' (a deviation from DESIGN §1.4, which trains on one-hot targets only).

The teacher reads only the training split (it is the ``cf`` stage's model, fitted on it), and only the window's
items before each target, as the LLM does. Nothing here is trained; the teacher runs in eval mode without grad.
"""
from __future__ import annotations

import numpy as np
import torch

from . import tasks
from .cf import SASRec


def trailing_windows(samples: list[dict]) -> list[tuple[int, np.ndarray]]:
    """The seqrec windows inside a batch of samples: per sample that ends in a run of at least two item
    placeholders (only seqrec windows do; every other task answers with one item or with text), the run's
    element positions in ``ids``.

    Args:
        samples: ``{"ids", "resp"}`` with placeholders (:func:`ttds_ray.tasks.item_ph`).

    Returns:
        ``[(sample index, int64 (n,) positions of the run's elements in ids, n >= 2)]``.
    """
    out = []
    for i, s in enumerate(samples):
        ids = np.asarray(s["ids"], dtype=np.int64)
        is_item = (ids < 0) & (ids % 2 == 1)
        n = len(ids) - (np.flatnonzero(~is_item)[-1] + 1 if (~is_item).any() else 0)
        if n >= 2:
            out.append((i, np.arange(len(ids) - n, len(ids))))
    return out


@torch.no_grad()
def code_distributions(probs: torch.Tensor, codes: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Marginalise item distributions onto the semantic-ID trie, level by level, given the target's prefix.

    Args:
        probs: float ``(m, N)`` next-item distributions (rows sum to 1).
        codes: int64 ``(N, L)`` every item's semantic ID.
        target: int64 ``(m, L)`` the semantic ID of each row's true next item.
        k: codebook size K (codes in ``[0, K)``).

    Returns:
        float ``(m, L, K)``: ``[r, l, c]`` = P(code l = c | first l codes = target[r, :l]) under ``probs[r]``;
        each ``[r, l]`` sums to 1 wherever some item with the target's first l codes has mass (always when the
        target itself has mass).
    """
    m, L = target.shape
    out = probs.new_zeros(m, L, k)
    on_prefix = torch.ones_like(probs, dtype=torch.bool)                 # (m, N) items sharing the prefix so far
    for level in range(L):
        p = probs * on_prefix
        q = out[:, level].scatter_add_(1, codes[:, level].expand(m, -1), p)
        q /= q.sum(1, keepdim=True).clamp_min(1e-30)
        on_prefix &= codes[:, level].unsqueeze(0) == target[:, level:level + 1]
    return out


class CFTeacher:
    """SASRec as the teacher of the LLM's semantic-ID tokens (module docstring).

    Args:
        model: the ``cf`` stage's SASRec (:func:`ttds_ray.cf.load_sasrec`); put in eval mode.
        temperature: the teacher's logits are divided by it before the softmax (> 1 = softer).
    """

    def __init__(self, model: SASRec, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.temperature = model.eval(), float(temperature)

    @torch.no_grad()
    def attach(self, samples: list[dict], rendered: list[dict], item_codes: np.ndarray, k: int,
               user_levels: int) -> torch.Tensor | None:
        """Add a ``soft`` list to each rendered sample and return the soft targets it points into.

        ``rendered[i]["soft"][t]`` = row of the returned matrix that is the soft target of token t's label
        (``-1`` = none); the rows of one item are its levels 0..L-1 in order. Tokens of the first item of a
        window, and of items without the loss (``resp`` 0), get none.

        Args:
            samples: the batch as built (``ids``, ``resp`` with placeholders), in the order of ``rendered``.
            rendered: :func:`ttds_ray.tasks.render_batch` of ``samples`` (changed in place).
            item_codes: int ``(N, L)`` the current item index (dynamic rounds change it between batches).
            k: codebook size K. user_levels: tokens per user placeholder (L_u), as rendered.

        Returns:
            float32 ``(m * L, K)`` on the teacher's device, or None when the batch has no seqrec window.
        """
        wins = trailing_windows(samples)
        if not wins:
            for r in rendered:
                r["soft"] = [-1] * len(r["input_ids"])
            return None
        dev = next(self.model.parameters()).device
        items = [(-1 - np.asarray(samples[i]["ids"], dtype=np.int64)[pos]) // 2 for i, pos in wins]
        T = max(len(w) for w in items) - 1
        seq = torch.full((len(wins), T), -1, dtype=torch.long)
        for r, w in enumerate(items):
            seq[r, T - len(w) + 1:] = torch.as_tensor(w[:-1])
        hidden = self.model(seq.to(dev))                                          # (W, T, D)
        rows, tgt, where = [], [], []      # hidden row, target item, (sample, element position)
        for r, ((i, pos), w) in enumerate(zip(wins, items)):
            resp = np.asarray(samples[i]["resp"])[pos]
            for j in range(1, len(w)):
                if resp[j]:
                    rows.append((r, T - len(w) + j))
                    tgt.append(int(w[j]))
                    where.append((i, int(pos[j])))
        for r in rendered:
            r["soft"] = [-1] * len(r["input_ids"])
        if not rows:
            return None
        rr = torch.as_tensor(rows, device=dev)
        h = hidden[rr[:, 0], rr[:, 1]]                                              # (m, D)
        probs = torch.softmax(self.model.score_all(h).float() / self.temperature, dim=-1)  # (m, N)
        codes = torch.as_tensor(np.asarray(item_codes), dtype=torch.long, device=dev)
        q = code_distributions(probs, codes, codes[torch.as_tensor(tgt, device=dev)], k)  # (m, L, K)
        L = codes.shape[1]
        offsets = {}
        for n, (i, p) in enumerate(where):
            if i not in offsets:
                offsets[i] = tasks.element_offsets(samples[i]["ids"], L, user_levels)
            start = int(offsets[i][p])
            rendered[i]["soft"][start:start + L] = range(n * L, n * L + L)
        return q.reshape(-1, k)
