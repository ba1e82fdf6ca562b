"""How much of a re-indexing round's churn is the tower's own drift, and how much of the catalogue its guidance sees.

    python bench/drift.py --runs runs/dynamic/ml100k-s0-static-cb-600 runs/dynamic/scientific-s0-static-cb-600 \
        --out results/drift-2026-12-04.json

A dynamic round (DESIGN §1.6, ``dynamic.run_round``) refines the item tower for ``dynamic.tokenizer_epochs`` at
``dynamic.tokenizer_lr`` on its own loss plus the LLM-guided terms, then re-exports every item's ID. This script
takes a finished run's tokenizer stage and, with **no guidance at all** (``gamma_kl = gamma_nce = 0``), runs the same
refinement and export (``towers.refine_item_tower``, ``towers.export_item_sids``) and counts the items whose ID
changes (per level too): the churn a round has before the LLM says anything. It also counts how many distinct
items the round's guidance prompts target (``dynamic.guidance_prompts`` with ``dynamic.guide_samples``, the
seed of round 1): the part of the catalogue the LLM's guidance can move on purpose. Re-exporting the unrefined
tower is checked to change nothing. CPU only, seconds to a minute per run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ttds_ray.artifacts import Files, RunDir, write_json


def unguided_churn(run: RunDir, *, epochs: int | None = None, lr: float | None = None) -> dict:
    """Items whose semantic ID changes when ``run``'s item tower is refined without guidance and re-exported.

    Args:
        run: a run directory with finished data, embeddings, cf and tokenizer stages.
        epochs / lr: refinement epochs and AdamW learning rate; default the run's ``dynamic.tokenizer_epochs`` /
            ``dynamic.tokenizer_lr`` (what its rounds use).

    Returns:
        ``{"n_items", "epochs", "lr", "reexport_changed" (must be 0), "changed", "changed_per_level" (L,),
        "guide_samples", "guided_items" (distinct targets of round 1's guidance prompts), "wall_s"}``.

    Raises:
        StageMissing: the tokenizer stage (or one before it) has not finished.
    """
    from ttds_ray import dynamic, recipes, towers
    from ttds_ray.config import load_config

    t0 = time.time()
    cfg = load_config(run.root / Files.CONFIG)
    epochs = cfg.dynamic.tokenizer_epochs if epochs is None else epochs
    lr = cfg.dynamic.tokenizer_lr if lr is None else lr
    x = recipes.tower_inputs(run, cfg.tokenizer)
    table, _ = recipes.load_sid_tables(run)
    tower = towers.load_tower(run.require("tokenizer") / Files.tower("item"))
    prepared, splits = recipes.load_splits(run)
    names = prepared.items["item_id"].tolist()
    n, k = len(table.codes), table.codebook_size
    again, _ = towers.export_item_sids(tower, x["item_s"], x["item_c"], cfg.tokenizer, item_names=names)
    none = towers.Guidance(target_idx=np.arange(2) % n, hidden=np.zeros((2, 1), np.float32),
                           p_level1=np.full((2, k), 1.0 / k, np.float32))       # unused: both weights are 0
    refined, _, _ = towers.refine_item_tower(tower, cfg.tokenizer, x["item_s"], x["item_c"], none, epochs=epochs,
                                             lr=lr, gamma_kl=0.0, gamma_nce=0.0, tau=cfg.dynamic.tau, seed=cfg.seed)
    new, _ = towers.export_item_sids(refined, x["item_s"], x["item_c"], cfg.tokenizer, item_names=names)
    seqs = [s.tolist() for s in splits.train_items]
    _, _, targets = dynamic.guidance_prompts(seqs, cfg.dynamic.guide_samples, max_history=cfg.data.max_history,
                                             seed=cfg.seed + 1000)
    return {"n_items": n, "epochs": epochs, "lr": lr,
            "reexport_changed": towers.count_changed(table.codes, again.codes),
            "changed": towers.count_changed(table.codes, new.codes),
            "changed_per_level": (table.codes != new.codes).sum(0).tolist(),
            "guide_samples": cfg.dynamic.guide_samples, "guided_items": int(len(np.unique(targets))),
            "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run directories with a finished tokenizer stage")
    p.add_argument("--epochs", type=int, default=None, help="refinement epochs (default: each run's dynamic.tokenizer_epochs)")
    p.add_argument("--lr", type=float, default=None, help="refinement lr (default: each run's dynamic.tokenizer_lr)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for r in args.runs:
        if not (r / "tokenizer" / Files.MANIFEST).is_file():
            p.error(f"--runs {r}: no finished tokenizer stage")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.lr is not None and args.lr < 0:
        p.error("--lr must be >= 0")
    import torch
    torch.set_num_threads(1)
    out = {}
    print("| run | items | guided items (round 1) | unguided refinement: items changed | per level |")
    print("|---|---|---|---|---|")
    for r in args.runs:
        res = out[str(r)] = unguided_churn(RunDir(r), epochs=args.epochs, lr=args.lr)
        share = res["changed"] / res["n_items"]
        print(f"| {r.name} | {res['n_items']:,} | {res['guided_items']:,} of {res['guide_samples']:,} prompts | "
              f"{res['changed']:,} ({share:.0%}) | {res['changed_per_level']} |", flush=True)
    if args.out:
        write_json(args.out, {"command": "python bench/drift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "runs": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
