"""End to end: jobs/train.py on a small real slice (300 users of Scientific, or of MovieLens-100K in the
LC-Rec layout when Scientific is not there; see conftest.lcrec_data), and its refusals of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _slice(lcrec_data, tmp_path: Path, n_users: int = 300) -> Path:
    """The first ``n_users`` users of the real LC-Rec dataset as Slice.inter.json + Slice.item.json."""
    return lcrec_data.write_slice(tmp_path / "slice", n_users, prefix="Slice")


def _config(tmp_path: Path, data_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
name: e2e
output_dir: {tmp_path / 'runs'}
data: {{path: {data_path}, kcore: 0}}
cf: {{epochs: 2}}
tokenizer: {{epochs: 6, item: {{n_levels: 3, codebook_size: 32, latent_dim: 8, hidden_dim: 32}},
            user: {{n_levels: 2, codebook_size: 8, latent_dim: 8, hidden_dim: 32}}}}
llm: {{backbone: tiny, finetune: full, loss_vocab: sid, tiny_hidden: 32, tiny_layers: 1, tiny_heads: 2,
      epochs: 1, max_steps: 8, batch_size: 8}}
eval: {{max_users: 30, batch_size: 16}}
ray: {{num_cpus: 2, torch_threads: 1}}
{extra}
""")
    return cfg


def _run(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(cfg), *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_train_job_end_to_end_on_real_slice(tmp_path, lcrec_data):
    cfg = _config(tmp_path, _slice(lcrec_data, tmp_path))
    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    for stage in ("data", "embeddings", "cf", "tokenizer", "llm", "eval"):
        assert (run / stage / "MANIFEST.json").is_file(), stage
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_users_evaluated"] == 30 and m["n_users_total"] == 300
    for model in ("TTDS", "SASRec", "Popularity"):
        assert 0.0 <= m["models"][model]["HR@10"] <= 1.0 and m["models"][model]["n_users"] == 30
    assert (run / "llm" / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    import pyarrow.parquet as pq
    sids = pq.read_table(run / "tokenizer" / "item_sids.parquet").column("sid").to_pylist()
    assert len(sids) == len(set(sids)) == m["n_items"]
    ranked = np.stack(pq.read_table(run / "eval" / "rankings.parquet").column("ranked").to_numpy(zero_copy_only=False))
    assert ranked.shape == (30, 20) and ranked.min() >= 0 and ranked.max() < m["n_items"]
    # dynamic indexing (default: 2 rounds) re-indexed items between LLM segments; all tasks were built
    rounds = json.loads((run / "llm" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and all(0 <= r["changed"] <= m["n_items"] for r in rounds)
    assert rounds[0]["step"] < rounds[1]["step"] < 8 and all(r["collisions_final"] == 0 for r in rounds)
    stats = json.loads((run / "llm" / "task_stats.json").read_text())
    assert set(stats) == {"seqrec", "item2id", "id2item", "title_history", "user2items", "co_interaction",
                          "neighbour_users", "user2profile"} and all(v["n"] > 0 for v in stats.values())
    final = pq.read_table(run / "llm" / "item_sids.parquet").column("sid").to_pylist()
    assert len(final) == len(set(final)) == m["n_items"]
    # model selection happens on the validation split: `ttds-ray evaluate` writes metrics_valid.json
    res = subprocess.run([sys.executable, "-m", "ttds_ray.cli", "evaluate", str(run), "--split", "valid",
                          "--max-users", "12"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    mv = json.loads((run / "metrics_valid_12users.json").read_text())
    assert mv["split"] == "valid" and mv["models"]["TTDS"]["n_users"] == 12
    # a second call finds every stage complete and only re-reads the metrics
    again = _run(cfg)
    assert again.returncode == 0 and "already complete" in again.stderr
    # the static-index ablation shares every stage up to the tokenizer and trains the LLM with no rounds
    static = _run(cfg, "--static-index", "--reuse-from", str(run), "name=e2e-static")
    assert static.returncode == 0, static.stderr[-3000:]
    srun = tmp_path / "runs" / "e2e-static"
    assert "tokenizer: already complete" in static.stderr
    assert json.loads((srun / "llm" / "rounds.json").read_text()) == []
    assert pq.read_table(srun / "llm" / "item_sids.parquet").column("sid").to_pylist() == sids


@pytest.mark.parametrize("case", ["unknown_key", "missing_path", "wrong_format", "empty_history",
                                  "item_without_text", "kcore_empties_data", "unknown_backbone",
                                  "id_space_too_small", "binary_config"])
def test_bad_input_stops_before_training_with_one_clear_message(tmp_path, case, lcrec_data):
    data_path = _slice(lcrec_data, tmp_path, n_users=20)
    extra, overrides, expect = "", [], ""
    if case == "unknown_key":
        overrides, expect = ["llm.loss_vocabb=sid"], "llm.loss_vocabb"
    elif case == "missing_path":
        overrides, expect = [f"data.path={tmp_path / 'nowhere'}"], "nowhere"
    elif case == "wrong_format":
        (data_path / "Slice.inter.json").write_text("[1, 2, 3]")
        expect = "Slice.inter.json"
    elif case == "empty_history":
        inter = json.loads((data_path / "Slice.inter.json").read_text())
        inter[next(iter(inter))] = []
        (data_path / "Slice.inter.json").write_text(json.dumps(inter))
        expect = "Slice.inter.json"
    elif case == "item_without_text":
        items = json.loads((data_path / "Slice.item.json").read_text())
        del items[next(iter(items))]
        (data_path / "Slice.item.json").write_text(json.dumps(items))
        expect = "Slice.item.json"
    elif case == "kcore_empties_data":
        overrides, expect = ["data.kcore=1000"], "data.kcore"
    elif case == "unknown_backbone":
        overrides, expect = [f"llm.backbone={tmp_path / 'no_model'}"], "no_model"
    elif case == "id_space_too_small":
        overrides, expect = ["tokenizer.item.n_levels=1", "tokenizer.item.codebook_size=2"], "codebook_size"
    cfg = _config(tmp_path, data_path, extra)
    if case == "binary_config":
        cfg.write_bytes(b"\xff\xfe\x00binary")
        expect = "job.yaml"
    res = _run(cfg, *overrides)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and expect in res.stderr, res.stderr[-2000:]
    run = tmp_path / "runs" / "e2e"
    assert not run.exists()
