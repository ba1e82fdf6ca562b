"""Ingestion throughput (rows/s) of the raw-log reader (data.format: logs) through Ray Data.

    python bench/ingest.py [--rows 1000000] [--files 8] [--csv] [--num-cpus 2] [--out results/ingest-<date>.json]

Writes a synthetic interaction log (``--rows`` rows, shuffled, split into ``--files`` parquet files; with ``--csv``
also as CSV files) plus an item table into a temporary folder, then times on one local Ray session:

- ``read``: read + validate + normalise every row (``ingest_ray.read`` -> ``normalize_log_batch``, materialised);
- ``prepare``: the whole Ray Data ingestion, ``ingest_ray.prepare_ray`` (read, counts, item table, the user shuffle,
  dedupe, k-core, ids, sequences) -> a ``data.Prepared``;
- ``pandas``: the same on the pandas path, ``ingest.prepare_local`` (one process), and whether both gave
  byte-identical tables.

rows/s = input rows / wall seconds (``ray.init`` excluded; the first ``read`` pass pays worker start-up). The
synthetic log: users with 5..40 interactions, Zipf-like item popularity, timestamps on a coarse (daily) grid so
ties are common, ~1 % exact duplicate rows, ~0.1 % rows with a null user, a rating column filtered at 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ttds_ray.config import config_from_dict  # noqa: E402


def synthetic_log(n_rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(log, items)``: a shuffled interaction log of about ``n_rows`` rows and its item table."""
    rng = np.random.default_rng(seed)
    n_users = max(10, n_rows // 20)
    n_items = max(10, n_rows // 50)
    lens = rng.integers(5, 41, n_users)
    lens = np.maximum(1, np.round(lens * n_rows / lens.sum()).astype(np.int64))
    user = np.repeat(np.arange(n_users), lens)[:n_rows]
    n = len(user)
    item = (rng.zipf(1.3, n) - 1) % n_items
    ts = 1_600_000_000 + rng.integers(0, 365, n) * 86_400          # daily grid: many ties
    log = pd.DataFrame({"user": np.char.add("u", user.astype(str)), "item": np.char.add("i", item.astype(str)),
                        "ts": ts.astype(np.int64), "rating": rng.integers(1, 6, n).astype(np.float64)})
    dup = log.sample(frac=0.01, random_state=seed)
    log = pd.concat([log, dup], ignore_index=True)
    log.loc[log.sample(frac=0.001, random_state=seed + 1).index, "user"] = None
    log = log.sample(frac=1.0, random_state=seed + 2).reset_index(drop=True)
    items = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)], "title": [f"Item {i}" for i in range(n_items)],
                          "brand": [f"brand {i % 97}" for i in range(n_items)],
                          "categories": [f"cat {i % 13}, sub {i % 131}" for i in range(n_items)]})
    return log, items


def write_split(log: pd.DataFrame, out: Path, n_files: int, fmt: str) -> None:
    """``log`` as ``n_files`` files of format ``fmt`` ('parquet' or 'csv') under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(log)), n_files)):
        chunk = log.iloc[part]
        if fmt == "parquet":
            chunk.to_parquet(out / f"part-{k:03d}.parquet", index=False)
        else:
            chunk.to_csv(out / f"part-{k:03d}.csv", index=False)


def _config(root: Path, inter: str) -> object:
    return config_from_dict({"data": {"path": str(root), "format": "logs", "kcore": 5, "min_rating": 2.0,
                                      "logs": {"interactions": inter, "items": "items.parquet", "user": "user",
                                               "item": "item", "timestamp": "ts", "rating": "rating",
                                               "title": "title", "text": ["brand", "categories"]}}}).data


def _same(a, b) -> bool:
    with tempfile.TemporaryDirectory() as x, tempfile.TemporaryDirectory() as y:
        a.save(x)
        b.save(y)
        return all((Path(x) / f).read_bytes() == (Path(y) / f).read_bytes()
                   for f in ("items.parquet", "sequences.parquet", "stats.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--csv", action="store_true", help="also time the same log as CSV files")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--out", default=f"results/ingest-{dt.date.today().isoformat()}.json")
    args = ap.parse_args()

    import ray
    from ttds_ray import ingest, ingest_ray

    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        log, items = synthetic_log(args.rows)
        items.to_parquet(root / "items.parquet", index=False)
        write_split(log, root / "parquet", args.files, "parquet")
        if args.csv:
            write_split(log, root / "csv", args.files, "csv")
        print(f"wrote {len(log)} rows in {args.files} files in {time.perf_counter() - t:.1f} s", flush=True)

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        runs = {}
        for fmt in ["parquet"] + (["csv"] if args.csv else []):
            cfg = _config(root, fmt)
            sources = ingest.plan(cfg)
            t = time.perf_counter()
            n = ingest_ray._map(ingest_ray.read(sources.interactions), ingest.normalize_log_batch,
                                spec=sources.log).materialize().count()
            read_s = time.perf_counter() - t
            t = time.perf_counter()
            phases: dict = {}
            prepared = ingest_ray.prepare_ray(cfg, seed=0, timings=phases)
            prep_s = time.perf_counter() - t
            runs[fmt] = {"rows": int(n), "read_s": round(read_s, 2), "read_rows_per_s": round(n / read_s),
                         "prepare_s": round(prep_s, 2), "prepare_rows_per_s": round(n / prep_s),
                         "prepare_phases_s": phases, "stats": prepared.stats}
            print(f"{fmt}: read+validate {n} rows in {read_s:.1f} s ({n / read_s:,.0f} rows/s); whole Ray Data "
                  f"ingestion {prep_s:.1f} s ({n / prep_s:,.0f} rows/s) -> {prepared.stats['n_users']} users, "
                  f"{prepared.stats['n_items']} items, {prepared.stats['n_interactions']} interactions; phases (s) "
                  f"{phases}", flush=True)
            if fmt == "parquet":
                t = time.perf_counter()
                local = ingest.prepare_local(cfg, seed=0)
                local_s = time.perf_counter() - t
                runs[fmt].update(pandas_s=round(local_s, 2), pandas_rows_per_s=round(n / local_s),
                                 byte_identical_to_pandas=_same(prepared, local))
                print(f"{fmt}: pandas path {local_s:.1f} s ({n / local_s:,.0f} rows/s); byte-identical: "
                      f"{runs[fmt]['byte_identical_to_pandas']}", flush=True)
        ray.shutdown()
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "rows": args.rows, "files": args.files,
              "num_cpus": args.num_cpus, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_before": [round(x, 2) for x in load], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
