"""Tokenizer step of dynamic semantic indexing (DESIGN §1.6): LLM-guided refinement of the item tower."""
import copy

import numpy as np
import pytest
import torch
from test_towers import _clusters
from torch import nn

from ttds_ray.config import TokenizerConfig, TowerConfig
from ttds_ray.towers import (Guidance, Tower, count_changed, encode_codes, export_item_sids, fit_tower,
                             guidance_terms, refine_item_tower, sticky_item_sids)

torch.set_num_threads(1)
K = 8
D_LLM = 24
# code_temp 0.01: the latents of a 10-epoch tower have norm ~0.2, so t=1 would make P_1 nearly uniform.
CFG = TokenizerConfig(epochs=10, batch_size=64, code_temp=0.01)
TCFG = TowerConfig(n_levels=3, codebook_size=K, latent_dim=8, hidden_dim=32)
REFINE = dict(epochs=10, lr=1e-3, tau=0.1, seed=0, batch_size=64)


@pytest.fixture(scope="module")
def items():
    """200 items in 8 clusters, a fitted item tower and each item's cluster label."""
    s, c, lab = _clusters(n_clusters=8, per=25, d=16)
    return s, c, lab, fit_tower(CFG, TCFG, s, c, seed=0)


def _guidance(target_idx, hidden=None, p_level1=None, seed=0) -> Guidance:
    """Defaults: random hidden states, uniform LLM level-1 distribution."""
    m = len(target_idx)
    if hidden is None:
        hidden = np.random.default_rng(seed).normal(size=(m, D_LLM))
    if p_level1 is None:
        p_level1 = np.full((m, K), 1.0 / K)
    return Guidance(np.asarray(target_idx, dtype=np.int64), hidden.astype(np.float32), p_level1.astype(np.float32))


def _p_level1(tower: Tower, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """P_1(k|μ) of every item ``(N, K)``."""
    with torch.no_grad():
        z = tower.latent(torch.as_tensor(s), torch.as_tensor(c))
        return tower.rq.soft_assign([z], CFG.code_temp)[0].numpy()


@pytest.mark.parametrize("gamma,term,other", [("gamma_kl", "guide_kl", "guide_nce"),
                                              ("gamma_nce", "guide_nce", "guide_kl")])
def test_guide_weight_zero_skips_the_term_and_a_weight_adds_exactly_weight_times_term(items, gamma, term, other):
    s, c, _, tower = items
    g = _guidance(np.arange(0, 200, 3))
    run = dict(REFINE, epochs=1, lr=1e-9)                      # parameters ~frozen: same tower terms in both runs
    _, _, off = refine_item_tower(tower, CFG, s, c, g, **{**run, "gamma_kl": 0.0, "gamma_nce": 0.0})
    _, _, on = refine_item_tower(tower, CFG, s, c, g, **{**run, "gamma_kl": 0.0, "gamma_nce": 0.0, gamma: 0.5})
    assert term not in off and other not in off and other not in on
    assert on[term] > 0
    assert on["loss"] - off["loss"] == pytest.approx(0.5 * on[term], rel=1e-4)


def test_guide_kl_reaches_encoder_and_level1_codebook_only_and_guide_nce_reaches_the_projection(items):
    s, c, _, tower = items
    proj = nn.Linear(D_LLM, TCFG.latent_dim)
    g = _guidance(np.arange(16))
    args = (tower, proj, torch.as_tensor(s[:16]), torch.as_tensor(c[:16]), torch.as_tensor(g.hidden),
            torch.as_tensor(g.p_level1))
    for name in ("guide_kl", "guide_nce"):
        tower.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        guidance_terms(*args, code_temp=CFG.code_temp, tau=0.1)[name].backward()
        assert tower.vae.enc_s[0].weight.grad.abs().sum() > 0 and tower.vae.enc_c[0].weight.grad.abs().sum() > 0
        cb = tower.rq.codebooks.grad
        if name == "guide_kl":
            assert cb[0].abs().sum() > 0 and cb[1:].abs().sum() == 0 and proj.weight.grad is None
        else:
            assert cb is None and proj.weight.grad.abs().sum() > 0
    tower.zero_grad(set_to_none=True)


def test_kl_guidance_pulls_targets_toward_the_level1_code_the_llm_predicts(items):
    s, c, lab, tower = items
    targets = np.flatnonzero(lab == 0)
    before_codes = encode_codes(tower, s, c)[0]
    p_before = _p_level1(tower, s, c)[targets].mean(0)
    held = set(before_codes[targets, 0].tolist())
    k_star = min((k for k in range(K) if k not in held), key=lambda k: p_before[k])  # least likely free code
    one_hot = np.eye(K)[np.full(len(targets), k_star)]
    g = _guidance(targets, p_level1=one_hot)
    guided, _, terms = refine_item_tower(tower, CFG, s, c, g, gamma_kl=1.0, gamma_nce=0.0, **REFINE)
    unguided, _, _ = refine_item_tower(tower, CFG, s, c, g, gamma_kl=0.0, gamma_nce=0.0, **REFINE)
    p_guided = _p_level1(guided, s, c)[targets, k_star].mean()
    p_unguided = _p_level1(unguided, s, c)[targets, k_star].mean()
    assert p_guided > p_before[k_star] + 0.5 and p_guided > p_unguided + 0.5
    after_codes = encode_codes(guided, s, c)[0]
    assert (after_codes[targets, 0] == k_star).mean() >= 0.8   # re-indexing follows the LLM
    assert count_changed(before_codes, after_codes) >= 0.8 * len(targets)


def test_nce_guidance_decreases_when_hidden_states_are_informative(items):
    s, c, _, tower = items
    rng = np.random.default_rng(1)
    targets = rng.integers(0, len(s), 200)
    informative = s[targets] @ rng.normal(size=(s.shape[1], D_LLM))   # fixed linear map of the item input
    curves = {}
    for name, hidden in (("informative", informative), ("noise", None)):
        curve = []
        refine_item_tower(tower, CFG, s, c, _guidance(targets, hidden=hidden), gamma_kl=0.0, gamma_nce=1.0,
                          on_epoch=lambda e, t: curve.append(t["guide_nce"]), **REFINE)
        curves[name] = curve
    assert curves["informative"][-1] < 0.6 * curves["informative"][0]
    assert curves["informative"][-1] < 0.6 * curves["noise"][-1]


def test_refine_copies_the_tower_is_deterministic_and_leaves_the_global_rng_alone(items):
    s, c, _, tower = items
    ref = {k: v.clone() for k, v in tower.state_dict().items()}
    g = _guidance(np.arange(0, 200, 2))
    rng_state = torch.get_rng_state()
    runs = [refine_item_tower(tower, CFG, s, c, g, gamma_kl=0.1, gamma_nce=0.1, **{**REFINE, "epochs": 2, "seed": sd})
            for sd in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, ref[k]) for k, v in tower.state_dict().items())
    (t1, p1, m1), (t2, p2, m2), (t3, _, _) = runs
    assert all(torch.equal(v, t2.state_dict()[k]) for k, v in t1.state_dict().items())
    assert all(torch.equal(v, p2.state_dict()[k]) for k, v in p1.state_dict().items()) and m1 == m2
    assert not torch.equal(t1.rq.codebooks, t3.rq.codebooks)


