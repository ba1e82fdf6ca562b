"""The TIGER-style baseline (ttds_ray/baselines.py) and the per-user ranks the quality table compares.

A synthetic catalogue whose next item is fully predictable (item i is always followed by item i + 1) checks that
the model learns from the item IDs alone and that decoding returns only existing, distinct items; the shared tiny
run checks that the per-user ranks of every system reproduce the eval stage's metrics.
"""
import json

import numpy as np
import pandas as pd
import pytest

from ttds_ray import baselines, pipeline, recipes
from ttds_ray.artifacts import Files, RunDir, read_json
from ttds_ray.config import load_config
from ttds_ray.evaluate import eval_histories, select_eval_users, targets_of
from ttds_ray.metrics import hr_ndcg
from ttds_ray.sids import SIDTable

from conftest import copy_run

N_ITEMS, N_USERS, LEVELS, K = 60, 80, 2, 8
FAST = baselines.TigerConfig(hidden=32, layers=1, heads=2, intermediate=64, attention_dropout=0.0, epochs=25,
                             patience=None, batch_size=16, lr=3e-3, warmup_steps=5, valid_users=20)


@pytest.fixture(scope="module")
def cycle_run(tmp_path_factory):
    """``(cfg, RunDir)``: a run with a data stage of 80 users walking a cycle of 60 items (i -> i + 1 mod 60) and a
    tokenizer stage holding random unique 2 x 8 item IDs (no towers: TIGER reads only the ID table)."""
    tmp = tmp_path_factory.mktemp("cycle")
    inter = {str(u): [str((u * 7 + j) % N_ITEMS) for j in range(10 + u % 6)] for u in range(N_USERS)}
    (tmp / "Cycle.inter.json").write_text(json.dumps(inter))
    (tmp / "Cycle.item.json").write_text(json.dumps({str(i): {"title": f"item {i}"} for i in range(N_ITEMS)}))
    cfg = load_config(None, [f"output_dir={tmp / 'runs'}", "name=cycle", "seed=1", f"data.path={tmp}",
                             "data.kcore=0", "eval.max_users=40", "eval.batch_size=40", "ray.torch_threads=1"])
    run = RunDir(cfg.run_dir)
    pipeline.stage_data(cfg, run, pipeline.LocalBackend())
    prepared, splits = recipes.load_splits(run)
    rng = np.random.default_rng(0)
    codes = np.stack(np.divmod(rng.permutation(K ** LEVELS)[:N_ITEMS], K), axis=1)   # (N, 2) unique
    with run.write_stage("tokenizer", config_hash=cfg.stage_hash("tokenizer")) as (d, _):
        SIDTable(codes, K).save(d / Files.ITEM_SIDS, prepared.items["item_id"].tolist(), prefix="i")
        SIDTable(np.zeros((len(splits), 1), np.int64), 2).save(d / Files.USER_SIDS,
                                                              prepared.sequences["user_id"].tolist(), prefix="u")
    return cfg, run


@pytest.fixture(scope="module")
def cycle_tiger(cycle_run):
    cfg, run = cycle_run
    return baselines.fit_tiger(cfg, run, FAST, progress=False)


def test_vocab_maps_codes_to_distinct_sid_tokens():
    v = baselines.TigerVocab(3, 4)
    assert v.size == 3 + 12 and v.level_token_ids.tolist()[1] == [7, 8, 9, 10]
    toks = v.item_tokens(np.array([[0, 0, 0], [3, 2, 1]]))
    assert toks.tolist() == [[3, 7, 11], [6, 9, 12]]
    assert set(v.sid_ids.tolist()) == set(range(3, 15))


def test_training_windows_hold_only_training_items():
    item_tokens = baselines.TigerVocab(1, 50).item_tokens(np.arange(50)[:, None])
    w = baselines.training_windows([np.arange(30)], item_tokens, max_history=20, stride=21)
    assert [len(x["input_ids"]) for x in w] == [22, 10]          # [BOS] + 21 items, [BOS] + items 0..8
    assert all(x["input_ids"][0] == baselines.TigerVocab.BOS and x["labels"][0] == -100 for x in w)
    assert w[0]["input_ids"][1:] == (3 + np.arange(9, 30)).tolist()


