"""Raw-log ingestion on Ray Data: the same result as ``ingest.prepare_local``, byte for byte, for data.format
'logs' and 'amazon' (docs/DATA.md). Every per-row and per-block step is a pure function of ``ingest.py``; this
module only wires them into Ray Data.

Plan (one shuffle; everything the driver holds is ids and counts, except the item-text table it writes anyway):

1. read the sorted file list (``read_parquet`` / ``read_csv`` with the mapped columns only, ``read_binary_files``
   + the JSON-lines parser) with the file path on every row; ``map_batches(normalize_log_batch)``; materialise.
2. ``map_batches(partial_counts)`` -> the driver sums them: null / filtered / not-UTF-8 rows, logged items.
3. the item table the same way (``normalize_item_batch``), then ``finish_items`` + ``data.check_items`` on the driver.
4. kept rows -> hash-``repartition`` by user id (sorted), then ``map_batches(user_rows)`` on whole blocks: the
   pattern ``groupby(...).map_groups`` uses internally (every row of a key lands in one block), vectorised over
   the block instead of one Python call per user. Dedupe and the (timestamp, raw item id) order happen here.
5. k-core: ``map_batches(kcore_filter)`` then ``map_batches(list_item_counts)`` summed on the driver, repeated until
   no item has fewer than k interactions (users are whole rows, so their counts are the list lengths); then the
   users shorter than 3 go.
6. ``data.dense_id_maps`` on the driver (ids only) -> ``map_batches(index_rows)`` -> the sequences, collected and
   assembled by ``data.assemble`` exactly as ``data.prepare`` does it.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from . import data, ingest
from .config import DataConfig

log = logging.getLogger("ttds_ray")

_MIN_SEQ_LEN = data._MIN_SEQ_LEN


def _map(ds: "ray.data.Dataset", fn, **kwargs) -> "ray.data.Dataset":
    """``map_batches`` of a pure ``ingest`` function over whole blocks, in pyarrow format."""
    return ds.map_batches(fn, fn_kwargs=kwargs or None, batch_size=None, batch_format="pyarrow",
                          zero_copy_batch=True)


def _collect(ds: "ray.data.Dataset") -> pa.Table:
    """The whole dataset on the driver, as one pyarrow table (only small results: counts, ids, sequences)."""
    refs = ds.to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def read(table: ingest.Table) -> "ray.data.Dataset":
    """Ray Data reader of ``table``'s sorted files, with the file path column (``include_paths``), no partition
    columns from directory names, and the same pyarrow options as ``ingest.read_file``."""
    files = list(table.files)
    common = {"include_paths": True}
    if table.reader == "parquet":
        ds = ray.data.read_parquet(files, columns=list(table.columns), partitioning=None, file_extensions=None,
                                   **common)
    elif table.reader in ("csv", "tsv"):
        ds = ray.data.read_csv(files, partitioning=None, **common, **ingest.csv_options(table.reader, table.columns))
    else:
        ds = _map(ray.data.read_binary_files(files, **common), ingest.parse_binary_batch, table=table)
    # a DataError raised in a map function reaches the driver as itself (inside a RayTaskError), not as Ray Data's
    # generic UserCodeException; datasets derived from this one share its context
    ds.context.raise_original_map_exception = True
    return ds


def _item_counts(ds: "ray.data.Dataset") -> pd.Series:
    t = _collect(_map(ds, ingest.list_item_counts))
    if not t.num_rows:
        return pd.Series(dtype=np.int64)
    return pd.DataFrame({"item_id": t["item_id"].to_pylist(), "n": t["n"].to_numpy()}).groupby("item_id")["n"].sum()


def _n_rows(ds: "ray.data.Dataset") -> int:
    return int(ds.count())


def prepare_ray(cfg: DataConfig, seed: int, *, num_partitions: int | None = None,
                timings: dict | None = None) -> data.Prepared:
    """Read and prepare a 'logs' or 'amazon' dataset on Ray Data (connects to the running Ray session).

    Args:
        num_partitions: blocks of the user shuffle (default: 2 per cluster CPU, at least 2). The result does not
            depend on it.
        timings: filled with wall seconds per phase (also logged).

    Returns:
        The same :class:`data.Prepared` as ``ingest.prepare_local`` (tables and stats).

    Raises:
        DataError: as ``ingest.prepare_local`` (a DataError raised in a Ray Data worker is re-raised as itself).
    """
    try:
        return _prepare(cfg, seed, num_partitions, timings)
    except ray.exceptions.RayTaskError as e:   # a worker's DataError: re-raise it as itself (one clear message)
        if isinstance(e.cause, data.DataError):
            raise data.DataError(str(e.cause)) from None
        raise


class _Timer:
    """Wall seconds per phase, logged at the end (and handed to the caller's ``timings`` dict)."""

    def __init__(self, out: dict | None):
        self.out = out if out is not None else {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.out[name] = round(now - self.t, 2)
        self.t = now


def _prepare(cfg: DataConfig, seed: int, num_partitions: int | None, timings: dict | None) -> data.Prepared:
    timer = _Timer(timings)
    sources = ingest.plan(cfg)
    ingest.check_sources(sources)
    timer.lap("list + check files")
    kcore = sources.kcore
    rows = _map(read(sources.interactions), ingest.normalize_log_batch, spec=sources.log).materialize()
    timer.lap("read + validate interactions")
    parts = _collect(_map(rows, ingest.partial_counts))
    counts = ingest.LogCounts.from_partials(pd.DataFrame({c: parts[c].to_pylist() for c in parts.column_names}))
    timer.lap("counts")
    items_ds = _map(read(sources.items), ingest.normalize_item_batch, spec=sources.item)
    items, icounts = ingest.finish_items([t for t in ray.get(items_ds.to_arrow_refs())], sources.dedupe_items)
    timer.lap("item table")
    ingest.log_counts(counts, icounts, sources)
    items, textless = ingest.checked_items(counts, items, sources)
    n_raw = int(counts.item_rows.sum() - counts.item_rows[textless].sum())

    parts_n = num_partitions or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    kept = _map(rows, ingest.keep_rows, drop_items=pa.array(textless, pa.string()))
    # Ray 2.60's default SHUFFLE_V2 took 6-9 s per shuffle here (2 cores) and held up the next operator another
    # 3-4 s; the actor-based HASH_SHUFFLE took 3.5-4.7 s and 12.0 s vs 15.0 s for the whole 1M-row ingestion.
    # Set on this dataset's own context only.
    kept.context.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
    users = _map(kept.repartition(parts_n, keys=["user_id"], sort=True), ingest.user_rows).materialize()
    timer.lap("shuffle by user + dedupe + order")
    item_n = _item_counts(users)
    c = {"n_raw": n_raw, "n_dedup": int(item_n.sum()), "n_dedup_users": _n_rows(users),
         "n_dedup_items": len(item_n)}
    if kcore > 0:
        drop = item_n.index[item_n < kcore]
        while True:      # the first pass also drops the users shorter than k
            users = _map(users, ingest.kcore_filter, drop_items=pa.array(list(drop), pa.string()),
                         min_len=kcore).materialize()
            item_n = _item_counts(users)
            drop = item_n.index[item_n < kcore]
            if not len(drop):
                break
    c.update(n_kcore=int(item_n.sum()), n_kcore_users=_n_rows(users), n_kcore_items=len(item_n))
    timer.lap("k-core")
    data.log_kcore(kcore, {"users": c["n_dedup_users"] - c["n_kcore_users"],
                           "items": c["n_dedup_items"] - c["n_kcore_items"],
                           "interactions": c["n_dedup"] - c["n_kcore"]},
                   c["n_dedup_users"], c["n_dedup_items"], c["n_dedup"])
    users = _map(users, ingest.kcore_filter, drop_items=pa.array([], pa.string()), min_len=_MIN_SEQ_LEN).materialize()
    c["n_short"] = c["n_kcore_users"] - _n_rows(users)
    if c["n_short"] == c["n_kcore_users"]:
        raise data.no_users_left(kcore, n_raw)
    item_ids = _item_counts(users).index
    user_ids = _collect(users.select_columns(["user_id"]))["user_id"].to_pylist()
    item_map, user_map = data.dense_id_maps(np.asarray(item_ids, dtype=object), np.asarray(user_ids, dtype=object), seed)
    seqs_t = _collect(_map(users, ingest.index_rows,
                           item_ids=pa.array(list(item_map), pa.string()), item_idx=np.fromiter(item_map.values(), np.int64),
                           user_ids=pa.array(list(user_map), pa.string()), user_idx=np.fromiter(user_map.values(), np.int64)))
    order = np.argsort(seqs_t["user_idx"].to_numpy())
    seqs_t = seqs_t.take(pa.array(order))
    lists = seqs_t["items"].combine_chunks()
    flat = lists.flatten().to_numpy()
    offsets = lists.offsets.to_numpy()
    seqs = np.split(flat, offsets[1:-1] - offsets[0])
    prepared = data.assemble(items, item_map, user_map, seqs, c, kcore=kcore, seed=seed,
                             n_dropped_textless=len(textless))
    timer.lap("ids + sequences")
    log.info("ingest (Ray Data): %s", ", ".join(f"{k} {v:.1f} s" for k, v in timer.out.items()))
    return data.Prepared(prepared.items, prepared.sequences,
                         {**prepared.stats, **ingest.ingest_stats(counts, icounts)})
