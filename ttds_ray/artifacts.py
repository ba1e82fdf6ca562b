"""The run-directory contract shared by every stage (one run-directory contract for every stage).

Reads and writes ``<output_dir>/<name>/<stage>/``. A stage writes into a hidden temporary sibling
directory and is renamed into place only when complete, with ``MANIFEST.json`` written last; so a
stage directory either holds a finished stage or does not exist. Never half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from contextlib import contextmanager

import numpy as np

#: Pipeline stages in data-flow order; each is one sub-directory of the run directory.
STAGES = ("data", "embeddings", "cf", "tokenizer", "llm", "eval")


class Files:
    """Every file name of the run directory, defined once (README "Run directory" lists them).

    Paths are relative to the run root (``CONFIG``, ``TRAIN_LOG``, ``RUN_METRICS``) or to a stage
    directory (the rest, grouped by the stage that writes them).
    """
    MANIFEST = "MANIFEST.json"
    CONFIG = "config.yaml"
    TRAIN_LOG = "train.log"
    RUN_METRICS = "metrics.json"
    # data/
    ITEMS = "items.parquet"
    SEQUENCES = "sequences.parquet"
    DATA_STATS = "stats.json"
    # embeddings/
    ITEM_TEXT = "item_text.npy"
    # cf/
    SASREC = "sasrec.safetensors"
    SASREC_META = "sasrec.json"
    CF_ITEMS = "cf_items.npy"
    CF_USERS = "cf_users.npy"
    # tokenizer/ (item and user towers) and llm/ (final item index, refined item tower)
    ITEM_TOWER = "item_tower.safetensors"
    USER_TOWER = "user_tower.safetensors"
    ITEM_SIDS = "item_sids.parquet"
    USER_SIDS = "user_sids.parquet"
    TOKENIZER_STATS = "tokenizer_stats.json"
    TOWER_HISTORY = "history.json"
    # llm/
    LLM_META = "llm_meta.json"
    LOSSES = "losses.json"
    ROUNDS = "rounds.json"
    TASK_STATS = "task_stats.json"
    LOSS_PLOT = "loss.png"
    # eval/
    METRICS = "metrics.json"
    RANKINGS = "rankings.parquet"
    # cold_start/ (items added to a served run after training; catalogue.py)
    COLD_START_DIR = "cold_start"
    COLD_START_ITEMS = "items.json"

    @staticmethod
    def tower(name: str) -> str:
        """``item_tower.safetensors`` / ``user_tower.safetensors``."""
        return {"item": Files.ITEM_TOWER, "user": Files.USER_TOWER}[name]

    @staticmethod
    def sids(name: str) -> str:
        """``item_sids.parquet`` / ``user_sids.parquet``."""
        return {"item": Files.ITEM_SIDS, "user": Files.USER_SIDS}[name]

    @staticmethod
    def split_metrics(split: str, n_users: int) -> str:
        """What ``ttds-ray evaluate`` writes at the run root: ``metrics_<split>_<n>users.json``."""
        return f"metrics_{split}_{n_users}users.json"


from .errors import StageMissing  # noqa: E402  (re-exported: the project's error hierarchy)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (numpy scalars converted)."""
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=default) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:
        return None


class RunDir:
    """One run's artifact directory: ``root/<stage>/`` per stage, each closed by a MANIFEST.json.

    Args:
        root: the run directory (``<output_dir>/<name>``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        #: stage -> time.time() when the pipeline started it; MANIFEST wall_s counts from there
        self.stage_started: dict[str, float] = {}

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        return self.root / stage

    def is_complete(self, stage: str, config_hash: str | None = None) -> bool:
        """True if the stage finished; with ``config_hash``, also that it was built from that config and
        from the upstream stages now in the run directory (their digests equal the ones recorded in its
        MANIFEST ``inputs``), so a stage built on replaced inputs is not reused."""
        path = self.stage_dir(stage) / Files.MANIFEST
        if not path.is_file():
            return False
        if config_hash is None:
            return True
        return read_json(path).get("config_hash") == config_hash and not self.changed_inputs(stage)

    def input_digests(self, stage: str) -> dict[str, str]:
        """Digests of the finished upstream stages of ``stage`` as they are now (what its MANIFEST records)."""
        return {s: self.manifest(s)["digest"] for s in STAGES[:STAGES.index(stage)] if self.is_complete(s)}

    def changed_inputs(self, stage: str) -> list[str]:
        """Upstream stages whose digest differs from the one ``stage`` was built from (added, removed or
        rebuilt since); [] when ``stage`` is consistent with the run directory or not finished."""
        path = self.stage_dir(stage) / Files.MANIFEST
        if not path.is_file():
            return []
        recorded, now = read_json(path).get("inputs", {}), self.input_digests(stage)
        return [s for s in STAGES[:STAGES.index(stage)] if recorded.get(s) != now.get(s)]

    def manifest(self, stage: str) -> dict:
        return read_json(self.require(stage) / Files.MANIFEST)

    def require(self, stage: str) -> Path:
        """Return the finished stage directory.

        Raises:
            StageMissing: the stage has no MANIFEST.json (not run, or interrupted).
        """
        d = self.stage_dir(stage)
        if not (d / Files.MANIFEST).is_file():
            raise StageMissing(f"{d} has no MANIFEST.json: stage '{stage}' has not finished; run "
                               f"'ttds-ray train --config {self.root / Files.CONFIG}' to build it")
        return d

    @contextmanager
    def write_stage(self, stage: str, *, config_hash: str, numbers: dict | None = None
                    ) -> Iterator[tuple[Path, dict]]:
        """Context manager giving ``(tmp_dir, numbers)``; on success the stage is swapped in atomically.

        Put files in ``tmp_dir`` and key numbers in the ``numbers`` dict; MANIFEST.json is written
        last and ``tmp_dir`` renamed to ``root/<stage>``. On an exception the temp dir is removed and
        any earlier finished version of the stage is kept.
        """
        final = self.stage_dir(stage)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.", suffix=".tmp"))
        nums: dict = dict(numbers or {})
        t0 = self.stage_started.get(stage, time.time())
        try:
            yield tmp, nums
            inputs = self.input_digests(stage)
            files = {str(f.relative_to(tmp)): file_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            man = {"stage": stage, "config_hash": config_hash, "inputs": inputs, "files": files,
                   "git_rev": _git_rev(), "wall_s": round(time.time() - t0, 2),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "numbers": nums}
            man["digest"] = hashlib.sha256(json.dumps(man, sort_keys=True, default=str).encode()
                                           ).hexdigest()[:12]
            write_json(tmp / Files.MANIFEST, man)
            old = None
            if final.exists():
                old = final.with_name(f".{stage}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
