"""Dynamic indexing schedule and guidance sampling (DESIGN §1.6); run-directory reuse for ablation pairs."""
import numpy as np
import pytest

from ttds_ray.artifacts import RunDir, write_json
from ttds_ray.config import DynamicConfig, TTDSConfig, config_from_dict
from ttds_ray.dynamic import guidance_prompts, reindex_steps
from ttds_ray.tasks import prefix_user_rows


def test_reindex_schedule_static_and_dynamic_share_the_budget():
    assert reindex_steps(300, DynamicConfig(static_index=True)) == []
    assert reindex_steps(300, DynamicConfig(rounds=0)) == []
    steps = reindex_steps(300, DynamicConfig(rounds=2, final_freeze=0.34))
    assert steps == [99, 198]                      # 0.66 * 300 / 2 = 99; index frozen for the last 102 steps
    steps = reindex_steps(10, DynamicConfig(rounds=5, final_freeze=0.5))
    assert steps == sorted(set(steps)) and all(1 <= s < 10 for s in steps)


def test_guidance_prompts_come_from_training_prefixes_only():
    seqs = [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9]]
    users, hist, tgt = guidance_prompts(seqs, 50, max_history=2, seed=0)
    assert len(users) == len(hist) == len(tgt) == 50
    assert 2 not in users.tolist()                 # a single training item has no target
    for u, h, t in zip(users, hist, tgt):
        s = seqs[u]
        j = s.index(t)
        assert j >= 1 and h == s[max(0, j - 2):j]  # the history is exactly the items before the target
    again = guidance_prompts(seqs, 50, max_history=2, seed=0)
    assert again[0].tolist() == users.tolist() and again[1] == hist
    rows, p_hist, p_tgt = guidance_prompts(seqs, 50, max_history=2, seed=0, prefix_off=prefix_user_rows(seqs))
    assert p_hist == hist and p_tgt.tolist() == tgt.tolist()
    _assert_prefix_rows(seqs, rows, hist, users, tgt.tolist())


def _assert_prefix_rows(seqs, rows, hist, users, targets):
    """With prefix_off the same prompts come back, each user row now naming the ID of the items before its target:
    row U + off[u] + j - 1 decodes to (u, j) with seqs[u][j] the target and the history the items right before j."""
    off, U = prefix_user_rows(seqs), len(seqs)
    decode = {U + off[u] + j - 1: (u, j) for u, s in enumerate(seqs) for j in range(1, len(s))}
    assert len(rows) == len(users)
    for r, u, h, t in zip(rows.tolist(), users.tolist(), hist, targets):
        pu, j = decode[r]
        assert pu == u and seqs[u][j] == t and h == seqs[u][max(0, j - 2):j]


def _fake_run(root, cfg: TTDSConfig, stages):
    run = RunDir(root)
    for st in stages:
        with run.write_stage(st, config_hash=cfg.stage_hash(st)) as (d, _):
            write_json(d / "payload.json", {"stage": st})
    return run


def test_reuse_links_matching_stages_and_stops_at_the_first_difference(tmp_path):
    from ttds_ray.pipeline import reuse_stages

    base = config_from_dict({"data": {"path": "x"}, "output_dir": str(tmp_path), "name": "src"})
    src = _fake_run(tmp_path / "src", base, ("data", "embeddings", "cf", "tokenizer", "llm"))
    static = config_from_dict({**base.to_dict(), "name": "dst", "dynamic": {"static_index": True}})
    dst = RunDir(tmp_path / "dst")
    taken = reuse_stages(static, src.root, dst)
    assert taken == ["data", "embeddings", "cf", "tokenizer"]      # llm differs (static vs dynamic)
    assert dst.is_complete("tokenizer", static.stage_hash("tokenizer")) and not dst.is_complete("llm")
    other_k = config_from_dict({**base.to_dict(), "tokenizer": {"item": {"codebook_size": 32}}})
    assert reuse_stages(other_k, src.root, RunDir(tmp_path / "dst2")) == ["data", "embeddings", "cf"]
    with pytest.raises(Exception, match="not a run directory"):
        reuse_stages(base, tmp_path / "nowhere", dst)
    other_data = config_from_dict({**base.to_dict(), "data": {"path": "y"}})
    with pytest.raises(Exception, match="nothing can be shared"):
        reuse_stages(other_data, src.root, RunDir(tmp_path / "dst3"))


