"""Batch scoring (issue 9): top-k items for every user of a run's prepared dataset, or for a parquet file of
raw histories, written to one parquet file atomically. The same :class:`~ttds_ray.recommender.Recommender`
path as evaluation and serving (``recommend_many``).

Reads a finished run directory (``data/`` and ``llm/`` at least) and optionally a histories parquet file
(columns ``user`` str and ``history`` list of item id strings, oldest first). Writes ``out``: one row per
(user, rank) with the columns of :data:`OUTPUT_SCHEMA`, sorted by (input order, rank).

- **Ray stays confined.** Only :func:`_score_on_ray` imports Ray (Ray Data ``map_batches`` over an actor pool
  of :class:`ScoreUDF`, ``num_gpus=1`` per actor on CUDA). ``use_ray=False`` runs the same UDF in this
  process; importing this module imports no Ray.
- **Determinism.** Inputs are cut into contiguous chunks of ``batch_size`` users (one Ray block each, so a
  Ray batch is exactly one chunk); the model's float scores depend (in the last bits) on which prompts
  share a padded batch, so fixing the chunks makes identical inputs give byte-identical files, with or
  without Ray (at the same torch thread count). Row groups have a fixed size, and the file metadata holds
  no time or path.
- **Bad rows never kill the job.** A request that fails (unknown item ids, an empty history) gets no rows
  in the output; it is counted, and the file's key-value metadata ``ttds_ray.score`` (JSON, read it with
  :func:`read_score_metadata`) lists every failed ``{pos, user, error}`` with the counts. If no user at
  all could be scored the job fails and the old output stays (that is a wrong run or a wrong file).
- **Atomic output.** Rows stream into a hidden temp file next to ``out`` (``.<name>.<random>.tmp``), which
  is fsynced and ``os.replace``-d onto ``out`` only when complete; on any error it is deleted, so an
  existing ``out`` stays intact until a new one is complete and no half-written file is ever visible.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .artifacts import Files, RunDir
from .errors import TTDSError

log = logging.getLogger(__name__)

#: Columns of the output file. ``rank`` is 1-based; ``score`` is the summed log-probability (nats) of the
#: item's semantic-ID tokens (higher is better), as in :class:`~ttds_ray.recommender.Recommendation`.
OUTPUT_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                           ("score", pa.float32()), ("semantic_id", pa.string())])
#: Key of the JSON summary (options, counts, failed requests) in the output file's metadata.
META_KEY = "ttds_ray.score"
#: Rows per parquet row group (fixed, so the bytes do not depend on how batches arrived).
ROW_GROUP_ROWS = 65_536
#: Columns a UDF call returns: the output columns plus the input position and the error (None if scored).
UDF_COLUMNS = ["pos", *OUTPUT_SCHEMA.names, "error"]

Split = Literal["test", "valid"] | None


class ScoreInputError(TTDSError, ValueError):
    """Bad batch-scoring input: a missing run or histories file, a missing/mistyped column, a bad option."""


@dataclass(frozen=True)
class ScoreOptions:
    """What each user gets: ``k`` items (>= 1); ``exclude_seen`` drops the history's items (as serving
    does); ``split`` (prepared users only): None = after the whole logged history (online serving's
    ``{user_id}``), 'test' / 'valid' = the evaluation prompt (``ttds-ray evaluate``); ``batch_size`` users
    per UDF call and per beam-search batch."""
    k: int = 10
    exclude_seen: bool = True
    split: Split = None
    batch_size: int = 32

    def validate(self) -> "ScoreOptions":
        for name in ("k", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScoreInputError(f"{name} must be an int >= 1, got {v!r}")
        if self.split not in (None, "test", "valid"):
            raise ScoreInputError(f"split must be none, test or valid, got {self.split!r}")
        return self


@dataclass
class ScoreSummary:
    """What a job did. ``errors``: ``{pos, user, error}`` of each request that could not be scored."""
    out: str
    n_users: int
    n_scored: int
    n_rows: int
    wall_s: float
    backend: str
    errors: list[dict] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def users_per_s(self) -> float:
        return self.n_users / self.wall_s if self.wall_s > 0 else float("nan")

    def line(self) -> str:
        return (f"scored {self.n_scored} of {self.n_users} users ({self.n_errors} failed) -> {self.n_rows} rows in "
                f"{self.out}; {self.wall_s:.1f} s, {self.users_per_s:.2f} users/s ({self.backend})")


# ----------------------------------------------------------------------------- inputs

def check_run(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, after checking it holds a config and finished data + llm stages.

    Raises:
        ArtifactError / StageMissing: not a run directory, or its data/llm stage is not finished.
    """
    from .recommender import load_run_config

    run_dir = Path(run_dir)
    load_run_config(run_dir)
    run = RunDir(run_dir)
    run.require("data")
    run.require("llm")
    return run_dir


