"""Stage 'tokenizer': twin towers (item, user) = DM-VAE encoder -> residual quantizer (DESIGN §1.2-1.3).

Reads ``embeddings/item_text.npy`` and ``cf/{cf_items,cf_users}.npy`` plus users' training histories.
Writes ``tokenizer/``: ``item_tower.safetensors``, ``user_tower.safetensors``, ``towers.json``,
``item_sids.parquet``, ``user_sids.parquet``, ``sid_tables.json`` (content hashes), ``tokenizer_stats.json``.
Also the tokenizer step of dynamic semantic indexing (DESIGN §1.6): :func:`refine_item_tower` updates
the item tower under guidance from the frozen LLM; :func:`count_changed` counts re-indexed items.
Dimensions: N entities, B batch, D_s / D_c input dims, Z latent, L levels, K codes.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_write_bytes
from .config import TokenizerConfig, TowerConfig
from .errors import CollisionError
from .sids import SIDTable  # noqa: F401  (re-exported)
from .quantizer import ResidualQuantizer, code_usage, unique_codes
from .vae import DMVAE, info_nce, kl_gauss, kl_std_normal, sym_kl_categorical

log = logging.getLogger(__name__)


class Tower(nn.Module):
    """DM-VAE encoder + residual quantizer for one entity type.

    Inputs are standardised with statistics stored as buffers, so the tower is self-contained.
    """

    def __init__(self, d_s: int, d_c: int, tcfg: TowerConfig):
        super().__init__()
        self.d_s, self.d_c, self.tcfg = d_s, d_c, tcfg     # constructor arguments, saved with the weights
        self.vae = DMVAE(d_s, d_c, tcfg.latent_dim, tcfg.hidden_dim)
        self.rq = ResidualQuantizer(tcfg.n_levels, tcfg.codebook_size, tcfg.latent_dim)
        for name, d in (("s", d_s), ("c", d_c)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_scale", torch.ones(()))

    def set_normalisation(self, s: torch.Tensor, c: torch.Tensor) -> None:
        """Centre each modality and scale it to unit mean per-dim variance."""
        for name, x in (("s", s), ("c", c)):
            mean = x.mean(0)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_scale").copy_((x - mean).pow(2).mean().sqrt().clamp(min=1e-8))

    def normalise(self, s: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (s - self.s_mean) / self.s_scale, (c - self.c_mean) / self.c_scale

    @torch.no_grad()
    def latent(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Deterministic fused latent μ of q(z|s,c): ``(N, Z)``; independent of batch composition."""
        s, c = self.normalise(s, c)
        return self.vae.encode(s, c)[2].mu

    @torch.no_grad()
    def latent_from(self, s: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Latent μ from the modalities an entity has (DESIGN §1.2, §1.7: cold-start items).

        With both, the product of experts of q(z|s) and q(z|c) (= :meth:`latent`); with text only,
        q(z|s) alone (a product of one expert).

        Args:
            s: ``(N, d_s)`` semantic embeddings; c: ``(N, d_c)`` collaborative embeddings or None.

        Returns:
            ``(N, Z)`` in the dtype of the tower's weights.
        """
        if c is not None:
            return self.latent(s, c)
        return self.vae._post(self.vae.enc_s((s - self.s_mean) / self.s_scale)).mu


def tower_loss(tower: Tower, s: torch.Tensor, c: torch.Tensor, cfg: TokenizerConfig
               ) -> tuple[torch.Tensor, dict, torch.Tensor, list[torch.Tensor]]:
    """Full tokenizer loss of one batch (DESIGN §1.2-1.3).

    Terms: reconstruction of s and c from the fused sample, from each single-modality sample
    (cross-modal) and from the quantized latent; KL(q(z|s,c)||N(0,I))·β_kl; RQ codebook +
    β·commitment; instance InfoNCE(μ_s, μ_c)·α_inst; distribution sym-KL(q(z|s), q(z|c))·α_dist;
    code sym-KL of the per-level soft assignments of μ_s and μ_c·α_code. A weight of 0 skips its term.

    Args:
        s: ``(B, D_s)``, c: ``(B, D_c)`` raw (un-normalised) inputs.

    Returns:
        ``(loss, terms, codes (B, L), residuals)``; ``terms`` maps each term name to a float.
    """
    s, c = tower.normalise(s, c)
    q_s, q_c, q = tower.vae.encode(s, c)
    z = q.sample() if tower.training else q.mu
    rec = {}
    for name, zz in (("fused", z), ("from_s", q_s.sample()), ("from_c", q_c.sample())):
        rs, rc = tower.vae.reconstruction(zz, s, c)
        rec[f"rec_s_{name}"], rec[f"rec_c_{name}"] = rs, rc
    z_q, codes, rq_loss, residuals = tower.rq(q.mu, beta=cfg.beta_commit)
    rs, rc = tower.vae.reconstruction(z_q, s, c)
    rec["rec_s_quant"], rec["rec_c_quant"] = rs, rc
    terms = dict(rec)
    terms["kl"] = kl_std_normal(q)
    terms["rq"] = rq_loss
    loss = sum(rec.values()) + cfg.beta_kl * terms["kl"] + rq_loss
    if cfg.alpha_inst > 0:
        terms["align_inst"] = info_nce(q_s.mu, q_c.mu, cfg.tau)
        loss = loss + cfg.alpha_inst * terms["align_inst"]
    if cfg.alpha_dist > 0:
        terms["align_dist"] = kl_gauss(q_s, q_c) + kl_gauss(q_c, q_s)
        loss = loss + cfg.alpha_dist * terms["align_dist"]
    if cfg.alpha_code > 0:
        _, _, _, res_s = tower.rq(q_s.mu, beta=0.0)
        _, _, _, res_c = tower.rq(q_c.mu, beta=0.0)
        p_s = tower.rq.soft_assign(res_s, cfg.code_temp)
        p_c = tower.rq.soft_assign(res_c, cfg.code_temp)
        terms["align_code"] = sum(sym_kl_categorical(a, b) for a, b in zip(p_s, p_c)) / len(p_s)
        loss = loss + cfg.alpha_code * terms["align_code"]
    return loss, {k: float(v.detach()) for k, v in terms.items()}, codes, residuals


def fit_tower(cfg: TokenizerConfig, tcfg: TowerConfig, s: np.ndarray, c: np.ndarray, *, seed: int,
              on_epoch: Callable[[int, dict], None] | None = None,
              device: torch.device | str = "cpu") -> Tower:
    """Train one tower on all entities.

    Codebooks are k-means initialised on the latents of the freshly initialised encoder after a
    short warm-up (a tenth of the epochs, reconstruction only), and dead codes are re-seeded at the
    end of each epoch from the residuals seen in it.

    Args:
        s: float32 ``(N, D_s)``; c: float32 ``(N, D_c)``.
        on_epoch: called as ``on_epoch(epoch, mean_terms)``.
        device: where the tower trains (the worker's GPU under ``ray.use_gpu``); inputs are moved
            there once. The returned tower is on the CPU.
    """
    torch.manual_seed(seed)
    s_t = torch.as_tensor(s, dtype=torch.float32).to(device)
    c_t = torch.as_tensor(c, dtype=torch.float32).to(device)
    n = s_t.shape[0]
    if n < 2:
        raise ValueError(f"a tower needs at least 2 entities, got {n}")
    tower = Tower(s_t.shape[1], c_t.shape[1], tcfg).to(device)
    tower.set_normalisation(s_t, c_t)
    opt = torch.optim.AdamW(tower.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, cfg.epochs // 10)
    bs = min(cfg.batch_size, n)
    for epoch in range(cfg.epochs):
        if epoch == warmup:
            tower.rq.kmeans_init(tower.latent(s_t, c_t), iters=cfg.kmeans_iters, seed=seed)
        tower.train()
        perm = torch.randperm(n, generator=g).to(device)
        usage = torch.zeros(tcfg.n_levels, tcfg.codebook_size, dtype=torch.long, device=device)
        pool: list[list[torch.Tensor]] = [[] for _ in range(tcfg.n_levels)]
        sums: dict[str, float] = {}
        n_batches = 0
        for start in range(0, n - bs + 1 if n >= bs else 1, bs):
            idx = perm[start:start + bs]
            if epoch < warmup:  # quantizer not initialised yet: autoencoder warm-up only
                parts = _rec_tensors(tower, s_t[idx], c_t[idx], cfg.beta_kl)
                loss, terms = sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}
            else:
                loss, terms, codes, residuals = tower_loss(tower, s_t[idx], c_t[idx], cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch >= warmup:
                for l in range(tcfg.n_levels):
                    usage[l] += torch.bincount(codes[:, l], minlength=tcfg.codebook_size)
                    pool[l].append(residuals[l].detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            n_batches += 1
        mean_terms = {k: v / n_batches for k, v in sums.items()}
        if epoch >= warmup and epoch < cfg.epochs - 1:
            mean_terms["dead_codes_reseeded"] = tower.rq.reseed_dead_codes(
                usage, [torch.cat(p) for p in pool], seed=seed + epoch)
        if on_epoch is not None:
            on_epoch(epoch, mean_terms)
    tower.eval()
    if cfg.final_kmeans_refit:
        tower.rq.kmeans_init(tower.latent(s_t, c_t), iters=cfg.kmeans_iters, seed=seed)
    return tower.cpu()


def _rec_tensors(tower: Tower, s: torch.Tensor, c: torch.Tensor, beta_kl: float) -> dict:
    """Warm-up terms: reconstructions from fused and single-modality samples + β_kl·KL."""
    s, c = tower.normalise(s, c)
    q_s, q_c, q = tower.vae.encode(s, c)
    out = {}
    for name, zz in (("fused", q.sample()), ("from_s", q_s.sample()), ("from_c", q_c.sample())):
        out[f"s_{name}"], out[f"c_{name}"] = tower.vae.reconstruction(zz, s, c)
    out["kl"] = beta_kl * kl_std_normal(q)
    return out


@dataclass(frozen=True)
class Guidance:
    """M guidance examples from the frozen LLM for a tokenizer step (DESIGN §1.6, step 1).

    Example m is one seqrec target: the item, the LLM's last hidden state at the position that
    predicts the target's first SID token, and the LLM's softmax there restricted to the K level-1
    item tokens ``<i1_0> .. <i1_{K-1}>`` (renormalised over them).

    Attributes:
        target_idx: int64 ``(M,)`` item indices in ``[0, N)``.
        hidden: float32 ``(M, D_llm)``.
        p_level1: float32 ``(M, K)``, non-negative, rows sum to 1; column k is token ``<i1_k>``.
    """
    target_idx: np.ndarray
    hidden: np.ndarray
    p_level1: np.ndarray

    def __post_init__(self):
        m = len(self.target_idx)
        if np.ndim(self.target_idx) != 1 or m == 0:
            raise ValueError(f"target_idx must be a non-empty 1-D array, got shape {np.shape(self.target_idx)}")
        if np.ndim(self.hidden) != 2 or len(self.hidden) != m:
            raise ValueError(f"hidden must be (M={m}, D_llm), got {np.shape(self.hidden)}")
        if np.ndim(self.p_level1) != 2 or len(self.p_level1) != m:
            raise ValueError(f"p_level1 must be (M={m}, K), got {np.shape(self.p_level1)}")
        sums = np.asarray(self.p_level1, dtype=np.float64).sum(1)
        if (np.asarray(self.p_level1) < 0).any() or not np.allclose(sums, 1.0, atol=1e-3):
            raise ValueError("p_level1 rows must be probability distributions (>= 0, summing to 1); "
                             f"row sums range {sums.min():.4f}..{sums.max():.4f}")


def guidance_terms(tower: Tower, proj: nn.Linear, s: torch.Tensor, c: torch.Tensor, hidden: torch.Tensor,
                   p_level1: torch.Tensor, *, code_temp: float, tau: float, kl: bool = True,
                   nce: bool = True) -> dict[str, torch.Tensor]:
    """Recommender-guided terms of one guidance batch (DESIGN §1.6 (a), (b)), graph-connected.

    Uses the fused posterior mean μ of q(z|s,c) of each target item (no sampling).

    - ``guide_kl`` (if ``kl``): sym-KL(P_1(·|μ), p_level1), mean over the batch (nats), where
      P_1(k|μ) = softmax_k(−||r_1 − e^1_k||² / code_temp) with r_1 = μ; gradients reach the
      encoders and the level-1 codebook; ``p_level1`` is a constant.
    - ``guide_nce`` (if ``nce``): symmetric in-batch InfoNCE(proj(hidden), μ) at temperature ``tau``
      (cosine logits; needs B >= 2). Repeated targets in one batch act as false negatives.

    This mirrors ETEGRec's recommendation-oriented alignment (sequence–item and preference–semantic
    alignment between a recommender and its item tokenizer), the nearest published peer.

    Args:
        s: ``(B, D_s)``, c: ``(B, D_c)`` raw inputs of the target items; hidden: ``(B, D_llm)``;
        p_level1: ``(B, K)``.
    """
    s, c = tower.normalise(s, c)
    mu = tower.vae.encode(s, c)[2].mu                                   # (B, Z) = r_1
    out = {}
    if kl:
        p1 = tower.rq.soft_assign([mu], code_temp)[0]                   # (B, K), level-1 codebook only
        out["guide_kl"] = sym_kl_categorical(p1, p_level1)
    if nce:
        out["guide_nce"] = info_nce(proj(hidden), mu, tau)
    return out


def _cycled_batches(m: int, size: int, g: torch.Generator):
    """Endless index batches ``(size,)`` over ``0..m-1``: consecutive seeded permutations, concatenated."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < size:
            buf = torch.cat([buf, torch.randperm(m, generator=g)])
        yield buf[:size]
        buf = buf[size:]


def refine_item_tower(tower: Tower, cfg: TokenizerConfig, s: np.ndarray, c: np.ndarray, guidance: Guidance, *,
                      epochs: int, lr: float, gamma_kl: float, gamma_nce: float, tau: float, seed: int,
                      batch_size: int | None = None,
                      on_epoch: Callable[[int, dict], None] | None = None) -> tuple[Tower, nn.Linear, dict]:
    """Tokenizer step of dynamic semantic indexing (DESIGN §1.6, step 1): the LLM is frozen.

    A deep copy of ``tower`` is trained for ``epochs`` on :func:`tower_loss` (weights from ``cfg``)
    plus ``gamma_kl · guide_kl + gamma_nce · guide_nce`` (:func:`guidance_terms`), jointly with a new
    projection ``proj: nn.Linear(D_llm, Z)``. Each step takes one item batch (a seeded permutation
    per epoch; a last partial batch is dropped, as in :func:`fit_tower`) and one guidance batch of
    ``min(batch size, M)`` examples (seeded permutations, cycled). A weight of 0 skips its term.
    There is no dead-code re-seeding and no k-means refit: code k of level l keeps denoting the LLM
    token ``<i{l}_{k}>``, so the LLM's learnt token rows stay meaningful across rounds.
    Sampling as in :func:`fit_tower` (train mode). Deterministic given ``seed``: global-RNG draws
    happen inside ``torch.random.fork_rng`` seeded with ``seed``, so the caller's RNG is untouched.

    Args:
        tower: a fitted item tower (codebooks initialised); not modified.
        s: float32 ``(N, D_s)``; c: float32 ``(N, D_c)``: all items, indexed by ``guidance.target_idx``.
        lr: AdamW learning rate of tower and projection. tau: temperature of ``guide_nce``.
        batch_size: items per step (default ``cfg.batch_size``), capped at N.
        on_epoch: called as ``on_epoch(epoch, mean_terms)``.

    Returns:
        ``(new_tower (eval mode), proj, mean_terms)``; ``mean_terms`` are the last epoch's means over
        its steps of every :func:`tower_loss` term, ``guide_kl`` / ``guide_nce`` (present only with a
        weight > 0) and ``loss`` (the total that was minimised).

    Raises:
        ValueError: untrained codebooks, mismatched guidance shapes or indices out of range,
            or ``gamma_nce > 0`` with fewer than 2 guidance examples.
    """
    if not bool(tower.rq.initialised):
        raise ValueError("refine_item_tower needs a fitted tower (codebooks not initialised); run fit_tower first")
    s_t, c_t = torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32)
    n, m, k = s_t.shape[0], len(guidance.target_idx), tower.rq.codebook_size
    tgt = torch.as_tensor(np.asarray(guidance.target_idx), dtype=torch.long)
    hid = torch.as_tensor(guidance.hidden, dtype=torch.float32)
    p_llm = torch.as_tensor(guidance.p_level1, dtype=torch.float32)
    if p_llm.shape[1] != k:
        raise ValueError(f"guidance.p_level1 has {p_llm.shape[1]} columns but the tower has K={k} level-1 codes")
    if int(tgt.min()) < 0 or int(tgt.max()) >= n:
        raise ValueError(f"guidance.target_idx must lie in [0, {n}); got {int(tgt.min())}..{int(tgt.max())}")
    if gamma_nce > 0 and m < 2:
        raise ValueError(f"in-batch InfoNCE needs at least 2 guidance examples, got {m}")
    bs = min(batch_size or cfg.batch_size, n)
    gb = min(bs, m)
    g_items, g_guide = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    guide_batches = _cycled_batches(m, gb, g_guide)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = copy.deepcopy(tower).float()
        proj = nn.Linear(hid.shape[1], new.rq.dim)
        opt = torch.optim.AdamW([*new.parameters(), *proj.parameters()], lr=lr)
        mean_terms: dict[str, float] = {}
        for epoch in range(epochs):
            new.train()
            perm = torch.randperm(n, generator=g_items)
            sums: dict[str, float] = {}
            n_batches = 0
            for start in range(0, n - bs + 1, bs):
                idx = perm[start:start + bs]
                loss, terms, _, _ = tower_loss(new, s_t[idx], c_t[idx], cfg)
                if gamma_kl > 0 or gamma_nce > 0:
                    j = next(guide_batches)
                    gt = guidance_terms(new, proj, s_t[tgt[j]], c_t[tgt[j]], hid[j], p_llm[j],
                                        code_temp=cfg.code_temp, tau=tau, kl=gamma_kl > 0, nce=gamma_nce > 0)
                    for name, w in (("guide_kl", gamma_kl), ("guide_nce", gamma_nce)):
                        if name in gt:
                            loss = loss + w * gt[name]
                            terms[name] = float(gt[name].detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
                for key, v in terms.items():
                    sums[key] = sums.get(key, 0.0) + v
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                n_batches += 1
            mean_terms = {key: v / n_batches for key, v in sums.items()}
            if on_epoch is not None:
                on_epoch(epoch, mean_terms)
    new.eval()
    proj.eval()
    return new, proj, mean_terms


def count_changed(old_codes: np.ndarray, new_codes: np.ndarray) -> int:
    """Items whose full semantic ID differs between two ID tables (DESIGN §1.6 step 2).

    Args:
        old_codes, new_codes: int ``(N, L)``, row i = item i.

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    old_codes, new_codes = np.asarray(old_codes), np.asarray(new_codes)
    if old_codes.shape != new_codes.shape or old_codes.ndim != 2:
        raise ValueError(f"code tables must both be (N, L); got {old_codes.shape} and {new_codes.shape}")
    return int((old_codes != new_codes).any(1).sum())


@torch.no_grad()
def encode_codes(tower: Tower, s: np.ndarray, c: np.ndarray, *, batch_size: int | None = None,
                 order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy RQ codes and last-level squared distances of every entity, in float64.

    The result does not depend on ``batch_size`` or on the ``order`` entities are visited in
    (a permutation of 0..N-1): each row is computed independently in float64 and stored at its index.

    Returns:
        ``codes`` int64 ``(N, L)``; ``last_cost`` float64 ``(N, K)``.
    """
    n = len(s)
    order = np.arange(n) if order is None else np.asarray(order)
    bs = batch_size or n
    t64 = copy.deepcopy(tower).double().eval()
    codes = np.zeros((n, tower.rq.n_levels), dtype=np.int64)
    cost = np.zeros((n, tower.rq.codebook_size), dtype=np.float64)
    for start in range(0, n, bs):
        idx = order[start:start + bs]
        z = t64.latent(torch.as_tensor(s[idx], dtype=torch.float64), torch.as_tensor(c[idx], dtype=torch.float64))
        cd, last = t64.rq.encode(z)
        codes[idx] = cd.numpy()
        cost[idx] = ((last[:, None, :] - t64.rq.codebooks[-1][None]) ** 2).sum(-1).numpy()
    return codes, cost


def export_item_sids(tower: Tower, s: np.ndarray, c: np.ndarray, cfg: TokenizerConfig,
                     item_names: list[str] | None = None, *, batch_size: int | None = None,
                     order: np.ndarray | None = None) -> tuple[SIDTable, dict]:
    """Unique item IDs: greedy RQ codes, Sinkhorn-balanced last level, deterministic resolver.

    Returns:
        ``(SIDTable, stats)`` with collision counts before/after and per-level usage/entropy.

    Raises:
        CollisionError: a prefix holds more items than K (names the prefix).
    """
    codes, cost = encode_codes(tower, s, c, batch_size=batch_size, order=order)
    out, stats = unique_codes(codes, cost, sinkhorn_iters=cfg.sinkhorn_iters,
                              sinkhorn_eps=cfg.sinkhorn_eps, item_names=item_names)
    table = SIDTable(out.astype(np.int64), tower.rq.codebook_size)
    assert table.n_shared() == 0, "item semantic IDs are not unique at export"
    stats.update(code_usage(table.codes, table.codebook_size))
    return table, stats


@torch.no_grad()
def sticky_item_sids(tower: Tower, s: np.ndarray, c: np.ndarray, old_codes: np.ndarray, *, margin: float,
                     max_changed: float, keep_levels: int = 0) -> tuple[SIDTable, dict]:
    """Re-index items with a switching cost (docs/DESIGN-NOTES.md, 'Sticky re-indexing'; issue-13 direction
    "an item moves only when the objective improves by a margin; a cap per round").

    Level by level on the refined tower's float64 latent ``z``: an item keeps its old code ``o`` at level
    l unless the greedy code ``g`` of its current residual satisfies ``d(g) < (1 - margin) · d(o)``
    (squared distances); at the first ``keep_levels`` levels it always keeps ``o`` (issue-13 direction "deeper
    levels first": the item keeps its prefix, and the deeper codes follow the residual under that prefix). If more than ``max_changed · N`` items would change, only those with the largest
    quantisation gain ``|z - q(old)|² - |z - q(new)|²`` (ties by item index) move; the others keep their
    old ID. Unchanged IDs are never re-assigned to resolve a collision: a moving item whose new ID is
    held takes the nearest free last-level code under its new prefix, or keeps its old ID if the prefix
    is full (old IDs of moving items stay reserved until they are released, so rows stay unique).

    Args:
        old_codes: int ``(N, L)`` unique item IDs before the round (the codebooks' indices, which the
            refinement fine-tunes in place, so code k keeps its neighbourhood).
        margin: in ``[0, 1)``; 0 = move whenever the greedy code is strictly closer.
        max_changed: in ``(0, 1]``; share of items allowed to change.
        keep_levels: in ``[0, L)``; leading levels no item changes (0 = every level may change).

    Returns:
        ``(SIDTable, stats)``; stats: ``wanted`` (items whose sticky code differs before the cap),
        ``capped`` (reverted by the cap), ``kept_full_prefix`` (reverted: new prefix full),
        ``collisions_greedy`` (rows sharing an ID before resolution), ``collisions_final`` (0), code usage.

    Raises:
        ValueError: ``old_codes`` has the wrong shape or repeats an ID, or margin/max_changed/keep_levels out of
            range.
    """
    old = np.asarray(old_codes, dtype=np.int64)
    n, n_levels, k = len(s), tower.rq.n_levels, tower.rq.codebook_size
    if old.shape != (n, n_levels):
        raise ValueError(f"old_codes must be (N, L) = ({n}, {n_levels}); got {old.shape}")
    if len(np.unique(old, axis=0)) != n:
        raise ValueError("old_codes repeat a semantic ID: sticky re-indexing needs a unique table")
    if not (0 <= margin < 1 and 0 < max_changed <= 1):
        raise ValueError(f"margin must be in [0, 1) and max_changed in (0, 1]; got {margin}, {max_changed}")
    if not 0 <= keep_levels < n_levels:
        raise ValueError(f"keep_levels must be in [0, {n_levels}) (the tower's levels); got {keep_levels}")
    t64 = copy.deepcopy(tower).double().eval()
    z = t64.latent(torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64))
    books = t64.rq.codebooks                                                   # (L, K, D)
    rows, old_t = torch.arange(n), torch.as_tensor(old)
    r, codes = z.clone(), old_t.clone()
    for lvl in range(n_levels):
        d = torch.cdist(r, books[lvl]).pow(2)                                  # (N, K)
        g = d.argmin(1)
        move = d[rows, g] < (1.0 - margin) * d[rows, old_t[:, lvl]] if lvl >= keep_levels else torch.zeros_like(g, dtype=torch.bool)
        codes[:, lvl] = torch.where(move, g, old_t[:, lvl])
        r = r - books[lvl][codes[:, lvl]]
    last_cost = d.numpy()                                                      # last level, under the new prefix
    err_new = r.pow(2).sum(1)
    err_old = (z - books[torch.arange(n_levels)[None, :], old_t].sum(1)).pow(2).sum(1)
    gain = (err_old - err_new).numpy()
    codes = codes.numpy()
    moving = np.flatnonzero((codes != old).any(1))
    stats = {"wanted": int(len(moving)), "collisions_greedy": int(n - len(np.unique(codes, axis=0)))}
    order = moving[np.lexsort((moving, -gain[moving]))]                        # largest gain first, then index
    cap = int(np.floor(max_changed * n))
    codes[order[cap:]] = old[order[cap:]]
    stats["capped"] = int(max(0, len(order) - cap))
    order = order[:cap]
    taken = {tuple(row) for row in old.tolist()}           # unchanged IDs + reserved old IDs of moving items
    kept_full = 0
    for i in order.tolist():
        prefix = tuple(int(x) for x in codes[i, :-1])
        choice = next((int(kk) for kk in np.argsort(last_cost[i], kind="stable")
                       if prefix + (int(kk),) not in taken), None)
        if choice is None:
            codes[i] = old[i]
            kept_full += 1
            continue
        codes[i, -1] = choice
        new_id, old_id = tuple(int(x) for x in codes[i]), tuple(int(x) for x in old[i])
        if new_id != old_id:
            taken.discard(old_id)
            taken.add(new_id)
    stats["kept_full_prefix"] = kept_full
    stats["collisions_final"] = int(n - len(np.unique(codes, axis=0)))
    assert stats["collisions_final"] == 0, "sticky re-indexing left duplicate semantic IDs"
    table = SIDTable(codes, k)
    stats.update(code_usage(table.codes, table.codebook_size))
    return table, stats


