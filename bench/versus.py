"""TTDS runs against the validation-selected SASRec of a ``bench/dynamic.py --sasrec-epochs`` results file.

    python bench/versus.py --runs 'runs/qs-cb-s{seed}' --seeds 0 1 2 3 4 \
        --sasrec results/sasrec-budget-ml100k-600.json --out results/versus-quickstart-ml100k.json

Issue 13's goal 2 compares TTDS trained with a config's own budget (e.g. the quickstart's 3,096 LLM steps,
``jobs/train.py``) with SASRec given as much training as helps it (``cf.epochs`` chosen per seed on validation by
``bench/dynamic.py --sasrec-epochs``). Both sides must have ranked the same test users of the same seed (the run's
``eval/rankings.parquet`` against the file's per-user SASRec ranks); the script checks it. Prints, and writes with
``--out`` (JSON + markdown), per seed the test metric of each, the mean difference with a 95 % t-interval over seeds,
the paired bootstrap over users (stratified by seed; ``bench/quality.py``), and each side's stage wall.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (bench/quality.py: statistics)

import numpy as np  # noqa: E402

from ttds_ray.artifacts import atomic_write_bytes, read_json, write_json  # noqa: E402


def compare(ttds: dict[int, tuple], other: dict[int, tuple], metrics: list[str], *,
            n_resamples: int = 1000) -> dict:
    """TTDS minus the other system per metric, over the seeds both hold.

    Args:
        ttds, other: ``{seed: (user_idx (U,), rank (U,))}``, 1-based test ranks (0 = not ranked) of the same users.
        metrics: names such as ``"NDCG@10"`` (:func:`quality.per_user`).

    Returns:
        ``{metric: {"per_seed": {seed: [ttds, other]}, "diff": mean, "low", "high" (t over seeds),
        "bootstrap": paired_bootstrap(...)}}``.

    Raises:
        ValueError: the seed sets differ, or a seed's two sides ranked other users.
    """
    if sorted(ttds) != sorted(other) or not ttds:
        raise ValueError(f"compare needs the same seeds on both sides, got {sorted(ttds)} and {sorted(other)}")
    for s in ttds:
        if not np.array_equal(np.asarray(ttds[s][0]), np.asarray(other[s][0])):
            raise ValueError(f"seed {s}: the TTDS run and SASRec ranked different test users")
    out = {}
    for m in metrics:
        a = [Q.per_user(ttds[s][1], m) for s in sorted(ttds)]
        b = [Q.per_user(other[s][1], m) for s in sorted(ttds)]
        mean, low, high = Q.t_interval([x.mean() - y.mean() for x, y in zip(a, b)])
        out[m] = {"per_seed": {s: [float(x.mean()), float(y.mean())] for s, x, y in zip(sorted(ttds), a, b)},
                  "diff": mean, "low": low, "high": high,
                  "bootstrap": Q.paired_bootstrap(a, b, n_resamples=n_resamples)}
    return out


def sasrec_from(path: Path) -> tuple[dict[int, tuple], dict]:
    """Per-seed ``(users, ranks)`` of the selected SASRec, and ``meta["sasrec"]`` (epochs and walls), from a
    ``bench/dynamic.py --sasrec-epochs`` results JSON.

    Raises:
        ValueError: the file holds no SASRec-budget selection (run without ``--sasrec-epochs``).
    """
    doc = read_json(path)
    if "sasrec" not in doc.get("meta", {}):
        raise ValueError(f"{path} was written without --sasrec-epochs: it holds no validation-selected SASRec")
    ranks = {}
    for rec in doc["records"]:
        ranks.setdefault(int(rec["seed"]), (np.asarray(rec["users"]), np.asarray(rec["sasrec_ranks"])))
    return ranks, doc["meta"]["sasrec"]


def render(result: dict, walls: dict, command: str) -> str:
    lines = [f"`{command}`", "", "| metric | seed | TTDS | SASRec | TTDS − SASRec |", "|---|---|---|---|---|"]
    for m, r in result.items():
        for s, (a, b) in r["per_seed"].items():
            lines.append(f"| {m} | {s} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
        bs = r["bootstrap"]
        t = "–" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"| {m} | mean | | | {r['diff']:+.4f} {t} over seeds; bootstrap over users "
                     f"[{bs['low']:+.4f}, {bs['high']:+.4f}], P(Δ≤0) {bs['p_le_0']:.3f} |")
    lines += ["", "| seed | TTDS llm stage s | SASRec epochs | SASRec cf stage s |", "|---|---|---|---|"]
    lines += [f"| {s} | {w['ttds_llm_s']} | {w['sasrec_epochs']} | {w['sasrec_s']} |" for s, w in walls.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="run directory pattern with {seed}, e.g. 'runs/qs-cb-s{seed}'")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--sasrec", type=Path, required=True, help="results JSON of bench/dynamic.py --sasrec-epochs")
    p.add_argument("--metrics", nargs="+", default=["NDCG@10", "HR@10"])
    p.add_argument("--out", type=Path, default=None, help="write this JSON and a .md beside it")
    args = p.parse_args(argv)
    if "{seed}" not in args.runs:
        p.error("--runs must contain {seed}")
    for m in args.metrics:
        try:
            Q.per_user([], m)
        except ValueError as e:
            p.error(f"--metrics: {e}")
    if not args.sasrec.is_file():
        p.error(f"--sasrec {args.sasrec} does not exist")
    from ttds_ray import baselines
    from ttds_ray.artifacts import RunDir
    from ttds_ray.errors import ArtifactError, StageMissing

    try:
        sasrec, sasrec_meta = sasrec_from(args.sasrec)
    except ValueError as e:
        p.error(str(e))
    missing = [s for s in args.seeds if s not in sasrec]
    if missing:
        p.error(f"{args.sasrec} holds no SASRec for seeds {missing}")
    ttds, walls = {}, {}
    for s in args.seeds:
        run = RunDir(Path(args.runs.format(seed=s)))
        try:
            ttds[s] = baselines.ttds_ranks(run)
        except (StageMissing, ArtifactError) as e:
            p.error(f"--runs, seed {s}: {e}")
        walls[s] = {"ttds_llm_s": run.manifest("llm").get("wall_s"),
                    "sasrec_epochs": sasrec_meta[str(s)]["epochs"], "sasrec_s": sasrec_meta[str(s)]["wall_s"]}
    result = compare(ttds, {s: sasrec[s] for s in args.seeds}, args.metrics)
    command = "python bench/versus.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(result, walls, command)
    print(text)
    if args.out:
        write_json(args.out, {"command": command, "runs": args.runs, "sasrec": str(args.sasrec),
                              "result": result, "walls": walls})
        atomic_write_bytes(args.out.with_suffix(".md"), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
