"""Dynamic vs static indexing, and re-indexing variants, on the same data, seeds and LLM step budget.

    python bench/dynamic.py --dataset ml100k --steps 600 --seeds 0 1 2 --variants static fresh sticky-m0.2
    python bench/dynamic.py --dataset ml100k --steps 600 --out ablation --reference fresh \
        --variants fresh static no-user-sid no-inst-grain no-dist-grain no-code-grain no-item2id ...

The research harness of issue 13 (docs/RESULTS.md, "Dynamic indexing"). Every variant of a seed shares
the data, embeddings, SASRec and tokenizer stages of the ``bench/quality.py`` run of that dataset, seed
and preset (``--reuse-from``; built here if missing), trains the LLM stage with ``llm.max_steps=--steps``
and the variant's overrides, and is scored on the validation split (selection) and the test split
(reported once), on the same seeded users (``eval.max_users`` of the preset). Everything runs in this
process on ``pipeline.LocalBackend``; a rerun reuses finished stages.

``--eval-users N|all`` evaluates more users than the preset (only the eval stage reruns); ``--sasrec-epochs E ...``
compares with SASRec trained for each epoch count, the count chosen per seed on validation (issue 13's
same-wall-budget comparator); ``--set KEY=VALUE ...`` overrides every run's config (checked before any work).
Run directories are named ``<dataset>-s<seed>-<variant>-<steps>`` (``--set`` does not enter the name, so an eval-only
override re-scores the stored runs); a variant whose directory already holds a run of other training settings is
refused before any work, naming the keys (``check_run_dir``), so a ``--set`` cannot replace a run that an earlier
results file points to: name a variant in ``VARIANTS`` for new settings.

``--merge FILE ...`` runs nothing: it combines the records of results files written per seed (``--seeds S --out
X-sS``, one process per seed to use every core) or by earlier studies into one table, for the ``--variants`` and
``--seeds`` named, reading each run's loss curve back from its run directory; ``--sasrec-from FILE`` takes the tuned
SASRec per seed of an earlier ``--sasrec-epochs`` study on the same users.

The second form is the component ablation (``ABLATIONS``: the full method with one part off, each against
the full method). Writes ``<results-dir>/<out>-<dataset>-<steps>.json`` and ``.md`` (``--out``, default
``dynamic``): per variant HR@1/5/10, NDCG@5/10 on valid and test as mean over seeds with a 95 % t-interval,
the ratio to the ``--reference`` variant (default static), the paired bootstrap over users of variant minus
reference and minus SASRec (test NDCG@10), the items whose ID changed per round and
the LLM loss jump at each round (mean of the 20 steps after minus the 20 steps before), and a PNG of the
loss curves of seed ``--seeds[0]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (bench/quality.py: datasets, presets, statistics)

import numpy as np  # noqa: E402

from ttds_ray.artifacts import Files, atomic_write_bytes, read_json, write_json  # noqa: E402
from ttds_ray.config import TaskWeights  # noqa: E402
from ttds_ray.errors import ConfigError  # noqa: E402

log = logging.getLogger("dynamic")

_STRONG_GUIDANCE = ["dynamic.guide_samples=2048", "dynamic.tokenizer_epochs=5", "dynamic.gamma_kl=1.0",
                    "dynamic.gamma_nce=1.0"]
#: configs/scientific_tiny.yaml's settings other than its rounds (grain off, d=256, erased SASRec inputs, per-prefix
#: training user IDs, current user IDs at test).
_SCI_CONFIG = ["llm.sid_init=codebook", "tokenizer.alpha_dist=0", "llm.tiny_hidden=256",
               "tokenizer.cf_erase_popularity=true", "eval.user_ids=history", "tasks.seqrec_user_ids=prefix"]
#: Variants that only some datasets' configs accept: ``keep_levels=3`` needs 4-level item IDs (configs/beauty_tiny.yaml);
#: on another dataset the variant's config is refused before any run (the error names ``dynamic.keep_levels``).
ONLY_ON = {"sticky-cb-keep3": ("beauty",)}
#: Applied before every variant's overrides, so that a variant means the same whatever a config's own choice is
#: (configs/scientific_tiny.yaml gates its rounds, ``dynamic.accept: llm``; the variants name the gate when they use it).
VARIANT_BASE = ["dynamic.accept=all"]
#: Variants as overrides of the TTDS config of the quality preset.
VARIANTS = {
    "static": ["dynamic.static_index=true"],
    "fresh": [],                                                   # the default re-indexing
    # DESIGN §1.4's title init of the semantic-ID rows, whatever the config's llm.sid_init
    "static-title": ["dynamic.static_index=true", "llm.sid_init=title"],
    "fresh-title": ["llm.sid_init=title"],
    "sticky": ["dynamic.reindex=sticky"],
    "sticky-m0.2": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.2"],
    "sticky-m0.5": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.5"],
    "sticky-cap0.05": ["dynamic.reindex=sticky", "dynamic.max_changed=0.05"],
    "sticky-m0.2-r4": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.2", "dynamic.rounds=4"],
    "fresh-lr1e-5": ["dynamic.tokenizer_lr=1e-5"],
    # one round only, early (after a third of the budget), when a round did the least damage
    "sticky-m0.2-early1": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.2", "dynamic.rounds=1",
                           "dynamic.final_freeze=0.67"],
    "fresh-early1": ["dynamic.rounds=1", "dynamic.final_freeze=0.67"],
    # semantic-ID token rows start from the towers' code vectors (llm.sid_init=codebook), not from titles
    "static-cb": ["dynamic.static_index=true", "llm.sid_init=codebook"],
    "fresh-cb": ["llm.sid_init=codebook"],
    "sticky-m0.2-early1-cb": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.2", "dynamic.rounds=1",
                              "dynamic.final_freeze=0.67", "llm.sid_init=codebook"],
    # plain rounds followed by N steps (of the same budget) that train only the moved items' new IDs
    # (dynamic.rewarm_steps): issue 13's "re-warm moved items" direction
    **{f"fresh-cb-rw{n}": ["llm.sid_init=codebook", f"dynamic.rewarm_steps={n}"] for n in (30, 60)},
    # the LLM pulled toward the item tower's latents at every step (llm.align_psa, ETEGRec's generator-side PSA),
    # on the static index and with plain rounds
    **{f"static-cb-psa{w}": ["dynamic.static_index=true", "llm.sid_init=codebook", f"llm.align_psa={w}"]
       for w in (0.1, 0.01)},
    **{f"fresh-cb-psa{w}": ["llm.sid_init=codebook", f"llm.align_psa={w}"] for w in (0.1, 0.01)},
    # deeper levels only: every item keeps its first N codes in a round, the deeper codes follow the refined tower
    # (dynamic.keep_levels; sticky re-indexing with no margin and no cap otherwise): issue 13's "deeper levels first"
    **{f"sticky-cb-keep{n}": ["llm.sid_init=codebook", "dynamic.reindex=sticky", f"dynamic.keep_levels={n}"]
       for n in (1, 2, 3)},
    "sticky-cb-keep2-m0.2": ["llm.sid_init=codebook", "dynamic.reindex=sticky", "dynamic.keep_levels=2",
                             "dynamic.switch_margin=0.2"],
    # the item ID token rows a learned map of the tower's code vectors through training, re-mapped after each round
    # (llm.sid_tie): issue 13's "tie the semantic-ID token embeddings to the codebook vectors"
    "static-cb-tie": ["dynamic.static_index=true", "llm.sid_init=codebook", "llm.sid_tie=true"],
    "fresh-cb-tie": ["llm.sid_init=codebook", "llm.sid_tie=true"],
    "sticky-cb-keep2-tie": ["llm.sid_init=codebook", "llm.sid_tie=true", "dynamic.reindex=sticky",
                            "dynamic.keep_levels=2"],
    # likelihood-gated rounds: a proposed move is made only where the frozen LLM prefers the new ID (dynamic.accept=llm)
    "fresh-cb-llm": ["llm.sid_init=codebook", "dynamic.accept=llm"],
    "fresh-cb-llm-r4": ["llm.sid_init=codebook", "dynamic.accept=llm", "dynamic.rounds=4"],
    # only the items the round's guidance prompts target may move (dynamic.accept=guided); 2,048 prompts target
    # about half of MovieLens-100K's items (bench/drift.py: the other moves are the tower's own drift)
    "fresh-cb-guided": ["llm.sid_init=codebook", "dynamic.accept=guided"],
    "fresh-cb-guided-2048": ["llm.sid_init=codebook", "dynamic.accept=guided", "dynamic.guide_samples=2048"],
    # without the DM-VAE's distribution grain (tokenizer.alpha_dist=0), which the ablation's validation rows favour
    "static-cb-no-dist": ["dynamic.static_index=true", "llm.sid_init=codebook", "tokenizer.alpha_dist=0"],
    "fresh-cb-llm-no-dist": ["llm.sid_init=codebook", "dynamic.accept=llm", "tokenizer.alpha_dist=0"],
    "static-cb-no-dist-w256": ["dynamic.static_index=true", "llm.sid_init=codebook", "tokenizer.alpha_dist=0",
                               "llm.tiny_hidden=256"],                 # ... with the tiny LLM twice as wide
    # the gated rounds of configs/scientific_tiny.yaml (grain off, d=256)
    "fresh-cb-llm-no-dist-w256": ["llm.sid_init=codebook", "dynamic.accept=llm", "tokenizer.alpha_dist=0",
                                  "llm.tiny_hidden=256"],
    # the LLM's peak learning rate (llm.lr, default 1e-3) on the static index: issue 13's "lr schedule" direction
    **{f"static-cb-lr{lr}": ["dynamic.static_index=true", "llm.sid_init=codebook", f"llm.lr={lr}"]
       for lr in ("5e-4", "2e-3", "4e-3")},
    # the items' SASRec inputs to the towers without their popularity direction (tokenizer.cf_erase_popularity)
    "static-cb-erase": ["dynamic.static_index=true", "llm.sid_init=codebook", "tokenizer.cf_erase_popularity=true"],
    "fresh-cb-llm-erase": ["llm.sid_init=codebook", "dynamic.accept=llm", "tokenizer.cf_erase_popularity=true"],
    "fresh-cb-llm-no-dist-w256-erase": ["llm.sid_init=codebook", "dynamic.accept=llm", "tokenizer.alpha_dist=0",
                                        "llm.tiny_hidden=256", "tokenizer.cf_erase_popularity=true"],
    # SASRec's next-item distribution, summed onto the semantic-ID trie, as soft targets of the seqrec items
    # (llm.distill_cf = lambda: (1 - lambda) * one-hot + lambda * teacher; docs/DESIGN-NOTES.md)
    **{f"static-cb-kd{lam}": ["dynamic.static_index=true", "llm.sid_init=codebook", f"llm.distill_cf={lam}"]
       for lam in ("0.5", "0.8", "0.95")},
    # ... with re-indexing rounds: the teacher is index-free, so its targets follow the items to their new IDs
    "fresh-cb-kd0.8": ["llm.sid_init=codebook", "llm.distill_cf=0.8"],
    "fresh-cb-llm-kd0.8": ["llm.sid_init=codebook", "dynamic.accept=llm", "llm.distill_cf=0.8"],
    "static-cb-kd0.8-t2": ["dynamic.static_index=true", "llm.sid_init=codebook", "llm.distill_cf=0.8",
                           "llm.distill_temperature=2"],
    "static-cb-erase-kd0.5": ["dynamic.static_index=true", "llm.sid_init=codebook", "tokenizer.cf_erase_popularity=true",
                              "llm.distill_cf=0.5"],
    # ... on configs/scientific_tiny.yaml's settings (gated rounds, grain off, d=256, erased SASRec inputs)
    **{f"fresh-cb-llm-no-dist-w256-erase-kd{lam}": ["llm.sid_init=codebook", "dynamic.accept=llm",
                                                    "tokenizer.alpha_dist=0", "llm.tiny_hidden=256",
                                                    "tokenizer.cf_erase_popularity=true", f"llm.distill_cf={lam}"]
       for lam in ("0.5", "0.8")},
    # current user IDs at test time (eval.user_ids=history), with seqrec prompts trained on the stored IDs or on the
    # ID of the items before a cut, loss from the cut on (tasks.seqrec_user_ids=prefix: no target in its prompt's ID)
    "static-cb-uid": ["dynamic.static_index=true", "llm.sid_init=codebook", "eval.user_ids=history"],
    "static-cb-prefix": ["dynamic.static_index=true", "llm.sid_init=codebook", "eval.user_ids=history",
                         "tasks.seqrec_user_ids=prefix"],
    **{f"fresh-cb-llm-no-dist-w256-erase-{v}": ["llm.sid_init=codebook", "dynamic.accept=llm", "tokenizer.alpha_dist=0",
                                                "llm.tiny_hidden=256", "tokenizer.cf_erase_popularity=true",
                                                "eval.user_ids=history", *extra]
       for v, extra in (("uid", []), ("prefix", ["tasks.seqrec_user_ids=prefix"]),
                        ("prefix-kd0.8", ["tasks.seqrec_user_ids=prefix", "llm.distill_cf=0.8"]))},
    # configs/scientific_tiny.yaml's settings (its gated rounds are the -prefix variant above) with the index kept
    # fixed, and with plain (ungated) rounds: goal 1's arms at the final config
    "static-cb-no-dist-w256-erase-prefix": ["dynamic.static_index=true", *_SCI_CONFIG],
    "fresh-cb-no-dist-w256-erase-prefix": [*_SCI_CONFIG],
    # ... at twice the config's LLM epochs (12; with --steps 6000, 5,172 steps), where a static index may overfit
    # (on MovieLens-100K plain rounds led it there): does validation choose the longer run, and rounds in it?
    "static-cb-no-dist-w256-erase-prefix-e12": ["dynamic.static_index=true", *_SCI_CONFIG, "llm.epochs=12"],
    "fresh-cb-no-dist-w256-erase-prefix-e12": [*_SCI_CONFIG, "llm.epochs=12"],
    "fresh-cb-llm-no-dist-w256-erase-prefix-e12": ["dynamic.accept=llm", *_SCI_CONFIG, "llm.epochs=12"],
    # configs/beauty_tiny.yaml's settings (gated rounds, d=256, current user IDs at test) with the items' SASRec inputs
    # erased of their popularity direction: the three seeds of its own setting that the erasure still lacked there
    "fresh-cb-llm-w256-erase-uid": ["llm.sid_init=codebook", "dynamic.accept=llm", "llm.tiny_hidden=256",
                                    "tokenizer.cf_erase_popularity=true", "eval.user_ids=history"],
    "static-cb-w256-erase-uid": ["dynamic.static_index=true", "llm.sid_init=codebook", "llm.tiny_hidden=256",
                                 "tokenizer.cf_erase_popularity=true", "eval.user_ids=history"],   # ... its static arm
    # ... at twice its LLM epochs (4; with --steps 4800, 4,800 steps), the question Scientific's -e12 arms asked: does
    # the static index overfit Beauty at 2x, and do rounds (plain or gated) undo it?
    **{f"{arm}-w256-erase-uid-e4": [*pre, "llm.sid_init=codebook", "llm.tiny_hidden=256",
                                    "tokenizer.cf_erase_popularity=true", "eval.user_ids=history", "llm.epochs=4"]
       for arm, pre in (("static-cb", ["dynamic.static_index=true"]), ("fresh-cb", []),
                        ("fresh-cb-llm", ["dynamic.accept=llm"]))},
    # ... and the IDs proposed by the frozen LLM's own likelihood, not by the refined tower (dynamic.reindex=llm)
    "llmid-cb": ["llm.sid_init=codebook", "dynamic.reindex=llm", "dynamic.accept=llm"],
    # the LLM's guidance at 10x the preset's strength: 8x the scored prompts, 2.5x the tower epochs, 10x the weights
    "fresh-cb-g10": ["llm.sid_init=codebook", *_STRONG_GUIDANCE],
    "sticky-m0.2-early1-cb-g10": ["dynamic.reindex=sticky", "dynamic.switch_margin=0.2", "dynamic.rounds=1",
                                  "dynamic.final_freeze=0.67", "llm.sid_init=codebook", *_STRONG_GUIDANCE],
}
#: The component ablation of issue 13: the default TTDS config ('fresh', the full method) with one part off;
#: 'static' is the dynamic-off row. Run with ``--out ablation --reference fresh``.
_TASKS_OFF = [t for t in TaskWeights.model_fields if t != "seqrec"]   # seqrec is the task that is evaluated
ABLATIONS = {
    "no-user-sid": ["tasks.use_user_sid=false"],        # user IDs out of every prompt, and the tasks that need them
    **{f"no-{g}-grain": [f"tokenizer.alpha_{g}=0"] for g in ("inst", "dist", "code")},      # DM-VAE grains
    **{f"no-{t}": [f"tasks.weights.{t}=0"] for t in _TASKS_OFF},
    "no-aux-tasks": [f"tasks.weights.{t}=0" for t in _TASKS_OFF],   # seqrec alone: do the seven help together?
}
VARIANTS.update(ABLATIONS)
WINDOW = 20          # steps either side of a round for the loss jump


def loss_jumps(losses: list[float], rounds: list[dict], window: int = WINDOW) -> list[float]:
    """Per round: mean LLM loss of the ``window`` ordinary steps after the round (after its re-warming steps,
    ``dynamic.rewarm_steps``, whose loss is on the moved items only) minus the ``window`` steps before.

    Args:
        losses: loss per optimiser step (nats/token), step s at index s-1.
        rounds: the LLM stage's ``rounds.json`` (each with ``step``: steps done when the round ran, and
            ``rewarm_steps`` when it re-warmed).
    """
    out = []
    for r in rounds:
        s, rw = int(r["step"]), int(r.get("rewarm_steps", 0))
        before, after = losses[max(0, s - window):s], losses[s + rw:s + rw + window]
        out.append(float(np.mean(after) - np.mean(before)) if before and after else float("nan"))
    return out


def excess_loss(rec: dict, static: dict, window: int = WINDOW) -> list[float]:
    """Per round of ``rec``: its mean loss over the ``window`` steps after the round minus the static run's over
    the same steps (same seed, same sample order, so before the first round the two curves are identical);
    the damage a round does, free of the downward trend that :func:`loss_jumps` includes. After a round that
    re-warmed for ``rw`` steps, ``rec``'s ordinary steps from ``s + rw`` on train the batches the static run
    trained from ``s`` on, so those are compared (same batches, ``rw`` more updates in ``rec``)."""
    a, b = rec["losses"], static["losses"]
    rws = rec.get("rewarm_steps") or [0] * len(rec["round_steps"])
    return [float(np.mean(a[s + rw:s + rw + window]) - np.mean(b[s:s + window]))
            for s, rw in zip(rec["round_steps"], rws) if s + rw + window <= len(a) and s + window <= len(b)]


def quality_run(dataset: str, seed: int, *, preset: str, runs_dir: Path, data_root: Path):
    """``(config file, common overrides, config of bench/quality.py's TTDS run)`` of a dataset and seed: the run
    whose data, embeddings, SASRec and tokenizer stages every variant and SASRec-budget run reuses."""
    from ttds_ray.config import load_config

    ds, pre = Q.DATASETS[dataset], Q.PRESETS[preset]
    common = [f"seed={seed}", f"data.path={ds.data_path(data_root)}", *pre.overrides(dataset)]
    base = load_config(Q.REPO / ds.config, [*common, f"output_dir={runs_dir / f'quality-{preset}'}",
                                            f"name={dataset}-s{seed}-ttds"])
    return Q.REPO / ds.config, common, base


def _flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested config dict: ``{"llm.lr": 1e-3, ...}``."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_run_dir(cfg) -> None:
    """Refuse to train into a variant's run directory that already holds a run of other settings.

    Run names are ``<dataset>-s<seed>-<variant>-<steps>``; ``--set`` does not enter them (so that an eval-only
    override re-scores the stored LLM runs). A ``--set`` that changes a training setting would otherwise retrain in
    place and silently replace the run an earlier results file points to. Settings of the eval stage only may
    differ (the eval stage reruns).

    Raises:
        RuntimeError: the directory's ``config.yaml`` differs from ``cfg`` before the eval stage; the message names
            the differing keys.
    """
    from ttds_ray.config import STAGE_SECTIONS, STAGE_SECTIONS_ORDER, load_config

    path = Path(cfg.run_dir) / Files.CONFIG
    if not path.exists():
        return
    old = load_config(path)
    if old.stage_hash("llm") == cfg.stage_hash("llm"):
        return
    hashed = {"seed", *(sec for group in STAGE_SECTIONS[:STAGE_SECTIONS_ORDER.index("llm") + 1] for sec in group)}
    a, b = _flat(old.to_dict()), _flat(cfg.to_dict())
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k.split(".")[0] in hashed)
    raise RuntimeError(f"{cfg.run_dir} holds a run of other settings ({', '.join(keys) or 'stage hash'} differ) "
                       "that an earlier results file may point to; name a variant in VARIANTS for these settings, "
                       "pass another --runs-dir, or delete that directory")


def variant_configs(dataset: str, seed: int, variant: str, steps: int, *, preset: str, runs_dir: Path,
                    data_root: Path, extra: tuple[str, ...] = ()):
    """``(config of the shared quality run, config of the variant's run)``; reads nothing but the config files."""
    from ttds_ray.config import load_config

    config_file, common, base_cfg = quality_run(dataset, seed, preset=preset, runs_dir=runs_dir, data_root=data_root)
    cfg = load_config(config_file, [*common, f"output_dir={runs_dir / 'dynamic'}",
                                    f"name={dataset}-s{seed}-{variant}-{steps}", f"llm.max_steps={steps}",
                                    *VARIANT_BASE, *VARIANTS[variant], *extra])
    return base_cfg, cfg


def run_variant(dataset: str, seed: int, variant: str, steps: int, *, preset: str, runs_dir: Path,
                data_root: Path, extra: tuple[str, ...] = ()) -> dict:
    """Train and score one variant; returns metrics on valid and test, per-user test ranks, churn, losses.
    ``extra``: overrides after the preset's and the variant's (``--eval-users``)."""
    from ttds_ray import baselines, pipeline
    from ttds_ray.artifacts import RunDir
    from ttds_ray.evaluate import evaluate_split

    base_cfg, cfg = variant_configs(dataset, seed, variant, steps, preset=preset, runs_dir=runs_dir,
                                    data_root=data_root, extra=extra)
    check_run_dir(cfg)
    backend = pipeline.LocalBackend()
    pipeline.run(base_cfg, backend, stop_after="tokenizer")          # reused when bench/quality.py built it
    pipeline.run(cfg, backend, reuse_from=base_cfg.run_dir)
    run = RunDir(cfg.run_dir)
    test = read_json(run.require("eval") / Files.METRICS)
    # where `ttds-ray evaluate RUN --split valid` writes; reused while the eval stage's hash is the same
    valid_path = run.root / Files.split_metrics("valid", test["n_users_evaluated"])
    if valid_path.exists() and read_json(valid_path).get("config_hash") == cfg.stage_hash("eval"):
        valid = read_json(valid_path)
    else:
        valid, *_ = evaluate_split(cfg, run, "valid", progress=False)
        valid["config_hash"] = cfg.stage_hash("eval")
        write_json(valid_path, valid)
    users, ranks = baselines.ttds_ranks(run)
    scored = baselines.score_baseline_ranks(cfg, run)
    if not np.array_equal(users, scored["user_idx"]):
        raise RuntimeError(f"{cfg.name}: TTDS and SASRec were evaluated on different users")
    llm_dir = run.require("llm")
    losses = read_json(llm_dir / "losses.json")
    rounds = read_json(llm_dir / "rounds.json") if (llm_dir / "rounds.json").exists() else []
    walls = Q._stage_walls(run, ("llm", "eval"))
    return {"dataset": dataset, "seed": seed, "variant": variant, "steps": steps, "run_dir": str(run.root),
            "test": test["models"]["TTDS"], "valid": valid["models"]["TTDS"],
            "sasrec_test": test["models"]["SASRec"], "sasrec_valid": valid["models"]["SASRec"],
            "ranks": np.asarray(ranks).tolist(), "sasrec_ranks": np.asarray(scored["SASRec"]).tolist(),
            "users": np.asarray(users).tolist(),
            "changed_per_round": [r["changed"] for r in rounds],
            "changed_per_level": [r.get("changed_per_level") for r in rounds],
            "round_steps": [r["step"] for r in rounds], "loss_jumps": loss_jumps(losses, rounds),
            "rewarm_steps": [int(r.get("rewarm_steps", 0)) for r in rounds],
            "final_loss": float(np.mean(losses[-WINDOW:])), "losses": losses, "wall_s": walls,
            "n_items": test["n_items"], "n_users_evaluated": test["n_users_evaluated"]}


def sasrec_budget(dataset: str, seed: int, epochs: list[int], *, preset: str, runs_dir: Path, data_root: Path,
                  extra: tuple[str, ...] = ()) -> dict:
    """SASRec given more training (``cf.epochs`` in ``epochs``), the epoch count chosen on the validation split
    (NDCG@10, first best): the comparator of issue 13's goal 2 when TTDS's stages take longer than the preset's
    SASRec. Each count is its own run (data and embeddings reused from the quality run), scored on the same
    seeded users as the variants. Returns ``{"epochs", "per_epochs", "valid", "test", "users", "ranks",
    "wall_s"}``: the chosen run's metrics, users, test ranks and cf-stage wall, and every count's valid
    NDCG@10 and wall."""
    from ttds_ray import baselines, metrics, pipeline
    from ttds_ray.artifacts import RunDir
    from ttds_ray.config import load_config

    config_file, common, base = quality_run(dataset, seed, preset=preset, runs_dir=runs_dir, data_root=data_root)
    tried = []
    for e in epochs:
        cfg = load_config(config_file, [*common, *extra, f"output_dir={runs_dir / 'sasrec-budget'}",
                                        f"name={dataset}-s{seed}-cf{e}", f"cf.epochs={e}"])
        pipeline.run(cfg, pipeline.LocalBackend(), stop_after="cf", reuse_from=base.run_dir)
        run = RunDir(cfg.run_dir)
        ranks = {split: baselines.score_baseline_ranks(cfg, run, split) for split in ("valid", "test")}
        m = {split: metrics.hr_ndcg(r["SASRec"], cfg.eval.ks) for split, r in ranks.items()}
        tried.append({"epochs": e, "valid": m["valid"], "test": m["test"], "users": ranks["test"]["user_idx"],
                      "ranks": ranks["test"]["SASRec"], "wall_s": run.manifest("cf").get("wall_s")})
    best = max(tried, key=lambda t: t["valid"]["NDCG@10"])          # max keeps the first of equals
    return {"epochs": best["epochs"], "valid": best["valid"], "test": best["test"], "users": best["users"],
            "ranks": np.asarray(best["ranks"]).tolist(), "wall_s": best["wall_s"],
            "per_epochs": {t["epochs"]: {"valid_ndcg@10": t["valid"]["NDCG@10"], "wall_s": t["wall_s"]}
                           for t in tried}}


def use_sasrec(record: dict, tuned: dict) -> dict:
    """``record`` with its SASRec fields (metrics and per-user test ranks) replaced by ``tuned``'s
    (:func:`sasrec_budget`), after checking that both ranked the same users.

    Raises:
        RuntimeError: the two were evaluated on different users.
    """
    if list(map(int, tuned["users"])) != list(map(int, record["users"])):
        raise RuntimeError(f"{record['variant']} seed {record['seed']}: SASRec-budget runs ranked other users")
    return {**record, "sasrec_test": tuned["test"], "sasrec_valid": tuned["valid"], "sasrec_ranks": tuned["ranks"],
            "sasrec_epochs": tuned["epochs"]}


def summarise(records: list[dict], variants: list[str], n_resamples: int = 1000, reference: str = "static") -> dict:
    """Per variant: mean [t-interval] over seeds of every metric on valid and test, ratio to ``reference``
    (a variant: 'static' for the re-indexing study, 'fresh', the full method, for the ablation), and paired
    bootstraps (test NDCG@10) against ``reference`` and SASRec on the seeds both have. Keys name the
    reference: ``vs_<reference>``, ``ratio_<reference>``, ``excess_loss_vs_<reference>``."""
    by = {v: sorted((r for r in records if r["variant"] == v), key=lambda r: r["seed"]) for v in variants}
    out = {}
    for v, recs in by.items():
        if not recs:
            continue
        row = {"seeds": [r["seed"] for r in recs]}
        for split in ("valid", "test"):
            row[split] = {m: dict(zip(("mean", "low", "high"), Q.t_interval([r[split][m] for r in recs])))
                          for m in Q.METRICS}
        row["sasrec_test"] = {m: Q.t_interval([r["sasrec_test"][m] for r in recs])[0] for m in Q.METRICS}
        row["changed_per_round"] = [r["changed_per_round"] for r in recs]
        row["loss_jumps"] = [r["loss_jumps"] for r in recs]
        ref = {r["seed"]: r for r in by.get(reference, [])}
        row[f"excess_loss_vs_{reference}"] = [excess_loss(r, ref[r["seed"]]) for r in recs if r["seed"] in ref
                                              and r is not ref[r["seed"]] and "losses" in r]
        row["final_loss"] = Q.t_interval([r["final_loss"] for r in recs])[0]
        row["llm_wall_s"] = float(np.mean([r["wall_s"].get("llm", 0.0) for r in recs]))
        for other, key in ((reference, "ranks"), ("SASRec", "sasrec_ranks")):
            mates = ref if other == reference else {r["seed"]: r for r in recs}
            pairs = [(r, mates[r["seed"]]) for r in recs if r["seed"] in mates]
            if not pairs or (other == reference and v == reference):
                continue
            a = [Q.per_user(r["ranks"], "NDCG@10") for r, _ in pairs]
            b = [Q.per_user(o[key], "NDCG@10") for _, o in pairs]
            row[f"vs_{other}"] = Q.paired_bootstrap(a, b, n_resamples=n_resamples)
            mean_o = np.mean([x.mean() for x in b])
            row[f"ratio_{other}"] = float(np.mean([x.mean() for x in a]) / mean_o) if mean_o > 0 else None
        out[v] = row
    return out


def render(summary: dict, meta: dict) -> str:
    ref = meta.get("reference", "static")
    title = (f"Component ablation (reference: {ref})" if set(summary) & set(ABLATIONS)
             else f"Dynamic indexing variants (reference: {ref})")
    lines = [f"# {title}: {meta['dataset']}, {meta['steps']} LLM steps", "",
             f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`. Preset `{meta['preset']}` "
             f"({', '.join(meta['overrides'])}) with `llm.max_steps={meta['steps']}`; {meta['n_items']} items, "
             f"{meta['n_users']} users evaluated per seed on each split. Cells: mean over seeds "
             "[95 % t-interval]. Select on valid; test is reported once per configuration.", ""]
    if isinstance(meta.get("sasrec"), dict):
        chosen = "; ".join(f"seed {s}: {t['epochs']} epochs ({t['wall_s']:.0f} s)" for s, t in meta["sasrec"].items())
        tried = sorted({int(e) for t in meta["sasrec"].values() for e in t["per_epochs"]})
        lines += [f"SASRec: `cf.epochs` chosen per seed on validation NDCG@10 from {tried}: {chosen}.", ""]
    for split in ("valid", "test"):
        lines += [f"## {split}", "", "| variant | seeds | " + " | ".join(Q.METRICS) + " |",
                  "|---|---|" + "---|" * len(Q.METRICS)]
        for v, row in summary.items():
            cells = [Q._cell(row[split][m]) for m in Q.METRICS]
            lines.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## Test NDCG@10 against {ref} and SASRec (paired bootstrap over users, stratified by seed)", "",
              f"| variant | / {ref} | − {ref} [95 %] | P(Δ≤0) | / SASRec | − SASRec [95 %] | items changed per round "
              f"(per seed) | loss jump per round (nats) | loss − {ref}'s after each round (nats) | final loss | "
              "LLM stage s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, row in summary.items():
        def cmp(other):
            b = row.get(f"vs_{other}")
            if b is None:
                return ["–", "–", "–"]
            return [Q._fmt_ratio(row.get(f"ratio_{other}")), f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]",
                    f"{b['p_le_0']:.3f}"]
        st, sa = cmp(ref), cmp("SASRec")
        def per_seed(lists, fmt):
            return "; ".join(", ".join(fmt(x) for x in xs) for xs in lists) if any(lists) else "–"
        jumps = per_seed(row["loss_jumps"], lambda j: f"{j:+.2f}")
        excess = per_seed(row.get(f"excess_loss_vs_{ref}", []), lambda j: f"{j:+.2f}")
        churn = per_seed(row["changed_per_round"], str)
        lines.append(f"| {v} | {st[0]} | {st[1]} | {st[2]} | {sa[0]} | {sa[1]} | {churn} | {jumps} | {excess} | "
                     f"{row['final_loss']:.3f} | {row['llm_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_losses(records: list[dict], seed: int, path: Path) -> None:
    """LLM loss per step (moving mean of 10) of every variant of ``seed``, rounds marked."""
    from ttds_ray.plots import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in (r for r in records if r["seed"] == seed):
        x = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
        line, = ax.plot(np.arange(10, 10 + len(x)), x, label=r["variant"], lw=1)
        for s in r["round_steps"]:
            ax.axvline(s, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("LLM loss (nats/token, mean of 10)")
    ax.set_title(f"{records[0]['dataset']} seed {seed}: loss per step, re-index rounds dotted")
    ax.legend()
    _save(fig, path)


def merge_records(files: list[Path], variants: list[str], seeds: list[int], *, dataset: str, steps: int,
                  sasrec_from: Path | None = None) -> tuple[list[dict], dict]:
    """The records of ``variants`` x ``seeds`` gathered from earlier results files (``<out>-<dataset>-<steps>.json``),
    each with its loss curve read back from ``<run_dir>/llm/losses.json`` where that still exists (else the loss
    above the reference is left out), and with the tuned SASRec per seed of ``sasrec_from``
    (:func:`use_sasrec`, which checks the users). Returns ``(records, meta)``: ``meta`` is the first file's, with
    ``sasrec`` taken from ``sasrec_from``'s where given.

    Raises:
        ValueError: a file is missing or not a results file, is of another dataset, holds a record of another
            step budget or a (variant, seed) another file also holds, a variant or seed has no record, the
            variants of a seed were scored on different users, or ``sasrec_from`` lacks a seed; each message
            names the file, variant or seed.
        RuntimeError: the tuned SASRec ranked other users (:func:`use_sasrec`).
    """
    def load(path: Path) -> dict:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable results file ({e})") from None
        keys = {"variant", "seed", "steps", "users", "ranks", "run_dir"}
        if (not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict)
                or not isinstance(doc.get("records"), list)
                or not all(isinstance(r, dict) and keys <= r.keys() for r in doc["records"])):
            raise ValueError(f"{path}: not a bench/dynamic.py results file (no 'meta' and 'records' with "
                             f"{', '.join(sorted(keys))})")
        if doc["meta"].get("dataset") != dataset:
            raise ValueError(f"{path}: a {doc['meta'].get('dataset')} study, not {dataset}")
        return doc

    docs = [load(f) for f in files]
    found: dict[tuple[str, int], Path] = {}
    records = []
    for f, doc in zip(files, docs):
        for r in doc["records"]:
            if r["variant"] not in variants or r["seed"] not in seeds:
                continue
            key = (r["variant"], r["seed"])
            if key in found:
                raise ValueError(f"{r['variant']} seed {r['seed']} is in both {found[key]} and {f}")
            if r["steps"] != steps:
                raise ValueError(f"{f}: {r['variant']} seed {r['seed']} ran {r['steps']} steps, not {steps}")
            found[key] = f
            r = dict(r)
            losses = Path(r["run_dir"]) / "llm" / "losses.json"
            if losses.exists():
                r["losses"] = read_json(losses)
            records.append(r)
    missing = [f"{v} seed {s}" for v in variants for s in seeds if (v, s) not in found]
    if missing:
        raise ValueError(f"no record of {', '.join(missing)} in {', '.join(map(str, files))}")
    for s in seeds:                                  # the paired comparisons need one user list per seed
        lists = {(r["variant"], tuple(map(int, r["users"]))) for r in records if r["seed"] == s}
        if len({users for _, users in lists}) > 1:
            raise ValueError(f"seed {s}: the variants were scored on different users "
                             f"({', '.join(sorted(f'{v}: {len(u)}' for v, u in lists))})")
    meta = dict(docs[0]["meta"])
    if sasrec_from is not None:
        src = load(sasrec_from)
        tuned = {}
        for r in src["records"]:
            if "sasrec_epochs" in r and r["seed"] in seeds:
                tuned.setdefault(r["seed"], {"users": r["users"], "test": r["sasrec_test"], "valid": r["sasrec_valid"],
                                             "ranks": r["sasrec_ranks"], "epochs": r["sasrec_epochs"]})
        lacking = [s for s in seeds if s not in tuned]
        if lacking:
            raise ValueError(f"{sasrec_from}: no tuned SASRec (a --sasrec-epochs study) for seeds {lacking}")
        records = [use_sasrec(r, tuned[r["seed"]]) for r in records]
        meta["sasrec"] = ({str(s): t for s, t in src["meta"]["sasrec"].items() if int(s) in seeds}
                          if isinstance(src["meta"].get("sasrec"), dict) else f"tuned per seed, from {sasrec_from}")
    return records, meta


def write_results(stem: Path, records: list[dict], variants: list[str], reference: str, meta: dict,
                  plot_seed: int) -> str:
    """Write ``stem``.json (meta, summary, records without their loss curves) and ``stem``.md atomically, and the
    loss curves of ``plot_seed`` to ``stem``-loss.png; returns the markdown table."""
    summary = summarise(records, variants, reference=reference)
    slim = [{k: v for k, v in r.items() if k != "losses"} for r in records]
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(
        {"meta": meta, "summary": summary, "records": slim}, indent=1, default=Q._json_default).encode())
    md = render(summary, meta)
    atomic_write_bytes(stem.with_suffix(".md"), md.encode())
    if any("losses" in r for r in records):
        plot_losses([r for r in records if "losses" in r], plot_seed, stem.parent / f"{stem.name}-loss.png")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml100k", choices=sorted(Q.DATASETS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--preset", default="cpu-fast", choices=sorted(Q.PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["static", "fresh", "sticky-m0.2"], choices=list(VARIANTS))
    p.add_argument("--reference", default="static", choices=list(VARIANTS),
                   help="the variant the others are divided by and bootstrapped against (must be in --variants)")
    p.add_argument("--out", default="dynamic", help="results file stem: <results-dir>/<out>-<dataset>-<steps>")
    p.add_argument("--eval-users", default=None, help="users evaluated per split instead of the preset's "
                   "eval.max_users: a number, or 'all'; only the eval stage reruns (the LLM runs are reused)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run after the preset's and the variant's (e.g. "
                        "llm.sid_init=title to rerun a study measured before that default changed)")
    p.add_argument("--sasrec-epochs", nargs="+", type=int, default=None,
                   help="compare with SASRec trained for each of these cf.epochs, the count chosen per seed on "
                        "validation NDCG@10 (more SASRec training for a same-wall comparison), instead of the "
                        "preset's SASRec")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="FILE",
                   help="train nothing: combine the records of --variants x --seeds from these results files "
                        "(e.g. one per seed) into <results-dir>/<out>-<dataset>-<steps>")
    p.add_argument("--sasrec-from", type=Path, default=None, metavar="FILE",
                   help="with --merge: the tuned SASRec per seed of this earlier --sasrec-epochs results file")
    p.add_argument("--runs-dir", type=Path, default=Q.REPO / "runs",
                   help="parent folder: variant runs go to RUNS_DIR/dynamic, the shared stages to "
                        "RUNS_DIR/quality-<preset>, SASRec budgets to RUNS_DIR/sasrec-budget")
    p.add_argument("--results-dir", type=Path, default=Q.REPO / "results")
    p.add_argument("--data-root", type=Path, default=Q.REPO.parent / "shared" / "data",
                   help="folder holding amazon_scientific_lcrec, amazon_beauty_p5 (as bench/quality.py; ml100k "
                        "comes from the `ttds-ray data fetch` cache)")
    args = p.parse_args(argv)
    if args.reference not in args.variants:
        p.error(f"--reference {args.reference} must be one of --variants {args.variants}")
    if not args.out.replace("-", "").replace("_", "").isalnum():
        p.error(f"--out must be a plain name (letters, digits, - and _), got {args.out!r}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (a round needs steps before and after it), got {args.steps}")
    if args.sasrec_from is not None and args.merge is None:
        p.error("--sasrec-from goes with --merge (a new study tunes SASRec with --sasrec-epochs)")
    if args.merge is not None:
        clash = [flag for flag, on in (("--eval-users", args.eval_users is not None), ("--set", bool(args.set)),
                                       ("--sasrec-epochs", args.sasrec_epochs is not None)) if on]
        if clash:
            p.error(f"--merge trains and scores nothing, so {', '.join(clash)} would do nothing")
        try:
            records, meta = merge_records(args.merge, args.variants, args.seeds, dataset=args.dataset,
                                          steps=args.steps, sasrec_from=args.sasrec_from)
        except (ValueError, RuntimeError) as e:
            p.error(str(e))
        meta = {**meta, "date": time.strftime("%Y-%m-%d"), "reference": args.reference, "wall_s": None,
                "command": "python bench/dynamic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "merged_from": [str(f) for f in args.merge]}
        print(write_results(args.results_dir / f"{args.out}-{args.dataset}-{args.steps}", records, args.variants,
                            args.reference, meta, args.seeds[0]))
        return 0
    extra = ()
    if args.eval_users is not None:
        if not (args.eval_users == "all" or (args.eval_users.isdigit() and int(args.eval_users) > 0)):
            p.error(f"--eval-users must be a positive number or 'all', got {args.eval_users!r}")
        extra = (f"eval.max_users={'null' if args.eval_users == 'all' else args.eval_users}",)
    bad = [kv for kv in args.set if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        p.error(f"--set takes KEY=VALUE, got {bad}")
    extra = (*extra, *args.set)
    if args.set:                                     # a wrong key or value is an error before any run
        from ttds_ray.config import load_config
        try:
            load_config(Q.REPO / Q.DATASETS[args.dataset].config, list(extra))
        except ConfigError as e:                     # its message names the key
            p.error(f"--set: {e}")
    if args.sasrec_epochs is not None and min(args.sasrec_epochs) < 1:
        p.error(f"--sasrec-epochs must be positive, got {args.sasrec_epochs}")
    for seed in args.seeds:                          # before any run: no variant may retrain over another's run
        for v in args.variants:
            try:
                check_run_dir(variant_configs(args.dataset, seed, v, args.steps, preset=args.preset,
                                              runs_dir=args.runs_dir, data_root=args.data_root, extra=extra)[1])
            except (RuntimeError, ConfigError) as e:
                p.error(f"variant {v} on {args.dataset}: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0, records, tuned = time.time(), [], {}
    stem = args.results_dir / f"{args.out}-{args.dataset}-{args.steps}"
    for seed in args.seeds:                          # seed-major: a partial table after each seed has every variant
        for v in args.variants:
            log.info("=== %s seed %d %s (%d steps) ===", args.dataset, seed, v, args.steps)
            records.append(run_variant(args.dataset, seed, v, args.steps, preset=args.preset,
                                       runs_dir=args.runs_dir, data_root=args.data_root, extra=extra))
        if args.sasrec_epochs:
            tuned[seed] = sasrec_budget(args.dataset, seed, args.sasrec_epochs, preset=args.preset,
                                        runs_dir=args.runs_dir, data_root=args.data_root, extra=extra)
            records = [use_sasrec(r, tuned[r["seed"]]) if r["seed"] == seed else r for r in records]
        meta = {"dataset": args.dataset, "steps": args.steps, "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
                "machine": Q._machine(), "overrides": [*Q.PRESETS[args.preset].overrides(args.dataset), *extra],
                "command": "python bench/dynamic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "n_items": records[0]["n_items"], "n_users": records[0]["n_users_evaluated"],
                "reference": args.reference, "wall_s": round(time.time() - t0, 1),
                "sasrec": ({str(s): {k: t[k] for k in ("epochs", "wall_s", "per_epochs")} for s, t in tuned.items()}
                           if tuned else "the preset's cf stage")}
        md = write_results(stem, records, args.variants, args.reference, meta, args.seeds[0])
        log.info("=== seed %d done (%.0f s); wrote %s ===", seed, time.time() - t0, stem.with_suffix(".md"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
