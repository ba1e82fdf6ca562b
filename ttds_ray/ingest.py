"""Raw-log ingestion, the Ray-free half: data formats 'logs' (interaction files + an item-text table, parquet /
CSV / JSON lines) and 'amazon' (the McAuley-lab review dumps, 2014 and 2018 releases), read into the prepared
form of :func:`ttds_ray.data.prepare` (``items.parquet``, ``sequences.parquet``, ``stats.json``). docs/DATA.md.

Both backends run the same per-batch functions of this module, so a laptop (``--no-ray``, :func:`prepare_local`,
pandas) and a cluster (``ingest_ray.prepare_ray``, Ray Data) write byte-identical tables:

1. :func:`plan` lists the files (sorted) and the column mapping; :func:`check_sources` checks every parquet
   footer and CSV header on the driver before any work (a missing column or a wrong type names the file and the
   column).
2. :func:`read_file` (pandas path) or Ray Data's readers read them; :func:`normalize_log_batch` /
   :func:`normalize_item_batch` validate and normalise each batch: ids to strings, time to float64 seconds, text
   that is not valid UTF-8 decoded by the declared encoding (or replaced) and flagged, rows with a null id or time
   flagged (``status`` 1) and rows the rating/event filter drops flagged (``status`` 2), never silently lost.
3. :func:`partial_counts` (per batch, summed on the driver: ids and counts only) gives the counts reported in
   ``stats.json`` and the distinct logged items; :func:`finish_items` + ``data.check_items`` check the item table.
4. Dedupe, k-core, ids and sequences: ``data.prepare`` on the pandas path; :func:`user_rows`,
   :func:`kcore_filter`, :func:`list_item_counts`, :func:`index_rows` on Ray Data (``ingest_ray``).

Order: each user's interactions are sorted by timestamp, ties by raw item id (Unicode code-point order), after
exact (user, item, timestamp) duplicates are dropped, so the order (and every output byte) depends only on the
rows' content, never on how the log is split into files or blocks. (The LC-Rec/RecBole readers keep input order
as their tie-break; ``data.py``.)
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from . import data
from .config import DataConfig, RESERVED_COLUMN
from .errors import DataError

logger = logging.getLogger("ttds_ray")

#: data.format values this module reads (the others are data.read_raw's LC-Rec / RecBole readers)
RAW_FORMATS = ("logs", "amazon")

#: file name extension -> reader ('.gz' is stripped first; parquet files are never gzipped)
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
               ".ndjson": "jsonl", ".json": "jsonl"}
_KEEP, _NULL, _FILTERED, _DUPLICATE = 0, 1, 2, 3      # row status after normalising
_MAX_NAMED_FILES = 3

#: Amazon review fields read (user, item, stars, unix time) and the item text fields of the metadata
AMAZON_REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")
AMAZON_TEXT_FIELDS = ("brand", "categories", "description")


# ----------------------------------------------------------------------------- what to read

@dataclass(frozen=True)
class LogSpec:
    """How interaction rows are normalised: source column names and the row filter."""
    user: str
    item: str
    timestamp: str
    rating: str | None = None            # read only when min_rating is set
    event: str | None = None             # read only when keep_events is set
    min_rating: float | None = None
    keep_events: tuple[str, ...] | None = None
    encoding: str | None = None
    keys: dict = field(default_factory=dict, hash=False, compare=False)   # column -> config key (messages)

    @property
    def columns(self) -> tuple[str, ...]:
        cols = [self.user, self.item, self.timestamp]
        if self.min_rating is not None:
            cols.append(self.rating)
        if self.keep_events is not None:
            cols.append(self.event)
        return tuple(cols)


@dataclass(frozen=True)
class ItemSpec:
    """How item-table rows are normalised: id, title and other text columns."""
    item: str
    title: str
    text: tuple[str, ...] = ()
    encoding: str | None = None
    keys: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.item, self.title, *self.text)


@dataclass(frozen=True)
class Table:
    """One input table: its files (sorted) and their reader.

    reader: 'parquet', 'csv', 'tsv', 'jsonl' (generic JSON lines), 'amazon_reviews', 'amazon_meta_2014'
    (python-literal lines), 'amazon_meta_2018' (JSON lines). ``columns`` are the source columns read;
    ``keys`` maps each to the config key that named it (for error messages); ``label`` names the table.
    """
    files: tuple[str, ...]
    reader: str
    columns: tuple[str, ...]
    keys: dict
    label: str
    encoding: str | None = None       # of text that is not valid UTF-8 (None: replace the bad bytes)


@dataclass(frozen=True)
class Sources:
    """Everything :func:`prepare_local` and ``ingest_ray.prepare_ray`` read, from :func:`plan`."""
    interactions: Table
    items: Table
    log: LogSpec
    item: ItemSpec
    kcore: int
    drop_textless: bool
    dedupe_items: str               # 'identical' (logs: identical rows collapse) | 'first' (amazon: first line wins)


def file_reader(path: str) -> str | None:
    """The reader of a data file by its extension ('parquet', 'csv', 'tsv', 'jsonl'), or None."""
    name = path.lower()
    gz = name.endswith(".gz")
    reader = _EXTENSIONS.get(os.path.splitext(name[:-3] if gz else name)[1])
    return None if reader == "parquet" and gz else reader


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


def list_files(spec: str, root: str, key: str) -> list[str]:
    """The data files ``spec`` names (a directory, a glob or one file; relative to ``root``), as sorted
    absolute paths. A directory gives every file with a known extension under it (recursively), skipping
    hidden and ``_``-prefixed names (``_SUCCESS``, ``.crc``); a glob or a file must name data files only.

    Raises:
        DataError: a remote URI, nothing there, a file of unknown type, several file types in one table.
    """
    if "://" in spec:
        raise DataError(f"{key}={spec!r}: remote URIs are not read directly; mount the bucket (s3fs, gcsfuse, "
                        f"NFS) on every node and give the mounted path")
    path = os.path.expanduser(spec if os.path.isabs(os.path.expanduser(spec)) else os.path.join(root, spec))
    if any(c in path for c in "*?["):
        files = [f for f in glob(path, recursive=True) if os.path.isfile(f)]
        unknown = [f for f in files if file_reader(f) is None]
        if unknown:
            raise DataError(f"{key}={spec!r} matches {len(unknown)} files of unknown type (e.g. {unknown[0]}); "
                            f"data files end in {', '.join(sorted(_EXTENSIONS))} (optionally .gz, not parquet)")
    elif os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                 if file_reader(f) and not _hidden(os.path.relpath(os.path.join(d, f), path))]
    elif os.path.isfile(path):
        if file_reader(path) is None:
            raise DataError(f"{key}={spec!r}: {path} is not a parquet, CSV/TSV or JSON-lines file (by extension)")
        files = [path]
    else:
        raise DataError(f"{key}={spec!r}: {path} does not exist (relative globs are under data.path={root!r})")
    if not files:
        raise DataError(f"{key}={spec!r}: no data files at {path} (parquet, CSV/TSV or JSON lines)")
    kinds = sorted({file_reader(f) for f in files})
    if len(kinds) > 1:
        raise DataError(f"{key}={spec!r} mixes file types {kinds}; one table must be all one type")
    return sorted(os.path.abspath(f) for f in files)


def plan(cfg: DataConfig) -> Sources:
    """What to read for ``cfg`` (format 'logs' or 'amazon').

    Raises:
        DataError: as :func:`list_files` / :func:`find_amazon`.
    """
    if cfg.format == "logs":
        lc = cfg.logs
        log = LogSpec(lc.user, lc.item, lc.timestamp, lc.rating, lc.event, cfg.min_rating, lc.keep_events,
                      lc.encoding, keys={lc.user: "data.logs.user", lc.item: "data.logs.item",
                                         lc.timestamp: "data.logs.timestamp", lc.rating: "data.logs.rating",
                                         lc.event: "data.logs.event"})
        ikey = lc.item_key or lc.item
        item = ItemSpec(ikey, lc.title, lc.text, lc.encoding,
                        keys={ikey: "data.logs.item_key" if lc.item_key else "data.logs.item (item_key)",
                              lc.title: "data.logs.title", **{c: "data.logs.text" for c in lc.text}})
        inter_files = list_files(lc.interactions, cfg.path, "data.logs.interactions")
        item_files = list_files(lc.items, cfg.path, "data.logs.items")
        return Sources(
            Table(tuple(inter_files), file_reader(inter_files[0]), log.columns, log.keys,
                  f"data.logs.interactions={lc.interactions!r}", lc.encoding),
            Table(tuple(item_files), file_reader(item_files[0]), item.columns, item.keys,
                  f"data.logs.items={lc.items!r}", lc.encoding),
            log, item, cfg.kcore, cfg.drop_items_without_text, "identical")
    if cfg.format == "amazon":
        release, reviews, meta = find_amazon(cfg)
        enc = cfg.amazon.encoding if cfg.amazon else None
        keys = {f: f"Amazon review field {f!r}" for f in AMAZON_REVIEW_FIELDS}
        log = LogSpec("reviewerID", "asin", "unixReviewTime", "overall", None, cfg.min_rating, None, enc, keys=keys)
        item = ItemSpec("asin", "title", AMAZON_TEXT_FIELDS, enc,
                        keys={f: f"Amazon metadata field {f!r}" for f in ("asin", "title", *AMAZON_TEXT_FIELDS)})
        return Sources(Table((reviews,), "amazon_reviews", log.columns, keys, reviews, enc),
                       Table((meta,), f"amazon_meta_{release}", item.columns, item.keys, meta, enc),
                       log, item, cfg.kcore, cfg.drop_items_without_text, "first")
    raise ValueError(f"ingest.plan reads formats 'logs' and 'amazon', not {cfg.format!r}")


# ----------------------------------------------------------------------------- Amazon review dumps

_AMAZON_2014 = re.compile(r"^reviews_(?P<cat>.+?)(?P<five>_5)?\.json(\.gz)?$")
_AMAZON_2018 = re.compile(r"^(?!meta_|reviews_)(?P<cat>.+?)(?P<five>_5)?\.json(\.gz)?$")
_AMAZON_META = re.compile(r"^meta_(?P<cat>.+)\.json(\.gz)?$")


def find_amazon(cfg: DataConfig) -> tuple[str, str, str]:
    """The review and metadata files of an Amazon dump in the directory ``cfg.path``.

    2014: ``reviews_<Cat>_5.json.gz`` (5-core) / ``reviews_<Cat>.json.gz`` + ``meta_<Cat>.json.gz``;
    2018: ``<Cat>_5.json.gz`` / ``<Cat>.json.gz`` + ``meta_<Cat>.json.gz``. The category is ``data.name``, or the
    only one there; ``data.amazon.release`` picks the release when both are present ('auto': 2014 first).

    Returns:
        ``(release, reviews_file, meta_file)`` with release '2014' or '2018'.

    Raises:
        DataError: no such directory, no dump, several categories and no data.name, the 5-core (or full)
            review file or the metadata file missing.
    """
    root = data.resolve_data_path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path!r} is not a directory; for data.format=amazon it holds the dump "
                        f"(reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz, or <Cat>_5.json.gz + meta_<Cat>.json.gz)")
    acfg = cfg.amazon
    names = sorted(f.name for f in root.iterdir() if f.is_file())
    found: dict[tuple[str, str], dict[str, str]] = {}       # (release, cat) -> {"5core"|"all": name}
    metas = {m["cat"]: n for n in names if (m := _AMAZON_META.match(n))}
    for n in names:
        for release, rx in (("2014", _AMAZON_2014), ("2018", _AMAZON_2018)):
            m = rx.match(n)
            if m and not _AMAZON_META.match(n):
                found.setdefault((release, m["cat"]), {})["5core" if m["five"] else "all"] = n
    want_release = acfg.release if acfg else "auto"
    cands = sorted(k for k in found if (cfg.name is None or k[1] == cfg.name)
                   and (want_release == "auto" or k[0] == want_release) and k[1] in metas)
    if not cands:
        what = f"category {cfg.name!r}" if cfg.name else "an Amazon review dump"
        raise DataError(f"no {what} in {root} (release {want_release}): expected reviews_<Cat>_5.json.gz + "
                        f"meta_<Cat>.json.gz (2014) or <Cat>_5.json.gz + meta_<Cat>.json.gz (2018); found {names[:10]}")
    cats = sorted({c for _, c in cands})
    if len(cats) > 1:
        raise DataError(f"{root} holds several Amazon categories {cats}; set data.name to one of them")
    release, cat = cands[0]              # '2014' sorts before '2018'
    kind = acfg.reviews if acfg else "5core"
    files = found[(release, cat)]
    if kind not in files:
        other = "all" if kind == "5core" else "5core"
        raise DataError(f"{root} has no {'5-core ' if kind == '5core' else 'full '}review file for {cat!r} "
                        f"({release}; found {files[other]}); set data.amazon.reviews={other}")
    return release, str(root / files[kind]), str(root / metas[cat])


def _amazon_text(val: object) -> str:
    """A metadata field as text: nested lists joined by ', ', HTML entities unescaped, whitespace squeezed."""
    return " ".join(html.unescape(data._as_text(val)).split())


def amazon_meta_records(records: list[dict]) -> dict[str, list]:
    """Metadata lines -> columns asin, title, brand, categories, description (text; 2014 'categories' lists of
    category paths and 2018 'category' lists both become 'categories'), and ``_dup`` (a later line of an asin
    already seen: the first line wins)."""
    cols: dict[str, list] = {k: [] for k in ("asin", "title", *AMAZON_TEXT_FIELDS, "_dup")}
    seen: set[str] = set()
    for r in records:
        asin = r.get("asin")
        asin = None if asin is None else str(asin).strip() or None
        cols["asin"].append(asin)
        cols["_dup"].append(asin is not None and asin in seen)
        seen.add(asin)
        cols["title"].append(_amazon_text(r.get("title")))
        cols["brand"].append(_amazon_text(r.get("brand")))
        cols["categories"].append(_amazon_text(r.get("categories", r.get("category"))))
        cols["description"].append(_amazon_text(r.get("description")))
    return cols


# ----------------------------------------------------------------------------- reading files

def csv_options(reader: str, columns: Sequence[str]) -> dict:
    """pyarrow CSV options of both backends: only the mapped columns, all read as raw bytes (no type inference,
    so ids keep leading zeros and every file of a split reads alike; text is decoded by the normalisers)."""
    return {"parse_options": pcsv.ParseOptions(delimiter="\t" if reader == "tsv" else ","),
            "convert_options": pcsv.ConvertOptions(include_columns=list(columns),
                                                   column_types={c: pa.binary() for c in columns},
                                                   strings_can_be_null=False)}


def _decode_lines(blob: bytes, encoding: str | None) -> tuple[list[str], np.ndarray]:
    """Non-empty lines of ``blob`` (gzip is undone) and a bool flag per line: it was not valid UTF-8."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    raw = [ln for ln in blob.split(b"\n") if ln.strip()]
    try:
        blob.decode("utf-8")
        return [ln.decode("utf-8") for ln in raw], np.zeros(len(raw), bool)
    except UnicodeDecodeError:
        pass
    lines, bad = [], np.zeros(len(raw), bool)
    for i, ln in enumerate(raw):
        try:
            lines.append(ln.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            lines.append(ln.decode(encoding or "utf-8", errors="replace"))
    return lines, bad


def parse_json_lines(blob: bytes, path: str, *, literal: bool = False, encoding: str | None = None
                     ) -> tuple[list[dict], np.ndarray]:
    """One JSON-lines file (python-literal lines with ``literal``, as the 2014 Amazon metadata; parsed with
    ``ast.literal_eval``, never eval) -> records and their not-UTF-8 flags.

    Raises:
        DataError: a line that does not parse, or is not an object; names the file and the line.
    """
    lines, bad = _decode_lines(blob, encoding)
    records = []
    for n, line in enumerate(lines, 1):
        try:
            obj = ast.literal_eval(line) if literal else json.loads(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            kind = "a Python literal" if literal else "JSON"
            raise DataError(f"{path}: non-empty line {n} is not {kind} ({str(e)[:120]}); fix or remove it") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: non-empty line {n} is a {type(obj).__name__}, not an object; expected one "
                            f"object per line (JSON lines)")
        records.append(obj)
    return records, bad


def _records_table(records: list[dict], columns: Sequence[str], path: str, keys: dict) -> dict[str, pa.Array]:
    out = {}
    for c in columns:
        if records and not any(c in r for r in records):
            raise DataError(f"{path}: no column {c!r} ({keys.get(c, c)}); no line has it")
        try:
            out[c] = pa.array([r.get(c) for r in records])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"{path}: column {c!r} ({keys.get(c, c)}) mixes value types ({e}); "
                            f"give it one type (e.g. all strings)") from None
    return out


