"""The quality table: every system on each dataset, in one invocation, with intervals over seeds and users.

    ttds-ray data fetch movielens-100k
    python bench/quality.py --datasets ml100k scientific --preset cpu-fast --seeds 0 1 2

Systems (all on the same run directory per dataset and seed: the same prepared data, leave-one-out split,
item semantic IDs, evaluated users; full-catalogue ranking, beam ``eval.n_beams`` = 20, pessimistic ties):

- ``Popularity`` and ``SASRec``: scored by the eval stage of the TTDS run (``eval/metrics.json``);
- ``TIGER-style``: a small transformer trained from scratch on the item IDs of the tokenizer stage
  (``ttds_ray.baselines``), its epoch chosen on the validation split;
- ``LC-Rec-style``: the same LLM backbone, the static index, the seqrec task only, no user ID in the prompt;
- ``TTDS static``: all tasks, the static index (``dynamic.static_index=true``);
- ``TTDS``: the full method, dynamic indexing.

The three LLM systems share the data, embeddings, SASRec and tokenizer stages (``--reuse-from`` the TTDS run,
``pipeline.reuse_stages``); everything runs in this process on ``pipeline.LocalBackend`` (no Ray). A rerun
reuses every finished stage and the stored TIGER result, so an interrupted table resumes where it stopped.

Writes ``<results-dir>/quality-<preset>.json`` (per dataset, system and seed: metrics, users evaluated, wall
seconds, per-user ranks; the summary: mean over seeds with a 95 % t-interval, TTDS minus each other system
in NDCG@10 and HR@10 with a 95 % t-interval over seeds and a 95 % paired bootstrap interval over users, and
TTDS / best baseline) and ``quality-<preset>.md`` (the same as tables). Run directories go to
``<runs-dir>/quality-<preset>/`` (default ``runs/``).

Beauty and Yelp are read in the LETTER protocol's preparation, and the prepared statistics are checked
against the published ones (:data:`LETTER_STATS`) before anything is trained.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

from ttds_ray.artifacts import Files, atomic_write_bytes, read_json  # noqa: E402
from ttds_ray.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("quality")

#: Prepared statistics of the LETTER-protocol datasets (5-core, as published by S3-Rec/P5/TIGER/LETTER).
LETTER_STATS = {
    "beauty": {"n_users": 22363, "n_items": 12101, "n_interactions": 198502},
    "yelp": {"n_users": 30431, "n_items": 20033, "n_interactions": 316354},
}

#: Systems in table order; TTDS is compared with every other one.
SYSTEMS = ("Popularity", "SASRec", "TIGER-style", "LC-Rec-style", "TTDS static", "TTDS")
#: The baselines TTDS / best baseline is taken over (TTDS static is the ablation, not a baseline).
BASELINES = ("Popularity", "SASRec", "TIGER-style", "LC-Rec-style")
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
#: Metrics of the paired comparisons.
DIFF_METRICS = ("NDCG@10", "HR@10")


def _non_seqrec_off() -> list[str]:
    from ttds_ray.config import TaskWeights
    return [f"tasks.weights.{t}=0" for t in TaskWeights.model_fields if t != "seqrec"]


#: The LLM systems as overrides of the TTDS config (the run names get a suffix).
LLM_VARIANTS = {
    "TTDS": ("ttds", []),
    "TTDS static": ("ttds-static", ["dynamic.static_index=true"]),
    "LC-Rec-style": ("lcrec", ["dynamic.static_index=true", "tasks.use_user_sid=false", *_non_seqrec_off()]),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset of the table: its base config, where its data is, and the statistics it must have."""
    label: str
    config: str                       # relative to the repository
    data: str                         # 'cache:NAME', or a folder name under --data-root
    letter: dict | None = None        # prepared statistics to assert (LETTER protocol)

    def data_path(self, data_root: Path) -> str:
        return self.data if self.data.startswith("cache:") else str(data_root / self.data)


