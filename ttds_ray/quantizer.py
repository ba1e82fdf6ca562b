"""Residual quantizer with k-means init, dead-code re-seeding and unique last-level assignment.

Pure torch (DESIGN §1.3; TIGER/SoundStream RQ, LC-Rec's Sinkhorn uniform semantic mapping).
Reads latents ``(N, D)`` from a DM-VAE; writes nothing itself (towers.py saves the tables).
Dimensions: N entities, B batch, D latent dim, L levels, K codes per level.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


from .errors import CollisionError  # noqa: E402  (re-exported: the project's error hierarchy)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None,
           n_init: int = 4) -> torch.Tensor:
    """Best of ``n_init`` runs (lowest inertia) of :func:`_kmeans_once`."""
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        cent = _kmeans_once(x, k, iters=iters, generator=generator)
        inertia = float(torch.cdist(x, cent).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = cent, inertia
    return best


def _kmeans_once(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Lloyd's k-means with greedy k-means++ seeding (Arthur & Vassilvitskii 2007).

    ``x`` float ``(N, D)`` -> centroids ``(k, D)``. Empty clusters are re-seeded on the point
    farthest from its centroid. With fewer points than codes, the extra centroids are jittered copies.
    """
    n = x.shape[0]
    if k >= n:
        extra = x[torch.randint(n, (k - n,), generator=generator)]
        return torch.cat([x.clone(), extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    cent = x[torch.randint(n, (1,), generator=generator)].clone()
    d2 = torch.cdist(x, cent).pow(2).squeeze(1)                       # (N,) distance to nearest seed
    trials = 2 + int(np.log(k))                                        # greedy k-means++ (as scikit-learn)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        cand = x[torch.multinomial(p, trials, replacement=True, generator=generator)]   # (trials, D)
        new_d2 = torch.minimum(d2[None], torch.cdist(cand, x).pow(2))  # (trials, N)
        best = int(new_d2.sum(1).argmin())
        cent = torch.cat([cent, cand[best:best + 1]])
        d2 = new_d2[best]
    for _ in range(iters):
        dist = torch.cdist(x, cent)                                    # (N, k)
        assign = dist.argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        cent = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], cent)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
            cent[empty] = x[far]
    return cent


