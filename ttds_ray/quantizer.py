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


class CollisionError(ValueError):
    """Two items would share a semantic ID and no free code is left under their prefix."""


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Lloyd's k-means. ``x`` float ``(N, D)`` -> centroids ``(k, D)``; empty clusters get a random point."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator)[: min(k, n)]
    cent = x[idx].clone()
    if k > n:  # fewer points than codes: duplicate with jitter
        extra = x[torch.randint(n, (k - n,), generator=generator)]
        cent = torch.cat([cent, extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(1)                        # (N,)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            cent[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
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
        """Initialise every level by k-means on that level's residuals of ``z`` ``(N, D)``."""
        g = torch.Generator().manual_seed(seed)
        r = z.detach().clone()
        for l in range(self.n_levels):
            self.codebooks.data[l] = kmeans(r, self.codebook_size, iters=iters, generator=g)
            r = r - self.codebooks[l][torch.cdist(r, self.codebooks[l]).argmin(1)]
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
                pick = torch.randint(len(pool), (len(dead),), generator=g)
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

    The last level is assigned by balanced optimal transport (Sinkhorn) over the catalogue, then
    each remaining collision is resolved deterministically: within a group of items sharing a full
    ID, the item with the highest transport mass keeps the code; the others, in order of decreasing
    mass then item index, move to the nearest code still free under their (L−1)-prefix.

    Args:
        codes: int64 ``(N, L)`` greedy codes (the last column is replaced).
        last_cost: float ``(N, K)`` squared distance of each item's last residual to each code.
        item_names: optional raw ids used in error messages.

    Returns:
        ``(codes (N, L) int64 unique rows, stats)``; stats has ``collisions_greedy`` (items that
        share their greedy ID with an earlier item), ``collisions_sinkhorn`` and ``collisions_final`` (0).

    Raises:
        CollisionError: more items share an (L−1)-prefix than there are codes K; names the prefix.
    """
    n, L = codes.shape
    k = last_cost.shape[1]

    def n_dup(c: np.ndarray) -> int:
        return int(n - len(np.unique(c, axis=0)))

    stats = {"collisions_greedy": n_dup(codes)}
    prefixes = [tuple(r) for r in codes[:, :-1].tolist()]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prefixes):
        groups[p].append(i)
    for p, members in groups.items():
        if len(members) > k:
            ex = [item_names[i] if item_names else str(i) for i in members[:3]]
            raise CollisionError(
                f"{len(members)} items share the semantic-ID prefix {p} but the last level has only "
                f"K={k} codes (e.g. items {ex}); raise tokenizer.item.codebook_size or n_levels")
    plan = sinkhorn(torch.as_tensor(last_cost, dtype=torch.float64), iters=sinkhorn_iters, eps=sinkhorn_eps
                    ).numpy()                                          # (N, K)
    out = codes.copy()
    out[:, -1] = plan.argmax(1)
    stats["collisions_sinkhorn"] = n_dup(out)
    for p, members in groups.items():
        taken: dict[int, int] = {}
        order = sorted(members, key=lambda i: (-plan[i, out[i, -1]], i))
        losers = []
        for i in order:
            c = int(out[i, -1])
            if c in taken:
                losers.append(i)
            else:
                taken[c] = i
        for i in losers:
            free = [c for c in np.argsort(last_cost[i], kind="stable") if int(c) not in taken]
            out[i, -1] = free[0]
            taken[int(free[0])] = i
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