def test_codes_keep_their_meaning_no_reseeding_or_refit(items):
    """With lr=0 nothing may move, not even a dead code: a re-seed or k-means refit would renumber codes."""
    s, c, _, fitted = items
    tower = copy.deepcopy(fitted)
    with torch.no_grad():
        tower.rq.codebooks[0, 3] = 100.0                        # a level-1 code no item uses
    g = _guidance(np.arange(0, 200, 2))
    same, _, _ = refine_item_tower(tower, CFG, s, c, g, gamma_kl=1.0, gamma_nce=1.0,
                                   **{**REFINE, "lr": 0.0, "seed": 3})
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in same.state_dict().items())


def test_bad_guidance_is_rejected(items):
    s, c, _, tower = items
    with pytest.raises(ValueError, match="hidden must be"):
        Guidance(np.arange(4), np.zeros((3, D_LLM), np.float32), np.full((4, K), 1 / K, np.float32))
    with pytest.raises(ValueError, match="probability distributions"):
        Guidance(np.arange(4), np.zeros((4, D_LLM), np.float32), np.ones((4, K), np.float32))
    wrong_k = Guidance(np.arange(4), np.zeros((4, D_LLM), np.float32), np.full((4, K + 1), 1 / (K + 1), np.float32))
    with pytest.raises(ValueError, match="level-1 codes"):
        refine_item_tower(tower, CFG, s, c, wrong_k, gamma_kl=1.0, gamma_nce=0.0, **REFINE)
    with pytest.raises(ValueError, match="target_idx must lie"):
        refine_item_tower(tower, CFG, s, c, _guidance([0, len(s)]), gamma_kl=1.0, gamma_nce=0.0, **REFINE)


def test_count_changed_counts_rows_with_any_changed_level_and_rejects_shape_mismatch():
    old = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 1, 1]])
    new = np.array([[0, 1, 2], [3, 5, 6], [5, 7, 0], [1, 1, 1]])  # row 1: two levels changed, row 2: one
    assert count_changed(old, new) == 2 and count_changed(old, old) == 0
    with pytest.raises(ValueError, match="code tables"):
        count_changed(old, new[:3])