def load_inputs(run_dir: str | Path, histories: str | Path | None = None, *, max_users: int | None = None,
                seed: int | None = None) -> pd.DataFrame:
    """The users to score, in output order: ``pos`` (0..n-1), ``user`` (str) and, for a histories file,
    ``history`` (list of item id strings, or None).

    Args:
        histories: a parquet file with columns ``user`` and ``history``; None = every user of the run's
            prepared dataset (``data/sequences.parquet``, in ``user_idx`` order).
        max_users: keep a seeded sample of this many (in their original order); the seed defaults to the
            run's ``seed``, so ``max_users = eval.max_users`` picks the users the eval stage evaluated.

    Raises:
        ScoreInputError: a missing or unreadable file, a missing column, a column of the wrong type, max_users < 1.
    """
    from .evaluate import select_eval_users
    from .recommender import load_run_config

    if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
        raise ScoreInputError(f"max_users must be an int >= 1, got {max_users!r}")
    cfg = load_run_config(run_dir)
    if histories is None:
        seqs = pd.read_parquet(RunDir(Path(run_dir)).require("data") / Files.SEQUENCES, columns=["user_idx", "user_id"])
        df = pd.DataFrame({"user": seqs.sort_values("user_idx")["user_id"].astype(str).to_numpy()})
    else:
        df = read_histories(histories)
    if len(df) == 0:
        raise ScoreInputError(f"no users to score: {histories or 'the run'} has no rows")
    rows = select_eval_users(len(df), max_users, cfg.seed if seed is None else seed)
    df = df.iloc[rows].reset_index(drop=True)
    df.insert(0, "pos", np.arange(len(df), dtype=np.int64))
    return df


def read_histories(path: str | Path) -> pd.DataFrame:
    """``user`` (str) and ``history`` (list of str or None) from a parquet file, in file order.

    Raises:
        ScoreInputError: the file is missing or not parquet; ``user`` is not a string column or ``history``
        not a list column (null histories are allowed: they fail as single requests).
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"histories file {path} does not exist")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise ScoreInputError(f"{path} is not a readable parquet file: {e}") from None
    missing = [c for c in ("user", "history") if c not in schema.names]
    if missing:
        raise ScoreInputError(f"{path} has no column(s) {missing}; it needs 'user' (str) and 'history' "
                              f"(list of item id strings, oldest first); it has {schema.names}")
    ut, ht = schema.field("user").type, schema.field("history").type
    if not (pa.types.is_string(ut) or pa.types.is_large_string(ut)):
        raise ScoreInputError(f"{path}: column 'user' must be strings, got {ut}")
    if not (pa.types.is_list(ht) or pa.types.is_large_list(ht)) or not (
            pa.types.is_string(ht.value_type) or pa.types.is_large_string(ht.value_type)):
        raise ScoreInputError(f"{path}: column 'history' must be a list of item id strings, got {ht}")
    table = pq.read_table(path, columns=["user", "history"])
    if table.column("user").null_count:
        raise ScoreInputError(f"{path}: column 'user' has {table.column('user').null_count} null value(s)")
    return pd.DataFrame({"user": table.column("user").to_pylist(), "history": table.column("history").to_pylist()})


def chunk_inputs(inputs: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Contiguous chunks of ``batch_size`` rows: the unit of one UDF call (and of one Ray block)."""
    return [inputs.iloc[s:s + batch_size].reset_index(drop=True) for s in range(0, len(inputs), batch_size)]