def test_tiger_learns_a_predictable_sequence_from_ids_alone(cycle_run, cycle_tiger):
    cfg, run = cycle_run
    model, info = cycle_tiger
    _, splits = recipes.load_splits(run)
    rows = select_eval_users(len(splits), cfg.eval.max_users, cfg.seed)
    m, ranks = baselines.evaluate_ranker(
        lambda h: model.rank(h, n_beams=20, batch_size=16, max_history=cfg.data.max_history), splits, rows,
        "test", cfg)
    assert m["n_users"] == 40 and ranks.shape == (40,)
    assert m["HR@10"] >= 0.9 and m["HR@1"] >= 0.5, m               # random: HR@10 = 10/60, HR@1 = 1/60
    assert info["history"][info["best_epoch"]]["valid"]["NDCG@10"] == max(h["valid"]["NDCG@10"]
                                                                        for h in info["history"])


def test_tiger_decodes_only_existing_distinct_items(cycle_run, cycle_tiger):
    cfg, run = cycle_run
    model, _ = cycle_tiger
    _, splits = recipes.load_splits(run)
    rows = np.arange(len(splits))
    ranked, scores = model.rank(eval_histories(splits, rows, "test", 20), n_beams=20, batch_size=32, max_history=20)
    assert ranked.shape == (N_USERS, 20)
    assert ((ranked >= 0) & (ranked < N_ITEMS)).all()               # every ID decodes to an item of the catalogue
    assert all(len(set(r)) == 20 for r in ranked.tolist())          # no item twice
    assert (np.diff(scores, axis=1) <= 0).all() and np.isfinite(scores).all()
    # an untrained model ranks through the same trie: still only valid, distinct items
    fresh = baselines.TigerModel(baselines.build_tiger(model.vocab, FAST, 20, seed=0), model.vocab, model.item_tokens,
                                 model.trie)
    r2, _ = fresh.rank(eval_histories(splits, rows[:8], "test", 20), n_beams=64, batch_size=8, max_history=20)
    assert r2.shape == (8, N_ITEMS) and all(sorted(r) == list(range(N_ITEMS)) for r in r2.tolist())


def test_run_tiger_stores_and_reuses_its_result(tiny_run, tmp_path, monkeypatch):
    cfg, run, _ = tiny_run
    run = RunDir(copy_run(run.root, tmp_path / "run"))
    tcfg = baselines.TigerConfig(hidden=16, layers=1, heads=2, intermediate=32, epochs=2, patience=None,
                                 batch_size=8, valid_users=10)
    res = baselines.run_tiger(cfg, run, tcfg, progress=False)
    assert res["metrics"]["n_users"] == 10 and res["epochs_run"] == 2
    stored = read_json(run.root / baselines.TIGER_DIR / "result.json")
    assert stored["metrics"] == res["metrics"] and stored["best_epoch"] in (0, 1)
    assert hr_ndcg(res["ranks"], ks=cfg.eval.ks) == res["metrics"]
    class Retrained(Exception):
        pass

    def refuse(*a, **k):
        raise Retrained
    monkeypatch.setattr(baselines, "fit_tiger", refuse)
    again = baselines.run_tiger(cfg, run, tcfg)
    assert again["metrics"] == res["metrics"] and (again["ranks"] == res["ranks"]).all()
    with pytest.raises(Retrained):                                   # other settings: trained anew
        baselines.run_tiger(cfg, run, tcfg.model_copy(update={"epochs": 1}))


def test_per_user_ranks_reproduce_the_eval_stage(tiny_run):
    cfg, run, _ = tiny_run
    official = read_json(run.require("eval") / Files.METRICS)["models"]
    scored = baselines.score_baseline_ranks(cfg, run)
    users, ttds = baselines.ttds_ranks(run)
    assert (users == scored["user_idx"]).all() and len(users) == cfg.eval.max_users
    for name, ranks in (("Popularity", scored["Popularity"]), ("SASRec", scored["SASRec"]), ("TTDS", ttds)):
        again = hr_ndcg(ranks, ks=cfg.eval.ks)
        assert again == pytest.approx(official[name], abs=1e-12), name
    _, splits = recipes.load_splits(run)
    rows = baselines.eval_rows(cfg, splits)
    assert (targets_of(splits, rows, "test") >= 0).all() and (scored["Popularity"] >= 1).all()
    df = pd.read_parquet(run.require("eval") / Files.RANKINGS)     # beam scores stored with the lists, best first
    assert "scores" in df.columns
    for r, s in zip(df["ranked"], df["scores"]):
        s = np.asarray(s)
        assert len(s) == len(r) and np.isfinite(s[np.asarray(r) >= 0]).all() and (np.diff(s) <= 0).all()