DATASETS = {
    "ml100k": Dataset("MovieLens-100K", "configs/quickstart.yaml", "cache:movielens-100k"),
    "scientific": Dataset("Amazon Scientific", "configs/scientific_tiny.yaml", "amazon_scientific_lcrec"),
    "beauty": Dataset("Amazon Beauty (LETTER)", "configs/beauty_tiny.yaml", "amazon_beauty_p5", LETTER_STATS["beauty"]),
    "yelp": Dataset("Yelp (LETTER)", "configs/beauty_tiny.yaml", "yelp_p5", LETTER_STATS["yelp"]),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A budget: overrides for every dataset, per dataset, and the TIGER-style model's settings."""
    description: str
    common: tuple[str, ...]
    per_dataset: dict
    tiger: dict

    def overrides(self, dataset: str) -> list[str]:
        return [*self.common, *self.per_dataset.get(dataset, ())]


# one torch thread: on 2 cores shared with other jobs, 2 threads per process took 2.1-3.0 s per LLM step, 1 thread 0.43-0.75 s
# the tiny backbone at d=128 whatever a config's own width (configs/beauty_tiny.yaml, which Yelp shares, uses 256), so
# the cpu-fast tables of docs/RESULTS.md stay reproducible and comparable across datasets
_CPU_COMMON = ("eval.max_users=300", "ray.num_workers=1", "ray.torch_threads=1", "llm.tiny_hidden=128")
_CPU_DYNAMIC = ("dynamic.guide_samples=256", "dynamic.tokenizer_epochs=2")
#: Beauty and Yelp (LETTER protocol), both on configs/beauty_tiny.yaml
_CPU_LETTER = ("cf.epochs=10", "tokenizer.epochs=30", "llm.max_steps=600", *_CPU_DYNAMIC, "eval.user_ids=training",
               "llm.epochs=2", "tokenizer.cf_erase_popularity=false")
PRESETS = {
    "smoke": Preset(
        "harness check only: a few steps of everything, 60 users; the numbers mean nothing",
        ("eval.max_users=60", "cf.epochs=2", "tokenizer.epochs=5", "llm.max_steps=30", "dynamic.guide_samples=64",
         "dynamic.tokenizer_epochs=1", "ray.torch_threads=2"),
        {}, {"epochs": 2, "patience": None, "valid_users": 60, "batch_size": 64}),
    "cpu-fast": Preset(
        "2-core CPU budget: the tiny backbone (4 layers, d=128, from scratch) with 200 LLM steps of 32 sequences, "
        "SASRec 10 epochs, towers 30 epochs, TIGER-style at most 3 epochs, 300 seeded test users, one torch thread; "
        "everything far below the papers' budgets",
        _CPU_COMMON,
        {"ml100k": ("cf.epochs=10", "tokenizer.epochs=30", "llm.max_steps=200", *_CPU_DYNAMIC),
         # tokenizer.alpha_dist=0.01, cf_erase_popularity=false, eval.user_ids=training and
         # tasks.seqrec_user_ids=sequence: the DM-VAE's distribution grain on, the SASRec inputs as they are and the
         # stored user IDs in training and evaluation, as when these tables were measured (configs/scientific_tiny.yaml
         # changed all four on 2026-12-05; bench/dynamic.py names the variants that use them, and --set
         # eval.user_ids=history evaluates with current user IDs)
         "scientific": ("cf.epochs=10", "tokenizer.epochs=30", "llm.max_steps=200", *_CPU_DYNAMIC,
                        "embeddings.max_text_chars=256", "tokenizer.alpha_dist=0.01",
                        "tokenizer.cf_erase_popularity=false", "eval.user_ids=training",
                        "tasks.seqrec_user_ids=sequence"),
         # eval.user_ids=training, llm.epochs=2 and the SASRec inputs as they are: the stored user IDs, LLM epochs and
         # tower inputs as when these tables were measured (beauty_tiny, which Yelp shares here, changed all three;
         # the -e4 variants of bench/dynamic.py set 4 epochs and the erasure)
         "beauty": _CPU_LETTER, "yelp": _CPU_LETTER},
        {"epochs": 3, "patience": 1, "valid_users": 300}),
    "full": Preset(
        "the dataset configs' own budgets (LLM epochs, SASRec and tower epochs), every user evaluated; sized for "
        "a GPU (add ray.use_gpu=true); not run on the 2-core machine",
        ("eval.max_users=null",), {},
        {"epochs": 200, "patience": 10, "valid_users": 2000}),
}


# ----------------------------------------------------------------------------- statistics

def t_interval(values, conf: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)``: the two-sided ``conf`` Student-t interval of the mean of ``values`` (over seeds).

    ``low``/``high`` are None with fewer than two values (no spread to estimate).

    Raises:
        ValueError: ``values`` is empty or holds NaN.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or np.isnan(x).any():
        raise ValueError(f"t_interval needs finite values, got {x.tolist()}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + conf / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def per_user(ranks, metric: str) -> np.ndarray:
    """Per-user values float64 ``(U,)`` of ``metric`` ('HR@k' or 'NDCG@k') from 1-based ranks (0 = not ranked);
    their mean is ``metrics.hr_ndcg(ranks)[metric]``.

    Raises:
        ValueError: an unknown metric name.
    """
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit():
        raise ValueError(f"metric must be 'HR@k' or 'NDCG@k', got {metric!r}")
    r = np.asarray(ranks, dtype=np.int64)
    hit = (r >= 1) & (r <= int(k))
    if name == "HR":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(np.maximum(r, 1) + 1.0), 0.0)


def paired_bootstrap(a: list, b: list, *, n_resamples: int = 1000, seed: int = 0, conf: float = 0.95) -> dict:
    """Paired bootstrap over users of mean(a - b), stratified by seed.

    ``a[s]`` and ``b[s]`` are per-user values (e.g. :func:`per_user`) of two systems on the SAME users of seed s.
    Each resample draws, for every seed, that seed's users with replacement (the pairs stay together), takes
    the mean difference per seed and averages over seeds; the interval is the percentile interval of those
    ``n_resamples`` values. It measures how much the difference depends on which users were drawn, for the
    trained models as they are (the t-interval over seeds measures the training noise).

    Returns:
        ``{"diff", "low", "high", "p_le_0", "n_resamples", "n_users"}``: the observed mean difference, the
        interval, the share of resamples with a difference <= 0, and the users per seed.

    Raises:
        ValueError: no seeds, or a seed whose two arrays differ in length or are empty.
    """
    if not a or len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs the same seeds on both sides, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_resamples)
    diffs = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"paired_bootstrap: per-user arrays of one seed must be equal-length and non-empty, "
                             f"got {x.shape} and {y.shape}")
        d = x - y
        diffs.append(d)
        stats += d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    stats /= len(diffs)
    low, high = np.quantile(stats, [(1 - conf) / 2, (1 + conf) / 2])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "low": float(low), "high": float(high),
            "p_le_0": float((stats <= 0).mean()), "n_resamples": int(n_resamples),
            "n_users": [int(d.size) for d in diffs]}


