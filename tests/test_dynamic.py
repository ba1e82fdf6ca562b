"""Dynamic indexing schedule and guidance sampling (DESIGN §1.6); run-directory reuse for ablation pairs."""
import numpy as np
import pytest

from ttds_ray.artifacts import RunDir, write_json
from ttds_ray.config import DynamicConfig, TTDSConfig, config_from_dict
from ttds_ray.dynamic import guidance_prompts, reindex_steps


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
