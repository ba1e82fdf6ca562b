"""The statistics and the table writer of bench/quality.py, on synthetic per-user ranks (no training)."""
import importlib.util
import json
import re
import sys

import numpy as np
import pytest

from conftest import REPO
from ttds_ray.errors import ConfigError, DataError
from ttds_ray.metrics import hr_ndcg


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_known_values(q):
    mean, low, high = q.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)   # t(0.975, 2) = 4.3027
    assert mean - low == pytest.approx(high - mean)
    assert q.t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert q.t_interval([0.25]) == (0.25, None, None)                  # one seed: no spread
    with pytest.raises(ValueError):
        q.t_interval([])
    with pytest.raises(ValueError):
        q.t_interval([0.1, float("nan")])


def test_per_user_values_average_to_the_metrics(q):
    ranks = np.array([1, 2, 3, 11, 0, 10, 5])
    m = hr_ndcg(ranks, ks=(1, 5, 10))
    for metric in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"):
        assert q.per_user(ranks, metric).mean() == pytest.approx(m[metric], abs=1e-15)
    assert q.per_user([1, 2, 3, 11], "NDCG@10") == pytest.approx([1, 0.6309298, 0.5, 0])
    with pytest.raises(ValueError):
        q.per_user(ranks, "MRR@10")


def test_paired_bootstrap_recovers_a_known_difference(q):
    rng = np.random.default_rng(0)
    # three seeds of 400 users; system a gains 0.1 NDCG over b on average, with per-user noise
    b = [rng.uniform(0, 0.4, 400) for _ in range(3)]
    a = [x + 0.1 + rng.normal(0, 0.05, 400) for x in b]
    res = q.paired_bootstrap(a, b, n_resamples=1000, seed=7)
    assert res["diff"] == pytest.approx(np.mean([(x - y).mean() for x, y in zip(a, b)]))
    assert res["low"] < 0.1 < res["high"] and res["high"] - res["low"] < 0.02
    assert res["p_le_0"] == 0.0 and res["n_users"] == [400] * 3 and res["n_resamples"] == 1000
    assert q.paired_bootstrap(a, b, n_resamples=1000, seed=7) == res                   # seeded
    # the same system on both sides: a zero-width interval at 0
    same = q.paired_bootstrap(b, b, n_resamples=200)
    assert same["diff"] == same["low"] == same["high"] == 0.0 and same["p_le_0"] == 1.0


def test_paired_bootstrap_pairs_users(q):
    # a large between-user spread that both systems share: pairing removes it, so the interval stays narrow
    base = np.linspace(0, 1, 500)
    res = q.paired_bootstrap([base + 0.01], [base], n_resamples=500)
    assert res["low"] == pytest.approx(0.01) and res["high"] == pytest.approx(0.01)
    # no difference on average, noisy: the interval covers 0
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 300).astype(float)
    res = q.paired_bootstrap([a], [b], n_resamples=2000, seed=0)
    assert res["low"] < 0 < res["high"] and res["low"] < res["diff"] < res["high"]
    # width ~ 2 x 1.96 x the standard error of a mean difference of two fair coins, sqrt(0.5 / 300) = 0.041
    assert 0.12 < res["high"] - res["low"] < 0.20
    with pytest.raises(ValueError):
        q.paired_bootstrap([a], [b[:-1]])
    with pytest.raises(ValueError):
        q.paired_bootstrap([], [])


def test_letter_statistics_check(q):
    ok = {"n_users": 22363, "n_items": 12101, "n_interactions": 198502, "kcore": 5}
    q.check_letter_stats("beauty", ok)
    q.check_letter_stats("yelp", {"n_users": 30431, "n_items": 20033, "n_interactions": 316354})
    with pytest.raises(DataError, match=r"n_items: 12100 here, 12101 published"):
        q.check_letter_stats("beauty", {**ok, "n_items": 12100})
    with pytest.raises(DataError, match="n_interactions"):
        q.check_letter_stats("yelp", ok)


def _record(q, dataset, seed, rng, n_users=50):
    """A run_one-shaped record with random ranks; TTDS ranks its targets better than the rest."""
    systems = {}
    for k, name in enumerate(q.SYSTEMS):
        ranks = rng.integers(0, 40 - 5 * k, n_users)
        systems[name] = {"metrics": hr_ndcg(ranks, ks=(1, 5, 10)), "ranks": ranks.tolist(), "wall_s": 10.0 * k}
    return {"dataset": dataset, "seed": seed, "n_users_evaluated": n_users, "n_items": 1000, "n_users_total": 900,
            "shared_stage_wall_s": {"data": 1.0, "embeddings": 2.0, "cf": 3.0, "tokenizer": 4.0}, "systems": systems,
            "compute_wall_s": 100.0}


