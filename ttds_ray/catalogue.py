"""Cold-start items added to a trained run after training (DESIGN §1.7), persisted in the run directory.

Reads and writes ``<run>/cold_start/items.json`` (``Files.COLD_START_ITEMS``): a JSON list, oldest first,
of ``{item_id, title, text, co_items, codes, s, created}`` where ``codes`` is the item's semantic ID
(L ints) and ``s`` its semantic embedding (d_s floats, for the user tower of histories that contain it).
The file is rewritten atomically (temp file + rename) on every addition, under an exclusive ``flock`` on
``<run>/cold_start/.lock``, so several processes serving the same run (Ray Serve replicas on one node or
on a shared file system) never assign one semantic ID twice and never see a half-written list. Entries
are append-only: a reader that has seen the first n entries only needs the ones after them.
No Ray, no torch.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .artifacts import Files, atomic_write_bytes
from .errors import ArtifactError


@dataclass(frozen=True)
class AddedItem:
    """One cold-start item.

    Attributes:
        item_id: raw id (unique across the catalogue and earlier additions). title, text: as given.
        co_items: raw ids of catalogue items it was co-interacted with (its collaborative input), may be empty.
        codes: its semantic ID, L ints. s: its semantic embedding, d_s floats. created: unix seconds.
    """
    item_id: str
    title: str
    text: str
    co_items: list[str]
    codes: list[int]
    s: list[float]
    created: float
    modalities: list[str] = field(default_factory=lambda: ["text"])


class ColdStartStore:
    """The persisted list of :class:`AddedItem` of one run directory.

    Args:
        run_root: the run directory (``<output_dir>/<name>``).
    """

    def __init__(self, run_root: str | Path):
        self.dir = Path(run_root) / Files.COLD_START_DIR
        self.path = self.dir / Files.COLD_START_ITEMS

    def stamp(self) -> tuple[int, int] | None:
        """``(mtime_ns, size)`` of the file, None if nothing was ever added: a cheap change check."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def read(self) -> list[AddedItem]:
        """Every added item, oldest first.

        Raises:
            ArtifactError: the file exists but is not the list this module writes.
        """
        if not self.path.is_file():
            return []
        try:
            return [AddedItem(**e) for e in json.loads(self.path.read_text(encoding="utf-8"))]
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{self.path}: not a cold-start item list ({e}); restore it or delete it to "
                                "drop the added items") from None

    def write(self, items: list[AddedItem]) -> None:
        """Replace the list atomically (call under :meth:`locked`)."""
        atomic_write_bytes(self.path, json.dumps([asdict(i) for i in items]).encode("utf-8"))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive inter-process lock for a read-assign-write cycle."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