def check_letter_stats(dataset: str, stats: dict, expected: dict | None = None) -> None:
    """Assert that a prepared LETTER-protocol dataset has the published users / items / interactions.

    Args:
        dataset: the name (``beauty`` / ``yelp`` pick :data:`LETTER_STATS` when ``expected`` is None).
        stats: the data stage's ``stats.json`` (``n_users``, ``n_items``, ``n_interactions``).

    Raises:
        DataError: a count differs (the message names each count, the found and the published value).
    """
    expected = expected if expected is not None else LETTER_STATS[dataset]
    bad = [f"{k}: {stats.get(k)} here, {v} published" for k, v in expected.items() if stats.get(k) != v]
    if bad:
        raise DataError(f"{dataset}: the prepared data does not match the LETTER protocol ({'; '.join(bad)}); "
                        "check data.path, data.kcore=5 and data.drop_items_without_text=false")


# ----------------------------------------------------------------------------- one dataset, one seed

def _stage_walls(run, stages) -> dict:
    return {s: run.manifest(s).get("wall_s") for s in stages}


def run_one(dataset: str, seed: int, preset_name: str, *, runs_dir: Path, data_root: Path,
            force_tiger: bool = False) -> dict:
    """Every system of :data:`SYSTEMS` on one dataset and seed; returns its record (metrics, ranks, walls).

    Raises:
        DataError: a LETTER dataset whose prepared statistics differ from the published ones.
        RuntimeError: a system's per-user ranks disagree with the eval stage's metrics (a harness bug).
    """
    from ttds_ray import baselines, pipeline
    from ttds_ray.artifacts import RunDir
    from ttds_ray.baselines import TigerConfig
    from ttds_ray.config import load_config
    from ttds_ray.metrics import hr_ndcg
    import pyarrow.parquet as pq

    ds, preset = DATASETS[dataset], PRESETS[preset_name]
    out_dir = runs_dir / f"quality-{preset_name}"
    base = [f"output_dir={out_dir}", f"seed={seed}", f"data.path={ds.data_path(data_root)}",
            *preset.overrides(dataset)]

    def config(system: str):
        suffix, extra = LLM_VARIANTS[system]
        return load_config(REPO / ds.config, [*base, f"name={dataset}-s{seed}-{suffix}", *extra])

    backend = pipeline.LocalBackend()
    t0 = time.time()
    cfg = config("TTDS")
    pipeline.run(cfg, backend, stop_after="data")
    stats = read_json(RunDir(cfg.run_dir).require("data") / "stats.json")
    if ds.letter is not None:
        check_letter_stats(dataset, stats, ds.letter)
    pipeline.run(cfg, backend)
    run = RunDir(cfg.run_dir)
    runs = {"TTDS": run}
    for system in ("TTDS static", "LC-Rec-style"):
        vcfg = config(system)
        pipeline.run(vcfg, backend, reuse_from=cfg.run_dir)
        runs[system] = RunDir(vcfg.run_dir)
    tiger = baselines.run_tiger(cfg, run, TigerConfig(**preset.tiger), force=force_tiger)
    scored = baselines.score_baseline_ranks(cfg, run)
    user_idx = scored["user_idx"]

    official = read_json(run.require("eval") / Files.METRICS)
    systems: dict[str, dict] = {}
    shared = _stage_walls(run, ("data", "embeddings", "cf", "tokenizer"))
    for name in ("Popularity", "SASRec"):
        systems[name] = {"metrics": official["models"][name], "ranks": scored[name],
                         "wall_s": shared["cf"] if name == "SASRec" else 0.0}
    systems["TIGER-style"] = {"metrics": tiger["metrics"], "ranks": tiger["ranks"],
                              "wall_s": round(tiger["train_wall_s"] + tiger["eval_wall_s"], 1),
                              "best_epoch": tiger["best_epoch"], "epochs_run": tiger["epochs_run"],
                              "valid_at_best": tiger["valid_at_best"], "steps": tiger["steps"]}
    if not np.array_equal(tiger["user_idx"], user_idx):
        raise RuntimeError("TIGER-style was evaluated on other users than the eval stage")
    for name in ("LC-Rec-style", "TTDS static", "TTDS"):
        m = read_json(runs[name].require("eval") / Files.METRICS)
        users, ranks = baselines.ttds_ranks(runs[name])
        if not np.array_equal(users, user_idx):
            raise RuntimeError(f"{name} was evaluated on other users than the eval stage of the TTDS run")
        llm_numbers = runs[name].manifest("llm")["numbers"]
        systems[name] = {"metrics": m["models"]["TTDS"], "ranks": ranks,
                         "wall_s": round(sum(_stage_walls(runs[name], ("llm", "eval")).values()), 1),
                         "llm_steps": llm_numbers.get("steps"), "changed_per_round": llm_numbers.get("changed_per_round")}
    for name, rec in systems.items():          # the per-user ranks must give the reported numbers
        again = hr_ndcg(rec["ranks"], ks=cfg.eval.ks)
        worst = max(abs(again[k] - rec["metrics"][k]) for k in METRICS)
        rec["ranks_vs_metrics_max_abs_diff"] = worst
        scored_file = name in LLM_VARIANTS and "scores" in pq.read_schema(
            runs[name].require("eval") / Files.RANKINGS).names
        if worst > 1e-9 and (name not in LLM_VARIANTS or scored_file):
            raise RuntimeError(f"{dataset} seed {seed}: per-user ranks of {name} give metrics {worst:.2e} away from "
                               "the reported ones")
        if worst > 1e-9:    # a run from before eval/rankings.parquet held beam scores: a bit-equal tie at the target
            log.warning("%s seed %d: %s per-user ranks (list order, no scores) differ from eval/metrics.json by %.2e; "
                        "the table shows eval/metrics.json, the bootstrap uses the per-user ranks", dataset, seed,
                        name, worst)
    compute = sum(shared.values()) + sum(s["wall_s"] for n, s in systems.items() if n != "SASRec")
    return {"dataset": dataset, "seed": seed, "run_dir": str(run.root), "stats": stats,
            "n_users_evaluated": int(len(user_idx)), "n_items": official["n_items"],
            "n_users_total": official["n_users_total"], "shared_stage_wall_s": shared,
            "compute_wall_s": round(compute, 1), "wall_s": round(time.time() - t0, 1), "user_idx": user_idx.tolist(),
            "systems": {name: {**{k: v for k, v in systems[name].items() if k != "ranks"},
                               "ranks": np.asarray(systems[name]["ranks"]).tolist()} for name in SYSTEMS}}


