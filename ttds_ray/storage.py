"""Shared storage for a run directory on a cluster: a cloud or network URI plus a local working copy.

On one machine a run directory is a local path (``<output_dir>/<name>``). On a cluster, Ray Train
workers on other nodes must read the stage inputs the driver wrote and write their checkpoints where
every node can reach them. Two ways, both through this module (pyarrow.fs only; no Ray import):

- **A mounted network filesystem** (NFS, EFS, Lustre, ...) mounted at the same path on every node:
  it *is* a local path, so nothing is copied. Every function here treats a path without a scheme as
  local: :func:`local_cache_dir` returns it unchanged, :func:`pull_stages` reads it in place, and
  :func:`push_stage` only copies when the source and the destination differ.
- **A URI** (``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://...``, ``file:///abs/path``):
  every node keeps a local working copy under :func:`local_cache_dir` (``$TTDS_CACHE/runs/<hash>``).
  The driver writes a stage locally (``RunDir.write_stage``) and :func:`push_stage` uploads it, its
  ``MANIFEST.json`` last, so a reader that sees the manifest sees the whole stage. A worker calls
  :func:`pull_stages` for its inputs: a stage is downloaded only when the remote manifest differs from
  the local one, into a temporary sibling that is checked against the manifest's sha256 list and then
  renamed into place, so the local copy is either the remote stage or absent.

Ray Train's ``storage_path`` takes a URI natively; :func:`train_storage_path` gives it for a run and
stage, local or remote. Errors on a bad location are :class:`~ttds_ray.errors.ConfigError` naming the
config key.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import pyarrow.fs as pafs

from .artifacts import STAGES, Files, atomic_write_bytes, file_sha256
from .errors import ArtifactError, ConfigError, StageMissing

log = logging.getLogger("ttds_ray")

#: ``scheme://`` at the start of a location; at least two letters, so a Windows drive (``C:\``) is a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_uri(path: str | os.PathLike) -> bool:
    """True if ``path`` has a scheme (``s3://``, ``gs://``, ``hdfs://``, ``file://``); False for a plain
    local or NFS-mounted path."""
    return bool(_SCHEME.match(str(path)))


def _split_query(uri: str) -> tuple[str, str]:
    """``'s3://b/p?region=x'`` -> ``('s3://b/p', '?region=x')`` (pyarrow reads options from the query)."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI (a URI's ``?query`` options stay at the end)."""
    loc = str(location)
    if not is_uri(loc):
        return str(Path(loc, *parts))
    base, query = _split_query(loc)
    return posixpath.join(base.rstrip("/"), *parts) + query


def run_uri(output_dir: str | os.PathLike, name: str) -> str:
    """The run directory's location, ``<output_dir>/<name>``: a local path or a URI."""
    return join(output_dir, name)


def filesystem(uri: str | os.PathLike, key: str = "output_dir") -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI or a local path.

    A local (or NFS-mounted) path gives ``(LocalFileSystem, absolute path)``; a URI goes through
    ``pyarrow.fs.FileSystem.from_uri`` (S3 options such as ``?region=us-west-2`` in the query; without a
    region, S3 asks the bucket for it over the network).

    Raises:
        ConfigError: naming ``key``: the scheme has no pyarrow filesystem here (e.g. ``hdfs://`` without
            a JVM, an unknown scheme), the URI is malformed, or it names no bucket/path.
    """
    loc = str(uri)
    if not loc.strip():
        raise ConfigError(f"{key} is empty: give a directory or a URI such as s3://bucket/runs")
    if not is_uri(loc):
        return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(loc)
    except Exception as e:      # ArrowInvalid (unknown scheme, bad URI), OSError (no JVM, no network), ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(
            f"{key}={loc!r}: pyarrow cannot open this location ({type(e).__name__}: {first}). Use a local or "
            "NFS-mounted directory, file:///absolute/path, s3://bucket/path (add ?region=... to skip the "
            "region lookup) or gs://bucket/path, with that filesystem's credentials on every node") from None
    if not path.strip("/"):
        raise ConfigError(f"{key}={loc!r} names no bucket or directory: use e.g. s3://my-bucket/runs")
    return fs, path.rstrip("/") or "/"


def local_cache_dir(run_location: str | os.PathLike) -> Path:
    """The local working copy of a run directory.

    A local or NFS-mounted path is its own working copy and comes back unchanged (``Path``). A URI maps to
    ``$TTDS_CACHE/runs/<16 hex of sha256(uri)>`` (default ``~/.cache/ttds_ray/runs/...``), the same on every
    node, so stages pulled once are reused by every later worker on that node.
    """
    loc = str(run_location)
    if not is_uri(loc):
        return Path(loc)
    base, query = _split_query(loc)
    key = hashlib.sha256((base.rstrip("/") + query).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TTDS_CACHE", Path.home() / ".cache" / "ttds_ray")) / "runs" / key
    root.mkdir(parents=True, exist_ok=True)
    src = root / ".source"
    if not src.is_file():
        atomic_write_bytes(src, (loc + "\n").encode())      # which URI this cache mirrors, for people
    return root


# ----------------------------------------------------------------------------- low-level transfers

def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def _read(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The file's bytes, or None if there is no file at ``path``."""
    if _info(fs, path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _copy(src: str, dst: str, src_fs: pafs.FileSystem, dst_fs: pafs.FileSystem) -> None:
    """``pyarrow.fs.copy_files`` (a file or a whole directory tree); every transfer goes through here."""
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def _put(local_file: Path, fs: pafs.FileSystem, dest: str) -> None:
    """Upload one file so that ``dest`` appears whole: copy to a temporary sibling, then move it over
    ``dest`` (a rename on local/NFS filesystems; one object copy on S3/GCS, whose objects are atomic)."""
    parent = posixpath.dirname(dest)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(dest)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _copy(str(local_file), tmp, pafs.LocalFileSystem(), fs)
        fs.move(tmp, dest)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


@contextlib.contextmanager
def _node_lock(local_root: Path) -> Iterator[None]:
    """One puller at a time per local working copy (two workers on one node pull the same stages)."""
    local_root.mkdir(parents=True, exist_ok=True)
    with open(local_root / ".pull.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a directory, maybe absent) by ``tmp``, as ``RunDir.write_stage`` does."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- pull / push

def pull_file(run_location: str | os.PathLike, name: str, local_root: str | os.PathLike | None = None) -> bool:
    """Make ``<local_root>/<name>`` equal the remote top-level file (``config.yaml``, ``metrics.json``).

    Written atomically and only if its bytes differ; a file absent remotely is left alone locally.
    Returns True if the local file changed. No-op (False) for a local/NFS run location.

    Raises:
        ConfigError: the location cannot be opened (see :func:`filesystem`).
    """
    if not is_uri(run_location):
        return False
    fs, base = filesystem(run_location)
    root = Path(local_root) if local_root is not None else local_cache_dir(run_location)
    return _pull_file(fs, posixpath.join(base, name), root / name)


def _pull_file(fs: pafs.FileSystem, remote: str, dst: Path) -> bool:
    blob = _read(fs, remote)
    if blob is None or (dst.is_file() and dst.read_bytes() == blob):
        return False
    atomic_write_bytes(dst, blob)
    return True


def pull_stages(run_location: str | os.PathLike, stages: Iterable[str],
                local_root: str | os.PathLike | None = None) -> Path:
    """Bring the named finished stages (and the run's ``config.yaml``) into the local working copy.

    For a local or NFS-mounted ``run_location`` nothing moves: it is returned as is. For a URI, each stage
    whose remote ``MANIFEST.json`` differs byte-wise from the local one is downloaded into a temporary
    sibling directory (``pyarrow.fs.copy_files``), every file listed in the manifest is checked against
    its sha256, files the manifest does not list are dropped, and the directory is renamed into place.
    A stage without a remote manifest (not finished, or half-pushed) is not complete: its local copy, if
    any, is removed so the working copy never holds a stage the shared run does not. Concurrent pullers
    on one node take turns (a file lock in the working copy).

    Args:
        run_location: the run directory, ``storage.run_uri(output_dir, name)``.
        stages: stage names (``artifacts.STAGES``) to bring in, e.g. a stage's upstream stages.
        local_root: the working copy; default :func:`local_cache_dir` of ``run_location``.

    Returns:
        The local run directory to open with ``RunDir``.

    Raises:
        ConfigError: the location cannot be opened (see :func:`filesystem`).
        ArtifactError: a downloaded file does not match the manifest (the remote stage was being
            rewritten during the pull); nothing local is changed, pull again.
    """
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    if not is_uri(run_location):
        return Path(run_location)
    fs, base = filesystem(run_location)
    root = Path(local_root) if local_root is not None else local_cache_dir(run_location)
    with _node_lock(root):
        _pull_file(fs, posixpath.join(base, Files.CONFIG), root / Files.CONFIG)
        for stage in stages:
            _pull_stage(fs, posixpath.join(base, stage), root / stage, f"{run_location}/{stage}")
    return root


def _pull_stage(fs: pafs.FileSystem, remote: str, final: Path, label: str) -> None:
    remote_man = _read(fs, posixpath.join(remote, Files.MANIFEST))
    local_man = final / Files.MANIFEST
    if remote_man is None:
        if final.exists():
            log.info("storage: %s has no MANIFEST.json (not finished): dropping the local copy", label)
            shutil.rmtree(final, ignore_errors=True)
        return
    if local_man.is_file() and local_man.read_bytes() == remote_man:
        return
    listed: dict[str, str] = json.loads(remote_man)["files"]
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.pull-", suffix=".tmp"))
    try:
        dl = tmp / "dl"
        dl.mkdir()                  # copy_files creates the tree's sub-directories, not its root
        _copy(remote, str(dl), fs, pafs.LocalFileSystem())
        bad = [rel for rel, sha in listed.items()
               if not (dl / rel).is_file() or file_sha256(dl / rel) != sha]
        if bad:
            raise ArtifactError(f"{label}: {len(bad)} file(s) differ from its MANIFEST.json after download "
                                f"({', '.join(bad[:5])}); the stage changed while it was pulled: pull again")
        for f in sorted(dl.rglob("*"), reverse=True):          # drop anything the manifest does not list
            rel = str(f.relative_to(dl))
            if f.is_file() and rel not in listed:
                f.unlink()
            elif f.is_dir() and not any(f.iterdir()):
                f.rmdir()
        atomic_write_bytes(dl / Files.MANIFEST, remote_man)     # the manifest checked above, written last
        _swap_in(dl, final)
        log.info("storage: pulled %s (%d files)", label, len(listed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_stage(local_root: str | os.PathLike, run_location: str | os.PathLike, stage: str) -> bool:
    """Upload a finished stage of the local working copy to the shared run directory, manifest last.

    A remote copy with the same ``MANIFEST.json`` is left as it is. Otherwise the remote manifest is
    deleted first (readers stop treating the old stage as complete), the old remote files are removed,
    every file the local manifest lists is uploaded, and the manifest is uploaded last: a reader that
    sees the manifest sees the whole stage (``RunDir.is_complete`` and :func:`pull_stages` key on it).
    For a local/NFS ``run_location`` equal to ``local_root`` there is nothing to do.

    Returns:
        True if anything was uploaded.

    Raises:
        StageMissing: the local stage has no MANIFEST.json (not finished).
        ConfigError: the location cannot be opened (see :func:`filesystem`).
    """
    src = Path(local_root) / stage
    man_path = src / Files.MANIFEST
    if not man_path.is_file():
        raise StageMissing(f"{src} has no MANIFEST.json: stage '{stage}' has not finished, nothing to push")
    fs, base = filesystem(run_location)
    if not is_uri(run_location) and Path(base) == Path(local_root).resolve():
        return False
    remote = posixpath.join(base, stage)
    local_man = man_path.read_bytes()
    remote_man_path = posixpath.join(remote, Files.MANIFEST)
    if _read(fs, remote_man_path) == local_man:
        return False
    if _info(fs, remote_man_path).type == pafs.FileType.File:
        fs.delete_file(remote_man_path)
    fs.delete_dir_contents(remote, missing_dir_ok=True)
    for rel in json.loads(local_man)["files"]:
        _put(src / rel, fs, posixpath.join(remote, rel))
    _put(man_path, fs, remote_man_path)
    log.info("storage: pushed %s to %s", src, join(run_location, stage))
    return True


def push_file(local_root: str | os.PathLike, run_location: str | os.PathLike, name: str) -> bool:
    """Upload a top-level file of the run (``config.yaml``, ``metrics.json``, ``train.log``) so that it
    appears whole. Returns False (nothing to do) for a local/NFS ``run_location`` equal to ``local_root``.

    Raises:
        FileNotFoundError: ``<local_root>/<name>`` does not exist.
        ConfigError: the location cannot be opened (see :func:`filesystem`).
    """
    src = Path(local_root) / name
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file to push")
    fs, base = filesystem(run_location)
    if not is_uri(run_location) and Path(base) == Path(local_root).resolve():
        return False
    _put(src, fs, posixpath.join(base, name))
    return True


def push_tree(local_root: str | os.PathLike, run_location: str | os.PathLike, rel: str) -> bool:
    """Upload the directory ``<local_root>/<rel>`` (e.g. the LLM stage's sample files under ``work/``) to
    ``<run_location>/<rel>`` in one ``pyarrow.fs.copy_files`` call, replacing what was there. Not atomic: for
    files the driver writes once and readers open only after this returns (Ray Data read tasks on any node).
    Returns False (nothing to do) for a local/NFS ``run_location`` equal to ``local_root``.

    Raises:
        FileNotFoundError: ``<local_root>/<rel>`` is not a directory.
        ConfigError: the location cannot be opened (see :func:`filesystem`).
    """
    src = Path(local_root) / rel
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory to push")
    fs, base = filesystem(run_location)
    if not is_uri(run_location) and Path(base) == Path(local_root).resolve():
        return False
    dest = posixpath.join(base, rel)
    fs.delete_dir_contents(dest, missing_dir_ok=True)
    fs.create_dir(dest, recursive=True)
    _copy(str(src), dest, pafs.LocalFileSystem(), fs)
    return True


def shared_paths(local_root: str | os.PathLike, run_location: str | os.PathLike,
                 paths: Iterable[str | os.PathLike]) -> list[str]:
    """Where every node finds files of the local working copy: each path under ``local_root`` mapped onto
    ``run_location`` (a URI: for ``ray.data.read_parquet`` on a cluster, after :func:`push_stage` /
    :func:`push_tree`); unchanged (as ``str``) for a local/NFS run location.

    Raises:
        ValueError: a path is not inside ``local_root``.
    """
    paths = [Path(p) for p in paths]
    if not is_uri(run_location):
        return [str(p) for p in paths]
    root = Path(local_root).resolve()
    out = []
    for p in paths:
        try:
            rel = p.resolve().relative_to(root)
        except ValueError:
            raise ValueError(f"{p} is not inside the run's working copy {root}") from None
        out.append(join(run_location, *rel.parts))
    return out


def delete_dir(location: str | os.PathLike, key: str = "output_dir") -> None:
    """Remove a directory tree, local or remote (what ``shutil.rmtree`` does for a local path); a missing one
    is fine.

    Raises:
        ConfigError: the location cannot be opened (see :func:`filesystem`).
    """
    fs, path = filesystem(location, key)
    if _info(fs, path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


# ----------------------------------------------------------------------------- Ray Train storage

class TrainStorage(NamedTuple):
    """Where Ray Train keeps a stage's checkpoints: ``RunConfig(storage_path=..., name=...)``.

    ``path`` is the whole directory (``storage_path/name``), e.g. for :func:`delete_dir` once the stage's
    artifacts are in place.
    """
    storage_path: str
    name: str

    @property
    def path(self) -> str:
        return join(self.storage_path, self.name)


def train_storage_path(output_dir: str | os.PathLike, run_name: str, stage: str, config_hash: str, *,
                       storage_path: str | None = None) -> TrainStorage:
    """Ray Train's ``storage_path`` and run ``name`` for one stage of one run.

    Default: ``<output_dir>/<run_name>/ray_results`` with name ``<stage>-<config_hash>`` (an absolute local
    path, which Ray requires, or the URI as given, which Ray opens with pyarrow itself). With
    ``storage_path`` (``ray.storage_path``) checkpoints go to ``<storage_path>/<run_name>/<stage>-<hash>``
    instead, e.g. an S3 bucket for a run directory on NFS. On a multi-node cluster the location must be
    shared (a URI or an NFS mount): Ray Train workers write their checkpoints there directly.

    Raises:
        ConfigError: a URI whose filesystem pyarrow cannot open (checked here, before Ray starts a trainer).
    """
    parent = join(storage_path, run_name) if storage_path else join(output_dir, run_name, "ray_results")
    filesystem(parent, "ray.storage_path" if storage_path else "output_dir")      # fail early, naming the key
    if not is_uri(parent):
        parent = str(Path(parent).expanduser().resolve())
    return TrainStorage(parent, f"{stage}-{config_hash}")