class ResidualQuantizer(nn.Module):
    """L-level residual VQ: r_1 = z; c_l = argmin_k ||r_l - e^l_k||; r_{l+1} = r_l - e^l_{c_l}.

    Args:
        n_levels: L. codebook_size: K. dim: D.
    """

    def __init__(self, n_levels: int, codebook_size: int, dim: int):
        super().__init__()
        self.n_levels, self.codebook_size, self.dim = n_levels, codebook_size, dim
        self.codebooks = nn.Parameter(torch.randn(n_levels, codebook_size, dim) * 0.01)  # (L, K, D)
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, *, iters: int = 20, seed: int = 0) -> None:
        """Initialise every level by k-means on that level's residuals of ``z`` ``(N, D)``.

        k-means runs on the CPU with a seeded CPU generator (same codebooks on any device); the
        result is copied to the codebooks' device."""
        g = torch.Generator().manual_seed(seed)
        r = z.detach().float().cpu().clone()
        for l in range(self.n_levels):
            cent = kmeans(r, self.codebook_size, iters=iters, generator=g)
            self.codebooks.data[l] = cent.to(self.codebooks.device)
            r = r - cent[torch.cdist(r, cent).argmin(1)]
        self.initialised.fill_(True)

    def forward(self, z: torch.Tensor, *, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, list[torch.Tensor]]:
        """Quantize ``z`` float ``(B, D)``.

        Returns:
            ``z_q`` ``(B, D)`` with straight-through gradient to ``z``; ``codes`` int64 ``(B, L)``;
            ``loss`` scalar = Σ_l ||sg[r_l] − e_l||² + β ||r_l − sg[e_l]||²; ``residuals``: L tensors
            ``(B, D)`` (r_1 .. r_L, graph-connected to z).
        """
        r = z
        q_sum = torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for l in range(self.n_levels):
            residuals.append(r)
            cb = self.codebooks[l]                                     # (K, D)
            c = torch.cdist(r.detach(), cb.detach()).argmin(1)          # (B,)
            e = cb[c]                                                  # (B, D)
            loss = loss + F.mse_loss(e, r.detach()) + (beta * F.mse_loss(r, e.detach()) if beta else 0.0)
            q_sum = q_sum + e
            r = r - e.detach()
            codes.append(c)
        z_q = z + (q_sum - z).detach()                                 # straight-through estimator
        return z_q, torch.stack(codes, 1), loss, residuals

    def soft_assign(self, residuals: list[torch.Tensor], temp: float) -> list[torch.Tensor]:
        """P_l(k|z) = softmax_k(−||r_l − e^l_k||² / t) per level: L tensors ``(B, K)`` (DESIGN §1.2)."""
        return [F.softmax(-torch.cdist(r, self.codebooks[l]).pow(2) / temp, dim=-1)
                for l, r in enumerate(residuals)]

    @torch.no_grad()
    def reseed_dead_codes(self, usage: torch.Tensor, residual_pool: list[torch.Tensor], *, seed: int) -> int:
        """Move codes unused in the last epoch (``usage`` int ``(L, K)``) onto random residuals.

        Returns:
            Number of codes re-seeded.
        """
        g = torch.Generator().manual_seed(seed)
        n = 0
        for l in range(self.n_levels):
            dead = (usage[l] == 0).nonzero().flatten()
            pool = residual_pool[l]
            if len(dead) and len(pool):
                pick = torch.randint(len(pool), (len(dead),), generator=g).to(pool.device)
                self.codebooks.data[l, dead] = pool[pick]
                n += len(dead)
        return n

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard codes for every level but the last and the last level's residual.

        Returns: ``codes`` int64 ``(N, L)`` (greedy), ``last_residual`` ``(N, D)``.
        """
        _, codes, _, residuals = self.forward(z, beta=0.0)
        return codes, residuals[-1]


def sinkhorn(cost: torch.Tensor, *, iters: int = 50, eps: float = 0.05) -> torch.Tensor:
    """Balanced entropic optimal transport (Cuturi 2013), uniform marginals.

    Args:
        cost: float ``(N, K)``; scaled by its median before ``exp(-cost/eps)``.

    Returns:
        Transport plan ``(N, K)``; row n sums to 1/N, column k to 1/K (approximately).
    """
    c = cost / cost.median().clamp(min=1e-12)
    log_p = -c / eps                                                   # (N, K)
    n, k = c.shape
    log_r = torch.full((n,), -np.log(n), dtype=c.dtype)
    log_c = torch.full((k,), -np.log(k), dtype=c.dtype)
    u = torch.zeros(n, dtype=c.dtype)
    v = torch.zeros(k, dtype=c.dtype)
    for _ in range(iters):
        u = log_r - torch.logsumexp(log_p + v[None], dim=1)
        v = log_c - torch.logsumexp(log_p + u[:, None], dim=0)
    return torch.exp(log_p + u[:, None] + v[None])


def unique_codes(codes: np.ndarray, last_cost: np.ndarray, *, sinkhorn_iters: int = 50,
                 sinkhorn_eps: float = 0.05, item_names: list[str] | None = None
                 ) -> tuple[np.ndarray, dict]:
    """Make item semantic IDs unique (DESIGN §1.3).

    Items are grouped by their (L−1)-prefix. In every group whose greedy last-level codes collide,
    the last level is re-assigned by balanced optimal transport (Sinkhorn, uniform marginals over
    the group's items and the K codes, as LC-Rec's uniform semantic mapping, applied per prefix so
    that it targets collisions). Any collision left is resolved deterministically: the item with
    the highest transport mass keeps the code; the others, by decreasing mass then item index,
    move to the nearest code still free under their prefix.

    Args:
        codes: int64 ``(N, L)`` greedy codes.
        last_cost: float ``(N, K)`` squared distance of each item's last residual to each code.
        item_names: optional raw ids used in error messages.

    Returns:
        ``(codes (N, L) int64 unique rows, stats)``; stats counts items that share their ID with an
        earlier item after each step: ``collisions_greedy``, ``collisions_sinkhorn`` (before the
        deterministic resolver) and ``collisions_final`` (always 0).

    Raises:
        CollisionError: more items share an (L−1)-prefix than there are codes K; names the prefix.
    """
    n, L = codes.shape
    k = last_cost.shape[1]

    def n_dup(c: np.ndarray) -> int:
        return int(n - len(np.unique(c, axis=0)))

    stats = {"collisions_greedy": n_dup(codes)}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(map(tuple, codes[:, :-1].tolist())):
        groups[p].append(i)
    for p, members in groups.items():
        if len(members) > k:
            ex = [item_names[i] if item_names else str(i) for i in members[:3]]
            raise CollisionError(
                f"{len(members)} items share the semantic-ID prefix {p} but the last level has only "
                f"K={k} codes (e.g. items {ex}); raise tokenizer.item.codebook_size or n_levels")
    out = codes.copy()
    mass = np.zeros(n)
    for members in groups.values():
        idx = np.asarray(members)
        if len(idx) > 1 and len(np.unique(codes[idx, -1])) < len(idx):
            plan = sinkhorn(torch.as_tensor(last_cost[idx], dtype=torch.float64), iters=sinkhorn_iters,
                            eps=sinkhorn_eps).numpy()                 # (n_group, K)
            out[idx, -1] = plan.argmax(1)
            mass[idx] = plan.max(1)
    stats["collisions_sinkhorn"] = n_dup(out)
    for members in groups.values():
        taken: dict[int, int] = {}
        losers = []
        for i in sorted(members, key=lambda i: (-mass[i], i)):
            if int(out[i, -1]) in taken:
                losers.append(i)
            else:
                taken[int(out[i, -1])] = i
        for i in losers:
            free = next(int(c) for c in np.argsort(last_cost[i], kind="stable") if int(c) not in taken)
            out[i, -1] = free
            taken[free] = i
    stats["collisions_final"] = n_dup(out)
    assert stats["collisions_final"] == 0, "collision resolver left duplicates"
    return out, stats


def code_usage(codes: np.ndarray, codebook_size: int) -> dict:
    """Per-level code usage: codes used and normalised entropy (1 = uniform over K)."""
    used, ent = [], []
    for l in range(codes.shape[1]):
        cnt = np.bincount(codes[:, l], minlength=codebook_size).astype(np.float64)
        p = cnt[cnt > 0] / cnt.sum()
        used.append(int((cnt > 0).sum()))
        ent.append(float(-(p * np.log(p)).sum() / np.log(codebook_size)))
    return {"codes_used": used, "entropy": ent}
