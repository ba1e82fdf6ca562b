"""Tests for the raw-log ingestion (ttds_ray/ingest.py, ingest_ray.py): config, boundary validation, counts,
the content-based order, the Amazon dump reader, the pipeline hook, and (Ray) that the result depends neither on
how the log is split into files nor on the backend."""
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ttds_ray import ingest, pipeline
from ttds_ray.artifacts import RunDir
from ttds_ray.config import ConfigError, config_from_dict
from ttds_ray.data import DataError, Prepared

_FILES = ("items.parquet", "sequences.parquet", "stats.json")


# ----------------------------------------------------------------------------- helpers

def _data_cfg(root: Path, **logs) -> object:
    """A DataConfig of format logs under ``root``; ``logs`` keys starting with 'data_' go to the data section."""
    data = {k[5:]: logs.pop(k) for k in list(logs) if k.startswith("data_")}
    lc = {"interactions": "events", "items": "items.csv", "user": "uid", "item": "iid", "timestamp": "ts",
          "item_key": "iid", "title": "name", "text": ["brand"], **logs}
    return config_from_dict({"data": {"path": str(root), "format": "logs", "kcore": 3, **data, "logs": lc}}).data


def _log(seed: int = 0) -> pd.DataFrame:
    """A small log with tied timestamps (0..4), exact duplicates, null rows and ratings."""
    rng = np.random.default_rng(seed)
    n = 700
    log = pd.DataFrame({"uid": [f"u{u:02d}" for u in rng.integers(0, 60, n)],
                        "iid": [f"i{i:02d}" for i in (rng.zipf(1.5, n) - 1) % 25],
                        "ts": rng.integers(0, 5, n).astype(np.float64),
                        "stars": rng.integers(1, 6, n).astype(np.float64)})
    log.loc[100:139, "iid"] = "i_notext"                                         # a logged item without any text
    log = pd.concat([log, log.iloc[:30]], ignore_index=True)                     # exact duplicates
    log.loc[3, "uid"] = None
    log.loc[4, "ts"] = np.nan
    log.loc[5, "iid"] = "  "
    return log


def _items_csv(path: Path) -> None:
    """25 items + one without text + one identical duplicate row + a latin-1 title; the first has no title."""
    rows = [b"iid,name,brand"] + [f"i{i:02d},Item {i},brand {i % 4}".encode() for i in range(1, 25)]
    rows += [b"i00,,Acme", b"i_notext,,", b"i03,Item 3,brand 3", b"i24x,Caf\xe9 24,brand 0"]
    path.write_bytes(b"\n".join(rows) + b"\n")


def _write_split(log: pd.DataFrame, root: Path, n_files: int, seed: int) -> Path:
    """``log`` shuffled (``seed``) and split into ``n_files`` parquet files under ``root/events``."""
    out = root / "events"
    out.mkdir(parents=True, exist_ok=True)
    shuffled = log.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    for k, part in enumerate(np.array_split(np.arange(len(shuffled)), n_files)):
        shuffled.iloc[part].to_parquet(out / f"part-{k}.parquet", index=False)
    return root


def _dataset(root: Path, n_files: int = 1, seed: int = 0) -> Path:
    _write_split(_log(), root, n_files, seed)
    _items_csv(root / "items.csv")
    return root


def _bytes(prepared: Prepared, out: Path) -> dict[str, bytes]:
    prepared.save(out)
    return {f: (out / f).read_bytes() for f in _FILES}


def _seqs(prep: Prepared) -> dict[str, list[str]]:
    ids = prep.items.set_index("item_idx")["item_id"]
    return {u: ids[s].tolist() for u, s in zip(prep.sequences["user_id"], prep.sequences["items"])}