# ----------------------------------------------------------------------------- the summary

def summarise(records: list[dict], *, n_resamples: int = 1000, boot_seed: int = 0) -> dict:
    """Per dataset: each system's metrics as mean over seeds with a 95 % t-interval, TTDS minus each other
    system (:data:`DIFF_METRICS`: seeds t-interval and a paired bootstrap over users) and TTDS / best baseline.

    Args:
        records: :func:`run_one` records (any datasets and seeds; per dataset every record has every system).

    Returns:
        ``{dataset: {"seeds", "n_users", "systems": {system: {metric: {"mean", "low", "high", "per_seed"}},
        "wall_s": ...}, "diffs": {system: {metric: {"seeds": {...}, "bootstrap": {...}}}}, "ratio": {...}}}``.
    """
    out: dict = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        recs = sorted((r for r in records if r["dataset"] == dataset), key=lambda r: r["seed"])
        res: dict = {"seeds": [r["seed"] for r in recs], "n_users": [r["n_users_evaluated"] for r in recs],
                     "systems": {}, "diffs": {}, "ratio": {}}
        for name in SYSTEMS:
            block = {}
            for metric in METRICS:
                vals = [r["systems"][name]["metrics"][metric] for r in recs]
                mean, low, high = t_interval(vals)
                block[metric] = {"mean": mean, "low": low, "high": high, "per_seed": vals}
            walls = [r["systems"][name]["wall_s"] for r in recs]
            block["wall_s"] = float(np.mean(walls))
            res["systems"][name] = block
        for name in SYSTEMS[:-1]:
            res["diffs"][name] = {}
            for metric in DIFF_METRICS:
                a = [per_user(r["systems"]["TTDS"]["ranks"], metric) for r in recs]
                b = [per_user(r["systems"][name]["ranks"], metric) for r in recs]
                mean, low, high = t_interval([x.mean() - y.mean() for x, y in zip(a, b)])
                res["diffs"][name][metric] = {
                    "seeds": {"mean": mean, "low": low, "high": high},
                    "bootstrap": paired_bootstrap(a, b, n_resamples=n_resamples, seed=boot_seed)}
        for metric in METRICS:
            best = max(BASELINES, key=lambda s: res["systems"][s][metric]["mean"])
            best_v = res["systems"][best][metric]["mean"]
            res["ratio"][metric] = {"best_baseline": best, "TTDS": _ratio(res["systems"]["TTDS"][metric]["mean"], best_v),
                                    "TTDS static": _ratio(res["systems"]["TTDS static"][metric]["mean"], best_v)}
        res["shared_stage_wall_s"] = {s: float(np.mean([r["shared_stage_wall_s"][s] for r in recs]))
                                      for s in recs[0]["shared_stage_wall_s"]}
        res["n_items"], res["n_users_total"] = recs[0]["n_items"], recs[0]["n_users_total"]
        out[dataset] = res
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _cell(block: dict, digits: int = 4) -> str:
    """``mean [low, high]`` (or just the mean with one seed)."""
    if block["low"] is None:
        return f"{block['mean']:.{digits}f}"
    return f"{block['mean']:.{digits}f} [{block['low']:.{digits}f}, {block['high']:.{digits}f}]"