def test_dataset_seeds(q):
    assert q.dataset_seeds(["ml100k", "yelp"], [0, 1, 2], ["yelp=0"]) == {"ml100k": [0, 1, 2], "yelp": [0]}
    assert q.dataset_seeds(["beauty"], [0], ["beauty=3,4"]) == {"beauty": [3, 4]}
    for bad in (["yelp"], ["beauty=0"], ["yelp=a"], ["yelp="], ["yelp=0", "yelp=1"], ["yelp=1,1"]):
        with pytest.raises(ValueError, match="--dataset-seeds"):
            q.dataset_seeds(["ml100k", "yelp"], [0], bad)


def test_summary_and_table_writer(q, tmp_path):
    rng = np.random.default_rng(3)
    records = [_record(q, "ml100k", s, rng) for s in (0, 1, 2)] + [_record(q, "scientific", 0, rng)]
    summary = q.summarise(records, n_resamples=100)
    ml = summary["ml100k"]
    assert ml["seeds"] == [0, 1, 2] and set(ml["systems"]) == set(q.SYSTEMS)
    per_seed = [r["systems"]["SASRec"]["metrics"]["NDCG@10"] for r in records[:3]]
    assert ml["systems"]["SASRec"]["NDCG@10"]["mean"] == pytest.approx(np.mean(per_seed))
    assert ml["systems"]["SASRec"]["NDCG@10"]["low"] < np.mean(per_seed) < ml["systems"]["SASRec"]["NDCG@10"]["high"]
    d = ml["diffs"]["Popularity"]["NDCG@10"]
    assert d["seeds"]["mean"] == pytest.approx(d["bootstrap"]["diff"])
    best = max(q.BASELINES, key=lambda s: ml["systems"][s]["HR@10"]["mean"])
    assert ml["ratio"]["HR@10"]["best_baseline"] == best
    assert ml["ratio"]["HR@10"]["TTDS"] == pytest.approx(ml["systems"]["TTDS"]["HR@10"]["mean"]
                                                        / ml["systems"][best]["HR@10"]["mean"])
    assert summary["scientific"]["systems"]["TTDS"]["HR@10"]["low"] is None          # one seed
    meta = {"preset": "unit", "preset_description": "synthetic", "date": "2026-12-03", "machine": "test",
            "command": "pytest", "wall_s": 1.0, "compute_wall_s": 400.0, "overrides": {"ml100k": ["eval.max_users=50"]}}
    js, md = q.write_outputs(records, summary, meta, tmp_path)
    assert js.name == "quality-unit.json" and md.name == "quality-unit.md"
    doc = json.loads(js.read_text())
    assert doc["summary"]["ml100k"]["systems"]["TTDS"]["HR@10"]["mean"] == ml["systems"]["TTDS"]["HR@10"]["mean"]
    text = md.read_text()
    sasrec = ml["systems"]["SASRec"]["NDCG@10"]
    assert f"{sasrec['mean']:.4f} [{sasrec['low']:.4f}, {sasrec['high']:.4f}]" in text
    rows = [line for line in text.splitlines() if line.startswith("| TTDS |")]
    assert len(rows) == 2 and rows[0].count("|") == len(q.METRICS) + 3
    assert "## MovieLens-100K" in text and "## Amazon Scientific" in text and "eval.max_users=50" in text
    assert "TTDS / best baseline" in text and f"(best: {best})" in text


