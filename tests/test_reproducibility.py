"""Reproducibility (issue 12, docs/DESIGN-NOTES.md "Reproducibility"): the same config and seed on the same machine
and torch thread count give the same artifacts, bit for bit: data tables, text embeddings, SASRec, towers, the item
and user ID tables, the LLM's losses, re-index rounds and weights, the rankings and the metrics.

Every stage's MANIFEST records the sha256 of each file it wrote (``artifacts.RunDir.write_stage``), so two runs are
compared file by file; the only fields left out are wall-clock seconds (``llm/rounds.json``, ``eval/metrics.json``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN_CONFIG, copy_run
from ttds_ray import embeddings, pipeline
from ttds_ray.artifacts import STAGES, Files, RunDir, read_json
from ttds_ray.config import load_config
from ttds_ray.data import Prepared

#: Keys that hold wall-clock seconds, the one thing two runs may differ in.
WALL_KEYS = {"wall_s", "guide_wall_s", "eval_wall_s"}
#: Files holding such keys: compared as JSON without them (every other file by its sha256).
TIMED_FILES = {"llm": (Files.ROUNDS,), "eval": (Files.METRICS,)}


def _without_wall(obj):
    if isinstance(obj, dict):
        return {k: _without_wall(v) for k, v in obj.items() if k not in WALL_KEYS}
    if isinstance(obj, list):
        return [_without_wall(v) for v in obj]
    return obj


def fingerprint(run: RunDir, stages=STAGES) -> dict[str, dict]:
    """``stage -> {file name -> sha256 (or the JSON content without wall-clock keys)}`` of a finished run."""
    out = {}
    for stage in stages:
        files = dict(run.manifest(stage)["files"])
        for name in TIMED_FILES.get(stage, ()):
            files[name] = _without_wall(read_json(run.stage_dir(stage) / name))
        out[stage] = files
    return out


def assert_same_runs(a: RunDir, b: RunDir, stages=STAGES) -> None:
    """Every file of every stage in ``stages`` is equal (wall-clock keys aside); the message names those that differ."""
    fa, fb = fingerprint(a, stages), fingerprint(b, stages)
    differ = {s: sorted(n for n in set(fa[s]) | set(fb[s]) if fa[s].get(n) != fb[s].get(n)) for s in stages}
    assert not any(differ.values()), f"the two runs differ in {({s: d for s, d in differ.items() if d})}"


def _tiny_config(out: Path, data_dir):
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(TINY_RUN_CONFIG.format(out=out / "runs", data=data_dir))
    return load_config(out / "job.yaml")


def test_second_run_of_the_same_config_is_identical(tiny_run, tmp_path):
    """A second run of the tiny slice (same config and seed, this process: its global RNG state differs from the
    first run's) rebuilds SASRec, the towers, the LLM with its re-index round and the evaluation: same ID tables,
    losses and metrics, and every other file. (The data and embeddings stages are linked from the first run to
    save time; the data stage is rerun below, the embeddings by the Ray test.)"""
    cfg, run1, metrics1 = tiny_run
    cfg2 = _tiny_config(tmp_path, cfg.data.path)
    run2 = RunDir(cfg2.run_dir)
    for stage in ("data", "embeddings"):
        copy_run(run1.stage_dir(stage), run2.stage_dir(stage))
    metrics2 = pipeline.run(cfg2, pipeline.LocalBackend())
    assert [s for s in STAGES if run2.manifest(s)["created"] != run1.manifest(s)["created"]] == list(STAGES[2:])

    for name in ("item", "user"):                                    # the ID tables
        stats1 = read_json(run1.stage_dir("tokenizer") / Files.TOKENIZER_STATS)[name]
        assert read_json(run2.stage_dir("tokenizer") / Files.TOKENIZER_STATS)[name]["sid_sha256"] == stats1["sid_sha256"]
    assert read_json(run2.stage_dir("llm") / Files.LOSSES) == read_json(run1.stage_dir("llm") / Files.LOSSES)
    assert metrics2["models"] == metrics1["models"]
    assert_same_runs(run1, run2, STAGES[2:])


def test_data_stage_is_reproducible(tiny_run, tmp_path):
    """The data stage again (the backend's ``prepare``) writes the same bytes as the first run's."""
    cfg, run1, _ = tiny_run
    pipeline.LocalBackend().prepare(cfg.data, cfg.seed).save(tmp_path)
    for name in ("items.parquet", "sequences.parquet", Files.DATA_STATS):
        assert (tmp_path / name).read_bytes() == (run1.stage_dir("data") / name).read_bytes(), name


def test_text_embeddings_are_encoded_in_fixed_chunks(tiny_run, monkeypatch):
    """A text's vector depends on the texts padded into its batch (docs/DESIGN-NOTES.md), so ``encode_texts`` works
    in fixed chunks of ``embeddings.ENCODE_CHUNK`` texts: the whole input in one call (LocalBackend) equals the chunks
    encoded one call each (the Ray Data batches of ``train.RayBackend.encode_items``), and a second call the first."""
    cfg, run1, _ = tiny_run
    texts = Prepared.load(run1.stage_dir("data")).items["text"].tolist()[:30]
    monkeypatch.setattr(embeddings, "ENCODE_CHUNK", 7)
    whole = embeddings.encode_with(cfg.embeddings, texts)
    chunks = [embeddings.encode_with(cfg.embeddings, texts[i:i + 7]) for i in range(0, 30, 7)]
    np.testing.assert_array_equal(whole, np.concatenate(chunks))
    np.testing.assert_array_equal(embeddings.encode_with(cfg.embeddings, texts), whole)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_equals_the_local_run(tiny_run, ray_session, tmp_path):
    """The tiny slice on ``train.RayBackend`` (Ray Data normalise and encode, one TorchTrainer per trained stage) gives
    the same files as the in-process run, stage by stage. The driver runs at the config's torch thread count, as
    LocalBackend does after its first fit: the tokenizer stage's reconstruction errors are computed on the driver."""
    import torch
    from ttds_ray import train

    cfg, run1, _ = tiny_run
    cfg2 = _tiny_config(tmp_path, cfg.data.path)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg2.ray.torch_threads)
    try:
        pipeline.run(cfg2, train.RayBackend())
    finally:
        torch.set_num_threads(threads)
    assert_same_runs(run1, RunDir(cfg2.run_dir))
