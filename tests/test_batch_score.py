"""Batch scoring job (issue 9, jobs/score.py + ttds_ray/batch.py) on the shared tiny run: output schema and
order, atomic replacement, determinism, unknown ids in a histories file, bad inputs, and agreement with the
eval stage and the online path. One Ray Data actor-pool test (``-m ray``)."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ttds_ray import batch
from ttds_ray.artifacts import Files
from ttds_ray.batch import OUTPUT_SCHEMA, ScoreInputError, ScoreOptions, read_score_metadata
from ttds_ray.errors import ArtifactError


@pytest.fixture(scope="module")
def run(tiny_run):
    cfg, run, _ = tiny_run
    return cfg, run.root


@pytest.fixture(scope="module")
def rec(run):
    """One loaded Recommender for the in-process tests (single-threaded, like a 1-CPU Ray actor)."""
    import torch

    from ttds_ray import Recommender
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Recommender.from_run(run[1])
    torch.set_num_threads(threads)


def _score(run_root, out, rec, **kw):
    opts = {k: kw.pop(k) for k in ("k", "exclude_seen", "split", "batch_size") if k in kw}
    return batch.score(run_root, out, options=ScoreOptions(**opts), use_ray=False, recommender=rec,
                       progress=False, **kw)


def _user_order(run_root) -> list[str]:
    seqs = pd.read_parquet(run_root / "data" / Files.SEQUENCES)
    return seqs.sort_values("user_idx")["user_id"].astype(str).tolist()


def _write_histories(path, users, histories):
    pq.write_table(pa.table({"user": pa.array(users, pa.string()),
                             "history": pa.array(histories, pa.list_(pa.string()))}), path)
    return path


def test_output_schema_order_and_exclude_seen(run, rec, tmp_path):
    out = tmp_path / "scores.parquet"
    s = _score(run[1], out, rec, k=5, batch_size=7)
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    df = table.to_pandas()
    users = _user_order(run[1])
    assert s.n_users == s.n_scored == len(users) and s.n_errors == 0 and s.n_rows == len(df) == 5 * len(users)
    assert list(dict.fromkeys(df["user"])) == users                      # input order, each user contiguous
    for u, g in df.groupby("user", sort=False):
        assert g["rank"].tolist() == [1, 2, 3, 4, 5]
        assert (np.diff(g["score"].to_numpy()) <= 0).all()
        assert g["item_id"].is_unique
        seen = {rec.item_ids[i] for i in rec.user_history(u)}
        assert not seen & set(g["item_id"]), f"user {u}: seen items recommended with exclude_seen"
        assert g["semantic_id"].tolist() == [rec.item(i)["semantic_id"] for i in g["item_id"]]
    meta = read_score_metadata(out)
    assert meta["n_users"] == len(users) and meta["n_errors"] == 0 and meta["k"] == 5 and meta["split"] == "none"


def test_identical_inputs_give_identical_bytes(run, rec, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    _score(run[1], a, rec, batch_size=8, max_users=25)
    _score(run[1], b, rec, batch_size=8, max_users=25)
    assert a.read_bytes() == b.read_bytes()
    assert pd.read_parquet(a)["user"].nunique() == 25


def test_a_failing_job_leaves_the_old_output_intact(run, rec, tmp_path, monkeypatch):
    out = tmp_path / "scores.parquet"
    _score(run[1], out, rec, k=3, batch_size=8)
    old = out.read_bytes()

    calls = {"n": 0}
    real = batch.ScoreUDF.__call__

    def udf_fails_on_second_batch(self, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in batch 2")
        return real(self, b)
    monkeypatch.setattr(batch.ScoreUDF, "__call__", udf_fails_on_second_batch)
    with pytest.raises(RuntimeError, match="injected"):
        _score(run[1], out, rec, k=5, batch_size=8)
    assert calls["n"] == 2
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]      # no temp file left
    monkeypatch.undo()

    # the writer failing after it has written a first row group: same guarantee
    monkeypatch.setattr(batch, "ROW_GROUP_ROWS", 16)
    writes = {"n": 0}
    real_write = pq.ParquetWriter.write_table

    def write_fails_on_second_row_group(self, *a, **kw):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError("injected disk error")
        return real_write(self, *a, **kw)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_fails_on_second_row_group)
    with pytest.raises(OSError, match="injected"):
        _score(run[1], out, rec, k=5, batch_size=8)
    assert writes["n"] == 2
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    monkeypatch.undo()

    # a failing job with no previous output creates nothing; a good re-run replaces the file
    monkeypatch.setattr(batch.ScoreUDF, "__call__", udf_fails_on_second_batch)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        _score(run[1], tmp_path / "new.parquet", rec, batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    monkeypatch.undo()
    _score(run[1], out, rec, k=5, batch_size=8)
    assert pd.read_parquet(out)["rank"].max() == 5


def test_histories_file_with_unknown_ids_scores_the_rest(run, rec, tmp_path):
    good = [rec.item_ids[i] for i in (3, 1, 4)]
    hist = _write_histories(tmp_path / "hist.parquet", ["a", "b", "c", "d", "a"],
                            [good, [good[0], "no-such-item"], [], None, good[:2]])
    out = tmp_path / "scores.parquet"
    s = _score(run[1], out, rec, histories=hist, k=4, batch_size=2)
    assert (s.n_users, s.n_scored, s.n_errors) == (5, 2, 3)
    df = pd.read_parquet(out)
    assert df["user"].tolist() == ["a"] * 8 and df["rank"].tolist() == [1, 2, 3, 4] * 2
    expect = rec.recommend(histories=[good, good[:2]], k=4)
    assert df["item_id"].tolist() == expect[0].item_ids + expect[1].item_ids
    np.testing.assert_allclose(df["score"], np.concatenate([expect[0].scores, expect[1].scores]), atol=1e-4)
    errors = read_score_metadata(out)["errors"]
    assert [(e["pos"], e["user"]) for e in errors] == [(1, "b"), (2, "c"), (3, "d")]
    assert "no-such-item" in errors[0]["error"] and "UnknownIdError" in errors[0]["error"]
    assert "empty" in errors[1]["error"] and "empty" in errors[2]["error"]
    assert s.errors == errors

    # every row failing is a wrong file or run: an error, and the old output stays
    old = out.read_bytes()
    bad = _write_histories(tmp_path / "bad.parquet", ["x", "y"], [["nope"], ["nope", "nada"]])
    with pytest.raises(ScoreInputError, match="none of the 2 users"):
        _score(run[1], out, rec, histories=bad)
    assert out.read_bytes() == old


def test_bad_inputs_fail_clearly(run, rec, tmp_path):
    out = tmp_path / "s.parquet"
    with pytest.raises(ArtifactError, match="not a run directory"):
        _score(tmp_path / "no-such-run", out, rec)
    with pytest.raises(ScoreInputError, match="k must be an int >= 1"):
        _score(run[1], out, rec, k=0)
    with pytest.raises(ScoreInputError, match="batch_size"):
        _score(run[1], out, rec, batch_size=0)
    with pytest.raises(ScoreInputError, match="split"):
        _score(run[1], out, rec, split="train")
    pq.write_table(pa.table({"user": ["a"], "items": [["1"]]}), tmp_path / "nohist.parquet")
    with pytest.raises(ScoreInputError, match=r"no column\(s\) \['history'\]"):
        _score(run[1], out, rec, histories=tmp_path / "nohist.parquet")
    pq.write_table(pa.table({"user": [1], "history": [["1"]]}), tmp_path / "intuser.parquet")
    with pytest.raises(ScoreInputError, match="'user' must be strings"):
        _score(run[1], out, rec, histories=tmp_path / "intuser.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ScoreInputError, match="not a readable parquet"):
        _score(run[1], out, rec, histories=tmp_path / "junk.parquet")
    with pytest.raises(ScoreInputError, match="does not exist"):
        _score(run[1], out, rec, histories=tmp_path / "missing.parquet")
    hist = _write_histories(tmp_path / "h.parquet", ["a"], [[rec.item_ids[0]]])
    with pytest.raises(ScoreInputError, match="prepared users only"):
        _score(run[1], out, rec, histories=hist, split="test")
    with pytest.raises(ScoreInputError, match="is a directory"):
        _score(run[1], tmp_path, rec)
    with pytest.raises(ScoreInputError, match="max_users"):
        _score(run[1], out, rec, max_users=0)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ScoreInputError, match="CUDA is not available"):
            _score(run[1], out, rec, device="cuda")
    pq.write_table(pa.table({"user": pa.array([], pa.string()), "history": pa.array([], pa.list_(pa.string()))}),
                   tmp_path / "empty.parquet")
    with pytest.raises(ScoreInputError, match="no users to score"):
        _score(run[1], out, rec, histories=tmp_path / "empty.parquet")
    assert not out.exists()


def test_cli_score_and_its_errors(run, tmp_path):
    from typer.testing import CliRunner

    from ttds_ray.cli import app
    out = tmp_path / "s.parquet"
    res = CliRunner().invoke(app, ["score", "--run", str(run[1]), "--out", str(out), "--no-ray", "--k", "3",
                                   "--max-users", "4", "--split", "test", "--no-exclude-seen"])
    assert res.exit_code == 0, res.output
    assert "scored 4 of 4 users" in res.output and "users/s" in res.output
    assert len(pd.read_parquet(out)) == 12 and read_score_metadata(out)["split"] == "test"
    res = CliRunner().invoke(app, ["score", "--run", str(run[1]), "--out", str(out), "--no-ray", "--k", "0"])
    assert res.exit_code == 2 and "k must be an int >= 1" in res.output


def test_batch_test_split_equals_the_eval_stage_rankings(run, rec, tmp_path):
    cfg, root = run
    out = tmp_path / "s.parquet"
    k = max(cfg.eval.ks)
    _score(root, out, rec, k=k, split="test", exclude_seen=False, max_users=cfg.eval.max_users,
           batch_size=cfg.eval.batch_size)
    df = pd.read_parquet(out)
    ranks = pd.read_parquet(root / "eval" / Files.RANKINGS)
    items = pd.read_parquet(root / "data" / Files.ITEMS).sort_values("item_idx")["item_id"].astype(str).to_numpy()
    seqs = pd.read_parquet(root / "data" / Files.SEQUENCES).set_index("user_idx")["user_id"].astype(str)
    expect = {seqs[u]: items[np.asarray(r)[:k]].tolist() for u, r in zip(ranks["user_idx"], ranks["ranked"])}
    got = {u: g["item_id"].tolist() for u, g in df.groupby("user", sort=False)}
    assert len(expect) == cfg.eval.max_users
    assert got == expect          # same users (the eval sample) and the same top-k, in order
    # and the same beam scores as eval/rankings.parquet stores with each list
    want_scores = {seqs[u]: np.asarray(sc, np.float32)[:k] for u, sc in zip(ranks["user_idx"], ranks["scores"])}
    for u, g in df.groupby("user", sort=False):
        np.testing.assert_allclose(g["score"].to_numpy(np.float32), want_scores[u], rtol=0, atol=1e-5)


def test_batch_equals_the_online_path(run, rec, tmp_path):
    out = tmp_path / "s.parquet"
    users = _user_order(run[1])[:12]
    hist = _write_histories(tmp_path / "h.parquet", users, [[rec.item_ids[i] for i in rec.user_history(u)][-5:]
                                                             for u in users])
    _score(run[1], out, rec, k=10)                                      # split none, exclude seen: {user_id}
    df = pd.read_parquet(out)
    online = rec.recommend(user_ids=users, k=10)
    for u, r in zip(users, online):
        g = df[df["user"] == u]
        assert g["item_id"].tolist() == r.item_ids
        assert g["semantic_id"].tolist() == r.semantic_ids
        np.testing.assert_allclose(g["score"], r.scores, atol=1e-4)
    _score(run[1], out, rec, k=10, histories=hist, batch_size=5)          # {history}
    df = pd.read_parquet(out)
    online = rec.recommend(histories=[[rec.item_ids[i] for i in rec.user_history(u)][-5:] for u in users], k=10)
    assert [df[df["user"] == u]["item_id"].tolist() for u in users] == [r.item_ids for r in online]


def test_importing_batch_scoring_leaves_ray_out():
    code = "import ttds_ray.batch, ttds_ray.cli; from ttds_ray.cli import score\nimport sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert "ray" not in out.stdout.split()


@pytest.mark.ray
def test_ray_actor_pool_equals_the_in_process_output(run, rec, tmp_path):
    """Ray Data map_batches over 2 ScoreUDF actors (1 CPU, 1 torch thread each) on a histories file (every
    user's logged history, one with an unknown item) gives the same bytes as the in-process scorer at 1 thread:
    the same chunks (5 blocks over 2 actors), the same order, the same floats, the same recorded error."""
    import ray

    users = _user_order(run[1])
    hists = [[rec.item_ids[i] for i in rec.user_history(u)] for u in users]
    hists[6] = hists[6] + ["unknown-item"]
    histories = _write_histories(tmp_path / "h.parquet", users, hists)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2 ** 20, log_to_driver=False)
    try:
        s = batch.score(run[1], tmp_path / "ray.parquet", histories=histories,
                        options=ScoreOptions(k=6, batch_size=8), concurrency=2, progress=False)
    finally:
        if started:
            ray.shutdown()
    assert s.backend.startswith("ray") and (s.n_users, s.n_scored) == (len(users), len(users) - 1)
    assert [(e["pos"], e["user"]) for e in s.errors] == [(6, users[6])] and "unknown-item" in s.errors[0]["error"]
    _score(run[1], tmp_path / "local.parquet", rec, k=6, batch_size=8, histories=histories)
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()