@pytest.fixture(scope="module")
def dyn(q):
    """bench/dynamic.py (imports bench/quality.py as ``quality``)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_dynamic", REPO / "bench" / "dynamic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _dyn_record(variant, seed, losses, round_steps, ranks):
    metrics = {m: 0.1 for m in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")}
    return {"variant": variant, "seed": seed, "losses": losses, "round_steps": round_steps,
            "loss_jumps": [], "changed_per_round": [5] * len(round_steps), "final_loss": losses[-1],
            "wall_s": {"llm": 1.0}, "valid": metrics, "test": metrics, "sasrec_test": metrics,
            "ranks": ranks, "sasrec_ranks": [1] * len(ranks)}


def test_dynamic_bench_loss_measures_and_summary(dyn):
    falling = list(np.linspace(5.0, 3.0, 100))
    bumped = falling[:40] + [x + 0.5 for x in falling[40:]]       # a round at step 40 costs 0.5 nats for good
    # the plain jump includes the downward trend; the excess over the static run is the round's cost alone
    assert dyn.loss_jumps(bumped, [{"step": 40}], window=10)[0] == pytest.approx(0.5 - 10 * 2.0 / 99, abs=1e-9)
    rec, static = _dyn_record("fresh", 0, bumped, [40], [1, 0, 3]), _dyn_record("static", 0, falling, [], [2, 1, 0])
    assert dyn.excess_loss(rec, static, window=10) == pytest.approx([0.5])
    summary = dyn.summarise([static, rec], ["static", "fresh"], n_resamples=200)
    assert summary["fresh"]["excess_loss_vs_static"] == [pytest.approx([0.5])]
    # a round that re-warmed 5 steps (dynamic.rewarm_steps, loss on the moved items only, here 9 nats): the
    # measures skip them and compare rec's ordinary steps from 45 on with the static run's same batches from 40 on
    rewarmed = falling[:40] + [9.0] * 5 + [x + 0.25 for x in falling[40:95]]
    assert dyn.loss_jumps(rewarmed, [{"step": 40, "rewarm_steps": 5}], window=10)[0] == pytest.approx(
        0.25 - 10 * 2.0 / 99, abs=1e-9)
    rw = {**_dyn_record("fresh-rw", 0, rewarmed, [40], [1, 0, 3]), "rewarm_steps": [5]}
    assert dyn.excess_loss(rw, static, window=10) == pytest.approx([0.25])
    ndcg = lambda r: np.mean([1 / np.log2(x + 1) if 1 <= x <= 10 else 0.0 for x in r])   # noqa: E731
    assert summary["fresh"]["vs_static"]["diff"] == pytest.approx(ndcg([1, 0, 3]) - ndcg([2, 1, 0]))
    assert "vs_static" not in summary["static"]
    md = dyn.render(summary, {"dataset": "x", "steps": 100, "date": "d", "machine": "m", "command": "c",
                              "preset": "p", "overrides": [], "n_items": 3, "n_users": 3})
    assert "| static |" in md and "+0.50" in md


def test_dynamic_bench_reference_variant_for_the_ablation(dyn):
    """With ``reference='fresh'`` (the component ablation) every comparison is against the full method."""
    full = _dyn_record("fresh", 0, [3.0] * 50, [20], [1, 2, 0, 4])
    off = _dyn_record("no-item2id", 0, [3.2] * 50, [20], [2, 2, 0, 0])
    summary = dyn.summarise([full, off], ["fresh", "no-item2id"], n_resamples=200, reference="fresh")
    ndcg = lambda r: np.mean([1 / np.log2(x + 1) if 1 <= x <= 10 else 0.0 for x in r])   # noqa: E731
    assert summary["no-item2id"]["vs_fresh"]["diff"] == pytest.approx(ndcg([2, 2, 0, 0]) - ndcg([1, 2, 0, 4]))
    assert summary["no-item2id"]["excess_loss_vs_fresh"] == [pytest.approx([0.2])]
    assert "vs_fresh" not in summary["fresh"] and "vs_static" not in summary["no-item2id"]
    md = dyn.render(summary, {"dataset": "x", "steps": 50, "date": "d", "machine": "m", "command": "c",
                              "preset": "p", "overrides": [], "n_items": 4, "n_users": 4, "reference": "fresh"})
    assert "Component ablation (reference: fresh)" in md and "| variant | / fresh |" in md


def test_every_bench_variant_is_a_valid_config(dyn):
    """Each variant's overrides load on the configs the benches use (a misspelt key would fail here, before
    an hour of runs), and each ablation switches off what its name says."""
    from ttds_ray.config import load_config

    for cfg_file, dataset in (("configs/quickstart.yaml", "ml100k"), ("configs/scientific_tiny.yaml", "scientific")):
        preset = list(dyn.Q.PRESETS["cpu-fast"].overrides(dataset))       # what bench/dynamic.py applies first
        base = load_config(REPO / cfg_file, [*preset, *dyn.VARIANT_BASE])
        assert base.tokenizer.alpha_dist > 0, cfg_file        # the cpu-fast tables were measured with the grain on
        assert not base.tokenizer.cf_erase_popularity, cfg_file   # ... and with the SASRec inputs as they are
        assert base.eval.user_ids == "training", cfg_file        # ... and the stored user IDs
        assert base.tasks.seqrec_user_ids == "sequence", cfg_file  # ... in training too
        for name, overrides in dyn.VARIANTS.items():
            if dataset not in dyn.ONLY_ON.get(name, (dataset,)):      # refused on this dataset's config, by name
                with pytest.raises(ConfigError, match="dynamic.keep_levels"):
                    load_config(REPO / cfg_file, [*preset, *dyn.VARIANT_BASE, *overrides])
                continue
            cfg = load_config(REPO / cfg_file, [*preset, *dyn.VARIANT_BASE, *overrides])
            if name in dyn.ABLATIONS:
                assert cfg.to_dict() != base.to_dict(), name
    for dataset in ("beauty", "yelp"):                           # beauty_tiny sets eval.user_ids=history
        preset = dyn.Q.PRESETS["cpu-fast"].overrides(dataset)
        pinned = load_config(REPO / "configs/beauty_tiny.yaml", [*preset])
        for name in (n for n, on in dyn.ONLY_ON.items() if dataset in on):
            load_config(REPO / "configs/beauty_tiny.yaml", [*preset, *dyn.VARIANT_BASE, *dyn.VARIANTS[name]])
        assert pinned.eval.user_ids == "training" and pinned.llm.epochs == 2, dataset     # beauty_tiny sets 4 epochs
        assert not pinned.tokenizer.cf_erase_popularity, dataset                          # ... and erases
    q = load_config(REPO / "configs/quickstart.yaml", dyn.VARIANTS["no-co_interaction"])
    assert q.tasks.weights.co_interaction == 0 and q.tasks.weights.item2id > 0
    assert load_config(REPO / "configs/quickstart.yaml", dyn.VARIANTS["no-dist-grain"]).tokenizer.alpha_dist == 0
    seqrec_only = load_config(REPO / "configs/quickstart.yaml", dyn.VARIANTS["no-aux-tasks"]).tasks.weights
    assert seqrec_only.seqrec > 0 and all(w == 0 for t, w in seqrec_only.model_dump().items() if t != "seqrec")
    assert set(dyn.ABLATIONS) <= set(dyn.VARIANTS) and len(dyn.ABLATIONS) == 12


@pytest.mark.parametrize("bad", ["0", "-3", "some", "1.5"])
def test_dynamic_bench_refuses_a_bad_eval_user_count_before_any_work(dyn, bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        dyn.main(["--eval-users", bad, "--seeds", "0", "--variants", "static", "--runs-dir", str(tmp_path)])
    assert e.value.code == 2 and "--eval-users" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_dynamic_bench_compares_with_the_tuned_sasrec_on_the_same_users(dyn):
    """``--sasrec-epochs``: the SASRec chosen on validation replaces the preset's in every comparison, and a
    SASRec run that ranked other users is refused."""
    rec = {**_dyn_record("static", 0, [3.0] * 5, [], [1, 0, 3]), "users": [4, 7, 9]}
    better = {m: 0.3 for m in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")}
    on_valid = {m: 0.2 for m in better}
    tuned = {"epochs": 50, "users": np.array([4, 7, 9]), "test": better, "valid": on_valid, "ranks": [2, 2, 2]}
    out = dyn.use_sasrec(rec, tuned)
    assert out["sasrec_ranks"] == [2, 2, 2] and out["sasrec_test"] is better and out["sasrec_epochs"] == 50
    assert rec["sasrec_ranks"] == [1, 1, 1] and "sasrec_epochs" not in rec          # the input is not modified
    row = dyn.summarise([out], ["static"], n_resamples=200)["static"]
    assert row["sasrec_test"]["NDCG@10"] == pytest.approx(0.3) and row["vs_SASRec"]["diff"] < 0
    with pytest.raises(RuntimeError, match="other users"):
        dyn.use_sasrec(rec, {**tuned, "users": np.array([4, 7, 8])})


@pytest.mark.parametrize("bad, says", [("llm.sid_init", "KEY=VALUE"), ("llm.no_such_key=1", "no_such_key"),
                                       ("llm.sid_init=random", "sid_init")])
def test_dynamic_bench_set_is_checked_before_any_work(dyn, bad, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        dyn.main(["--set", bad, "--seeds", "0", "--variants", "static", "--runs-dir", str(tmp_path)])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def vs(q):
    """bench/versus.py (imports bench/quality.py as ``quality``)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_versus", REPO / "bench" / "versus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_versus_compares_per_seed_on_the_same_users(vs):
    """TTDS minus SASRec per seed, its mean over seeds and the bootstrap; other users are refused."""
    users = np.array([3, 5, 8])
    ttds = {0: (users, np.array([1, 0, 2])), 1: (users, np.array([1, 1, 0]))}
    other = {0: (users, np.array([0, 0, 2])), 1: (users, np.array([2, 1, 11]))}
    out = vs.compare(ttds, other, ["HR@10", "NDCG@10"], n_resamples=200)
    assert out["HR@10"]["per_seed"][0] == pytest.approx([2 / 3, 1 / 3])
    assert out["HR@10"]["per_seed"][1] == pytest.approx([2 / 3, 2 / 3])
    assert out["HR@10"]["diff"] == pytest.approx((1 / 3 + 0) / 2) == out["HR@10"]["bootstrap"]["diff"]
    gain = (1 - 1 / np.log2(3)) / 3                                   # seed 1: rank 2 -> 1 for one user of three
    assert out["NDCG@10"]["per_seed"][1][0] - out["NDCG@10"]["per_seed"][1][1] == pytest.approx(gain)
    with pytest.raises(ValueError, match="different test users"):
        vs.compare(ttds, {**other, 1: (np.array([3, 5, 9]), other[1][1])}, ["HR@10"])
    with pytest.raises(ValueError, match="same seeds"):
        vs.compare(ttds, {0: other[0]}, ["HR@10"])


