"""TTDS runs against the validation-selected SASRec of a ``bench/dynamic.py --sasrec-epochs`` results file, or
against another set of TTDS runs.

    python bench/versus.py --runs 'runs/qs-cb-s{seed}' --seeds 0 1 2 3 4 \
        --sasrec results/sasrec-budget-ml100k-600.json --out results/versus-quickstart-ml100k.json
    python bench/versus.py --runs 'runs/probe/beauty-s{seed}-static-cb-w256-2400' --seeds 0 1 2 \
        --against 'runs/dynamic/beauty-s{seed}-static-cb-2400'

Issue 13's goal 2 compares TTDS trained with a config's own budget (e.g. the quickstart's 3,096 LLM steps,
``jobs/train.py``) with SASRec given as much training as helps it (``cf.epochs`` chosen per seed on validation by
``bench/dynamic.py --sasrec-epochs``). Both sides must have ranked the same test users of the same seed (the run's
``eval/rankings.parquet`` against the file's per-user SASRec ranks); the script checks it. Prints, and writes with
``--out`` (JSON + markdown), per seed the test metric of each, the mean difference with a 95 % t-interval over seeds,
the paired bootstrap over users (stratified by seed; ``bench/quality.py``), and each side's stage wall.
``--against`` compares two sets of TTDS runs the same way (e.g. a probe against its reference variant): both must
have evaluated the same test users per seed (same data, seed and ``eval.max_users``).
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


def render(result: dict, walls: dict, command: str, names: tuple[str, str] = ("TTDS", "SASRec")) -> str:
    a_, b_ = names
    lines = [f"`{command}`", "", f"| metric | seed | {a_} | {b_} | {a_} − {b_} |", "|---|---|---|---|---|"]
    for m, r in result.items():
        for s, (a, b) in r["per_seed"].items():
            lines.append(f"| {m} | {s} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
        bs = r["bootstrap"]
        t = "–" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"| {m} | mean | | | {r['diff']:+.4f} {t} over seeds; bootstrap over users "
                     f"[{bs['low']:+.4f}, {bs['high']:+.4f}], P(Δ≤0) {bs['p_le_0']:.3f} |")
    if all("sasrec_s" in w for w in walls.values()):
        lines += ["", "| seed | TTDS llm stage s | SASRec epochs | SASRec cf stage s |", "|---|---|---|---|"]
        lines += [f"| {s} | {w['ttds_llm_s']} | {w['sasrec_epochs']} | {w['sasrec_s']} |" for s, w in walls.items()]
    else:
        lines += ["", f"| seed | {a_} llm stage s | {b_} llm stage s |", "|---|---|---|"]
        lines += [f"| {s} | {w['ttds_llm_s']} | {w['against_llm_s']} |" for s, w in walls.items()]
    return "\n".join(lines) + "\n"


def _runs(p: argparse.ArgumentParser, flag: str, pattern: str, seeds: list[int]) -> tuple[dict, dict]:
    """``({seed: (users, ranks)}, {seed: llm stage wall s})`` of the run directories ``pattern`` names; a missing
    or unfinished run is a usage error naming ``flag`` and the seed."""
    from ttds_ray import baselines
    from ttds_ray.artifacts import RunDir
    from ttds_ray.errors import ArtifactError, StageMissing

    ranks, walls = {}, {}
    for s in seeds:
        run = RunDir(Path(pattern.format(seed=s)))
        try:
            ranks[s] = baselines.ttds_ranks(run)
            walls[s] = run.manifest("llm").get("wall_s")
        except (StageMissing, ArtifactError) as e:
            p.error(f"{flag}, seed {s}: {e}")
    return ranks, walls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="run directory pattern with {seed}, e.g. 'runs/qs-cb-s{seed}'")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    other = p.add_mutually_exclusive_group(required=True)
    other.add_argument("--sasrec", type=Path, help="results JSON of bench/dynamic.py --sasrec-epochs")
    other.add_argument("--against", help="another run directory pattern with {seed}: TTDS runs to compare with")
    p.add_argument("--metrics", nargs="+", default=["NDCG@10", "HR@10"])
    p.add_argument("--out", type=Path, default=None, help="write this JSON and a .md beside it")
    args = p.parse_args(argv)
    for flag, pattern in (("--runs", args.runs), ("--against", args.against)):
        if pattern is not None and "{seed}" not in pattern:
            p.error(f"{flag} must contain {{seed}}")
    for m in args.metrics:
        try:
            Q.per_user([], m)
        except ValueError as e:
            p.error(f"--metrics: {e}")
    if args.sasrec is not None and not args.sasrec.is_file():
        p.error(f"--sasrec {args.sasrec} does not exist")
    ttds, ttds_walls = _runs(p, "--runs", args.runs, args.seeds)
    if args.sasrec is not None:
        try:
            other, sasrec_meta = sasrec_from(args.sasrec)
        except ValueError as e:
            p.error(str(e))
        missing = [s for s in args.seeds if s not in other]
        if missing:
            p.error(f"{args.sasrec} holds no SASRec for seeds {missing}")
        walls = {s: {"ttds_llm_s": ttds_walls[s], "sasrec_epochs": sasrec_meta[str(s)]["epochs"],
                     "sasrec_s": sasrec_meta[str(s)]["wall_s"]} for s in args.seeds}
        names = ("TTDS", "SASRec")
    else:
        other, other_walls = _runs(p, "--against", args.against, args.seeds)
        walls = {s: {"ttds_llm_s": ttds_walls[s], "against_llm_s": other_walls[s]} for s in args.seeds}
        names = ("runs", "against")
    try:
        result = compare(ttds, {s: other[s] for s in args.seeds}, args.metrics)
    except ValueError as e:
        p.error(str(e))
    command = "python bench/versus.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(result, walls, command, names)
    print(text)
    if args.out:
        write_json(args.out, {"command": command, "runs": args.runs, "sasrec": args.sasrec and str(args.sasrec),
                              "against": args.against, "result": result, "walls": walls})
        atomic_write_bytes(args.out.with_suffix(".md"), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