# ----------------------------------------------------------------------------- the UDF (rows in, rows out)

def score_batch(rec, batch: pd.DataFrame, opts: ScoreOptions) -> pd.DataFrame:
    """Score one chunk of users with ``rec.recommend_many``; columns :data:`UDF_COLUMNS`, rows sorted by
    (pos, rank). A request that fails gives one row with its ``error`` message and null rank/item."""
    from .recommender import RecRequest

    if "history" in batch.columns:
        reqs = [RecRequest(history=[] if h is None else [str(x) for x in h], k=opts.k, exclude_seen=opts.exclude_seen)
                for h in batch["history"]]
    else:
        reqs = [RecRequest(user_id=str(u), k=opts.k, exclude_seen=opts.exclude_seen) for u in batch["user"]]
    results = rec.recommend_many(reqs, split=opts.split, batch_size=opts.batch_size)
    cols: dict[str, list] = {c: [] for c in UDF_COLUMNS}
    for pos, user, res in zip(batch["pos"].tolist(), batch["user"].tolist(), results):
        if isinstance(res, TTDSError):
            for c, v in zip(UDF_COLUMNS, (pos, str(user), None, None, None, None, f"{type(res).__name__}: {res}")):
                cols[c].append(v)
            continue
        n = len(res.item_ids)
        cols["pos"] += [pos] * n
        cols["user"] += [str(user)] * n
        cols["rank"] += list(range(1, n + 1))
        cols["item_id"] += list(res.item_ids)
        cols["score"] += [float(s) for s in np.asarray(res.scores, np.float32)]
        cols["semantic_id"] += list(res.semantic_ids)
        cols["error"] += [None] * n
    out = pd.DataFrame(cols)
    out["pos"] = out["pos"].astype(np.int64)
    out["rank"] = out["rank"].astype("Int32")
    out["score"] = out["score"].astype(np.float32)
    return out