def _perturbed(tower: Tower, scale: float, seed: int = 0) -> Tower:
    """A copy of ``tower`` with every parameter moved by Gaussian noise of std ``scale`` (a stand-in for a
    guided refinement that changes the latents)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(tower)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="module")
def items16():
    """The clusters of ``items`` with a K=16 tower, whose export has unique IDs without a CollisionError."""
    s, c, _ = _clusters(n_clusters=8, per=25, d=16)
    return s, c, fit_tower(CFG, TowerConfig(n_levels=3, codebook_size=16, latent_dim=8, hidden_dim=32), s, c, seed=0)


def test_sticky_reindex_keeps_ids_unique_obeys_the_margin_and_the_cap(items16):
    s, c, tower = items16
    old = export_item_sids(tower, s, c, CFG)[0].codes
    moved = _perturbed(tower, 0.002)
    free, st = sticky_item_sids(moved, s, c, old, margin=0.0, max_changed=1.0)
    assert len(np.unique(free.codes, axis=0)) == len(s) and st["collisions_final"] == 0
    n_free = count_changed(old, free.codes)
    marg, _ = sticky_item_sids(moved, s, c, old, margin=0.5, max_changed=1.0)
    assert 0 < count_changed(old, marg.codes) < n_free               # a switching cost keeps more items in place
    # the rule at level 1, recomputed here: a level-1 code changes only if it is closer by the margin
    with torch.no_grad():
        z = copy.deepcopy(moved).double().latent(torch.as_tensor(s, dtype=torch.float64),
                                                 torch.as_tensor(c, dtype=torch.float64))
        d = torch.cdist(z, moved.rq.codebooks[0].double()).pow(2).numpy()
    rows = np.flatnonzero(marg.codes[:, 0] != old[:, 0])
    assert np.all(d[rows, marg.codes[rows, 0]] < 0.5 * d[rows, old[rows, 0]])
    assert count_changed(old, sticky_item_sids(moved, s, c, old, margin=0.999, max_changed=1.0)[0].codes) == 0
    capped, cst = sticky_item_sids(moved, s, c, old, margin=0.0, max_changed=0.05)
    assert count_changed(old, capped.codes) <= int(0.05 * len(s)) and cst["capped"] > 0
    assert len(np.unique(capped.codes, axis=0)) == len(s)
    # the items the cap lets move are among those the uncapped round moves, and items that keep their ID
    # keep all of it (no collision resolution touches an unchanged ID)
    changed_capped = (capped.codes != old).any(1)
    assert np.all((free.codes != old).any(1)[changed_capped])
    assert np.array_equal(capped.codes[~changed_capped], old[~changed_capped])


def test_sticky_reindex_with_kept_levels_moves_only_the_deeper_codes(items16):
    s, c, tower = items16
    old = export_item_sids(tower, s, c, CFG)[0].codes
    moved = _perturbed(tower, 0.002)
    free, _ = sticky_item_sids(moved, s, c, old, margin=0.0, max_changed=1.0)
    assert (free.codes[:, 0] != old[:, 0]).any()                      # without it, some level-1 codes move
    for keep in (1, 2):
        kept, st = sticky_item_sids(moved, s, c, old, margin=0.0, max_changed=1.0, keep_levels=keep)
        assert np.array_equal(kept.codes[:, :keep], old[:, :keep]) and st["collisions_final"] == 0
        assert len(np.unique(kept.codes, axis=0)) == len(s)
        assert (kept.codes[:, keep:] != old[:, keep:]).any()            # the deeper levels still follow the tower
    with pytest.raises(ValueError, match="keep_levels"):
        sticky_item_sids(moved, s, c, old, margin=0.0, max_changed=1.0, keep_levels=3)


def test_sticky_reindex_with_an_unchanged_tower_moves_only_items_the_export_put_off_their_greedy_code(items16):
    s, c, tower = items16
    old, _ = export_item_sids(tower, s, c, CFG)
    greedy = encode_codes(tower, s, c)[0]
    again, _ = sticky_item_sids(tower, s, c, old.codes, margin=0.0, max_changed=1.0)
    on_greedy = (old.codes == greedy).all(1)
    assert np.array_equal(again.codes[on_greedy], old.codes[on_greedy])


def test_sticky_reindex_rejects_a_bad_old_table(items16):
    s, c, tower = items16
    old = export_item_sids(tower, s, c, CFG)[0].codes
    with pytest.raises(ValueError, match="repeat"):
        sticky_item_sids(tower, s, c, np.vstack([old[:-1], old[:1]]), margin=0.1, max_changed=1.0)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        sticky_item_sids(tower, s, c, old[:, :2], margin=0.1, max_changed=1.0)
    with pytest.raises(ValueError, match="margin"):
        sticky_item_sids(tower, s, c, old, margin=1.0, max_changed=1.0)