def test_target_contexts_are_the_training_prefixes_before_each_item_capped_per_item():
    from ttds_ray.dynamic import target_contexts

    seqs = [[0, 1, 2, 1], [1, 3], [2, 1, 4], [5]]
    pos, users, hist = target_contexts(seqs, np.array([1, 5, 4]), 2, max_history=2, seed=0)
    items = np.array([1, 5, 4])[pos]
    assert sorted(items.tolist()) == [1, 1, 4]             # item 1 has 3 contexts (capped to 2); 5 is only ever first
    for i, u, h in zip(items, users, hist):
        s = seqs[u]
        j = next(j for j in range(1, len(s)) if s[j] == i and s[max(0, j - 2):j] == h)
        assert s[j] == i and len(h) >= 1                    # the history is what came right before the item
    again = target_contexts(seqs, np.array([1, 5, 4]), 2, max_history=2, seed=0)
    assert again[1].tolist() == users.tolist() and again[2] == hist
    p_pos, p_rows, p_hist = target_contexts(seqs, np.array([1, 5, 4]), 2, max_history=2, seed=0,
                                            prefix_off=prefix_user_rows(seqs))
    assert p_pos.tolist() == pos.tolist() and p_hist == hist
    _assert_prefix_rows(seqs, p_rows, p_hist, users, items.tolist())
    with pytest.raises(ValueError, match="per_item"):
        target_contexts(seqs, np.array([1]), 0, max_history=2, seed=0)


def test_accept_moves_applies_accepted_moves_and_reverts_those_that_would_share_an_id():
    from ttds_ray.dynamic import accept_moves

    old = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    proposed = np.array([[0, 1], [0, 0], [2, 0], [1, 1]])   # items 0 and 1 swap, item 2 moves to a free ID
    codes, reverted = accept_moves(old, proposed, np.array([True, True, True, False]))
    assert codes.tolist() == proposed.tolist() and reverted == 0
    codes, reverted = accept_moves(old, proposed, np.array([True, False, True, True]))
    assert codes.tolist() == [[0, 0], [0, 1], [2, 0], [1, 1]] and reverted == 1    # 0 would take 1's kept ID
    chain = np.array([[0, 1], [1, 0], [2, 0], [1, 1]])      # 0 -> 1's ID, 1 -> 2's ID, 2 -> free
    codes, reverted = accept_moves(old, chain, np.array([True, True, False, False]))
    assert codes.tolist() == old.tolist() and reverted == 2  # 2 stays, so 1 cannot move, so 0 cannot either
    assert len(np.unique(codes, axis=0)) == len(codes)
    with pytest.raises(ValueError, match="repeats"):
        accept_moves(old, np.array([[0, 0], [0, 0], [1, 0], [1, 1]]), np.ones(4, dtype=bool))


def test_drift_bench_counts_the_churn_of_an_unguided_refinement(tiny_run):
    """bench/drift.py: no learning step, no churn; a real step moves items, counted per level as the export sees it."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("bench_drift", REPO / "bench" / "drift.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, run, _ = tiny_run
    still = mod.unguided_churn(run, epochs=1, lr=0.0)
    assert still["reexport_changed"] == 0 and still["changed"] == 0 and still["changed_per_level"] == [0] * 3
    moved = mod.unguided_churn(run, epochs=2, lr=1e-3)
    assert 0 < moved["changed"] <= moved["n_items"] and max(moved["changed_per_level"]) <= moved["changed"]
    assert sum(moved["changed_per_level"]) >= moved["changed"] and (moved["epochs"], moved["lr"]) == (2, 1e-3)
    assert 0 < moved["guided_items"] <= min(moved["n_items"], cfg.dynamic.guide_samples)


def test_tail_bench_pools_the_eval_stage_and_its_buckets_add_up(tiny_run):
    """bench/tail.py on the tiny run: the pooled HR@10 / NDCG@10 of TTDS and SASRec are the eval stage's, the
    popularity buckets partition the users, a full-ID prefix hit is a hit, and beta = 0 re-evaluates to the same
    test metrics."""
    import importlib.util

    from conftest import REPO
    from ttds_ray.artifacts import Files, read_json
    spec = importlib.util.spec_from_file_location("bench_tail", REPO / "bench" / "tail.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, run, _ = tiny_run
    metrics = read_json(run.require("eval") / Files.METRICS)["models"]
    rec = mod.run_tail(run)
    summary = mod.summarise([rec, rec])                        # pooling two copies changes no rate
    assert summary["users"] == 2 * metrics["TTDS"]["n_users"]
    for ours, key in (("ttds", "TTDS"), ("sasrec", "SASRec")):
        assert summary["all"][f"{ours}_hr10"] == pytest.approx(metrics[key]["HR@10"])
        assert summary["all"][f"{ours}_ndcg10"] == pytest.approx(metrics[key]["NDCG@10"])
    assert sum(b["users"] for b in summary["buckets"]) == summary["users"]
    for b in [*summary["buckets"], summary["all"]]:
        assert b["prefix_hit"][-1] == pytest.approx(b["ttds_hr10"])          # unique IDs: full prefix = the item
        assert all(x >= y for x, y in zip(b["prefix_hit"], b["prefix_hit"][1:]))
    assert "| all |" in mod.render(summary)
    assert len(summary["level1_stratification"]) == 2 and -1 <= summary["level1_stratification"][0] <= 1
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])          # rare with rare, popular with popular
    assert mod.level1_stratification(codes, np.array([1, 2, 50, 60])) == pytest.approx(0.6)   # by hand
    assert mod.level1_stratification(codes[[0, 2, 1, 3]], np.array([1, 2, 50, 60])) == pytest.approx(-0.6)
    [row] = mod.beta_sweep(run, [0.0], users=cfg.eval.max_users)
    assert row["test"]["NDCG@10"] == pytest.approx(metrics["TTDS"]["NDCG@10"])


def test_erased_cf_inputs_reach_every_reader_of_the_item_tower_and_retrain_the_tokenizer(tiny_run):
    """tokenizer.cf_erase_popularity: tower_inputs (tokenizer stage, re-index rounds, bench/drift.py) and the
    Recommender's cold-start path read the same erased item inputs, computed from training-split counts; users'
    inputs are untouched; the flag is part of the tokenizer stage's hash (a reused run retrains its towers)."""
    from ttds_ray import recipes
    from ttds_ray.cf import erase_popularity
    from ttds_ray.data import train_item_counts
    from ttds_ray.recommender import Recommender

    cfg, run, _ = tiny_run
    on = cfg.tokenizer.model_copy(update={"cf_erase_popularity": True})
    cfg_on = cfg.model_copy(update={"tokenizer": on})
    off_x, on_x = recipes.tower_inputs(run, cfg.tokenizer), recipes.tower_inputs(run, on)
    _, splits = recipes.load_splits(run)
    counts = train_item_counts(splits, len(off_x["item_c"]))
    np.testing.assert_array_equal(on_x["item_c"], erase_popularity(off_x["item_c"], counts))
    assert not np.allclose(on_x["item_c"], off_x["item_c"])
    for key in ("item_s", "user_s", "user_c"):
        np.testing.assert_array_equal(on_x[key], off_x[key])
    assert cfg_on.stage_hash("tokenizer") != cfg.stage_hash("tokenizer")
    assert cfg_on.stage_hash("cf") == cfg.stage_hash("cf")
    _, cf_items = Recommender(cfg_on, run)._load_item_tower()
    np.testing.assert_array_equal(cf_items, on_x["item_c"])