def _signed(block: dict, lo: str = "low", hi: str = "high", digits: int = 4) -> str:
    if block.get(lo) is None:
        return "–"
    return f"[{block[lo]:+.{digits}f}, {block[hi]:+.{digits}f}]"


def render_markdown(summary: dict, meta: dict) -> str:
    """The quality table(s) as Markdown: per dataset the systems' metrics (mean over seeds [95 % t-interval]),
    the TTDS differences, TTDS / best baseline and the stage walls; the preset and the machine above them."""
    lines = [f"# Quality table, preset `{meta['preset']}`", "",
             f"Measured {meta['date']} on {meta['machine']}; `{meta['command']}`. Wall: {meta['compute_wall_s']:.0f} s "
             f"of stage and baseline time in all (the sum of every stage's and the TIGER-style runs' own wall, also "
             f"when an earlier invocation built them), {meta['wall_s']:.0f} s for this invocation. Preset: "
             f"{meta['preset_description']}.", "",
             "Protocol: leave-one-out, full-catalogue ranking, nothing excluded, beam 20 (TTDS, LC-Rec-style, "
             "TIGER-style), a tie with the target counts against it. Cells: mean over seeds [95 % Student-t "
             "interval over seeds]. All systems of a dataset and seed share the prepared data, the split, the "
             "item semantic IDs and the evaluated users. Any choice (TIGER-style epoch) was made on the "
             "validation split.", ""]
    for dataset, res in summary.items():
        ds = DATASETS.get(dataset)
        seeds = ", ".join(map(str, res["seeds"]))
        lines += [f"## {ds.label if ds else dataset}", "",
                  f"{res['n_users_total']:,} users, {res['n_items']:,} items; {res['n_users'][0]:,} test users "
                  f"evaluated per seed; seeds {seeds}; overrides: `{' '.join(meta['overrides'].get(dataset, []))}`.",
                  "", "| system | " + " | ".join(METRICS) + " | wall (s) |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        for name in SYSTEMS:
            b = res["systems"][name]
            lines.append(f"| {name} | " + " | ".join(_cell(b[m]) for m in METRICS) + f" | {b['wall_s']:.0f} |")
        walls = res["shared_stage_wall_s"]
        lines += ["", "Wall (s, mean over seeds, 2 shared cores): Popularity is counted in the eval stage; SASRec = "
                  "the cf stage; TIGER-style = its training (with the per-epoch validation) and test ranking; the "
                  "LLM systems = their llm + eval stages. Shared by all: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + ".", "",
                  "TTDS minus each system, 95 % intervals over seeds and by a paired bootstrap over users "
                  f"({res['diffs'][SYSTEMS[0]][DIFF_METRICS[0]]['bootstrap']['n_resamples']} resamples, seeded, "
                  "stratified by seed):", "",
                  "| TTDS − | " + " | ".join(f"Δ{m} | seeds | users (bootstrap) | P(Δ≤0)" for m in DIFF_METRICS) + " |",
                  "|---|" + "---|---|---|---|" * len(DIFF_METRICS)]
        for name in SYSTEMS[:-1]:
            cells = []
            for m in DIFF_METRICS:
                d = res["diffs"][name][m]
                cells += [f"{d['bootstrap']['diff']:+.4f}", _signed(d["seeds"]), _signed(d["bootstrap"]),
                          f"{d['bootstrap']['p_le_0']:.3f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "TTDS / best baseline (of " + ", ".join(BASELINES) + "): " + "; ".join(
            f"{m} {_fmt_ratio(res['ratio'][m]['TTDS'])} (best: {res['ratio'][m]['best_baseline']})" for m in METRICS)
            + ". TTDS static / best baseline: " + "; ".join(
            f"{m} {_fmt_ratio(res['ratio'][m]['TTDS static'])}" for m in METRICS) + ".", ""]
    return "\n".join(lines)


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def write_outputs(records: list[dict], summary: dict, meta: dict, results_dir: Path) -> tuple[Path, Path]:
    """Write ``quality-<preset>.json`` (meta, summary, records) and ``.md`` atomically; returns both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"quality-{meta['preset']}"
    doc = {"meta": meta, "summary": summary, "records": records}
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(doc, indent=1, default=_json_default) + "\n").encode())
    atomic_write_bytes(stem.with_suffix(".md"), (render_markdown(summary, meta) + "\n").encode())
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _machine() -> str:
    cores = os.cpu_count()
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:    # noqa: BLE001 (description only)
        gpu = "no GPU"
    return f"{platform.machine()} {cores} cores, {gpu}, Python {platform.python_version()}"


def dataset_seeds(datasets: list[str], seeds: list[int], specs: list[str]) -> dict[str, list[int]]:
    """Seeds per dataset: ``seeds`` unless a ``DATASET=S[,S...]`` spec gives that dataset its own.

    Raises:
        ValueError: a malformed spec, a dataset not in ``datasets``, a repeated dataset or seed, or no seed.
    """
    out = {d: list(seeds) for d in datasets}
    seen = set()
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name not in out or name in seen:
            raise ValueError(f"--dataset-seeds {spec!r}: expected DATASET=S[,S...] with DATASET one of --datasets "
                             f"{datasets}, each at most once")
        try:
            out[name] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--dataset-seeds {spec!r}: seeds must be integers separated by commas") from None
        if len(set(out[name])) != len(out[name]):
            raise ValueError(f"--dataset-seeds {spec!r}: a seed is given twice")
        seen.add(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml100k", "scientific"], choices=sorted(DATASETS))
    p.add_argument("--preset", default="cpu-fast", choices=sorted(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset-seeds", nargs="+", default=[], metavar="DATASET=S[,S...]",
                   help="other seeds for a dataset than --seeds, e.g. yelp=0 for a large dataset run with one seed")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="run directories go to <runs-dir>/quality-<preset>/")
    p.add_argument("--results-dir", type=Path, default=REPO / "results")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder holding amazon_scientific_lcrec, amazon_beauty_p5, yelp_p5")
    p.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--force-tiger", action="store_true", help="retrain the TIGER-style model even if stored")
    args = p.parse_args(argv)
    try:
        seeds_of = dataset_seeds(args.datasets, args.seeds, args.dataset_seeds)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.preset == "cpu-fast" and ({"beauty", "yelp"} & set(args.datasets)):
        log.warning("Beauty/Yelp with cpu-fast take 30-50 min (Beauty) and about 77 min (Yelp) of stage time per "
                    "seed on 2 shared cores (measured 2026-12-04, docs/RESULTS.md)")
    t0 = time.time()
    records = []
    meta = {"preset": args.preset, "preset_description": PRESETS[args.preset].description,
            "overrides": {d: PRESETS[args.preset].overrides(d) for d in args.datasets},
            "tiger": PRESETS[args.preset].tiger, "datasets": args.datasets, "seeds": args.seeds,
            "dataset_seeds": seeds_of,
            "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
            "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "bootstrap": {"resamples": args.resamples, "seed": 0}}
    for dataset in args.datasets:
        for seed in seeds_of[dataset]:
            log.info("=== %s seed %d (%s) ===", dataset, seed, args.preset)
            records.append(run_one(dataset, seed, args.preset, runs_dir=args.runs_dir, data_root=args.data_root,
                                   force_tiger=args.force_tiger))
            meta["wall_s"] = round(time.time() - t0, 1)
            meta["compute_wall_s"] = round(sum(r["compute_wall_s"] for r in records), 1)
            summary = summarise(records, n_resamples=args.resamples)
            paths = write_outputs(records, summary, meta, args.results_dir)   # partial tables after every run
            log.info("=== %s seed %d done (%.0f s so far); wrote %s ===", dataset, seed, meta["wall_s"], paths[1])
    print(render_markdown(summarise(records, n_resamples=args.resamples), meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
