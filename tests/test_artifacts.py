"""Run-directory contract (issue 8 item 5): reuse only on matching config and inputs, self-describing
checkpoints, no silent fallback to another ID table."""
import numpy as np
import pytest
import torch

from ttds_ray.artifacts import RunDir
from ttds_ray.config import TowerConfig
from ttds_ray.errors import ArtifactError, StageMissing, TTDSError
from ttds_ray.recommender import load_final_item_sids
from ttds_ray.sids import SIDTable
from ttds_ray.towers import Tower, load_tower, save_tower


def _stage(run: RunDir, stage: str, h: str = "h", content: str = "") -> None:
    with run.write_stage(stage, config_hash=h) as (d, _):
        (d / "x.txt").write_text(stage + content)


def test_stage_built_on_replaced_inputs_is_not_reused(tmp_path):
    run = RunDir(tmp_path / "r")
    _stage(run, "data")
    _stage(run, "embeddings")
    assert run.is_complete("embeddings", "h") and run.changed_inputs("embeddings") == []
    _stage(run, "data", content="v2")                    # rebuilt upstream with other content: a new digest
    assert run.is_complete("embeddings")                 # finished ...
    assert not run.is_complete("embeddings", "h")        # ... but not reusable
    assert run.changed_inputs("embeddings") == ["data"]
    assert not run.is_complete("embeddings", "other-config")


def test_tower_checkpoint_loads_without_the_run_config(tmp_path):
    tcfg = TowerConfig(n_levels=2, codebook_size=4, latent_dim=4, hidden_dim=8)
    tower = Tower(6, 3, tcfg)
    with torch.no_grad():
        tower.s_mean.add_(1.5)
    save_tower(tower, tmp_path / "t.safetensors")
    back = load_tower(tmp_path / "t.safetensors")
    assert (back.d_s, back.d_c, back.tcfg) == (6, 3, tcfg)
    for k, v in tower.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(ArtifactError, match="saved for"):
        load_tower(tmp_path / "t.safetensors", 7, 3, tcfg)
    with pytest.raises(ArtifactError, match="missing"):
        load_tower(tmp_path / "nope.safetensors")


def test_final_item_index_has_no_fallback(tmp_path):
    run = RunDir(tmp_path / "r")
    table = SIDTable(np.array([[0, 1], [1, 0]]), 2)
    with run.write_stage("tokenizer", config_hash="h") as (d, _):
        table.save(d / "item_sids.parquet", ["a", "b"], prefix="i")
    with pytest.raises(StageMissing):                    # the tokenizer's table is not used in its place
        load_final_item_sids(run)
    with run.write_stage("llm", config_hash="h") as (d, _):
        pass
    with pytest.raises(ArtifactError, match="missing"):
        load_final_item_sids(run)
    assert issubclass(ArtifactError, TTDSError)