class ScoreUDF:
    """Callable class for Ray Data ``map_batches`` (one per actor): holds the run's Recommender.

    Args:
        run_dir: the run. options: :class:`ScoreOptions` fields as a dict. device: torch device.
        threads: ``torch.set_num_threads`` for this process (None: leave it).
        recommender: an already loaded Recommender of the run (in-process use; skips loading).
    """

    def __init__(self, run_dir: str, options: dict, device: str = "cpu", threads: int | None = None,
                 recommender=None):
        import torch

        from .recommender import Recommender

        if threads:
            torch.set_num_threads(int(threads))
        self.opts = ScoreOptions(**options).validate()
        self.rec = recommender if recommender is not None else Recommender.from_run(run_dir, device=device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return score_batch(self.rec, batch, self.opts)


# ----------------------------------------------------------------------------- atomic output

class AtomicParquetWriter:
    """Streams tables into a hidden temp file next to ``out`` in fixed-size row groups; :meth:`commit`
    fsyncs it and ``os.replace``-s it onto ``out``; :meth:`abort` (or leaving a ``with`` block on an
    exception) deletes it. ``out`` is never half-written."""

    def __init__(self, out: str | Path, schema: pa.Schema = OUTPUT_SCHEMA, row_group_rows: int | None = None):
        self.out, self.schema, self.row_group_rows = Path(out), schema, row_group_rows or ROW_GROUP_ROWS
        fd, tmp = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        self._pending: list[pa.Table] = []
        self._n_pending = 0
        self.n_rows = 0
        try:
            self._writer = pq.ParquetWriter(self.tmp, schema)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))
        self._n_pending += table.num_rows
        while self._n_pending >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self._pending)
        self._writer.write_table(t.slice(0, n), row_group_size=n)
        rest = t.slice(n)
        self._pending, self._n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        self.n_rows += n

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        if self._n_pending:
            self._flush(self._n_pending)
        if metadata:
            self._writer.add_key_value_metadata(metadata)
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def write_scores(out: Path, batches: Iterable[pd.DataFrame], meta: dict) -> tuple[int, int, list[dict]]:
    """Write the UDF outputs (in input order) to ``out`` atomically; returns ``(n_rows, n_scored, errors)``.

    Raises:
        ScoreInputError: every request failed (``out`` is left as it was).
        RuntimeError: batches arrived out of input order.
    """
    errors: list[dict] = []
    scored, last_pos = 0, -1
    with AtomicParquetWriter(out) as w:
        for df in batches:
            if len(df) == 0:
                continue
            pos = df["pos"].to_numpy()
            if pos[0] <= last_pos or (np.diff(pos) < 0).any():
                raise RuntimeError(f"scored batches arrived out of input order (pos {pos[0]} after {last_pos})")
            last_pos = int(pos[-1])
            bad = df["error"].notna().to_numpy()
            errors += [{"pos": int(p), "user": u, "error": e}
                       for p, u, e in zip(pos[bad], df["user"][bad], df["error"][bad])]
            good = df[~bad]
            scored += good["pos"].nunique()
            w.write(pa.Table.from_pandas(good[OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA, preserve_index=False))
        n_users = meta["n_users"]
        if n_users and scored == 0:
            raise ScoreInputError(f"none of the {n_users} users could be scored (e.g. {errors[0]['error']}); "
                                  f"{out} was left as it was")
        meta = {**meta, "n_scored": scored, "n_errors": len(errors), "errors": errors}
        w.commit({META_KEY: json.dumps(meta, sort_keys=True)})
        return w.n_rows, scored, errors


def read_score_metadata(path: str | Path) -> dict:
    """The job summary stored in a scores file: options, ``n_users``, ``n_scored``, ``n_errors``, ``errors``."""
    md = pq.read_metadata(path).metadata or {}
    if META_KEY.encode() not in md:
        raise ScoreInputError(f"{path} was not written by the batch scoring job (no {META_KEY!r} metadata)")
    return json.loads(md[META_KEY.encode()])


# ----------------------------------------------------------------------------- the job

def _score_in_process(run_dir: Path, chunks: list[pd.DataFrame], opts: ScoreOptions, device: str,
                      threads: int | None, recommender, progress: bool) -> Iterator[pd.DataFrame]:
    from tqdm.auto import tqdm

    udf = ScoreUDF(str(run_dir), asdict(opts), device=device, threads=threads, recommender=recommender)
    with tqdm(total=sum(map(len, chunks)), desc="scoring", unit="user", disable=not progress) as bar:
        for chunk in chunks:
            yield udf(chunk)
            bar.update(len(chunk))


def _input_table(chunk: pd.DataFrame) -> pa.Table:
    """One chunk as an Arrow block with a fixed schema (a chunk of null histories stays list<string>)."""
    cols = {"pos": pa.array(chunk["pos"], pa.int64()), "user": pa.array(chunk["user"], pa.string())}
    if "history" in chunk.columns:
        cols["history"] = pa.array(chunk["history"].tolist(), pa.list_(pa.string()))
    return pa.table(cols)


def _score_on_ray(run_dir: Path, chunks: list[pd.DataFrame], opts: ScoreOptions, device: str,
                  concurrency: int, cpus_per_actor: float, threads: int | None,
                  consume: Callable[[Iterable[pd.DataFrame]], object]):
    """Ray Data ``map_batches`` over ``concurrency`` :class:`ScoreUDF` actors; the outputs (in input order)
    go to ``consume``. Connects to ``RAY_ADDRESS`` or an initialised Ray, else starts (and afterwards
    stops) an embedded cluster."""
    import ray

    from .train import RAY_ENV

    started = False
    if not ray.is_initialized():
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        addr = os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr)
        else:
            ray.init(include_dashboard=False, runtime_env={"env_vars": {k: os.environ[k] for k in RAY_ENV}})
        started = True
    try:
        gpu = str(device).startswith("cuda")
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:     # else the actors would wait forever
            raise ScoreInputError(f"--device {device}: the Ray cluster has no GPU; use --device cpu")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # from_blocks keeps one block per chunk (from_pandas may re-split, and runs a remote metadata task
        # per block); with batch_size == chunk size every Ray batch is exactly one chunk.
        ds = ray.data.from_blocks([_input_table(c) for c in chunks]).map_batches(
            ScoreUDF, fn_constructor_kwargs={"run_dir": str(run_dir.resolve()), "options": asdict(opts),
                                             "device": device, "threads": threads or max(1, int(cpus_per_actor))},
            batch_size=opts.batch_size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(chunks)))),
            num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
        return consume(ds.iter_batches(batch_size=None, batch_format="pandas"))
    finally:
        if started:
            ray.shutdown()