def test_rewarm_batches_draw_only_samples_that_learn_a_moved_items_id_and_fall_back_to_all_rows():
    from ttds_ray.dynamic import moved_items, moved_only_loss, rewarm_batches
    from ttds_ray.tasks import item_ph

    old = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    new = np.array([[0, 0], [1, 2], [1, 0], [2, 1]])
    moved = moved_items(old, new)
    assert moved.tolist() == [1, 3]
    obj = lambda rows: np.array([np.array(r, dtype=np.int64) for r in rows] + [None], dtype=object)[:-1]
    ids = obj([[5, item_ph(0), 7, item_ph(3)], [item_ph(1), 9, item_ph(0)], [8, item_ph(2)], [item_ph(2), 4], [5],
               [item_ph(3), 6, item_ph(0), item_ph(1)]])
    resp = obj([[0, 0, 0, 1], [0, 0, 1], [0, 1], [0, 1], [1], [0, 0, 1, 1]])    # a moved item in the prompt: no
    with pytest.raises(ValueError, match="loss masks"):
        rewarm_batches(ids, obj([[0]] * 6), moved, steps=1, batch_size=2, seed=0)
    batches, pool = rewarm_batches(ids, resp, moved, steps=5, batch_size=2, seed=0)
    assert pool == 2 and batches.shape == (5, 2)
    assert set(batches.ravel()) == {0, 5} and all(len(set(b)) == 2 for b in batches)   # no row twice in a batch
    again, _ = rewarm_batches(ids, resp, moved, steps=5, batch_size=2, seed=0)
    assert np.array_equal(batches, again)                                      # seeded
    small, _ = rewarm_batches(ids, resp, moved, steps=1, batch_size=16, seed=0)
    assert sorted(small[0].tolist()) == [0, 5]                                 # the batch shrinks to the pool
    none, pool = rewarm_batches(ids, resp, np.array([42]), steps=2, batch_size=3, seed=0)
    assert pool == 0 and none.shape == (2, 3) and set(none.ravel()) <= set(range(6))   # DDP: same step count
    assert rewarm_batches(ids, resp, moved, steps=0, batch_size=2, seed=0)[0].size == 0
    assert moved_only_loss(ids[5], resp[5], moved).tolist() == [0, 0, 0, 1]      # item 0 is not moved
    assert moved_only_loss(ids[0], resp[0], moved).tolist() == [0, 0, 0, 1]
    assert moved_only_loss(ids[1], resp[1], moved).tolist() == [0, 0, 0]         # item 1 only in the prompt