_COMMON = dict(data_min_rating=2.0, data_drop_items_without_text=True, rating="stars", encoding="latin-1")


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("data,key", [
    ({"format": "logs"}, "data.logs.interactions"),
    ({"format": "logs", "logs": {"items": "x"}}, "data.logs.interactions"),
    ({"format": "logs", "min_rating": 3, "logs": {"interactions": "a", "items": "b"}}, "data.logs.rating"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "keep_events": ["buy"]}}, "data.logs.event"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "event": "e", "keep_events": []}},
     "data.logs.keep_events"),
    ({"logs": {"interactions": "a", "items": "b"}}, "data.format=logs"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "amazon": {}}}, "data.logs.amazon"),
    ({"format": "lcrec", "amazon": {}}, "data.format=amazon"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "encoding": "latin-99"}}, "data.logs.encoding"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "user": "path"}}, "data.logs.user"),
    ({"format": "logs", "logs": {"interactions": "a", "items": "b", "user": "x", "item": "x"}}, "data.logs.item"),
    ({"format": "amazon", "amazon": {"release": "2016"}}, "data.amazon.release"),
])
def test_wrong_reader_configs_are_config_errors_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        config_from_dict({"data": {"path": "x", **data}})


def test_unset_reader_sections_keep_stage_hashes(tmp_path):
    """Adding data.logs/data.amazon must not rebuild existing runs: an unset section is not in the config dict."""
    cfg = config_from_dict({"data": {"path": "x"}})
    assert "logs" not in cfg.to_dict()["data"] and "amazon" not in cfg.to_dict()["data"]
    logs = _data_cfg(tmp_path)
    assert config_from_dict({"data": logs.model_dump(mode="json")}).data == logs


# ----------------------------------------------------------------------------- files and boundary validation

def test_list_files_directory_glob_and_errors(tmp_path):
    (tmp_path / "ev" / "day=1").mkdir(parents=True)
    for name in ("b.parquet", "a.parquet", "day=1/c.parquet", "_SUCCESS", ".a.parquet.crc", "notes.txt"):
        (tmp_path / "ev" / name).write_bytes(b"")
    got = [Path(f).relative_to(tmp_path).as_posix() for f in ingest.list_files("ev", str(tmp_path), "k")]
    assert got == ["ev/a.parquet", "ev/b.parquet", "ev/day=1/c.parquet"]
    assert len(ingest.list_files(str(tmp_path / "ev" / "**" / "*.parquet"), "/elsewhere", "k")) == 3
    with pytest.raises(DataError, match=r"data\.logs\.items='nowhere'.*does not exist"):
        ingest.list_files("nowhere", str(tmp_path), "data.logs.items")
    with pytest.raises(DataError, match="unknown type"):
        ingest.list_files("ev/*", str(tmp_path), "k")
    (tmp_path / "ev" / "d.csv").write_bytes(b"")
    with pytest.raises(DataError, match="mixes file types"):
        ingest.list_files("ev", str(tmp_path), "k")
    with pytest.raises(DataError, match="mount"):
        ingest.list_files("s3://bucket/ev", str(tmp_path), "k")


def test_missing_column_or_wrong_type_names_the_file_and_the_column(tmp_path):
    root = _dataset(tmp_path, n_files=3)
    bad = root / "events" / "part-1.parquet"
    pd.read_parquet(bad).drop(columns=["ts"]).to_parquet(bad, index=False)
    cfg = _data_cfg(root, **_COMMON)
    for check in (lambda: ingest.check_sources(ingest.plan(cfg)), lambda: ingest.prepare_local(cfg, 0)):
        with pytest.raises(DataError, match=r"part-1\.parquet: no column 'ts' \(data\.logs\.timestamp\)"):
            check()
    pd.read_parquet(root / "events" / "part-0.parquet").assign(ts=lambda d: d["uid"].notna()).to_parquet(bad)
    with pytest.raises(DataError, match=r"part-1\.parquet: column 'ts' \(data\.logs\.timestamp\) has type bool"):
        ingest.prepare_local(cfg, 0)
    pd.read_parquet(root / "events" / "part-0.parquet").assign(uid=1.5).to_parquet(bad)
    with pytest.raises(DataError, match=r"part-1\.parquet: column 'uid' \(data\.logs\.user\) has type double"):
        ingest.check_sources(ingest.plan(cfg))


