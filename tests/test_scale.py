"""Training at scale: equal steps on every worker, resuming after a fault, evaluation on several workers.

The plain-function tests run without Ray. The ``ray`` tests run the real Ray Train / Ray Data paths on a
private copy of the shared tiny run (``conftest.tiny_run``): two CPU workers at 0.5 CPU each (gloo).
"""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import copy_run
from ttds_ray import cf, pipeline, recipes
from ttds_ray.artifacts import Files, RunDir
from ttds_ray.config import load_config


# ----------------------------------------------------------------------------- plain functions

@pytest.mark.parametrize("n_rows", [3, 5, 8, 13])
def test_epoch_batches_give_every_worker_the_same_steps_whatever_its_shard(n_rows):
    b = recipes.epoch_batches(n_rows, n_steps=4, batch_size=2, seed=0, epoch=1)
    assert b.shape == (4, 2) and b.min() >= 0 and b.max() < n_rows
    first = b.ravel()[:min(8, n_rows)]
    assert len(set(first.tolist())) == len(first)          # a permutation first, repeated only if the shard is short
    assert np.array_equal(b, recipes.epoch_batches(n_rows, 4, 2, seed=0, epoch=1))     # a resumed run draws the same
    assert not np.array_equal(b, recipes.epoch_batches(n_rows, 4, 2, seed=0, epoch=2)) or n_rows < 3


def test_epoch_batches_refuse_an_empty_shard():
    with pytest.raises(ValueError, match="ray.num_workers"):
        recipes.epoch_batches(0, 1, 2, seed=0, epoch=0)


def test_sasrec_windows_are_the_training_split_and_keyed_uniquely():
    seqs = pd.DataFrame({"user_idx": [0, 1, 2], "items": [np.arange(10), np.arange(3), np.arange(3) + 5]})
    w = cf.window_rows(seqs, max_len=4, stride=2)
    assert not w.duplicated(["user_idx", "win"]).any()
    assert set(w["user_idx"]) == {0}                       # users 1, 2: < 2 training items after leave-one-out
    targets = np.concatenate([np.asarray(t) for t in w["target"]])
    assert targets.max() == 7                              # items 8, 9 (valid, test targets) never trained on
    again = cf.training_windows([list(range(8))], 4, stride=2)
    assert np.array_equal(np.stack(w["seq"].to_numpy()), again["seq"])


def test_local_datasets_hand_out_rows_sorted_by_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"i": [2, 0, 1], "x": ["c", "a", "b"]}), tmp_path / "a.parquet")
    ds = pipeline.local_datasets({"e": pipeline.DatasetSpec((str(tmp_path / "a.parquet"),), key=("i",))})
    assert ds("e")["x"].tolist() == ["a", "b", "c"]


# ----------------------------------------------------------------------------- Ray

def _ray_cfg(run_root, *overrides):
    return load_config(run_root / Files.CONFIG, [f"output_dir={run_root.parent}", f"name={run_root.name}",
                                                 "ray.torch_threads=1", *overrides])


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_run_equal_steps_and_finish(ray_session, tiny_run, tmp_path):
    """SASRec and the LLM (with its re-index round) on 2 DDP workers; the shards are uneven (odd row counts),
    every worker runs the same number of steps and the stages finish (a hang fails on pytest-timeout)."""
    from ttds_ray.train import RayBackend

    _, src, _ = tiny_run
    root = copy_run(src.root, tmp_path / "two")
    cfg = _ray_cfg(root, "ray.num_workers=2", "ray.cpus_per_worker=0.5")
    run = RunDir(root)
    n_windows = len(cf.window_rows(pd.read_parquet(run.require("data") / "sequences.parquet"),
                                   max_len=cfg.cf.max_len, stride=cfg.cf.window_stride))
    backend = RayBackend()
    pipeline.stage_cf(cfg, run, backend)
    pipeline.stage_llm(cfg, run, backend)
    cf_steps = run.manifest("cf")["numbers"]["steps_per_worker"]
    llm = run.manifest("llm")["numbers"]
    assert len(cf_steps) == 2 and cf_steps[0] == cf_steps[1] > 0, (cf_steps, n_windows)
    assert len(llm["steps_per_worker"]) == 2 and llm["steps_per_worker"][0] == llm["steps_per_worker"][1] == llm["steps"]
    assert len(llm["changed_per_round"]) == cfg.dynamic.rounds


