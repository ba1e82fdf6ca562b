"""Choose ``eval.user_ids`` on the validation split: does a current user ID beat a one-interaction-old one?

At test time a known user's stored ID (``eval.user_ids=training``) is built from the training history, one
interaction older than the test prompt's item history; ``history`` recomputes it from the history before the target.
On validation both give the same ID, so validation cannot tell them apart directly. This script builds the
validation analogue: it ranks each validation prompt (history = training items) once with the user ID of that
history (current, = the stored ID) and once with the ID of the history without its last item (one interaction old,
as the stored ID is at test), and compares the two over users (paired bootstrap, stratified by seed). The test split
is not read.

    python bench/user_ids.py --runs 'runs/dynamic/scientific-s{seed}-fresh-cb-llm-no-dist-w256-erase-3000' \\
        --seeds 0 1 2 --users all --out results/user-ids-valid-scientific.json

Writes the JSON (per seed: users, ranks of both, metrics) and a .md table beside it. With ``--against FILE`` (an
earlier output of this script on other runs of the same seeds and users) it also compares the current-ID ranks of
the two run sets over users: a validation choice between two configs whose per-user ranks are kept.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (bench/quality.py: statistics)

import numpy as np  # noqa: E402

METRICS = ("NDCG@10", "HR@10")


def stale_vs_current(run_dir: Path, max_users: int | None) -> dict:
    """Validation ranks of one run with current and one-interaction-old user IDs.

    Returns:
        ``{"users": (U,) split rows, "current": (U,) 1-based ranks (0 = not ranked), "stale": (U,),
        "changed": share of users whose old ID differs}``. A user with one training item keeps it as the old history.

    Raises:
        ValueError: the run has no user IDs (``tasks.use_user_sid=false``).
    """
    import torch

    from ttds_ray.evaluate import eval_histories, select_eval_users, targets_of
    from ttds_ray.metrics import target_ranks
    from ttds_ray.recommender import Recommender

    torch.set_num_threads(1)
    rec = Recommender.from_run(run_dir)
    sp, cfg = rec.splits, rec.cfg
    if not cfg.tasks.use_user_sid:
        raise ValueError(f"{run_dir}: tasks.use_user_sid is false, the prompts have no user ID")
    rows = select_eval_users(len(sp), max_users, cfg.seed)
    hist = eval_histories(sp, rows, "valid", cfg.data.max_history)
    targets = targets_of(sp, rows, "valid")
    current = rec.user_table.codes[sp.user_idx[rows]]
    stale = rec._user_codes([sp.train_items[r][:-1] if len(sp.train_items[r]) > 1 else sp.train_items[r]
                             for r in rows])
    out = {"users": rows.tolist(), "changed": float((stale != current).any(1).mean())}
    for name, codes in (("current", current), ("stale", stale)):
        ranked, scores = rec.rank(hist, codes, n_beams=cfg.eval.n_beams)
        out[name] = np.asarray(target_ranks(ranked, targets, scores=scores)).tolist()
    return out


def _paired(a: dict[int, list], b: dict[int, list], names: tuple[str, str]) -> dict:
    """``{metric: {names[0]: [per seed], names[1]: [...], "bootstrap": a - b}}`` from per-seed rank lists of the same
    users (paired bootstrap over users, stratified by seed)."""
    seeds, out = sorted(a), {}
    for m in METRICS:
        x = [Q.per_user(a[s], m) for s in seeds]
        y = [Q.per_user(b[s], m) for s in seeds]
        out[m] = {names[0]: [float(v.mean()) for v in x], names[1]: [float(v.mean()) for v in y],
                  "bootstrap": Q.paired_bootstrap(x, y)}
    return out


def summarise(per_seed: dict[int, dict]) -> dict:
    """``{metric: {"current": [per seed], "stale": [...], "bootstrap": current - stale}}``."""
    return _paired({s: r["current"] for s, r in per_seed.items()}, {s: r["stale"] for s, r in per_seed.items()},
                   ("current", "stale"))


def versus(per_seed: dict[int, dict], other: dict[int, dict]) -> dict:
    """These runs' validation ranks with current IDs against another run set's (an earlier ``--out`` file of this
    script): ``{metric: {"runs": [per seed], "against": [...], "bootstrap": runs - against}}``, paired over users.

    Raises:
        ValueError: a seed of ``per_seed`` is missing from ``other``, or a seed's users differ (the two sets must
            have ranked the same validation users: same data, seed and ``--users``).
    """
    seeds = sorted(per_seed)
    missing = [s for s in seeds if s not in other]
    if missing:
        raise ValueError(f"--against has no seed {missing} (it has {sorted(other)})")
    bad = [s for s in seeds if list(per_seed[s]["users"]) != list(other[s]["users"])]
    if bad:
        raise ValueError(f"seed {bad}: the two run sets ranked different validation users (same data, seed and "
                         "--users needed)")
    return _paired({s: per_seed[s]["current"] for s in seeds}, {s: other[s]["current"] for s in seeds},
                   ("runs", "against"))


def render(summary: dict, per_seed: dict, command: str) -> str:
    lines = [f"`{command}`", "", "| metric | seed | current ID | one interaction old | current − old |",
             "|---|---|---|---|---|"]
    for m, block in summary.items():
        for s, c, o in zip(sorted(per_seed), block["current"], block["stale"]):
            lines.append(f"| {m} | {s} | {c:.4f} | {o:.4f} | {c - o:+.4f} |")
        b = block["bootstrap"]
        lines.append(f"| {m} | mean | {np.mean(block['current']):.4f} | {np.mean(block['stale']):.4f} | "
                     f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}], P(Δ≤0) {b['p_le_0']:.3f} |")
    lines += ["", "Users whose one-interaction-old ID differs: " +
              ", ".join(f"seed {s}: {per_seed[s]['changed']:.1%}" for s in sorted(per_seed))]
    return "\n".join(lines) + "\n"


def render_versus(block: dict, seeds: list[int]) -> str:
    """Markdown table of :func:`versus` (current IDs on both sides)."""
    lines = ["", f"Against `{block['against']}` (validation, current IDs):", "",
             "| metric | seed | runs | against | runs − against |", "|---|---|---|---|---|"]
    for m in METRICS:
        for s, a, b in zip(seeds, block[m]["runs"], block[m]["against"]):
            lines.append(f"| {m} | {s} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
        bs = block[m]["bootstrap"]
        lines.append(f"| {m} | mean | {np.mean(block[m]['runs']):.4f} | {np.mean(block[m]['against']):.4f} | "
                     f"{bs['diff']:+.4f} [{bs['low']:+.4f}, {bs['high']:+.4f}], P(Δ≤0) {bs['p_le_0']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ttds_ray.artifacts import atomic_write_bytes, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="run directory pattern with {seed}")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--users", default="all", help="validation users per seed: a number or 'all'")
    p.add_argument("--out", type=Path, required=True, help="JSON path; a .md is written beside it")
    p.add_argument("--against", type=Path, default=None,
                   help="an earlier --out JSON of this script: also compare these runs' current-ID validation ranks "
                        "with its runs' (same seeds and users), paired over users")
    args = p.parse_args(argv)
    if "{seed}" not in args.runs:
        p.error("--runs must contain {seed}")
    if args.users != "all" and not (args.users.isdigit() and int(args.users) > 0):
        p.error(f"--users must be a positive number or 'all', got {args.users!r}")
    other = None
    if args.against is not None:                         # read and checked before any ranking
        from ttds_ray.artifacts import read_json
        try:
            other = {int(s): v for s, v in read_json(args.against)["per_seed"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--against {args.against}: not a results file of this script ({e})")
        if any(s not in other for s in args.seeds):
            p.error(f"--against {args.against} has seeds {sorted(other)}, not all of {args.seeds}")
        if args.users != "all" and any(len(other[s]["users"]) != int(args.users) for s in args.seeds):
            p.error(f"--against {args.against} ranked {[len(other[s]['users']) for s in args.seeds]} users per seed, "
                    f"not --users {args.users}: the two run sets must rank the same users")
    runs = {s: Path(args.runs.format(seed=s)) for s in args.seeds}
    missing = [str(r) for r in runs.values() if not (r / "llm").is_dir()]
    if missing:
        p.error(f"no finished llm stage in: {', '.join(missing)}")
    from ttds_ray.recommender import load_run_config
    no_ids = [str(r) for r in runs.values() if not load_run_config(r).tasks.use_user_sid]
    if no_ids:                                           # before any ranking: nothing to compare in these runs
        p.error(f"tasks.use_user_sid is false (the prompts have no user ID) in: {', '.join(no_ids)}")
    max_users = None if args.users == "all" else int(args.users)
    per_seed = {s: stale_vs_current(r, max_users) for s, r in runs.items()}
    summary = summarise(per_seed)
    command = "python bench/user_ids.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "runs": {s: str(r) for s, r in runs.items()}, "summary": summary,
              "per_seed": per_seed}
    if other is not None:
        result["versus"] = {"against": str(args.against), **versus(per_seed, other)}
    write_json(args.out, result)
    md = render(summary, per_seed, command)
    if other is not None:
        md += render_versus(result["versus"], sorted(per_seed))
    atomic_write_bytes(args.out.with_suffix(".md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
