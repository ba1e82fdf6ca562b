"""The Ray-free pipeline (pipeline.py + recipes.py): the run loop on LocalBackend, and the LLM recipe's
checkpoint contract (a recipe restored from a mid-run checkpoint finishes exactly like an uninterrupted one)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttds_ray import pipeline, recipes
from ttds_ray.artifacts import STAGES, Files, RunDir
from ttds_ray.config import load_config

from conftest import llm_recipe

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def local_run(tiny_run):
    """A finished run of a 40-user slice, built by pipeline.run on LocalBackend (no Ray; conftest.tiny_run)."""
    return tiny_run


def test_local_backend_runs_every_stage_and_writes_the_run_dir_contract(local_run):
    cfg, run, metrics = local_run
    for stage in STAGES:
        assert run.is_complete(stage, cfg.stage_hash(stage)), stage
    assert metrics["n_users_evaluated"] == 10 and set(metrics["stage_wall_s"]) == set(STAGES)
    assert json.loads((run.root / Files.RUN_METRICS).read_text())["models"] == metrics["models"]
    rounds = json.loads((run.stage_dir("llm") / Files.ROUNDS).read_text())
    assert [r["round"] for r in rounds] == [1] and rounds[0]["collisions_final"] == 0
    assert len(json.loads((run.stage_dir("llm") / Files.LOSSES).read_text())) == 6
    assert not (run.root / "ray_results").exists()          # the local backend keeps no resume checkpoints


def test_a_second_run_reuses_every_stage_and_never_starts_the_backend(local_run):
    cfg, run, metrics = local_run
    called = []
    again = pipeline.run(cfg, pipeline.LocalBackend(), before_first_stage=lambda: called.append(1))
    assert called == [] and again["models"] == metrics["models"]


def test_pipeline_and_recipes_import_no_ray():
    code = "import sys, ttds_ray.pipeline, ttds_ray.recipes, ttds_ray.evaluate; assert 'ray' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("switch", [None, {"dynamic": {"rewarm_steps": 1}}, {"llm": {"align_psa": 0.5}},
                                    {"llm": {"sid_init": "codebook", "sid_tie": True}}])
def test_llm_recipe_resumed_from_its_round_checkpoint_ends_like_an_uninterrupted_run(local_run, switch):
    """state_dict/load_state_dict carry the whole position: weights, item index, tower, step, batch, rounds (and
    the re-warming steps after the round, dynamic.rewarm_steps, which the round's checkpoint includes; the
    alignment's latents, llm.align_psa, which follow the restored tower; the tied rows' map, llm.sid_tie)."""
    from ttds_ray.config import config_from_dict

    cfg, run, _ = local_run
    if switch:
        d = cfg.to_dict()
        for section, keys in switch.items():
            d[section].update(keys)
        cfg = config_from_dict(d)
    torch.set_num_threads(1)
    full: list = []
    llm_recipe(cfg, run, full).fit()
    assert any("round" in m for m, _ in full), "the config must have a re-index round mid-run"

    class Stop(Exception):
        pass

    cut: list = []

    def stop_after_round(m, f):
        cut.append((m, f))
        if "round" in m:
            raise Stop
    first = llm_recipe(cfg, run, [])
    first.env.report = stop_after_round
    with pytest.raises(Stop):
        first.fit()
    resumed_reports: list = []
    resumed = llm_recipe(cfg, run, resumed_reports)
    resumed.load_state_dict(cut[-1][1])
    assert resumed.step == first.step > 0 and len(resumed.rounds) == 1
    resumed.fit()
    want = json.loads(full[-1][1][recipes.STATE])
    got = json.loads(resumed_reports[-1][1][recipes.STATE])
    assert got["step"] == want["step"] and len(got["rounds"]) == len(want["rounds"]) == 1
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    codes = [recipes.load_state(r[-1][1][recipes.ITEM_CODES])["codes"] for r in (full, resumed_reports)]
    assert torch.equal(codes[0], codes[1])
    a, b = (recipes.load_state(r[-1][1][recipes.TRAINABLE]) for r in (full, resumed_reports))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_llm_recipe_refuses_a_checkpoint_of_another_model(local_run):
    from ttds_ray.config import config_from_dict
    from ttds_ray.errors import ArtifactError
    cfg, run, _ = local_run
    rec = llm_recipe(cfg, run, [])
    files = rec.state_dict()
    files[recipes.TRAINABLE] = recipes.state_bytes({"not.a.parameter": torch.zeros(1)})
    with pytest.raises(ArtifactError, match="trainable parameters"):
        rec.load_state_dict(files)
    d = cfg.to_dict()
    d["llm"].update(sid_init="codebook", sid_tie=True)
    tied = llm_recipe(config_from_dict(d), run, [])
    untied = tied.state_dict()
    del untied[recipes.TIED]                               # a checkpoint of the same model without llm.sid_tie
    with pytest.raises(ArtifactError, match="sid_tie"):
        tied.load_state_dict(untied)


def test_llm_recipe_round_with_guided_only_moves_moves_only_guidance_targets(local_run):
    """dynamic.accept=guided: a round changes the ID of no item that none of its guidance prompts targets."""
    from ttds_ray import dynamic
    from ttds_ray.config import config_from_dict

    cfg, run, _ = local_run
    d = cfg.to_dict()
    d["dynamic"].update(accept="guided", tokenizer_lr=1e-3, guide_samples=64)   # 0.01 can overflow a prefix
    cfg = config_from_dict(d)
    rec = llm_recipe(cfg, run, [])
    before = rec.item_codes.copy()
    torch.set_num_threads(1)
    rec.fit()
    (r,) = rec.rounds
    _, _, targets = dynamic.guidance_prompts(rec.train_seqs, cfg.dynamic.guide_samples,
                                             max_history=cfg.data.max_history, seed=cfg.seed + 1000)
    moved = np.flatnonzero((rec.item_codes != before).any(1))
    g = r["guided"]
    assert g["proposed"] > g["proposed_guided"] > 0 and g["guided_items"] == len(np.unique(targets))
    assert len(moved) == r["changed"] == g["proposed_guided"] - g["reverted"] and set(moved) <= set(targets.tolist())
    assert len(np.unique(rec.item_codes, axis=0)) == len(rec.item_codes)


@pytest.mark.parametrize("reindex", ["fresh", "llm"])
def test_llm_recipe_runs_a_likelihood_gated_round(local_run, reindex):
    """dynamic.accept=llm wired through the recipe: the round reports the gate, makes only accepted moves, and
    the item index stays unique (reindex=llm: the IDs the LLM proposes, gated)."""
    from ttds_ray.config import config_from_dict

    cfg, run, _ = local_run
    d = cfg.to_dict()
    d["dynamic"].update(accept="llm", reindex=reindex, accept_contexts=2)
    rec = llm_recipe(config_from_dict(d), run, [])
    before = rec.item_codes.copy()
    torch.set_num_threads(1)
    rec.fit()
    (r,) = rec.rounds
    g = r["gate"]
    assert g["proposed"] >= g["scored"] > 0 and g["accepted"] > 0         # the gate had moves to judge and g["accepted"] - g["reverted"] == r["changed"] <= g["proposed"]
    assert r["changed"] == int((rec.item_codes != before).any(1).sum())
    assert len(np.unique(rec.item_codes, axis=0)) == len(rec.item_codes)


def test_llm_recipe_rewarms_the_moved_items_within_the_step_budget(local_run, monkeypatch):
    """dynamic.rewarm_steps: right after the round, that many steps train on samples that learn a moved item's ID,
    with the loss on the moved items' elements only; they are logged with the round, and the run ends at the same
    step budget."""
    from ttds_ray.config import config_from_dict
    from ttds_ray.tasks import item_ph

    cfg, run, _ = local_run
    d = cfg.to_dict()
    d["dynamic"].update(rewarm_steps=2, tokenizer_lr=1e-3)        # a larger tower step: items surely move
    cfg = config_from_dict(d)
    rec = llm_recipe(cfg, run, [])
    torch.set_num_threads(1)
    seen: list = []
    real = rec.train_step
    monkeypatch.setattr(rec, "train_step", lambda rows: seen.append((rec.step, rows)) or real(rows))
    before = rec.item_codes.copy()
    rec.fit()
    (r,) = rec.rounds
    assert r["changed"] > 0 and r["rewarm_steps"] == 2 and r["rewarm_pool"] > 0 and r["rewarm_loss"] > 0
    assert rec.step == cfg.llm.max_steps == len(rec.losses) == len(seen)        # the budget, not budget + 2
    assert np.array_equal(rec.moved, np.flatnonzero((rec.item_codes != before).any(1)))
    moved = {item_ph(i) for i in rec.moved}
    for step, rows in seen:
        learnt = [set(np.asarray(x["ids"])[np.asarray(x["resp"], dtype=bool)].tolist()) for x in rows]
        if r["step"] <= step < r["step"] + 2:                                   # re-warming: moved IDs only
            assert all(lt and lt <= moved for lt in learnt), step
        else:                                                                   # ordinary steps: every element
            assert not all(lt <= moved for lt in learnt), step


def test_llm_recipe_keeps_the_item_rows_tied_to_the_towers_code_vectors_through_the_round(local_run):
    """llm.sid_tie: after training (a round included) every item ID token row is the map of the refined tower's
    code vector, the map was trained, and the user rows stayed free."""
    from ttds_ray import llm
    from ttds_ray.config import config_from_dict

    cfg, run, _ = local_run
    d = cfg.to_dict()
    d["llm"].update(sid_init="codebook", sid_tie=True)
    d["dynamic"]["tokenizer_lr"] = 1e-3                          # a larger tower step: the code vectors surely move
    torch.set_num_threads(1)
    rec = llm_recipe(config_from_dict(d), run, [])
    books0 = rec.tie.books.clone()
    proj0 = rec.tie.proj.detach().clone()
    item_ids, user_ids = rec.vocab.item_token_ids.flatten(), rec.vocab.user_token_ids.flatten()
    w0 = llm._input_weight(rec.base).detach().clone()
    assert torch.allclose(w0[item_ids], rec.tie.rows().detach(), atol=1e-5)   # step 0: the codebook init
    rec.fit()
    assert rec.rounds[0]["changed"] > 0
    w = llm._input_weight(rec.base).detach()
    assert torch.allclose(rec.tie.books, rec.tower.rq.codebooks.detach()) and not torch.allclose(rec.tie.books, books0)
    assert torch.allclose(w[item_ids], rec.tie.rows().detach(), atol=1e-6)
    assert not torch.allclose(rec.tie.proj.detach(), proj0) and not torch.allclose(w[user_ids], w0[user_ids])


def test_llm_recipe_aligns_the_llm_to_the_towers_latents_and_follows_the_round(local_run):
    """llm.align_psa: the term is in every step's loss (the trained weights differ from a run without it), and
    after the round the alignment holds the refined tower's latents and the new ID table."""
    from ttds_ray import llm
    from ttds_ray.config import config_from_dict

    cfg, run, _ = local_run
    d = cfg.to_dict()
    d["llm"]["align_psa"] = 0.5
    d["dynamic"]["tokenizer_lr"] = 1e-3                          # a larger tower step: the latents surely move
    torch.set_num_threads(1)
    rec = llm_recipe(config_from_dict(d), run, [])
    before = rec.align.latents.clone()
    assert torch.allclose(before, F.normalize(rec._mapped_latents(), dim=-1))
    rec.fit()
    d["llm"]["align_psa"] = 0.0
    plain = llm_recipe(config_from_dict(d), run, [])
    assert plain.align is None
    plain.fit()
    assert rec.rounds[0]["changed"] > 0 and not torch.allclose(rec.align.latents, before)
    assert torch.allclose(rec.align.latents, F.normalize(rec._mapped_latents(), dim=-1))
    starts, items = rec.align.items_in(torch.as_tensor(rec.item_tok[[3, 7]].reshape(-1)))
    assert items.tolist() == [3, 7]                                # the table it reads is the new one
    # the LM loss reported is the LM loss alone (step 1: same weights, same loss); the term then changes the training
    assert rec.losses[0] == pytest.approx(plain.losses[0], rel=1e-6) and rec.losses[1] != pytest.approx(plain.losses[1])