def parse_file_bytes(blob: bytes, path: str, table: Table) -> pa.Table:
    """A JSON-lines file of ``table`` (generic or Amazon) -> a pyarrow table of its columns, plus ``_recoded``
    (the line was not valid UTF-8), ``_dup`` (Amazon metadata: a repeated asin) and ``path``."""
    records, bad = parse_json_lines(blob, path, literal=table.reader == "amazon_meta_2014", encoding=table.encoding)
    if table.reader.startswith("amazon_meta"):
        cols = {k: pa.array(v, pa.bool_() if k == "_dup" else pa.string())
                for k, v in amazon_meta_records(records).items()}
    else:
        cols = _records_table(records, table.columns, path, table.keys)
    cols["_recoded"] = pa.array(bad, pa.bool_())
    return _with_path(pa.table(cols), path)


def _with_path(t: pa.Table, path: str) -> pa.Table:
    return t.append_column(RESERVED_COLUMN, pa.array([path] * t.num_rows, pa.string()))


def read_file(path: str, table: Table) -> pa.Table:
    """One file of ``table`` as the pandas path reads it (the same pyarrow options Ray Data's readers get),
    with a ``path`` column as Ray Data's ``include_paths`` adds."""
    if table.reader == "parquet":
        return _with_path(pq.read_table(path, columns=list(table.columns)), path)
    if table.reader in ("csv", "tsv"):
        try:
            return _with_path(pcsv.read_csv(path, **csv_options(table.reader, table.columns)), path)
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: cannot read as {table.reader.upper()} ({e})") from None
    return parse_file_bytes(Path(path).read_bytes(), path, table)