@torch.no_grad()
def cold_start_codes(tower: Tower, s: np.ndarray, c: np.ndarray | None, taken: set[tuple[int, ...]]
                     ) -> np.ndarray:
    """A unique semantic ID for one new item from the modalities it has (DESIGN §1.7).

    Greedy residual quantization of :meth:`Tower.latent_from` (float64) gives the item's prefix of
    L-1 codes; the last level takes the nearest code whose full ID is not in ``taken``, as the export's
    collision resolver does (:func:`quantizer.unique_codes`). The codebooks are not changed.

    Args:
        s: float ``(d_s,)``; c: float ``(d_c,)`` or None (text only); taken: IDs already held.

    Returns:
        int64 ``(L,)``.

    Raises:
        CollisionError: every code under the item's prefix is held (names the prefix).
    """
    t64 = copy.deepcopy(tower).double().eval()
    z = t64.latent_from(torch.as_tensor(s, dtype=torch.float64)[None],
                        None if c is None else torch.as_tensor(c, dtype=torch.float64)[None])
    codes, last = t64.rq.encode(z)
    codes = codes[0].numpy().astype(np.int64)
    cost = ((last[0][None, :] - t64.rq.codebooks[-1]) ** 2).sum(-1).numpy()      # (K,)
    prefix = tuple(int(x) for x in codes[:-1])
    for k in np.argsort(cost, kind="stable"):
        if prefix + (int(k),) not in taken:
            codes[-1] = int(k)
            return codes
    raise CollisionError(f"every one of the {len(cost)} semantic IDs under prefix {prefix} is taken; the new "
                         "item cannot get a unique ID without retraining with a larger tokenizer.item.codebook_size")