def score(run_dir: str | Path, out: str | Path, *, histories: str | Path | None = None,
          options: ScoreOptions = ScoreOptions(), max_users: int | None = None, seed: int | None = None,
          use_ray: bool = True, concurrency: int = 1, device: str = "cpu", cpus_per_actor: float = 1.0,
          threads: int | None = None, progress: bool = True, recommender=None) -> ScoreSummary:
    """Score every user of the run (or every row of ``histories``) and write ``out`` atomically.

    Args:
        run_dir: a run with finished data and llm stages. out: the parquet file to (re)place.
        histories: parquet of raw histories (see :func:`read_histories`); None = the run's prepared users.
        options: k / exclude_seen / split / batch_size. ``split`` needs the prepared users.
        max_users, seed: a seeded sample (see :func:`load_inputs`).
        use_ray: Ray Data actor pool of ``concurrency`` actors (``cpus_per_actor`` CPUs, one GPU each on
            CUDA); False = the same UDF in this process (``recommender`` may be given, already loaded).
        threads: torch threads of each scorer (Ray default: ``cpus_per_actor``; in-process: unchanged).

    Returns:
        :class:`ScoreSummary`.

    Raises:
        ScoreInputError: bad options or inputs, or no user could be scored. ArtifactError / StageMissing: not a
        finished run. Anything the model raises propagates; ``out`` is then left as it was.
    """
    t0 = time.time()
    opts = options.validate()
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ScoreInputError(f"concurrency must be an int >= 1, got {concurrency!r}")
    out = Path(out)
    if out.is_dir():
        raise ScoreInputError(f"--out {out} is a directory; give a file path such as {out / 'scores.parquet'}")
    run_dir = check_run(run_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScoreInputError(f"cannot create {out.parent} for --out: {e}") from None
    if not os.access(out.parent, os.W_OK):
        raise ScoreInputError(f"cannot write {out}: {out.parent} is not writable")
    if histories is not None and opts.split is not None:
        raise ScoreInputError("--split test/valid applies to the run's prepared users only; raw histories "
                              "are scored after the whole history (--split none)")
    inputs = load_inputs(run_dir, histories, max_users=max_users, seed=seed)
    chunks = chunk_inputs(inputs, opts.batch_size)
    meta = {"k": opts.k, "exclude_seen": opts.exclude_seen, "split": opts.split or "none",
            "source": "histories" if histories is not None else "prepared users", "n_users": len(inputs)}

    def consume(batches):
        return write_scores(out, batches, meta)

    if use_ray:
        n_rows, n_scored, errors = _score_on_ray(run_dir, chunks, opts, device, concurrency, cpus_per_actor,
                                                 threads, consume)
        backend = f"ray, {max(1, min(concurrency, len(chunks)))} actor(s)"
    else:
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ScoreInputError(f"--device {device}: CUDA is not available here; use --device cpu")
        n_rows, n_scored, errors = consume(_score_in_process(run_dir, chunks, opts, device, threads, recommender,
                                                             progress))
        backend = "in-process"
    summary = ScoreSummary(out=str(out), n_users=len(inputs), n_scored=n_scored, n_rows=n_rows,
                           wall_s=time.time() - t0, backend=backend, errors=errors)
    log.info(summary.line())
    return summary


__all__ = ["OUTPUT_SCHEMA", "META_KEY", "ScoreOptions", "ScoreSummary", "ScoreInputError", "ScoreUDF", "score",
           "score_batch", "load_inputs", "read_histories", "write_scores", "read_score_metadata",
           "AtomicParquetWriter"]