@pytest.mark.ray
def test_a_fault_mid_stage_resumes_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(
        ray_session, tiny_run, tmp_path):
    """A worker raises once after LLM step 5 (checkpoints every 2 steps, the re-index round and its checkpoint at
    step 4); Ray Train restarts the worker group from the step-4 round checkpoint (FailureConfig), the round
    of the first attempt (``attempt`` 0) is kept and not redone, and the
    losses equal the uninterrupted in-process run of the same config and seed (tolerance 1e-5 relative:
    same kernels, one thread)."""
    from ttds_ray.train import RayBackend

    _, src, _ = tiny_run
    ref_losses = json.loads((src.require("llm") / Files.LOSSES).read_text())
    ref_rounds = json.loads((src.require("llm") / Files.ROUNDS).read_text())
    root = copy_run(src.root, tmp_path / "fault")
    cfg = _ray_cfg(root, "ray.checkpoint_every_steps=2", "ray.max_failures=1")
    run = RunDir(root)
    pipeline.stage_llm(cfg, run, RayBackend(inject_fault=("llm", 5)))
    assert (root / "work" / "fault-llm-5.fired").exists()            # the fault did fire
    numbers = run.manifest("llm")["numbers"]
    assert numbers["resumed_at_steps"] == [4]                          # one restart, from the step-4 checkpoint
    rounds = json.loads((run.require("llm") / Files.ROUNDS).read_text())
    assert len(rounds) == len(ref_rounds) == 1 and rounds[0]["step"] == 4 and rounds[0]["attempt"] == 0
    assert {k: v for k, v in rounds[0].items() if k != "wall_s"} == {k: v for k, v in ref_rounds[0].items() if k != "wall_s"}
    losses = json.loads((run.require("llm") / Files.LOSSES).read_text())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.ray
def test_evaluation_on_several_workers_counts_every_user_once(ray_session, tiny_run, tmp_path):
    """11 users ranked on 1, 2 and 3 Ray Data actors: identical rankings and metrics, 11 users evaluated."""
    from ttds_ray import evaluate
    from ttds_ray.train import RayBackend

    cfg0, run, _ = tiny_run
    base = dict(max_users=11, progress=False)
    ref, rows, ref_ranked, _ = evaluate.evaluate_split(cfg0, run, "test", **base)
    assert ref["n_users_evaluated"] == 11
    for w in (1, 2, 3):
        cfg = load_config(run.root / Files.CONFIG, [f"ray.num_workers={w}", "ray.cpus_per_worker=0.5",
                                                    "ray.torch_threads=1", "eval.batch_size=4"])
        m, _, ranked, _ = evaluate.evaluate_split(cfg, run, "test", **base,
                                               rank=lambda h, u: RayBackend().rank(cfg, run, h, u))
        assert m["n_users_evaluated"] == 11 and m["models"] == ref["models"], w
        assert np.array_equal(ranked, ref_ranked), w


def test_a_run_on_shared_storage_uri_writes_every_stage_there(tiny_run, tmp_path, monkeypatch):
    """``output_dir`` as a URI (``file://`` standing in for s3://): the driver pulls the finished stages into its
    working copy, rebuilds what changed (the LLM and eval here) and pushes every stage back, manifest last; a
    fresh node (another cache) pulls a complete, loadable run."""
    from ttds_ray import storage
    from ttds_ray.artifacts import STAGES
    from ttds_ray.recommender import Recommender

    cfg0, src, _ = tiny_run
    bucket = f"file://{tmp_path}/bucket"
    for stage in STAGES[:4]:                                   # data .. tokenizer already in the bucket
        storage.push_stage(src.root, storage.join(bucket, "shared"), stage)
    monkeypatch.setenv("TTDS_CACHE", str(tmp_path / "driver_cache"))
    cfg = load_config(src.root / Files.CONFIG, [f"output_dir={bucket}", "name=shared", "llm.max_steps=4"])
    driver_dir = cfg.run_dir
    assert str(driver_dir).startswith(str(tmp_path / "driver_cache"))
    pipeline.run(cfg, pipeline.LocalBackend())
    remote = tmp_path / "bucket" / "shared"
    assert all((remote / s / Files.MANIFEST).is_file() for s in STAGES)
    assert (remote / Files.RUN_METRICS).is_file() and not list(remote.glob("work/**/*.parquet"))  # samples removed
    monkeypatch.setenv("TTDS_CACHE", str(tmp_path / "other_node"))
    root = storage.pull_stages(cfg.run_uri, STAGES)
    assert root != driver_dir and RunDir(root).is_complete("eval", cfg.stage_hash("eval"))
    rec = Recommender(cfg, RunDir(root))
    assert rec.rank([np.array([0, 1])], None, n_beams=3)[0].shape == (1, 3)