def parse_binary_batch(batch: pa.Table, table: Table) -> pa.Table:
    """Ray Data ``map_batches`` over ``read_binary_files(include_paths=True)`` rows: each file's bytes ->
    :func:`parse_file_bytes`."""
    parts = [parse_file_bytes(b, p, table) for b, p in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist())]
    return pa.concat_tables(parts) if parts else pa.table({})


# ----------------------------------------------------------------------------- checks before any work

_KINDS = {"id": "strings or integers", "time": "numbers, date-times or ISO-8601 text", "number": "numbers",
          "label": "strings or integers", "text": "text, numbers or lists of text"}


def _type_ok(t: pa.DataType, kind: str) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return True
    stringy = _is_stringy(t)
    if kind in ("id", "label"):
        return stringy or pa.types.is_integer(t)
    if kind == "time":
        return stringy or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t) or \
            pa.types.is_date(t)
    if kind == "number":
        return stringy or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _type_ok(t.value_type, "text")
    return stringy or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or \
        pa.types.is_decimal(t)


def _roles(sources: Sources) -> tuple[dict, dict]:
    log, item = sources.log, sources.item
    inter = {log.user: "id", log.item: "id", log.timestamp: "time"}
    if log.min_rating is not None:
        inter[log.rating] = "number"
    if log.keep_events is not None:
        inter[log.event] = "label"
    return inter, {item.item: "id", item.title: "text", **{c: "text" for c in item.text}}


