"""Semantic IDs: the ID table of an entity type and the SID vocabulary of the LLM (DESIGN §1.3-1.4).

:class:`SIDTable` holds one entity type's semantic IDs (``codes`` int64 ``(N, L)``), saved as parquet
plus a JSON sidecar with its sha256; :class:`SIDVocab` maps (level, code) to the tokenizer ids of the
semantic-ID tokens ``<i{l}_{k}>`` (items) and ``<u{l}_{k}>`` (users). Shared by the tokenizer, LLM,
evaluation and serving code; no torch model code here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .artifacts import atomic_write_bytes, read_json, write_json
from .errors import ArtifactError


@dataclass(frozen=True)
class SIDTable:
    """Semantic IDs of one entity type. ``codes[i]`` is the ID of entity index i.

    ``codes`` int64 ``(N, L)``, each value in ``[0, codebook_size)``.
    """
    codes: np.ndarray
    codebook_size: int

    @property
    def n_levels(self) -> int:
        return int(self.codes.shape[1])

    def content_hash(self) -> str:
        """sha256 of shape, K and the code bytes (int64, C order)."""
        h = hashlib.sha256(json.dumps([list(self.codes.shape), self.codebook_size]).encode())
        h.update(np.ascontiguousarray(self.codes, dtype=np.int64).tobytes())
        return h.hexdigest()

    def n_shared(self) -> int:
        """Entities whose ID is also held by another entity."""
        _, inv, cnt = np.unique(self.codes, axis=0, return_inverse=True, return_counts=True)
        return int((cnt[inv.reshape(-1)] > 1).sum())

    def sid_strings(self, prefix: str) -> list[str]:
        return ["".join(f"<{prefix}{l + 1}_{k}>" for l, k in enumerate(row)) for row in self.codes.tolist()]

    def save(self, path: Path, ids: list[str], prefix: str) -> None:
        """Write a parquet with ``idx``, raw ``id``, ``codes`` (list) and ``sid`` (token string)."""
        t = pa.table({"idx": np.arange(len(self.codes), dtype=np.int64), "id": ids,
                      "codes": [list(r) for r in self.codes.tolist()], "sid": self.sid_strings(prefix)})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        meta = {"codebook_size": self.codebook_size, "n_levels": self.n_levels, "sha256": self.content_hash()}
        write_json(Path(path).with_suffix(".json"), meta)

    @classmethod
    def load(cls, path: Path) -> "SIDTable":
        """Load and verify the content hash.

        Raises:
            ArtifactError: the table or its JSON sidecar is missing, or does not match its recorded hash.
        """
        if not Path(path).is_file() or not Path(path).with_suffix(".json").is_file():
            raise ArtifactError(f"{path}: semantic-ID table or its .json sidecar is missing; rerun the stage "
                                "that writes it")
        meta = read_json(Path(path).with_suffix(".json"))
        codes = np.array(pq.read_table(path, columns=["codes"]).column("codes").to_pylist(), dtype=np.int64)
        codes = codes.reshape(-1, meta["n_levels"])
        table = cls(codes, int(meta["codebook_size"]))
        if table.content_hash() != meta["sha256"]:
            raise ArtifactError(f"{path}: content hash mismatch (expected {meta['sha256'][:12]}); the ID table "
                             "was modified; rerun the tokenizer stage")
        return table



def sid_token_strings(prefix: str, n_levels: int, codebook_size: int) -> list[str]:
    """Tokens ``<{prefix}{l}_{k}>`` for l in 1..L, k in 0..K-1, level-major (DESIGN §1.3)."""
    return [f"<{prefix}{l}_{k}>" for l in range(1, n_levels + 1) for k in range(codebook_size)]


@dataclass(frozen=True)
class SIDVocab:
    """Vocabulary ids of the semantic-ID tokens.

    ``item_token_ids`` int64 ``(L, K)``: id of item token level l, code k; ``user_token_ids``
    int64 ``(L_u, K_u)``.
    """
    item_token_ids: torch.Tensor
    user_token_ids: torch.Tensor

    @property
    def new_token_ids(self) -> list[int]:
        return self.item_token_ids.flatten().tolist() + self.user_token_ids.flatten().tolist()

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Token ids of item SIDs: ``codes`` int ``(..., L)`` -> int64 ``(..., L)``."""
        lv = np.arange(codes.shape[-1])
        return self.item_token_ids.numpy()[lv, codes]

    def user_tokens(self, codes: np.ndarray) -> np.ndarray:
        lv = np.arange(codes.shape[-1])
        return self.user_token_ids.numpy()[lv, codes]


def add_sid_tokens(tok, item_levels: int, item_k: int, user_levels: int, user_k: int) -> SIDVocab:
    """Add item and user semantic-ID tokens to the tokenizer (atomic special tokens).

    Raises:
        AssertionError: a token does not encode to exactly one id.
    """
    item = sid_token_strings("i", item_levels, item_k)
    user = sid_token_strings("u", user_levels, user_k)
    tok.add_tokens(item + user, special_tokens=True)
    return sid_vocab_from_tokenizer(tok, item_levels, item_k, user_levels, user_k)


def sid_vocab_from_tokenizer(tok, item_levels: int, item_k: int, user_levels: int, user_k: int) -> SIDVocab:
    """Look the SID tokens up in a tokenizer that already has them (after save/load)."""
    def ids(prefix, levels, k):
        strs = sid_token_strings(prefix, levels, k)
        out = tok.convert_tokens_to_ids(strs)
        bad = [s for s, i in zip(strs, out) if i is None or i == tok.unk_token_id]
        assert not bad, f"semantic-ID tokens missing from the tokenizer: {bad[:3]}"
        return torch.tensor(out, dtype=torch.long).view(levels, k)
    return SIDVocab(ids("i", item_levels, item_k), ids("u", user_levels, user_k))
