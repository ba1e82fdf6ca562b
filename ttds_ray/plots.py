"""PNG plots of a run (loss curves, code usage); matplotlib with the Agg backend, written atomically.

Reads in-memory numbers from the stages; writes ``*.png`` files into stage directories.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .artifacts import atomic_write_bytes


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curve(values: list[float], path: Path, *, title: str, ylabel: str, xlabel: str = "optimiser step",
               marks: list[int] = ()) -> None:
    """Raw values plus a moving average; ``marks`` draws dashed vertical lines (e.g. re-index steps)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    v = np.asarray(values, dtype=float)
    ax.plot(v, lw=0.6, alpha=0.4, label="raw")
    if len(v) >= 10:
        k = max(2, len(v) // 50)
        ax.plot(np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    for i, m in enumerate(marks):
        ax.axvline(m, ls="--", lw=0.8, color="gray", label="re-index" if i == 0 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_terms(history: dict[str, list[float]], path: Path, *, title: str) -> None:
    """One line per loss term (log scale), x = epoch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, vals in sorted(history.items()):
        v = np.asarray(vals, dtype=float)
        if len(v) and np.all(np.isfinite(v)) and np.all(v > 0):
            ax.plot(v, lw=1.2, label=name)
    ax.set(title=title, xlabel="epoch", ylabel="value", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_code_usage(codes: np.ndarray, codebook_size: int, path: Path, *, title: str) -> None:
    """Histogram of entities per code, one panel per level (codes sorted by count)."""
    plt = _plt()
    L = codes.shape[1]
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 3), dpi=110, squeeze=False)
    for l in range(L):
        cnt = np.sort(np.bincount(codes[:, l], minlength=codebook_size))[::-1]
        ax = axes[0, l]
        ax.bar(np.arange(codebook_size), cnt, width=1.0)
        ax.set(title=f"level {l + 1}: {int((cnt > 0).sum())}/{codebook_size} used", xlabel="code (by count)",
               ylabel="entities" if l == 0 else None)
    fig.suptitle(title)
    _save(fig, path)