def test_csv_and_json_lines_errors_name_file_column_and_value(tmp_path):
    (tmp_path / "items.csv").write_text("iid,name,brand\ni1,A,b\n")
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.csv").write_text("uid,iid,ts\nu1,i1,5\nu1,i1,yesterday\n")
    cfg = _data_cfg(tmp_path, interactions="events/*.csv")
    with pytest.raises(DataError, match=r"a\.csv: column 'ts' \(data\.logs\.timestamp\) holds 'yesterday', neither"):
        ingest.prepare_local(cfg, 0)
    (tmp_path / "events" / "a.csv").write_text("uid,item,ts\nu1,i1,5\n")
    with pytest.raises(DataError, match=r"a\.csv: no column 'iid' \(data\.logs\.item\)"):
        pipeline.validate_inputs(config_from_dict({"data": cfg.model_dump(mode="json")}))
    (tmp_path / "events" / "a.csv").unlink()
    (tmp_path / "events" / "b.jsonl").write_text('{"uid": "u1", "iid": "i1", "ts": 1}\n{"uid": 2, "iid": "i1", "ts": 2}\n')
    cfg = _data_cfg(tmp_path, interactions="events")
    with pytest.raises(DataError, match=r"b\.jsonl: column 'uid' \(data\.logs\.user\) mixes value types"):
        ingest.prepare_local(cfg, 0)
    (tmp_path / "events" / "b.jsonl").write_text('{"uid": "u1", "item": "i1", "ts": 1}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: no column 'iid' \(data\.logs\.item\)"):
        ingest.prepare_local(cfg, 0)
    (tmp_path / "events" / "b.jsonl").write_text('{"uid": "u1", "iid": "i1", "ts": 1}\n{"uid": \n')
    with pytest.raises(DataError, match=r"b\.jsonl: non-empty line 2 is not JSON"):
        ingest.prepare_local(cfg, 0)


def test_nulls_filters_duplicates_and_bad_utf8_are_counted(tmp_path):
    root = _dataset(tmp_path)
    prep = ingest.prepare_local(_data_cfg(root, **_COMMON), seed=0)
    log = _log()
    st = prep.stats
    assert st["n_input_rows"] == len(log) == 730
    assert st["n_dropped_null_rows"] == 3                      # null user, NaN time, blank item
    valid = log.drop(index=[3, 4, 5])
    assert st["n_dropped_filtered_rows"] == int((valid["stars"] < 2).sum())
    assert st["n_dropped_textless_items"] == 1 and "i_notext" not in set(prep.items["item_id"])
    kept = valid[(valid["stars"] >= 2) & (valid["iid"] != "i_notext")]
    assert st["n_raw_interactions"] == len(kept)
    assert st["n_dropped_duplicates"] == len(kept) - len(kept.drop_duplicates(["uid", "iid", "ts"]))
    assert (st["n_item_rows"], st["n_duplicate_item_rows"], st["n_recoded_item_rows"]) == (28, 1, 1)
    assert st["n_recoded_rows"] == 0 and st["n_titles_filled"] == 1
    assert st["n_interactions"] == sum(map(len, prep.sequences["items"]))
    titles = dict(zip(prep.items["item_id"], prep.items["title"]))
    assert titles["i00"] == "Acme"                              # empty title filled from the brand
    # the latin-1 row: decoded by the declared encoding, else replaced; counted either way
    one = ingest.normalize_item_batch(ingest.read_file(str(root / "items.csv"), ingest.plan(
        _data_cfg(root, **_COMMON)).items), ingest.ItemSpec("iid", "name", ("brand",), "latin-1"))
    assert "Café 24" in one["title"].to_pylist()
    replaced = ingest.normalize_item_batch(ingest.read_file(str(root / "items.csv"), ingest.plan(
        _data_cfg(root)).items), ingest.ItemSpec("iid", "name", ("brand",), None))
    assert "Caf\ufffd 24" in replaced["title"].to_pylist() and replaced["recoded"].to_pylist().count(True) == 1


def test_bad_utf8_in_interaction_ids_is_decoded_and_counted(tmp_path):
    (tmp_path / "items.jsonl").write_bytes(b'{"iid": "i1", "name": "A"}\n{"iid": "caf\xe9", "name": "B"}\n'
                                           b'{"iid": "i2", "name": "C"}\n')
    (tmp_path / "events").mkdir()
    rows = [b"uid\tiid\tts"] + [f"u{u}\t{i}\t{t}".encode() for u in range(3) for t, i in enumerate(["i1", "i2"])]
    rows += [b"u0\tcaf\xe9\t7", b"u1\tcaf\xe9\t7", b"u2\tcaf\xe9\t7"]
    (tmp_path / "events" / "a.tsv.gz").write_bytes(gzip.compress(b"\n".join(rows)))
    for enc, name in (("latin-1", "café"), ("cp1252", "café"), (None, "caf\ufffd")):
        cfg = _data_cfg(tmp_path, interactions="events", items="items.jsonl", encoding=enc, data_kcore=0,
                        text=[])
        prep = ingest.prepare_local(cfg, seed=0)
        assert name in set(prep.items["item_id"])
        assert (prep.stats["n_recoded_rows"], prep.stats["n_recoded_item_rows"]) == (3, 1)


def test_time_types_event_filter_and_integer_ids(tmp_path):
    (tmp_path / "events").mkdir()
    when = pd.to_datetime(["2024-01-01 10:00", "2024-01-01 09:00", "2024-01-02 00:00", "2024-01-01 09:00"], utc=True)
    pd.DataFrame({"uid": [7, 7, 7, 7], "iid": [3, 1, 2, 4], "ts": when, "kind": ["buy", "view", "buy", "buy"]}
                 ).to_parquet(tmp_path / "events" / "a.parquet")
    (tmp_path / "items.csv").write_text("iid,name,brand\n1,One,x\n2,Two,x\n3,Three,x\n4,Four,x\n")
    cfg = _data_cfg(tmp_path, data_kcore=0, event="kind", keep_events=["buy"])
    prep = ingest.prepare_local(cfg, seed=0)
    assert _seqs(prep) == {"7": ["4", "3", "2"]}               # 09:00, 10:00, next day; the 'view' is filtered
    assert prep.stats["n_dropped_filtered_rows"] == 1
    spec = ingest.LogSpec("u", "i", "t")
    out = ingest.normalize_log_batch(pa.table({"u": ["a", "a", "a"], "i": ["x", "y", "z"], "t": [" 1.5 ", "2", ""]}),
                                     spec)
    assert out["timestamp"].to_pylist() == [1.5, 2.0, None] and out["status"].to_pylist() == [0, 0, 1]
    out = ingest.normalize_log_batch(pa.table({"u": ["a", "a"], "i": ["x", "y"], "t": ["2024-01-01T00:00:01", ""]}),
                                     spec)
    assert out["timestamp"].to_pylist() == [1704067201.0, None] and out["status"].to_pylist() == [0, 1]


def test_order_is_timestamp_then_raw_item_id_whatever_the_row_order(tmp_path):
    """Ties are broken by the raw item id (code points), so shuffling the rows changes nothing."""
    (tmp_path / "items.csv").write_text("iid,name,brand\n" + "".join(f"{c},{c},x\n" for c in "abcdZ"))
    log = pd.DataFrame({"uid": ["u"] * 6 + ["v"] * 3, "iid": list("dcbaZa") + list("abc"),
                        "ts": [2, 1, 1, 1, 1, 1, 5, 5, 5]})
    outs = []
    for seed in range(3):
        (tmp_path / "events").mkdir(exist_ok=True)
        log.sample(frac=1.0, random_state=seed).to_parquet(tmp_path / "events" / "a.parquet", index=False)
        prep = ingest.prepare_local(_data_cfg(tmp_path, data_kcore=0), seed=0)
        assert _seqs(prep) == {"u": ["Z", "a", "b", "c", "d"], "v": ["a", "b", "c"]}   # (u, a, 1) twice: deduped
        outs.append(_bytes(prep, tmp_path / f"out{seed}"))
    assert outs[0] == outs[1] == outs[2]


def test_block_functions_dedupe_order_and_kcore():
    block = pa.table({"user_id": ["v", "u", "u", "u", "u"], "item_id": ["x", "b", "a", "b", "c"],
                      "timestamp": [1.0, 2.0, 2.0, 2.0, 1.0]})
    rows = ingest.user_rows(block)
    assert rows["user_id"].to_pylist() == ["u", "v"]
    assert rows["items"].to_pylist() == [["c", "a", "b"], ["x"]] and rows["ts"].to_pylist()[0] == [1.0, 2.0, 2.0]
    out = ingest.kcore_filter(rows, pa.array(["a"]), min_len=2)
    assert out["user_id"].to_pylist() == ["u"] and out["items"].to_pylist() == [["c", "b"]]
    counts = ingest.list_item_counts(rows)
    assert dict(zip(counts["item_id"].to_pylist(), counts["n"].to_pylist())) == {"a": 1, "b": 1, "c": 1, "x": 1}


# ----------------------------------------------------------------------------- Amazon dumps

#: (reviewer, asin, stars, time): with data.min_rating=2 the two 1-star reviews go; ties at time 100 (A2)
_REVIEWS = [("A1", "B1", 5.0, 100), ("A1", "B2", 4.0, 200), ("A1", "B3", 4.0, 300), ("A1", "B2", 1.0, 400),
            ("A2", "B1", 5.0, 100), ("A2", "B3", 3.0, 100), ("A2", "B2", 5.0, 50), ("A3", "B2", 2.0, 10),
            ("A3", "B1", 5.0, 20), ("A3", "B3", 4.0, 30), ("A3", "B1", 1.0, 40)]


def _amazon_2014(root: Path, cat: str = "Beauty") -> Path:
    lines = [json.dumps({"reviewerID": u, "asin": i, "reviewerName": "X", "helpful": [0, 0], "reviewText": "ok",
                         "overall": r, "summary": "s", "unixReviewTime": t, "reviewTime": "01 1, 2014"})
             for u, i, r, t in _REVIEWS]
    lines.append(json.dumps({"reviewerID": None, "asin": "B1", "overall": 5.0, "unixReviewTime": 5}))
    meta = [{"asin": "B1", "title": "Lotion &amp; Cream", "categories": [["Beauty", "Skin Care", "Lotions"]],
             "salesRank": {"Beauty": 5}, "related": {"also_bought": ["B2"]}, "price": 3.5, "brand": "Acme"},
            {"asin": "B2", "description": "Soft brush for the face", "categories": [["Beauty", "Tools"]],
             "imUrl": "http://x"},
            {"asin": "B3", "title": "Soap", "brand": "O'Brien"},
            {"asin": "B3", "title": "Soap (later line)"}]
    with gzip.open(root / f"reviews_{cat}_5.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(root / f"meta_{cat}.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(repr(m) for m in meta) + "\n")          # python-literal lines, as the 2014 dump
    return root


def _amazon_2018(root: Path, cat: str = "All_Beauty") -> Path:
    lines = [json.dumps({"overall": r, "verified": True, "reviewTime": "09 1, 2016", "reviewerID": u, "asin": i,
                         "style": {"Size:": " 7.0 oz"}, "reviewerName": "S", "reviewText": "t", "summary": "s",
                         "unixReviewTime": t, "vote": "1,234"}) for u, i, r, t in _REVIEWS]
    meta = [{"category": ["Beauty", "Skin Care"], "tech1": "", "description": ["Great", "lotion"], "fit": "",
             "title": "Lotion &amp; Cream", "also_buy": [], "brand": "Acme", "feature": [], "rank": "1 in Beauty",
             "details": {}, "main_cat": "All Beauty", "price": "", "asin": "B1", "imageURL": []},
            {"category": [], "description": [], "title": "", "brand": "Brushy", "asin": "B2"},
            {"category": [], "description": [], "title": "Soap", "brand": "", "asin": "B3"}]
    for name, rows in ((f"{cat}_5.json.gz", lines), (f"meta_{cat}.json.gz", [json.dumps(m) for m in meta])):
        with gzip.open(root / name, "wt", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("release", ["2014", "2018"])
def test_amazon_dump_slice_gives_the_prepared_form(tmp_path, release):
    root = (_amazon_2014 if release == "2014" else _amazon_2018)(tmp_path)
    cfg = config_from_dict({"data": {"path": str(root), "format": "amazon", "kcore": 0, "min_rating": 2.0}}).data
    assert ingest.find_amazon(cfg)[0] == release
    prep = ingest.prepare_local(cfg, seed=0)
    assert prep.items.columns.tolist() == ["item_idx", "item_id", "title", "text"]
    assert _seqs(prep) == {"A1": ["B1", "B2", "B3"], "A2": ["B2", "B1", "B3"], "A3": ["B2", "B1", "B3"]}
    items = prep.items.set_index("item_id")
    assert items.loc["B1", "title"] == "Lotion & Cream"                                   # HTML entities undone
    st = prep.stats
    assert st["n_dropped_filtered_rows"] == 2 and st["n_titles_filled"] == 1
    if release == "2014":
        assert items.loc["B1", "text"] == "title: Lotion & Cream; brand: Acme; categories: Beauty, Skin Care, Lotions"
        assert items.loc["B3", "title"] == "Soap" and st["n_duplicate_item_rows"] == 1   # the first line wins
        assert items.loc["B2", "title"] == "Tools"                   # no title or brand: the last category
        assert st["n_dropped_null_rows"] == 1 and st["n_input_rows"] == len(_REVIEWS) + 1
    else:
        assert items.loc["B1", "text"] == ("title: Lotion & Cream; brand: Acme; categories: Beauty, Skin Care; "
                                           "description: Great, lotion")
        assert items.loc["B2", "title"] == "Brushy" and st["n_duplicate_item_rows"] == 0


def test_amazon_file_choice_and_errors(tmp_path):
    _amazon_2014(tmp_path, "Beauty")
    _amazon_2014(tmp_path, "Toys")
    cfg = lambda **d: config_from_dict({"data": {"path": str(tmp_path), "format": "amazon", **d}}).data  # noqa: E731
    with pytest.raises(DataError, match=r"several Amazon categories \['Beauty', 'Toys'\]; set data.name"):
        ingest.find_amazon(cfg())
    release, reviews, meta = ingest.find_amazon(cfg(name="Toys"))
    assert (release, Path(reviews).name, Path(meta).name) == ("2014", "reviews_Toys_5.json.gz", "meta_Toys.json.gz")
    with pytest.raises(DataError, match="data.amazon.reviews=5core"):
        ingest.find_amazon(cfg(name="Toys", amazon={"reviews": "all"}))
    with pytest.raises(DataError, match="no category 'Toys'.*release 2018"):
        ingest.find_amazon(cfg(name="Toys", amazon={"release": "2018"}))
    (tmp_path / "meta_Toys.json.gz").write_bytes(gzip.compress(b"{'asin': 'B1', 'title': 'x'}\n{'asin': \n"))
    with pytest.raises(DataError, match=r"meta_Toys\.json\.gz: non-empty line 2 is not a Python literal"):
        ingest.prepare_local(cfg(name="Toys", kcore=0), seed=0)


# ----------------------------------------------------------------------------- the pipeline hook

def test_stage_data_on_local_backend_writes_the_prepared_tables(tmp_path):
    root = _dataset(tmp_path / "d", n_files=3)
    dcfg = _data_cfg(root, **_COMMON)
    cfg = config_from_dict({"name": "r", "output_dir": str(tmp_path / "runs"), "data": dcfg.model_dump(mode="json"),
                            "tokenizer": {"item": {"n_levels": 2, "codebook_size": 8}}})
    run = RunDir(cfg.run_dir)
    pipeline.stage_data(cfg, run, pipeline.LocalBackend())
    expect = _bytes(ingest.prepare_local(dcfg, seed=cfg.seed), tmp_path / "ref")
    assert {f: (run.stage_dir("data") / f).read_bytes() for f in _FILES} == expect
    assert run.is_complete("data", cfg.stage_hash("data"))
    small = config_from_dict({**cfg.to_dict(), "tokenizer": {"item": {"n_levels": 1, "codebook_size": 4}}})
    with pytest.raises(Exception, match="cannot get unique semantic IDs"):
        pipeline.stage_data(small, RunDir(tmp_path / "runs2"), pipeline.LocalBackend())


# ----------------------------------------------------------------------------- Ray Data

@pytest.mark.ray
def test_ray_result_does_not_depend_on_files_blocks_or_backend(tmp_path, ray_session):
    """The same log, shuffled differently and split into 1, 3 and 8 parquet files (tied timestamps, duplicates,
    nulls), gives byte-identical tables and stats on Ray Data, equal to the pandas path (LocalBackend)."""
    from ttds_ray import ingest_ray
    from ttds_ray.train import RayBackend

    outs = {}
    for n_files, parts in ((1, 2), (3, 3), (8, 5)):
        root = _dataset(tmp_path / f"split{n_files}", n_files=n_files, seed=n_files)
        dcfg = _data_cfg(root, **_COMMON)
        prep = (RayBackend().prepare(dcfg, 0) if n_files == 8
                else ingest_ray.prepare_ray(dcfg, 0, num_partitions=parts))
        outs[n_files] = _bytes(prep, tmp_path / f"ray{n_files}")
    assert outs[1] == outs[3] == outs[8]
    local = pipeline.LocalBackend().prepare(_data_cfg(tmp_path / "split8", **_COMMON), 0)
    assert _bytes(local, tmp_path / "local") == outs[8]
    stats = json.loads(outs[8]["stats.json"])
    assert stats["n_dropped_null_rows"] == 3 and stats["n_recoded_item_rows"] == 1 and stats["n_dropped_kcore"] > 0


@pytest.mark.ray
def test_ray_amazon_equals_pandas_and_worker_errors_surface_as_data_errors(tmp_path, ray_session):
    from ttds_ray import ingest_ray

    (tmp_path / "amz").mkdir()
    root = _amazon_2014(tmp_path / "amz")
    cfg = config_from_dict({"data": {"path": str(root), "format": "amazon", "kcore": 0}}).data
    assert _bytes(ingest_ray.prepare_ray(cfg, 0), tmp_path / "r") == _bytes(ingest.prepare_local(cfg, 0),
                                                                             tmp_path / "l")
    (tmp_path / "bad" / "events").mkdir(parents=True)
    (tmp_path / "bad" / "items.csv").write_text("iid,name,brand\ni1,A,b\n")
    (tmp_path / "bad" / "events" / "a.csv").write_text("uid,iid,ts\nu1,i1,5\nu1,i1,later\n")
    with pytest.raises(DataError, match=r"a\.csv: column 'ts' \(data\.logs\.timestamp\) holds 'later'"):
        ingest_ray.prepare_ray(_data_cfg(tmp_path / "bad", interactions="events"), 0)
