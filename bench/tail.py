"""Where TTDS loses to SASRec: hit rates by the target's training popularity, and what TTDS's top-10 looks like.

    python bench/tail.py --runs runs/probe/beauty-s{0,1,2}-fresh-cb-llm-w256-2400 --out results/tail-beauty.json
    python bench/tail.py --runs RUN ... --beta 0 0.1 0.2 0.4 --users 1000 --out results/prior-beauty.json

From finished runs (the eval stage's test rankings, the run's SASRec; runs pooled, e.g. the seeds of one config):
- **by popularity**: HR@10 / NDCG@10 of TTDS and SASRec on the test users, bucketed by how often the target item
  occurs in the training split (``data.train_item_counts``);
- **prefix hits**: the share of users whose TTDS top-10 holds an item sharing the target's first d codes (d = 1..L):
  where the beam search leaves the target's branch of the trie;
- **what is recommended**: median training count of the top-10 items and the share of them with fewer than 20
  training interactions, for TTDS and SASRec, and the distinct first-level codes in TTDS's top-10;
- **first-level stratification**: per run, the Spearman correlation between an item's training count and the mean
  count of the other items sharing its first code (near 1: the first level groups rare items with rare items).
With ``--beta``, each run is also evaluated on valid and test with ``eval.popularity_correction`` = beta
(docs/DESIGN-NOTES.md, *Popularity-corrected decoding*; beta 0 = the run as trained), on ``--users`` seeded users:
select beta on valid. CPU, seconds per run and beta on 1,000 users at d=256.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ttds_ray.artifacts import Files, RunDir, write_json

BUCKETS = (0, 5, 10, 20, 50)        # lower edges of the training-count buckets of a target item
RARE = 20                           # "rare": fewer training interactions than this


def _hr_ndcg10(ranks: np.ndarray) -> tuple[float, float]:
    from ttds_ray.metrics import hr_ndcg
    m = hr_ndcg(ranks, ks=(10,))
    return m["HR@10"], m["NDCG@10"]


def run_tail(run: RunDir) -> dict:
    """Per-user records of one run's test evaluation (the eval stage's users and rankings).

    Returns:
        ``{"target_count" (U,), "ttds_rank" (U,), "sasrec_rank" (U,) (1-based, 0 = not in the list),
        "prefix_hit" (U, L) bool, "ttds_top_counts" / "sasrec_top_counts" (U * 10,) training counts of the
        recommended items, "ttds_distinct_level1" (U,)}`` as numpy arrays.

    Raises:
        StageMissing / ArtifactError: the run has no finished eval stage.
    """
    import pandas as pd

    from ttds_ray import baselines, recipes
    from ttds_ray.cf import load_sasrec, score_users
    from ttds_ray.config import load_config
    from ttds_ray.data import train_item_counts
    from ttds_ray.evaluate import eval_histories
    from ttds_ray.metrics import score_ranks, topk_from_scores
    from ttds_ray.recommender import load_final_item_sids

    cfg = load_config(run.root / Files.CONFIG)
    codes = load_final_item_sids(run).codes                                    # (N, L)
    prepared, splits = recipes.load_splits(run)
    counts = train_item_counts(splits, len(prepared.items))
    users, ttds_rank = baselines.ttds_ranks(run)
    rankings = pd.read_parquet(run.require("eval") / Files.RANKINGS)
    rows = baselines.eval_rows(cfg, splits)
    if not np.array_equal(splits.user_idx[rows], users):
        raise RuntimeError(f"{run.root}: the eval stage's users are not eval_rows' users")
    targets = rankings["target"].to_numpy(np.int64, copy=True)
    top = [np.asarray(r[:10], np.int64) for r in rankings["ranked"]]
    top = [t[t >= 0] for t in top]
    prefix_hit = np.array([[(codes[t, :d] == codes[g, :d]).all(1).any() for d in range(1, codes.shape[1] + 1)]
                           for t, g in zip(top, targets)], dtype=bool)
    # SASRec scored once, ranked as baselines.score_baseline_ranks ranks it (same histories, exclusion, ties)
    hist = eval_histories(splits, rows, "test", cfg.cf.max_len)
    scores = score_users(load_sasrec(run.require("cf")), [h.tolist() for h in hist], cfg.cf.max_len)  # (U, N)
    seen = ([h.tolist() for h in eval_histories(splits, rows, "test", 10 ** 9)] if cfg.eval.exclude_seen
            else None)
    sasrec_rank = score_ranks(scores, targets, exclude=seen)
    sasrec_top = np.asarray(topk_from_scores(scores, 10, exclude=seen))
    return {"target_count": counts[targets], "ttds_rank": np.asarray(ttds_rank), "sasrec_rank": np.asarray(sasrec_rank),
            "prefix_hit": prefix_hit, "ttds_top_counts": np.concatenate([counts[t] for t in top]),
            "sasrec_top_counts": counts[sasrec_top].ravel(),
            "ttds_distinct_level1": np.array([len(np.unique(codes[t, 0])) for t in top]),
            "level1_stratification": np.array([level1_stratification(codes, counts)])}


def level1_stratification(codes: np.ndarray, counts: np.ndarray) -> float:
    """Spearman correlation, over items, between an item's training count and the mean count of the other items
    that share its first code: near 1 when the first level groups items by popularity (rare with rare)."""
    n = len(codes)
    mass = np.bincount(codes[:, 0], weights=counts.astype(np.float64), minlength=codes[:, 0].max() + 1)
    size = np.bincount(codes[:, 0], minlength=len(mass))
    first = codes[:, 0]
    mates = (mass[first] - counts) / np.maximum(size[first] - 1, 1)
    ranks = [np.argsort(np.argsort(a, kind="stable"), kind="stable") for a in (counts, mates)]
    return float(np.corrcoef(*ranks)[0, 1]) if n > 1 else 0.0


def summarise(records: list[dict]) -> dict:
    """Pools :func:`run_tail` records (one per run) into the tables the module docstring describes."""
    r = {k: np.concatenate([rec[k] for rec in records]) for k in records[0]}
    edges = [*BUCKETS, np.inf]
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (r["target_count"] >= lo) & (r["target_count"] < hi)
        if not m.any():
            continue
        (th, tn), (sh, sn) = _hr_ndcg10(r["ttds_rank"][m]), _hr_ndcg10(r["sasrec_rank"][m])
        buckets.append({"train_count": f"{lo}-{'' if hi == np.inf else int(hi) - 1}", "users": int(m.sum()),
                        "ttds_hr10": th, "sasrec_hr10": sh, "ttds_ndcg10": tn, "sasrec_ndcg10": sn,
                        "prefix_hit": r["prefix_hit"][m].mean(0).tolist()})
    (th, tn), (sh, sn) = _hr_ndcg10(r["ttds_rank"]), _hr_ndcg10(r["sasrec_rank"])
    return {"users": int(len(r["ttds_rank"])), "buckets": buckets,
            "all": {"ttds_hr10": th, "sasrec_hr10": sh, "ttds_ndcg10": tn, "sasrec_ndcg10": sn,
                    "prefix_hit": r["prefix_hit"].mean(0).tolist()},
            "recommended": {"ttds_median_count": float(np.median(r["ttds_top_counts"])),
                            "sasrec_median_count": float(np.median(r["sasrec_top_counts"])),
                            "ttds_rare_share": float(np.mean(r["ttds_top_counts"] < RARE)),
                            "sasrec_rare_share": float(np.mean(r["sasrec_top_counts"] < RARE)),
                            "ttds_distinct_level1": float(np.mean(r["ttds_distinct_level1"]))},
            "level1_stratification": r["level1_stratification"].tolist()}


def beta_sweep(run: RunDir, betas: list[float], users: int) -> list[dict]:
    """TTDS HR@10 / NDCG@10 on valid and test for each ``eval.popularity_correction`` (the run's own config
    otherwise, one torch thread); nothing is written into the run."""
    from ttds_ray.config import load_config
    from ttds_ray.evaluate import evaluate_split

    out = []
    for beta in betas:
        cfg = load_config(run.root / Files.CONFIG, [f"eval.popularity_correction={beta}", "ray.torch_threads=1"])
        row = {"run": str(run.root), "beta": beta}
        for split in ("valid", "test"):
            m = evaluate_split(cfg, run, split, max_users=users, progress=False)[0]["models"]["TTDS"]
            row[split] = {k: m[k] for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")}
        out.append(row)
    return out


def render(summary: dict) -> str:
    """Markdown tables of :func:`summarise`'s output."""
    levels = len(summary["all"]["prefix_hit"])
    head = ("| target's training count | users | TTDS HR@10 | SASRec HR@10 | TTDS NDCG@10 | SASRec NDCG@10 | "
            + " | ".join(f"top-10 shares {d} code{'s' if d > 1 else ''}" for d in range(1, levels + 1)) + " |")
    lines = [head, "|" + "---|" * (6 + levels)]
    for b in [*summary["buckets"], {"train_count": "all", "users": summary["users"], **summary["all"]}]:
        lines.append(f"| {b['train_count']} | {b['users']} | {b['ttds_hr10']:.4f} | {b['sasrec_hr10']:.4f} | "
                     f"{b['ttds_ndcg10']:.4f} | {b['sasrec_ndcg10']:.4f} | "
                     + " | ".join(f"{h:.3f}" for h in b["prefix_hit"]) + " |")
    rec = summary["recommended"]
    lines.append(f"\nTop-10 items: median training count TTDS {rec['ttds_median_count']:.0f}, SASRec "
                 f"{rec['sasrec_median_count']:.0f}; share with < {RARE} training interactions TTDS "
                 f"{rec['ttds_rare_share']:.3f}, SASRec {rec['sasrec_rare_share']:.3f}; distinct first-level codes in "
                 f"TTDS's top-10 {rec['ttds_distinct_level1']:.2f}. First-level popularity stratification (Spearman of "
                 f"an item's count with its first-code mates' mean count), per run: "
                 + ", ".join(f"{x:.2f}" for x in summary["level1_stratification"]) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run directories, pooled")
    p.add_argument("--beta", nargs="+", type=float, default=[], help="eval.popularity_correction values to sweep")
    p.add_argument("--users", type=int, default=1000, help="seeded users per split for --beta")
    p.add_argument("--out", type=Path, default=None, help="JSON output (written atomically)")
    args = p.parse_args(argv)
    if args.users < 1:
        p.error(f"--users must be >= 1, got {args.users}")
    if any(not 0 <= b <= 1 for b in args.beta):
        p.error("--beta values must lie in [0, 1] (eval.popularity_correction)")
    missing = [str(r) for r in args.runs if not (r / Files.CONFIG).exists()]
    if missing:
        p.error(f"not run directories (no {Files.CONFIG}): {missing}")
    t0 = time.time()
    runs = [RunDir(r) for r in args.runs]
    summary = summarise([run_tail(r) for r in runs])
    print(render(summary))
    sweep = [row for r in runs for row in beta_sweep(r, args.beta, args.users)]
    for beta in args.beta:
        rows = [s for s in sweep if s["beta"] == beta]
        print(f"beta {beta}: " + "; ".join(f"{split} HR@10 {np.mean([s[split]['HR@10'] for s in rows]):.4f} "
                                           f"NDCG@10 {np.mean([s[split]['NDCG@10'] for s in rows]):.4f}"
                                           for split in ("valid", "test")) + f" (mean over {len(rows)} runs)")
    if args.out:
        write_json(args.out, {"argv": sys.argv, "runs": [str(r) for r in args.runs], "tail": summary,
                              "beta_sweep": sweep, "wall_s": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
