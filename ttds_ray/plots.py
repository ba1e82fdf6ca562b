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


#: Panels of :func:`plot_terms`, in order: (title, predicate on the term name). Names follow
#: ``towers.tower_loss`` (rec_s_*/rec_c_*, kl, rq, align_*), ``fit_tower`` (loss,
#: dead_codes_reseeded) and the guided round terms (guide_kl, guide_nce); a name no predicate takes
#: goes to the last panel, "other".
_TERM_GROUPS = (
    ("reconstruction", lambda n: n.startswith("rec")),
    ("alignment", lambda n: n.startswith("align")),
    ("KL", lambda n: n == "kl" or n.startswith("kl_")),
    ("RQ (codebook + commitment)", lambda n: n == "rq" or n.startswith(("rq_", "commit"))),
    ("recommender guidance (dynamic rounds)", lambda n: n.startswith("guide")),
    ("total", lambda n: n in ("loss", "total") or n.startswith(("loss_", "total_"))),
    ("dead codes re-seeded", lambda n: n.startswith("dead_codes")),
)


def group_terms(names) -> dict[str, list[str]]:
    """Term names -> {panel title: sorted names}, panels in :data:`_TERM_GROUPS` order, empty ones left out."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        title = next((t for t, pred in _TERM_GROUPS if pred(name)), "other")
        groups.setdefault(title, []).append(name)
    order = [t for t, _ in _TERM_GROUPS] + ["other"]
    return {t: groups[t] for t in order if t in groups}


def plot_terms(history: dict[str, list[float]], path: Path, *, title: str):
    """Loss terms per epoch, one panel per term group (see :data:`_TERM_GROUPS`).

    Each panel has its own legend; a panel is log-scaled when all its plotted values are > 0 (a term
    with a non-finite value is skipped). Returns the matplotlib figure (already closed; its axes can be
    inspected, e.g. ``len(fig.axes)``).
    """
    plt = _plt()
    groups = group_terms(history)
    if not groups:
        groups = {"(no terms)": []}
    n = len(groups)
    ncols = 1 if n == 1 else 2
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), dpi=110, squeeze=False)
    flat = axes.ravel()
    for ax, (group, names) in zip(flat, groups.items()):
        positive, plotted = True, 0
        for name in names:
            v = np.asarray(history[name], dtype=float)
            if not len(v) or not np.all(np.isfinite(v)):
                continue
            ax.plot(v, lw=1.2, label=name, marker="." if len(v) < 3 else None)
            positive &= bool(np.all(v > 0))
            plotted += 1
        ax.set(title=group, xlabel="epoch", ylabel="value")
        if plotted:
            if positive:
                ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2 if plotted > 4 else 1)
        ax.grid(alpha=0.3)
    for ax in flat[n:]:
        fig.delaxes(ax)
    fig.suptitle(title)
    _save(fig, path)
    return fig


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
