"""DM-VAE: dual-modality VAE aligning semantic (text) and collaborative embeddings (DESIGN §1.2).

Pure torch. Reads per-entity ``s`` ``(B, d_s)`` and ``c`` ``(B, d_c)``; gives Gaussian posteriors
q(z|s), q(z|c), their product of experts q(z|s,c), and reconstructions of both modalities.
Dimensions: B batch, D_s / D_c modality dims, Z latent dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, d_out))


@dataclass
class Posterior:
    """Diagonal Gaussian: ``mu``, ``logvar`` float ``(B, Z)``."""
    mu: torch.Tensor
    logvar: torch.Tensor

    def sample(self) -> torch.Tensor:
        return self.mu + torch.randn_like(self.mu) * (0.5 * self.logvar).exp()


def product_of_experts(*experts: Posterior) -> Posterior:
    """PoE of Gaussian experts and the N(0, I) prior expert (MVAE, Wu & Goodman 2018)."""
    prec = 1.0 + sum(torch.exp(-e.logvar) for e in experts)            # prior precision = 1
    mu = sum(e.mu * torch.exp(-e.logvar) for e in experts) / prec
    return Posterior(mu, -torch.log(prec))


def kl_std_normal(p: Posterior) -> torch.Tensor:
    """KL(p || N(0, I)), summed over Z, mean over the batch (nats)."""
    return 0.5 * (p.mu.pow(2) + p.logvar.exp() - 1.0 - p.logvar).sum(-1).mean()


def kl_gauss(p: Posterior, q: Posterior) -> torch.Tensor:
    """KL(p || q) for diagonal Gaussians, summed over Z, mean over the batch (nats)."""
    return 0.5 * (q.logvar - p.logvar + (p.logvar.exp() + (p.mu - q.mu).pow(2)) / q.logvar.exp() - 1.0
                  ).sum(-1).mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between rows of ``a`` and ``b`` ``(B, Z)`` (cosine / τ)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau  # (B, B)
    y = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def sym_kl_categorical(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(p||q) + KL(q||p) for rows of categorical distributions ``(B, K)``, mean over B."""
    lp, lq = (p + eps).log(), (q + eps).log()
    return ((p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)).mean()


class DMVAE(nn.Module):
    """Two encoders q(z|s), q(z|c), PoE fusion, two decoders p(s|z), p(c|z).

    Args:
        d_s: semantic dim. d_c: collaborative dim. d_z: latent dim Z. hidden: MLP width.
    """

    def __init__(self, d_s: int, d_c: int, d_z: int, hidden: int):
        super().__init__()
        self.enc_s, self.enc_c = _mlp(d_s, hidden, 2 * d_z), _mlp(d_c, hidden, 2 * d_z)
        self.dec_s, self.dec_c = _mlp(d_z, hidden, d_s), _mlp(d_z, hidden, d_c)

    @staticmethod
    def _post(h: torch.Tensor) -> Posterior:
        mu, logvar = h.chunk(2, dim=-1)
        return Posterior(mu, logvar.clamp(-8.0, 8.0))

    def encode(self, s: torch.Tensor, c: torch.Tensor) -> tuple[Posterior, Posterior, Posterior]:
        """Returns q(z|s), q(z|c), q(z|s,c); each ``(B, Z)``."""
        q_s, q_c = self._post(self.enc_s(s)), self._post(self.enc_c(c))
        return q_s, q_c, product_of_experts(q_s, q_c)

    def reconstruction(self, z: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor,
                                                                                       torch.Tensor]:
        """Mean squared errors (per dim) of s and c decoded from ``z``."""
        return F.mse_loss(self.dec_s(z), s), F.mse_loss(self.dec_c(z), c)