def check_sources(sources: Sources) -> None:
    """Check every parquet footer and CSV header of both tables on the driver, before any data is read: each
    mapped column exists, and (parquet) has a usable type. CSV cells are text, parsed by the normalisers; JSON
    lines carry no schema: their columns are checked as each file is parsed. Cheap: no data pages are read.

    Raises:
        DataError: naming the file, the column, the config key that maps it, and what it holds.
    """
    for table, roles in zip((sources.interactions, sources.items), _roles(sources)):
        for f in table.files:
            if table.reader == "parquet":
                try:
                    schema = pq.read_schema(f)
                except (pa.ArrowInvalid, OSError) as e:
                    raise DataError(f"{f}: not a readable parquet file ({e})") from None
            elif table.reader in ("csv", "tsv"):
                try:
                    opts = csv_options(table.reader, [])
                    with pcsv.open_csv(f, parse_options=opts["parse_options"]) as r:
                        schema = r.schema
                except (pa.ArrowInvalid, OSError) as e:
                    raise DataError(f"{f}: cannot read a {table.reader.upper()} header ({e})") from None
            else:
                continue
            for col, kind in roles.items():
                if col not in schema.names:
                    raise DataError(f"{f}: no column {col!r} ({table.keys.get(col, col)}); its columns are "
                                    f"{schema.names[:20]}")
                t = schema.field(col).type
                if table.reader == "parquet" and not _type_ok(t, kind):
                    raise DataError(f"{f}: column {col!r} ({table.keys.get(col, col)}) has type {t}; expected "
                                    f"{_KINDS[kind]}")


# ----------------------------------------------------------------------------- per-batch normalising

def _files(batch: pa.Table, rows: np.ndarray | None = None) -> str:
    """The file(s) of ``batch`` (of the given rows), for error messages."""
    if RESERVED_COLUMN not in batch.column_names:
        return "<batch>"
    col = batch[RESERVED_COLUMN]
    paths = pc.unique(col if rows is None else col.take(pa.array(rows))).to_pylist()
    return ", ".join(paths[:_MAX_NAMED_FILES]) + (f" (+{len(paths) - _MAX_NAMED_FILES} more)"
                                                   if len(paths) > _MAX_NAMED_FILES else "")


