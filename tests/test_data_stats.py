"""Tests for the k-core drop counts in the data stats, the missing-path hint, and the loss-term plot."""
import logging

import numpy as np
import pandas as pd
import pytest

from ttds_ray.config import DataConfig
from ttds_ray.data import DataError, RawData, normalize_interactions_batch, prepare, read_raw
from ttds_ray.plots import group_terms, plot_terms


def _raw(rows):
    """RawData from (user, item, timestamp) rows; input order = row order; every item titled."""
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(order=np.arange(len(rows)))
    ids = sorted({r[1] for r in rows})
    return RawData(normalize_interactions_batch(log),
                   pd.DataFrame({"item_id": ids, "title": ids, "text": [f"title: {i}" for i in ids]}))


# 13 interactions. 2-core, round 1: items D, E, F, G have one user each -> their 4 rows go, which
# leaves u4 with nothing and u3 with only A. Round 2: u3 has 1 interaction -> (u3, A) goes.
# Round 3: A (u1, u2), B and C (u1, u2, u5), u1/u2 (3 items), u5 (2 items) all pass -> stop.
# k-core toll: users u3, u4 (2), items D, E, F, G (4), interactions 4 + 1 = 5; 8 rows remain.
# Afterwards u5 (B, C) is too short for leave-one-out -> 1 short user, 2 users and 3 items kept.
_LOG = ([("u1", i, t) for t, i in enumerate("ABC")] + [("u2", i, t) for t, i in enumerate("ABC")]
        + [("u3", i, t) for t, i in enumerate("ADE")] + [("u4", "F", 0)]
        + [("u5", i, t) for t, i in enumerate("BCG")])


def test_kcore_reports_dropped_users_items_and_interactions(caplog):
    with caplog.at_level(logging.INFO, logger="ttds_ray"):
        prep = prepare(_raw(_LOG), kcore=2, seed=0)
    st = prep.stats
    assert (st["n_dropped_kcore_users"], st["n_dropped_kcore_items"], st["n_dropped_kcore_interactions"]) == (2, 4, 5)
    assert st["n_dropped_kcore"] == 5                 # the old key, still interactions
    assert st["n_dropped_short_users"] == 1
    assert (st["n_users"], st["n_items"], st["n_interactions"]) == (2, 3, 6)
    assert sorted(prep.sequences["user_id"]) == ["u1", "u2"]
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("ttds_ray") and r.levelno == logging.INFO]
    assert any("2-core filter dropped 2 users, 4 items and 5 interactions" in m for m in msgs), msgs


def test_kcore_off_drops_nothing():
    st = prepare(_raw(_LOG), kcore=0, seed=0).stats
    assert (st["n_dropped_kcore_users"], st["n_dropped_kcore_items"], st["n_dropped_kcore_interactions"]) == (0, 0, 0)
    assert st["n_dropped_kcore"] == 0


def _missing_message(path) -> str:
    with pytest.raises(DataError, match="does not exist") as e:
        read_raw(DataConfig(path=str(path)))
    return str(e.value)


def test_missing_path_hint_depends_on_the_dataset(tmp_path):
    amazon = _missing_message(tmp_path / "amazon_beauty_lcrec")
    movielens = _missing_message(tmp_path / "movielens-100k")
    assert amazon != movielens
    assert "data fetch" not in amazon
    assert "LC-Rec or RecBole layout" in amazon and "data.path" in amazon
    assert "ttds-ray data fetch movielens-100k" in movielens


def test_missing_cache_path_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("TTDS_DATA_CACHE", str(tmp_path))
    assert "ttds-ray data fetch movielens-100k" in _missing_message("cache:movielens-100k")
    unknown = _missing_message("cache:beauty")
    assert "cannot download 'beauty'" in unknown and "LC-Rec or RecBole layout" in unknown


# Term names as towers.tower_loss / fit_tower report them (alignment on), 6 epochs.
_TERMS = ([f"rec_{m}_{src}" for m in "sc" for src in ("fused", "from_s", "from_c", "quant")]
          + ["kl", "rq", "align_inst", "align_dist", "align_code", "loss", "dead_codes_reseeded"])


def test_plot_terms_draws_one_panel_per_group_with_own_legend(tmp_path):
    rng = np.random.default_rng(0)
    history = {n: list(rng.uniform(0.1, 2.0, 6)) for n in _TERMS}
    history["dead_codes_reseeded"] = [3.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    path = tmp_path / "item_losses.png"
    fig = plot_terms(history, path, title="item tower loss terms")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = group_terms(history)
    assert list(groups) == ["reconstruction", "alignment", "KL", "RQ (codebook + commitment)", "total",
                            "dead codes re-seeded"]
    assert len(fig.axes) == len(groups) > 1
    for ax, (group, names) in zip(fig.axes, groups.items()):
        assert ax.get_title() == group
        assert ax.get_legend() is not None
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == names
    assert len(groups["reconstruction"]) == 8 and groups["alignment"] == ["align_code", "align_dist", "align_inst"]