def test_versus_refuses_a_results_file_without_a_sasrec_selection(vs, tmp_path):
    path = tmp_path / "dynamic-x-600.json"
    path.write_text(json.dumps({"meta": {"dataset": "x"}, "records": []}))
    with pytest.raises(ValueError, match="--sasrec-epochs"):
        vs.sasrec_from(path)


def _fake_run(root, users, targets, ranked, wall):
    """A run directory with just the llm and eval stages bench/versus.py reads (rankings.parquet, llm wall)."""
    import pandas as pd
    from ttds_ray.artifacts import Files, RunDir
    run = RunDir(root)
    with run.write_stage("llm", config_hash="x", numbers={}):
        pass
    with run.write_stage("eval", config_hash="x") as (d, _):
        pd.DataFrame({"user_idx": users, "target": targets, "ranked": ranked}).to_parquet(d / Files.RANKINGS)
    man = root / "llm" / Files.MANIFEST
    man.write_text(json.dumps({**json.loads(man.read_text()), "wall_s": wall}))


def test_versus_against_compares_two_sets_of_runs_on_the_same_users(vs, tmp_path, capsys):
    """--against: per seed, run A minus run B from their eval rankings; other users are a usage error."""
    users, targets = [0, 1, 2, 3], [7, 8, 9, 6]
    for s in (0, 1):
        _fake_run(tmp_path / f"a{s}", users, targets, [[7, 1], [2, 8], [5, 4], [6]], 10.0 + s)     # HR@10 3/4
        _fake_run(tmp_path / f"b{s}", users, targets, [[1, 7], [3, 4], [5, 4], [1]], 20.0 + s)     # HR@10 1/4
    out = tmp_path / "o.json"
    assert vs.main(["--runs", str(tmp_path / "a{seed}"), "--against", str(tmp_path / "b{seed}"), "--seeds", "0", "1",
                    "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["result"]["HR@10"]["diff"] == pytest.approx(0.5)
    ndcg_a, ndcg_b = (1 + 1 / np.log2(3) + 1) / 4, (1 / np.log2(3)) / 4
    assert doc["result"]["NDCG@10"]["per_seed"]["1"] == pytest.approx([ndcg_a, ndcg_b])
    assert doc["walls"]["1"] == {"ttds_llm_s": 11.0, "against_llm_s": 21.0}
    assert "| HR@10 | 0 | 0.7500 | 0.2500 | +0.5000 |" in capsys.readouterr().out
    _fake_run(tmp_path / "c0", [0, 1, 2, 4], targets, [[7], [8], [9], [6]], 1.0)
    with pytest.raises(SystemExit) as e:
        vs.main(["--runs", str(tmp_path / "a{seed}"), "--against", str(tmp_path / "c{seed}"), "--seeds", "0"])
    assert e.value.code == 2 and "different test users" in capsys.readouterr().err


def test_pack_bench_profile_names_where_a_step_spends_its_time():
    """bench/pack.py --profile: the op that does the work tops the table, per step, with its share of the time."""
    import torch
    spec = importlib.util.spec_from_file_location("bench_pack", REPO / "bench" / "pack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = torch.randn(256, 256)
    out = mod.profile_ops(lambda b: [a @ b for _ in range(4)], [torch.randn(256, 256) for _ in range(3)], top=5)
    top = out["ops"][0]
    assert top["op"] == "aten::mm" and top["calls_per_step"] == pytest.approx(4)
    assert 0.5 < top["share"] <= 1 and top["self_ms_per_step"] <= out["self_ms_per_step"]
    assert len(out["ops"]) <= 5 and sum(o["share"] for o in out["ops"]) <= 1 + 1e-9


@pytest.mark.parametrize("args, says", [(["--metrics", "MRR"], "--metrics"), (["--sasrec", "missing.json"], "--sasrec"),
                                        (["--runs", "runs/x"], "{seed}"), (["--against", "runs/y{seed}"], "--against"),
                                        (["--against", "runs/y"], "--against")])
def test_versus_refuses_bad_arguments_before_any_work(vs, args, says, capsys, tmp_path):
    base = {"--runs": str(tmp_path / "r{seed}"), "--sasrec": str(tmp_path / "s.json"), "--out": str(tmp_path / "o.json")}
    (tmp_path / "s.json").write_text(json.dumps({"meta": {"sasrec": {}}, "records": []}))
    base.update(dict(zip(args[::2], args[1::2])))
    if args == ["--against", "runs/y"]:
        del base["--sasrec"]                              # alone, but without {seed}
    argv = [x for kv in base.items() for x in kv] + ["--seeds", "0"] + (args if args[0] not in base else [])
    with pytest.raises(SystemExit) as e:
        vs.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


@pytest.fixture(scope="module")
def report(dyn):
    """bench/dynamic_report.py (imports bench/quality.py as ``quality``)."""
    spec = importlib.util.spec_from_file_location("bench_dynamic_report", REPO / "bench" / "dynamic_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dynamic_report_tabulates_every_study_and_plots_the_rounds(dyn, report, tmp_path, capsys):
    """One row per (study, variant) from the study's own summary; a round's point = share of items moved and the
    loss above the static run's; files that are not bench/dynamic.py studies are skipped, and bad input is refused."""
    falling = list(np.linspace(5.0, 3.0, 100))
    static = _dyn_record("static-cb", 0, falling, [], [2, 1, 0])
    fresh = {**_dyn_record("fresh-cb", 0, falling[:40] + [x + 0.5 for x in falling[40:]], [40], [1, 0, 3]),
             "changed_per_round": [30]}
    summary = dyn.summarise([static, fresh], ["static-cb", "fresh-cb"], n_resamples=200, reference="static-cb")
    meta = {"dataset": "toy", "steps": 100, "n_items": 120, "n_users": 3, "reference": "static-cb"}
    (tmp_path / "s.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": []},
                                                default=dyn.Q._json_default))
    (tmp_path / "other.json").write_text(json.dumps({"meta": {}, "rows": []}))      # not a study: skipped
    out = tmp_path / "table"
    assert report.main(["--results", str(tmp_path / "s.json"), str(tmp_path / "other.json"), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    fresh_row = next(line for line in md.splitlines() if line.startswith("| s.json | fresh-cb |"))
    ratio = summary["fresh-cb"]["ratio_static-cb"]
    assert f"{ratio:.2f} (" in fresh_row and "25.0%" in fresh_row          # 30 of 120 items moved in round 1
    assert "| s.json | static-cb |" in md and md.count("| s.json |") == 2
    pts = report.round_points(report.load_studies([tmp_path / "s.json"]))
    assert pts == [{"dataset": "toy", "variant": "fresh-cb", "study": "s.json", "round": 1, "moved": 0.25,
                    "excess": pytest.approx(0.5)}]
    assert (tmp_path / "table-rounds.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("{not json")
    for argv, says in ((["--results", str(tmp_path / "bad.json")], "bad.json: not a JSON text file"),
                       (["--results", str(tmp_path / "other.json")], "none of the 1 files"),
                       (["--results", str(tmp_path / "missing.json")], "no such results file")):
        with pytest.raises(SystemExit) as e:
            report.main([*argv, "--out", str(tmp_path / "never")])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "never.md").exists()


def test_user_ids_versus_pairs_two_run_sets_on_the_same_validation_users(q, tmp_path, capsys):
    """bench/user_ids.py --against: current-ID ranks of two run sets per seed and their paired difference; other
    users, a missing seed or a file that is not this script's are refused before any ranking."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_user_ids", REPO / "bench" / "user_ids.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mine = {0: {"users": [3, 5, 8], "current": [1, 0, 2]}, 1: {"users": [1, 2, 4], "current": [1, 1, 0]}}
    other = {0: {"users": [3, 5, 8], "current": [0, 0, 2]}, 1: {"users": [1, 2, 4], "current": [2, 1, 11]}}
    out = mod.versus(mine, other)
    assert out["HR@10"]["runs"] == pytest.approx([2 / 3, 2 / 3])
    assert out["HR@10"]["against"] == pytest.approx([1 / 3, 2 / 3])
    assert out["HR@10"]["bootstrap"]["diff"] == pytest.approx(1 / 6)
    gain = (1 - 1 / np.log2(3)) / 3                                   # seed 1: rank 2 -> 1 for one user of three
    assert out["NDCG@10"]["runs"][1] - out["NDCG@10"]["against"][1] == pytest.approx(gain)
    assert "| HR@10 | mean | 0.6667 | 0.5000 | +0.1667" in mod.render_versus({"against": "f", **out}, [0, 1])
    with pytest.raises(ValueError, match="different validation users"):
        mod.versus(mine, {**other, 1: {"users": [1, 2, 9], "current": [0, 0, 0]}})
    with pytest.raises(ValueError, match="no seed"):
        mod.versus(mine, {0: other[0]})
    bad = tmp_path / "bad.json"
    bad.write_text('{"summary": {}}')
    for against in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            mod.main(["--runs", str(tmp_path / "r{seed}"), "--seeds", "0", "--out", str(tmp_path / "u.json"),
                      "--against", str(against)])
        assert f"--against {against}: not a results file" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text('{"per_seed": {"0": {"users": [1, 2], "current": [0, 1]}}}')
    with pytest.raises(SystemExit):                                 # 2 users ranked there, 5 asked for here
        mod.main(["--runs", str(tmp_path / "r{seed}"), "--seeds", "0", "--users", "5", "--out",
                  str(tmp_path / "u.json"), "--against", str(good)])
    assert "not --users 5" in capsys.readouterr().err
    assert not (tmp_path / "u.json").exists()


def test_dynamic_bench_refuses_to_retrain_over_a_run_of_other_settings(dyn, tmp_path):
    """bench/dynamic.py: a variant's run directory that holds a run of other training settings (e.g. an earlier
    --set) is refused before any work, naming the key; the same settings or an eval-only change pass."""
    from ttds_ray.artifacts import Files
    from ttds_ray.config import dump_yaml

    def cfg(*extra):
        return dyn.variant_configs("ml100k", 0, "static-cb", 10, preset="cpu-fast", runs_dir=tmp_path,
                                   data_root=tmp_path, extra=extra)[1]

    dyn.check_run_dir(cfg())                                          # nothing there yet
    first = cfg("llm.lr=0.002")
    first.run_dir.mkdir(parents=True)
    (first.run_dir / Files.CONFIG).write_text(dump_yaml(first.to_dict()))
    dyn.check_run_dir(cfg("llm.lr=0.002"))                            # the same run: reused
    dyn.check_run_dir(cfg("llm.lr=0.002", "eval.max_users=50"))       # eval only: re-scored in place
    with pytest.raises(RuntimeError, match=r"llm\.lr differ"):
        dyn.check_run_dir(cfg())
    with pytest.raises(SystemExit):
        dyn.main(["--dataset", "ml100k", "--steps", "10", "--seeds", "0", "--variants", "static-cb",
                  "--reference", "static-cb", "--runs-dir", str(tmp_path), "--results-dir", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists() and not (tmp_path / "quality-cpu-fast").exists()


def test_dynamic_bench_merges_per_seed_results_with_a_tuned_sasrec(dyn, tmp_path, capsys):
    """``--merge``: the records of per-seed results files become one table, each run's loss curve read back from
    its run directory and SASRec replaced by an earlier study's tuned one; a duplicate, missing or mismatched
    record is refused before anything is written, naming it."""
    def rec(variant, seed, ranks, users=(4, 7, 9)):
        run = tmp_path / "runs" / f"{variant}-s{seed}"
        (run / "llm").mkdir(parents=True, exist_ok=True)
        (run / "llm" / "losses.json").write_text(json.dumps([3.0 + seed] * 30))
        r = {**_dyn_record(variant, seed, [0.0], [], ranks), "users": list(users), "steps": 50,
             "run_dir": str(run), "dataset": "scientific"}
        del r["losses"]
        return r

    meta = {"dataset": "scientific", "steps": 50, "date": "d", "machine": "m", "command": "c", "preset": "p",
            "overrides": [], "n_items": 3, "n_users": 3}
    def write(name, records, **extra):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": {**meta, **extra}, "records": records}))
        return path

    f0 = write("a-s0.json", [rec("static", 0, [1, 0, 3]), rec("fresh", 0, [2, 1, 0])])
    f1 = write("a-s1.json", [rec("static", 1, [1, 2, 3]), rec("fresh", 1, [5, 1, 0]), rec("sticky", 1, [1, 1, 1])])
    better = {m: 0.3 for m in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")}
    tuned = [{**rec("x", s, [1, 1, 1]), "sasrec_test": better, "sasrec_valid": better, "sasrec_ranks": [2, 2, 2],
              "sasrec_epochs": 20} for s in (0, 1)]
    sas = write("tuned.json", tuned, sasrec={"0": {"epochs": 20, "wall_s": 9.0, "per_epochs": {"20": {}}},
                                             "1": {"epochs": 20, "wall_s": 8.0, "per_epochs": {"20": {}}}})

    records, m = dyn.merge_records([f0, f1], ["static", "fresh"], [0, 1], dataset="scientific", steps=50,
                                   sasrec_from=sas)
    assert sorted((r["variant"], r["seed"]) for r in records) == [("fresh", 0), ("fresh", 1), ("static", 0),
                                                                   ("static", 1)]          # sticky left out
    assert all(r["losses"] == [3.0 + r["seed"]] * 30 and r["sasrec_ranks"] == [2, 2, 2] for r in records)
    assert set(m["sasrec"]) == {"0", "1"}

    out = tmp_path / "res"
    out.mkdir()
    assert dyn.main(["--dataset", "scientific", "--steps", "50", "--seeds", "0", "1", "--variants", "static", "fresh",
                     "--merge", str(f0), str(f1), "--sasrec-from", str(sas), "--out", "m", "--results-dir",
                     str(out)]) == 0
    doc = json.loads((out / "m-scientific-50.json").read_text())
    assert doc["meta"]["merged_from"] == [str(f0), str(f1)] and len(doc["records"]) == 4
    assert doc["summary"]["fresh"]["sasrec_test"]["NDCG@10"] == pytest.approx(0.3)
    assert "vs_static" in doc["summary"]["fresh"] and (out / "m-scientific-50-loss.png").exists()
    assert "20 epochs" in (out / "m-scientific-50.md").read_text()
    capsys.readouterr()

    bad = {"duplicate": ([f0, f0], {}, "in both"),
           "missing seed": ([f0], {}, "static seed 1"),
           "other dataset": ([write("b.json", [rec("static", 0, [1, 1, 1])], dataset="beauty")], {}, "beauty"),
           "other steps": ([write("c.json", [{**rec("static", 0, [1, 1, 1]), "steps": 60}])], {}, "60 steps"),
           "other users": ([write("d.json", [rec("static", 0, [1, 1, 1]), rec("fresh", 0, [1, 1], users=(4, 7))])],
                           {}, "different users"),
           "not results": ([tmp_path / "runs"], {}, "not a readable results file"),
           "no records": ([write("e.json", None)], {}, "not a bench/dynamic.py results file"),
           "bare records": ([write("f.json", [{"variant": "static", "seed": 0}])], {}, "not a bench/dynamic.py"),
           "no tuned seed": ([f0], {"sasrec_from": write("t.json", tuned[1:])}, "seeds [0]")}
    for name, (files, kw, says) in bad.items():
        seeds = [0, 1] if name == "missing seed" else [0]
        with pytest.raises(ValueError, match=re.escape(says)):
            dyn.merge_records(files, ["static", "fresh"] if name != "other steps" else ["static"], seeds,
                              dataset="scientific", steps=50, **kw)
    for argv, says in ((["--merge", str(f0), "--set", "llm.lr=1"], "--set"),
                       (["--sasrec-from", str(sas)], "goes with --merge"),
                       (["--merge", str(tmp_path / "nowhere.json")], "nowhere.json")):
        with pytest.raises(SystemExit) as e:
            dyn.main(["--dataset", "scientific", "--steps", "50", "--seeds", "0", "--variants", "static", "fresh",
                      "--results-dir", str(tmp_path / "never"), *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