def _column(batch: pa.Table, name: str, keys: dict) -> pa.Array:
    if name not in batch.column_names:
        raise DataError(f"{_files(batch)}: no column {name!r} ({keys.get(name, name)})")
    arr = batch[name].combine_chunks() if isinstance(batch[name], pa.ChunkedArray) else batch[name]
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _is_stringy(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or \
        pa.types.is_large_binary(t)


def decode_text(arr: pa.Array, encoding: str | None) -> tuple[pa.Array, np.ndarray]:
    """String or binary values -> a string array and a bool flag per value: it was not valid UTF-8 (then it is
    decoded as ``encoding``, or with the bad bytes replaced by U+FFFD when ``encoding`` is None). Valid UTF-8 is
    always read as UTF-8, so the result is the same however the rows are split."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.view(pa.binary() if pa.types.is_string(arr.type) else pa.large_binary())
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), bool)
    except pa.ArrowInvalid:
        pass
    out, bad = [], np.zeros(len(arr), bool)
    for i, v in enumerate(arr.to_pylist()):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            out.append(v.decode(encoding or "utf-8", errors="replace"))
    return pa.array(out, pa.string()), bad


def _blank_to_null(s: pa.Array) -> pa.Array:
    s = pc.utf8_trim_whitespace(s)
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def _bad_type(batch: pa.Table, name: str, keys: dict, t: pa.DataType, kind: str) -> DataError:
    return DataError(f"{_files(batch)}: column {name!r} ({keys.get(name, name)}) has type {t}; expected "
                     f"{_KINDS[kind]}")


def _ids(batch: pa.Table, name: str, keys: dict, encoding: str | None, kind: str = "id"
         ) -> tuple[pa.Array, np.ndarray]:
    """An id/label column -> stripped strings (blank -> null) and not-UTF-8 flags."""
    arr = _column(batch, name, keys)
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string()), np.zeros(len(arr), bool)
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.string()), np.zeros(len(arr), bool)
    if not _is_stringy(arr.type):
        raise _bad_type(batch, name, keys, arr.type, kind)
    s, bad = decode_text(arr, encoding)
    return _blank_to_null(s), bad


_UNIT_PER_S = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def _seconds(arr: pa.Array) -> pa.Array:
    """A timestamp/date array -> float64 seconds since the epoch (UTC)."""
    if pa.types.is_date32(arr.type):
        return pc.multiply(arr.cast(pa.int32()).cast(pa.float64()), 86400.0)
    if pa.types.is_date64(arr.type):
        return pc.divide(arr.cast(pa.int64()).cast(pa.float64()), 1e3)
    return pc.divide(arr.cast(pa.int64()).cast(pa.float64()), _UNIT_PER_S[arr.type.unit])


def _parse_text_time(s: pa.Array) -> pa.Array | None:
    """Text -> float64 seconds: numbers, else ISO-8601 date-times all without a zone offset (read as UTC) or all
    with one. None if neither parses every value."""
    for target in (pa.float64(), pa.timestamp("us"), pa.timestamp("us", "UTC")):
        try:
            out = s.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return out if target == pa.float64() else _seconds(out)
    return None


def _first_unparsable(s: pa.Array, target: Callable[[pa.Array], pa.Array | None]) -> int:
    for i in range(len(s)):
        if s[i].is_valid and target(s.slice(i, 1)) is None:
            return i
    return 0


def _numbers(batch: pa.Table, name: str, keys: dict, encoding: str | None, kind: str
             ) -> tuple[pa.Array, np.ndarray]:
    """A time (kind 'time') or rating ('number') column -> float64 (non-finite -> null) and not-UTF-8 flags."""
    arr = _column(batch, name, keys)
    bad = np.zeros(len(arr), bool)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.float64()), bad
    if pa.types.is_integer(t) or pa.types.is_floating(t) or (kind == "number" and pa.types.is_decimal(t)):
        out = arr.cast(pa.float64())
    elif kind == "time" and (pa.types.is_timestamp(t) or pa.types.is_date(t)):
        out = _seconds(arr)
    elif _is_stringy(t):
        s, bad = decode_text(arr, encoding)
        s = _blank_to_null(s)
        parse = _parse_text_time if kind == "time" else (lambda x: _try_cast(x, pa.float64()))
        out = parse(s)
        if out is None:
            i = _first_unparsable(s, parse)
            what = "neither a number nor an ISO-8601 date-time" if kind == "time" else "not a number"
            raise DataError(f"{_files(batch, np.array([i]))}: column {name!r} ({keys.get(name, name)}) holds "
                            f"{s[i].as_py()!r}, {what}")
    else:
        raise _bad_type(batch, name, keys, t, kind)
    out = pc.if_else(pc.is_finite(out), out, pa.scalar(None, pa.float64()))
    return pc.add(out, 0.0), bad       # -0.0 -> 0.0, so equal times compare and dedupe alike


def _try_cast(s: pa.Array, target: pa.DataType) -> pa.Array | None:
    try:
        return s.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _flag(batch: pa.Table, name: str) -> np.ndarray:
    if name not in batch.column_names:
        return np.zeros(batch.num_rows, bool)
    return np.asarray(batch[name].to_numpy(zero_copy_only=False), bool)


def normalize_log_batch(batch: pa.Table, spec: LogSpec) -> pa.Table:
    """Pure ``map_batches`` function (pyarrow batch -> pyarrow batch): raw interaction rows -> the normalised
    schema, one row out per row in.

    Output: ``user_id``, ``item_id`` (stripped strings; integer ids as decimal text), ``timestamp`` (float64:
    numbers as they are, date-times as seconds since the epoch), ``status`` int8 (0 kept, 1 a null/blank user, item
    or timestamp, 2 dropped by data.min_rating / data.logs.keep_events: a null rating or event fails the filter),
    ``recoded`` bool (some text in the row was not valid UTF-8).

    Raises:
        DataError: a mapped column missing or of a type that cannot hold it, a time or rating that does not
            parse; names the file and the column.
    """
    user, b1 = _ids(batch, spec.user, spec.keys, spec.encoding)
    item, b2 = _ids(batch, spec.item, spec.keys, spec.encoding)
    ts, b3 = _numbers(batch, spec.timestamp, spec.keys, spec.encoding, "time")
    recoded = b1 | b2 | b3 | _flag(batch, "_recoded")
    null = pc.or_(pc.or_(user.is_null(), item.is_null()), ts.is_null()).to_numpy(zero_copy_only=False)
    keep = np.ones(len(user), bool)
    if spec.min_rating is not None:
        rating, b4 = _numbers(batch, spec.rating, spec.keys, spec.encoding, "number")
        keep &= pc.fill_null(pc.greater_equal(rating, spec.min_rating), False).to_numpy(zero_copy_only=False)
        recoded |= b4
    if spec.keep_events is not None:
        event, b5 = _ids(batch, spec.event, spec.keys, spec.encoding, "label")
        keep &= pc.fill_null(pc.is_in(event, value_set=pa.array(spec.keep_events, pa.string())),
                             False).to_numpy(zero_copy_only=False)
        recoded |= b5
    status = np.where(null, _NULL, np.where(keep, _KEEP, _FILTERED)).astype(np.int8)
    return pa.table({"user_id": user, "item_id": item, "timestamp": ts, "status": status, "recoded": recoded})


def _text_values(batch: pa.Table, name: str, keys: dict, encoding: str | None) -> tuple[list, np.ndarray]:
    """A text column -> python values for ``data._item_row`` ('' for null; lists stay lists) and not-UTF-8 flags."""
    arr = _column(batch, name, keys)
    t = arr.type
    n = len(arr)
    if pa.types.is_null(t):
        return [""] * n, np.zeros(n, bool)
    if _is_stringy(t):
        s, bad = decode_text(arr, encoding)
        return [v or "" for v in s.to_pylist()], bad
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_stringy(t.value_type):
        arr = arr.cast(pa.list_(t.value_type)) if pa.types.is_large_list(t) else arr
        vals, bad_vals = decode_text(arr.values, encoding)
        rebuilt = pa.ListArray.from_arrays(arr.offsets, vals, mask=arr.is_null())
        bad = np.zeros(n, bool)
        parents = pc.list_parent_indices(rebuilt).to_numpy()
        offset = arr.offsets[0].as_py()
        bad[parents[bad_vals[offset:offset + len(parents)]]] = True
        return [v or "" for v in rebuilt.to_pylist()], bad
    if _type_ok(t, "text"):
        return ["" if v is None else v if isinstance(v, list) else str(v) for v in arr.to_pylist()], np.zeros(n, bool)
    raise _bad_type(batch, name, keys, t, "text")


def normalize_item_batch(batch: pa.Table, spec: ItemSpec) -> pa.Table:
    """Pure ``map_batches`` function: raw item-table rows -> ``item_id``, ``title``, ``text``, ``title_filled``
    (as ``data.read_lcrec`` builds them: an empty title is filled from the other text), ``status`` int8 (0 kept,
    1 null/blank item id, 3 a repeated Amazon asin) and ``recoded`` bool.

    Raises:
        DataError: a mapped column missing or of an unusable type; names the file and the column.
    """
    ids, b1 = _ids(batch, spec.item, spec.keys, spec.encoding)
    titles, b2 = _text_values(batch, spec.title, spec.keys, spec.encoding)
    fields = {}
    recoded = b1 | b2 | _flag(batch, "_recoded")
    for c in spec.text:
        fields[c], b = _text_values(batch, c, spec.keys, spec.encoding)
        recoded |= b
    rows = [data._item_row(i or "", data._as_text(titles[k]), {c: v[k] for c, v in fields.items()})
            for k, i in enumerate(ids.to_pylist())]
    null = ids.is_null().to_numpy(zero_copy_only=False)
    status = np.where(null, _NULL, np.where(_flag(batch, "_dup"), _DUPLICATE, _KEEP)).astype(np.int8)
    return pa.table({"item_id": ids, "title": pa.array([r[1] for r in rows], pa.string()),
                     "text": pa.array([r[2] for r in rows], pa.string()),
                     "title_filled": pa.array([r[3] for r in rows], pa.bool_()), "status": status,
                     "recoded": recoded})


# ----------------------------------------------------------------------------- counts (driver side: ids + counts)

def partial_counts(batch: pa.Table) -> pa.Table:
    """Per-batch counts of normalised interaction rows, to be summed on the driver: rows ``(kind, key, n)`` with
    kind 'status' (key = status), 'recoded' and 'item' (key = item id, kept rows only)."""
    status = batch["status"].to_numpy(zero_copy_only=False) if batch.num_rows else np.zeros(0, np.int8)
    st = np.bincount(status.astype(np.int64), minlength=3)
    kept = batch.filter(pa.array(status == _KEEP)) if batch.num_rows else batch
    vc = pc.value_counts(kept["item_id"]) if kept.num_rows else None
    kinds = ["status"] * len(st) + ["recoded"]
    keys = [str(i) for i in range(len(st))] + [""]
    ns = [int(x) for x in st] + [int(np.asarray(_flag(batch, "recoded")).sum())]
    if vc is not None:
        kinds += ["item"] * len(vc)
        keys += vc.field("values").to_pylist()
        ns += vc.field("counts").to_pylist()
    return pa.table({"kind": pa.array(kinds, pa.string()), "key": pa.array(keys, pa.string()),
                     "n": pa.array(ns, pa.int64())})


@dataclass(frozen=True)
class LogCounts:
    """The summed :func:`partial_counts`: input rows, null/filtered/recoded rows, and raw rows per logged item."""
    n_input: int
    n_null: int
    n_filtered: int
    n_recoded: int
    item_rows: pd.Series         # item_id -> kept rows (before dedupe)

    @classmethod
    def from_partials(cls, parts: pd.DataFrame) -> "LogCounts":
        tot = parts.groupby(["kind", "key"], sort=False)["n"].sum()
        status = tot.get("status", pd.Series(dtype=np.int64))
        items = tot["item"] if "item" in tot.index.get_level_values(0) else pd.Series(dtype=np.int64)
        return cls(n_input=int(status.sum()), n_null=int(status.get(str(_NULL), 0)),
                   n_filtered=int(status.get(str(_FILTERED), 0)),
                   n_recoded=int(tot.get(("recoded", ""), 0)), item_rows=items.astype(np.int64))


@dataclass(frozen=True)
class ItemCounts:
    """Item-table rows read, dropped for a null id, dropped as duplicates, and holding text that is not UTF-8."""
    n_rows: int
    n_null: int
    n_duplicate: int
    n_recoded: int


def finish_items(tables: Iterable[pa.Table], dedupe: str) -> tuple[pd.DataFrame, ItemCounts]:
    """The normalised item batches -> the item table for ``data.check_items`` and the item counts.

    Duplicates: with ``dedupe='identical'`` (logs) rows identical in every column collapse into one (so the
    result does not depend on file order); ids left twice with different text stop the job in
    ``data.check_items``. With 'first' (Amazon) later lines of an asin were already marked (status 3).
    """
    t = pa.concat_tables(list(tables))
    status = t["status"].to_numpy(zero_copy_only=False)
    kept = t.filter(pa.array(status == _KEEP)).select(["item_id", "title", "text", "title_filled"])
    df = pd.DataFrame({c: kept[c].to_pylist() for c in kept.column_names})
    df = df.astype({"item_id": object, "title": object, "text": object, "title_filled": bool})
    n_dup = int((status == _DUPLICATE).sum())
    if dedupe == "identical":
        before = len(df)
        df = df.drop_duplicates().reset_index(drop=True)
        n_dup += before - len(df)
    return df, ItemCounts(n_rows=t.num_rows, n_null=int((status == _NULL).sum()), n_duplicate=n_dup,
                          n_recoded=int(_flag(t, "recoded").sum()))


def ingest_stats(counts: LogCounts, icounts: ItemCounts) -> dict[str, int]:
    """The counts this reader adds to ``stats.json`` (after ``data.prepare``'s)."""
    return {"n_input_rows": counts.n_input, "n_dropped_null_rows": counts.n_null,
            "n_dropped_filtered_rows": counts.n_filtered, "n_recoded_rows": counts.n_recoded,
            "n_item_rows": icounts.n_rows, "n_dropped_null_item_rows": icounts.n_null,
            "n_duplicate_item_rows": icounts.n_duplicate, "n_recoded_item_rows": icounts.n_recoded}


def log_counts(counts: LogCounts, icounts: ItemCounts, sources: Sources) -> None:
    """Log what was dropped or re-decoded (also in stats.json)."""
    logger.info("ingest: %d interaction rows from %d file(s); dropped %d with a null user/item/timestamp, %d by the "
                "rating/event filter", counts.n_input, len(sources.interactions.files), counts.n_null,
                counts.n_filtered)
    if counts.n_null or icounts.n_null:
        logger.warning("ingest: dropped %d interaction rows and %d item rows with a null or blank id/timestamp",
                       counts.n_null, icounts.n_null)
    if counts.n_recoded or icounts.n_recoded:
        logger.warning("ingest: %d interaction rows and %d item rows held text that is not valid UTF-8; decoded "
                       "as %s", counts.n_recoded, icounts.n_recoded,
                       sources.log.encoding or "UTF-8 with the bad bytes replaced (U+FFFD)")


def checked_items(counts: LogCounts, items: pd.DataFrame, sources: Sources) -> tuple[pd.DataFrame, list[str]]:
    """``data.check_items`` on the logged item ids; logs the textless items it says to drop."""
    items, textless = data.check_items(pd.Index(counts.item_rows.index), items, sources.items.label,
                                       sources.drop_textless)
    if textless:
        logger.warning("dropped %d logged items with no text in %s (%d interactions; e.g. %s) because "
                       "data.drop_items_without_text is set", len(textless), sources.items.label,
                       int(counts.item_rows[textless].sum()), textless[:3])
    return items, textless


# ----------------------------------------------------------------------------- the pandas path

def prepare_local(cfg: DataConfig, seed: int) -> data.Prepared:
    """The whole ingestion in this process (pandas): the reference the Ray Data path must equal byte for byte.

    Reads every file with :func:`read_file`, normalises with the same batch functions, then hands the kept rows,
    ordered by (timestamp, raw item id), to ``data.prepare`` (dedupe, k-core, ids, sequences).

    Raises:
        DataError: as :func:`plan`, :func:`check_sources`, the normalisers, ``data.check_items``, ``data.prepare``.
    """
    sources = plan(cfg)
    check_sources(sources)
    log = pa.concat_tables([normalize_log_batch(read_file(f, sources.interactions), sources.log)
                            for f in sources.interactions.files])
    counts = LogCounts.from_partials(partial_counts(log).to_pandas())
    items, icounts = finish_items((normalize_item_batch(read_file(f, sources.items), sources.item)
                                   for f in sources.items.files), sources.dedupe_items)
    log_counts(counts, icounts, sources)
    items, textless = checked_items(counts, items, sources)
    kept = log.filter(pc.equal(log["status"], _KEEP)).select(["user_id", "item_id", "timestamp"])
    kept = pd.DataFrame({c: kept[c].to_numpy(zero_copy_only=False) for c in kept.column_names})
    kept = kept[~kept["item_id"].isin(textless)]
    kept = kept.sort_values(["timestamp", "item_id"], kind="stable").reset_index(drop=True)
    kept["order"] = np.arange(len(kept), dtype=np.int64)          # the content-based tie-break
    prepared = data.prepare(data.RawData(kept, items, n_dropped_textless=len(textless)), kcore=sources.kcore,
                            seed=seed)
    return data.Prepared(prepared.items, prepared.sequences, {**prepared.stats, **ingest_stats(counts, icounts)})


def prepare_with(cfg: DataConfig, seed: int, normalize: Callable[[pd.DataFrame], pd.DataFrame]) -> data.Prepared:
    """The data stage in this process for any ``data.format``: :func:`prepare_local` for 'logs'/'amazon', else
    ``data.read_raw`` -> ``normalize`` (a backend's ``map_batches`` of ``data.normalize_interactions_batch``)
    -> ``data.prepare`` (LC-Rec / RecBole; input order breaks timestamp ties there)."""
    if cfg.format in RAW_FORMATS:
        return prepare_local(cfg, seed)
    raw = data.read_raw(cfg)
    return data.prepare(dataclasses.replace(raw, interactions=normalize(raw.interactions)), kcore=cfg.kcore, seed=seed)


# ----------------------------------------------------------------------------- Ray Data path: pure block functions

def keep_rows(batch: pa.Table, drop_items: pa.Array) -> pa.Table:
    """Kept interaction rows (status 0) whose item is not in ``drop_items`` (items without text), ids + time."""
    mask = pc.and_(pc.equal(batch["status"], _KEEP), pc.invert(pc.is_in(batch["item_id"], value_set=drop_items)))
    return batch.filter(mask).select(["user_id", "item_id", "timestamp"])


def _lists(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)


def user_rows(block: pa.Table) -> pa.Table:
    """A block holding every row of its users -> one row per user: ``user_id``, ``items`` (raw item ids) and
    ``ts`` (float64), sorted by (timestamp, raw item id), exact (item, timestamp) duplicates dropped."""
    if block.num_rows == 0:
        return pa.table({"user_id": pa.array([], pa.string()), "items": _lists(pa.array([], pa.string()), np.zeros(0)),
                         "ts": _lists(pa.array([], pa.float64()), np.zeros(0))})
    t = block.select(["user_id", "item_id", "timestamp"])
    t = t.take(pc.sort_indices(t, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"),
                                             ("item_id", "ascending")]))
    u, i, ts = (t[c].combine_chunks() for c in ("user_id", "item_id", "timestamp"))
    new_user = np.ones(len(u), bool)
    new_user[1:] = pc.not_equal(u[1:], u[:-1]).to_numpy(zero_copy_only=False)
    dup = np.zeros(len(u), bool)
    dup[1:] = (~new_user[1:]) & pc.equal(i[1:], i[:-1]).to_numpy(zero_copy_only=False) & \
        pc.equal(ts[1:], ts[:-1]).to_numpy(zero_copy_only=False)
    keep = pa.array(~dup)
    u, i, ts, new_user = u.filter(keep), i.filter(keep), ts.filter(keep), new_user[~dup]
    starts = np.flatnonzero(new_user)
    lengths = np.diff(np.append(starts, len(u)))
    return pa.table({"user_id": u.take(pa.array(starts)), "items": _lists(i, lengths), "ts": _lists(ts, lengths)})


def kcore_filter(block: pa.Table, drop_items: pa.Array, min_len: int) -> pa.Table:
    """Remove ``drop_items`` from every user's lists, then users left with fewer than ``min_len`` items."""
    if block.num_rows == 0:
        return block
    items, ts = block["items"].combine_chunks(), block["ts"].combine_chunks()
    flat, flat_ts = pc.list_flatten(items), pc.list_flatten(ts)
    parents = pc.list_parent_indices(items).to_numpy()
    keep = ~pc.is_in(flat, value_set=drop_items).to_numpy(zero_copy_only=False)
    lengths = np.bincount(parents[keep], minlength=block.num_rows)
    out = pa.table({"user_id": block["user_id"], "items": _lists(flat.filter(pa.array(keep)), lengths),
                    "ts": _lists(flat_ts.filter(pa.array(keep)), lengths)})
    return out.filter(pa.array(lengths >= min_len))


def list_item_counts(block: pa.Table) -> pa.Table:
    """Per-block item counts over the users' lists: ``item_id``, ``n`` (summed on the driver)."""
    if block.num_rows == 0:
        return pa.table({"item_id": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    vc = pc.value_counts(pc.list_flatten(block["items"].combine_chunks()))
    return pa.table({"item_id": vc.field("values"), "n": vc.field("counts").cast(pa.int64())})


def index_rows(block: pa.Table, item_ids: pa.Array, item_idx: np.ndarray, user_ids: pa.Array, user_idx: np.ndarray
               ) -> pa.Table:
    """Raw ids -> dense ids: ``user_idx`` int64, ``user_id``, ``items`` (list of item_idx int64), through the maps
    given as (ids, idx) arrays."""
    items = block["items"].combine_chunks()
    pos = pc.index_in(pc.list_flatten(items), value_set=item_ids).to_numpy(zero_copy_only=False)
    offsets = items.offsets.to_numpy()
    flat = pa.array(item_idx[pos], pa.int64())
    upos = pc.index_in(block["user_id"], value_set=user_ids).to_numpy(zero_copy_only=False)
    return pa.table({"user_idx": pa.array(user_idx[upos], pa.int64()), "user_id": block["user_id"],
                     "items": pa.LargeListArray.from_arrays(pa.array(offsets - offsets[0], pa.int64()), flat)})