def export_user_sids(tower: Tower, s: np.ndarray, c: np.ndarray) -> tuple[SIDTable, dict]:
    """User IDs (greedy RQ codes; may be shared). Stats include ``shared_share``."""
    codes, _ = encode_codes(tower, s, c)
    table = SIDTable(codes, tower.rq.codebook_size)
    stats = {"shared_share": table.n_shared() / max(1, len(table.codes))}
    stats.update(code_usage(table.codes, table.codebook_size))
    return table, stats


def user_semantic_embeddings(item_text: np.ndarray, histories: list[list[int]]) -> np.ndarray:
    """Users' semantic embeddings: mean of their *training* history items' text embeddings.

    Args:
        item_text: float32 ``(N, D_s)``; histories: U lists of item_idx (training split only).

    Returns:
        float32 ``(U, D_s)``; a user with an empty history gets the catalogue mean.
    """
    mean = item_text.mean(0)
    return np.stack([item_text[h].mean(0) if len(h) else mean for h in histories]).astype(np.float32)


#: safetensors metadata key of a tower's constructor arguments (one JSON value: safetensors writes a metadata map
#: with several keys in a per-process random order, so equal towers gave different file bytes).
TOWER_META_KEY = "ttds_tower"


def tower_bytes(tower: Tower) -> bytes:
    """safetensors bytes of the tower's weights, with its constructor arguments in the safetensors metadata
    (key :data:`TOWER_META_KEY`: JSON ``{"d_c", "d_s", "tower_config"}``, sorted keys), so :func:`load_tower`
    needs nothing else (no pickle). Equal towers give equal bytes."""
    from safetensors.torch import save as st_save

    meta = {TOWER_META_KEY: json.dumps({"d_s": tower.d_s, "d_c": tower.d_c,
                                         "tower_config": tower.tcfg.model_dump()}, sort_keys=True)}
    return st_save({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, metadata=meta)


def save_tower(tower: Tower, path: Path) -> None:
    """Atomically write :func:`tower_bytes` to ``path``."""
    atomic_write_bytes(path, tower_bytes(tower))


def load_tower(path: Path, d_s: int | None = None, d_c: int | None = None, tcfg: TowerConfig | None = None) -> Tower:
    """A tower in eval mode from :func:`save_tower`'s file; the constructor arguments come from the file's
    metadata (arguments given here must agree with it).

    Raises:
        ArtifactError: the file is missing, carries no constructor arguments (and none are given), or
            disagrees with the given ones.
    """
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    from .errors import ArtifactError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: tower checkpoint is missing; rerun the tokenizer stage")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if TOWER_META_KEY in meta:
        args = json.loads(meta[TOWER_META_KEY])
    elif "tower_config" in meta:        # written before TOWER_META_KEY: one metadata key per argument
        args = {**meta, "tower_config": json.loads(meta["tower_config"])}
    else:
        args = None
    if args is not None:
        saved = (int(args["d_s"]), int(args["d_c"]), TowerConfig.model_validate(args["tower_config"]))
        given = (d_s, d_c, tcfg)
        if any(g is not None and g != v for g, v in zip(given, saved)):
            raise ArtifactError(f"{path}: saved for d_s, d_c, config = {saved}, asked for {given}")
        d_s, d_c, tcfg = saved
    elif None in (d_s, d_c, tcfg):
        raise ArtifactError(f"{path}: an older tower checkpoint without its constructor arguments; pass d_s, d_c "
                            "and the tower config, or rerun the tokenizer stage")
    tower = Tower(d_s, d_c, tcfg)
    tower.load_state_dict(st_load(path.read_bytes()))
    return tower.eval()


@torch.no_grad()
def reconstruction_errors(tower: Tower, s: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """Per-modality reconstruction MSE (standardised units) over all entities, eval mode.

    Keys: ``rec_{s,c}_{fused,quant,from_s,from_c}``: decoded from the fused posterior mean, from the
    quantized latent, and from each single-modality mean (cross-modal).
    """
    s_t, c_t = tower.normalise(torch.as_tensor(s), torch.as_tensor(c))
    q_s, q_c, q = tower.vae.encode(s_t, c_t)
    z_q, _, _, _ = tower.rq(q.mu, beta=0.0)
    out = {}
    for name, z in (("fused", q.mu), ("quant", z_q), ("from_s", q_s.mu), ("from_c", q_c.mu)):
        rs, rc = tower.vae.reconstruction(z, s_t, c_t)
        out[f"rec_s_{name}"], out[f"rec_c_{name}"] = float(rs), float(rc)
    return out
