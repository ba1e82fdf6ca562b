"""Shared run storage (ttds_ray/storage.py): push a finished stage, pull it on another "node", no Ray.

The bucket is a ``file://`` URI over tmp_path (pyarrow's LocalFileSystem through the URI code path, the
same calls S3/GCS get); the NFS mount is a plain directory (a local path on every node, nothing copied).
"""
import os
from pathlib import Path

import pytest

from ttds_ray import storage
from ttds_ray.artifacts import Files, RunDir
from ttds_ray.errors import ArtifactError, ConfigError, StageMissing


def _write_stage(root: Path, stage: str, payload: bytes) -> None:
    """A finished stage written the way every stage is (RunDir.write_stage), with a nested file."""
    with RunDir(root).write_stage(stage, config_hash="h1") as (d, numbers):
        (d / "weights.bin").write_bytes(payload)
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "vocab.json").write_text('{"a": 1}')
        numbers["loss"] = 1.5


def _tree(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture
def driver(tmp_path, monkeypatch) -> Path:
    """The driver's local working copy of a run with finished data and embeddings stages and its config."""
    monkeypatch.setenv("TTDS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "driver" / "r1"
    _write_stage(root, "data", os.urandom(4096))
    _write_stage(root, "embeddings", os.urandom(1000))
    (root / Files.CONFIG).write_text("name: r1\n")
    return root


@pytest.fixture
def copies(monkeypatch) -> list:
    """Records every transfer (storage._copy: pyarrow.fs.copy_files) as (src, dst)."""
    calls = []
    real = storage._copy

    def counting(src, dst, src_fs, dst_fs):
        calls.append((src, dst))
        real(src, dst, src_fs, dst_fs)
    monkeypatch.setattr(storage, "_copy", counting)
    return calls


BUCKET, NFS = "file-uri", "nfs-path"


def _remote(kind: str, tmp_path: Path) -> str:
    return f"file://{tmp_path}/bucket/runs/r1" if kind == BUCKET else str(tmp_path / "nfs" / "runs" / "r1")


def test_is_uri_and_join():
    for u in ("s3://b/runs", "gs://b/x", "file:///abs/x", "hdfs://namenode:8020/x"):
        assert storage.is_uri(u)
    for p in ("/mnt/nfs/runs", "runs", "C:\\runs", Path("/x")):
        assert not storage.is_uri(p)
    assert storage.join("s3://b/runs/?region=us-west-2", "r1", "data") == "s3://b/runs/r1/data?region=us-west-2"
    assert storage.run_uri("/mnt/nfs/runs", "r1") == "/mnt/nfs/runs/r1"


@pytest.mark.parametrize("kind", [BUCKET, NFS])
def test_push_then_pull_is_byte_identical_and_complete(driver, tmp_path, kind):
    remote = _remote(kind, tmp_path)
    for stage in ("data", "embeddings"):
        assert storage.push_stage(driver, remote, stage)
    assert storage.push_file(driver, remote, Files.CONFIG)
    local = storage.pull_stages(remote, ["data", "embeddings"])        # a fresh node: empty cache
    if kind == BUCKET:
        assert local == storage.local_cache_dir(remote) and local.is_relative_to(tmp_path / "cache")
        remote_dir = tmp_path / "bucket" / "runs" / "r1"
    else:                                                               # the mount is read in place
        assert local == Path(remote)
        remote_dir = Path(remote)
    for stage in ("data", "embeddings"):
        assert _tree(local / stage) == _tree(driver / stage) == _tree(remote_dir / stage)
        assert RunDir(local).is_complete(stage, "h1")                  # digests of upstream stages agree too
    assert (local / Files.CONFIG).read_text() == "name: r1\n"
    assert not [p for p in local.iterdir() if p.name.endswith(".tmp")]  # no temporary siblings left behind


def test_second_pull_with_unchanged_manifest_transfers_nothing(driver, tmp_path, copies):
    remote = _remote(BUCKET, tmp_path)
    storage.push_stage(driver, remote, "data")
    n_push = len(copies)
    assert n_push == 3                             # weights, vocab, then MANIFEST (each via a temp + move)
    local = storage.pull_stages(remote, ["data"])
    assert len(copies) == n_push + 1               # one copy_files of the stage directory
    before = {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in (local / "data").rglob("*")}
    assert storage.pull_stages(remote, ["data"]) == local
    assert len(copies) == n_push + 1               # nothing transferred
    assert {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in (local / "data").rglob("*")} == before
    assert not storage.push_stage(driver, remote, "data")               # same manifest: nothing uploaded
    assert len(copies) == n_push + 1


def test_manifest_is_uploaded_last_and_removed_first(driver, tmp_path, monkeypatch):
    """On an object store a directory's objects are deleted in no set order, so the old manifest must go
    first, explicitly; the bucket here is a filesystem that records what push_stage asks of it."""
    fsspec = pytest.importorskip("fsspec")
    import pyarrow.fs as pafs
    events = []

    class Recording(pafs.FSSpecHandler):
        def delete_file(self, path):
            events.append(("delete", Path(path).name))
            super().delete_file(path)

        def delete_dir_contents(self, path, missing_dir_ok):
            events.append(("clear", Path(path).name))
            super().delete_dir_contents(path, missing_dir_ok)

        def move(self, src, dest):                     # _put: a temp object, then moved to its name
            events.append(("put", Path(dest).name))
            super().move(src, dest)

    bucket = tmp_path / "bucket"
    remote = f"file://{bucket}/r1"
    storage.push_stage(driver, remote, "data")
    _write_stage(driver, "data", b"rebuilt")                          # the stage is rebuilt locally
    monkeypatch.setattr(storage, "filesystem", lambda uri, key="output_dir": (
        pafs.PyFileSystem(Recording(fsspec.filesystem("file"))), str(bucket / "r1")))
    assert storage.push_stage(driver, remote, "data")
    assert events[:2] == [("delete", Files.MANIFEST), ("clear", "data")]   # old stage stops being complete
    assert events[-1] == ("put", Files.MANIFEST)                # the new one is complete only when whole
    assert sorted(e[1] for e in events[2:]) == sorted([Files.MANIFEST, "weights.bin", "vocab.json"])
    assert (bucket / "r1" / "data" / Files.MANIFEST).read_bytes() == (driver / "data" / Files.MANIFEST).read_bytes()


@pytest.mark.parametrize("kind", [BUCKET, NFS])
def test_half_pushed_stage_is_not_complete(driver, tmp_path, monkeypatch, kind):
    remote = _remote(kind, tmp_path)
    storage.push_stage(driver, remote, "data")
    cache = storage.pull_stages(remote, ["data"])
    assert RunDir(cache).is_complete("data")
    _write_stage(driver, "data", b"rebuilt")
    real_put = storage._put

    def dies_before_manifest(src, fs, dest):
        if dest.endswith(Files.MANIFEST):
            raise OSError("connection lost")
        real_put(src, fs, dest)
    monkeypatch.setattr(storage, "_put", dies_before_manifest)
    with pytest.raises(OSError, match="connection lost"):
        storage.push_stage(driver, remote, "data")
    remote_dir = tmp_path / "bucket" / "runs" / "r1" / "data" if kind == BUCKET else Path(remote) / "data"
    assert (remote_dir / "weights.bin").read_bytes() == b"rebuilt"     # files there, manifest not
    assert not (remote_dir / Files.MANIFEST).exists()
    assert not RunDir(storage.pull_stages(remote, ["data"])).is_complete("data")   # the old local copy is dropped
    if kind == BUCKET:
        fresh = storage.pull_stages(remote, ["data"], tmp_path / "other-node")
        assert not (fresh / "data").exists()


def test_changed_remote_manifest_triggers_a_repull(driver, tmp_path, copies):
    remote = _remote(BUCKET, tmp_path)
    storage.push_stage(driver, remote, "data")
    local = storage.pull_stages(remote, ["data"])
    _write_stage(driver, "data", b"version 2")
    storage.push_stage(driver, remote, "data")
    n = len(copies)
    storage.pull_stages(remote, ["data"])
    assert len(copies) == n + 1
    assert (local / "data" / "weights.bin").read_bytes() == b"version 2"
    assert (local / "data" / Files.MANIFEST).read_bytes() == (driver / "data" / Files.MANIFEST).read_bytes()


def test_pull_checks_files_against_the_manifest(driver, tmp_path):
    remote = _remote(BUCKET, tmp_path)
    storage.push_stage(driver, remote, "data")
    (tmp_path / "bucket" / "runs" / "r1" / "data" / "weights.bin").write_bytes(b"torn")   # rewritten mid-pull
    with pytest.raises(ArtifactError, match="weights.bin"):
        storage.pull_stages(remote, ["data"])
    local = storage.local_cache_dir(remote)
    assert not (local / "data").exists() and not [p for p in local.iterdir() if p.name.endswith(".tmp")]


def test_push_refuses_an_unfinished_stage(driver, tmp_path):
    with pytest.raises(StageMissing, match="cf"):
        storage.push_stage(driver, _remote(BUCKET, tmp_path), "cf")


def test_nfs_run_directory_is_used_in_place(driver):
    assert storage.local_cache_dir(driver) == driver
    assert not storage.push_stage(driver, str(driver), "data")        # source and destination are one
    assert storage.pull_stages(str(driver), ["data"]) == driver


def test_local_cache_dir_is_per_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("TTDS_CACHE", str(tmp_path / "c"))
    a = storage.local_cache_dir("s3://b/runs/r1")
    assert a == storage.local_cache_dir("s3://b/runs/r1/") and a.parent == tmp_path / "c" / "runs"
    assert storage.local_cache_dir("s3://b/runs/r2") != a
    assert (a / ".source").read_text().strip() == "s3://b/runs/r1"


@pytest.mark.parametrize("uri, says", [
    ("foo://bucket/runs", "pyarrow cannot open"),
    ("file://relative/runs", "pyarrow cannot open"),
    ("s3://", "names no bucket"),
    ("", "is empty"),
])
def test_bad_locations_name_the_key(uri, says):
    with pytest.raises(ConfigError, match=says) as e:
        storage.filesystem(uri)
    assert "output_dir" in str(e.value)
    with pytest.raises(ConfigError, match="ray.storage_path"):
        storage.train_storage_path("runs", "r1", "cf", "abc", storage_path="foo://x/y")


def test_train_storage_path(tmp_path):
    local = storage.train_storage_path("runs", "r1", "llm", "abc123")
    assert local == (str(Path("runs/r1/ray_results").resolve()), "llm-abc123")
    uri = storage.train_storage_path(f"file://{tmp_path}/runs", "r1", "cf", "h")
    assert uri.storage_path == f"file://{tmp_path}/runs/r1/ray_results" and uri.name == "cf-h"
    assert uri.path == f"file://{tmp_path}/runs/r1/ray_results/cf-h"
    s3 = storage.train_storage_path("/mnt/nfs/runs", "r1", "llm", "h", storage_path="s3://b/ckpt?region=us-west-2")
    assert s3 == ("s3://b/ckpt/r1?region=us-west-2", "llm-h")


def test_delete_dir_through_the_uri(tmp_path):
    (tmp_path / "ck" / "a").mkdir(parents=True)
    (tmp_path / "ck" / "a" / "f").write_text("x")
    storage.delete_dir(f"file://{tmp_path}/ck")
    assert not (tmp_path / "ck").exists()
    storage.delete_dir(f"file://{tmp_path}/ck")                      # already gone: fine


def test_work_files_are_pushed_and_read_through_the_shared_location(driver, tmp_path):
    """The LLM stage's sample files (``work/``) reach other nodes: pushed as a tree, read via mapped paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    work = driver / "work" / "llm-h"
    work.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"x": [i, i + 1]}), work / f"epoch-{i}.parquet")
    remote = _remote(BUCKET, tmp_path)
    assert storage.push_tree(driver, remote, "work/llm-h")
    paths = storage.shared_paths(driver, remote, sorted(work.glob("*.parquet")))
    assert paths == [f"{remote}/work/llm-h/epoch-{i}.parquet" for i in range(2)]
    fs, p = storage.filesystem(paths[1])
    assert pq.read_table(p, filesystem=fs).column("x").to_pylist() == [1, 2]
    nfs = _remote(NFS, tmp_path)
    assert storage.shared_paths(nfs, nfs, [Path(nfs) / "a.parquet"]) == [f"{nfs}/a.parquet"]
    with pytest.raises(ValueError, match="not inside"):
        storage.shared_paths(driver, remote, [tmp_path / "elsewhere.parquet"])
