"""LLM training step time with and without sample packing (``llm.pack``), on a run's real samples.

    python bench/pack.py --run runs/quickstart-ml100k --steps 40 --out results/pack-<date>.json

Builds the run's recommender LM as its LLM stage starts it (``recipes.build_recommender_lm``: the run's backbone,
SID vocabulary and token init) and the run's epoch-0 task samples (``tasks.build_task_samples``, the batches of
``recipes.epoch_batches``), then times ``--steps`` optimiser steps of each batch form, alternating padded and
packed on the same batches (so machine load hits both alike), after ``--warmup`` untimed steps of each. Both
models start from the same weights and see the same batches; the loss of the two is printed side by side (equal
up to float rounding at the first step, then drifting apart by rounding only).

Reported: tokens per batch (real and as computed: rows x width), padding share, rows per batch, median and mean
ms per step of each form, the speed-up, and /proc/loadavg before and after (this machine is shared). With
``--profile N``, N more packed steps run under ``torch.profiler`` and the ops with the most self CPU time per step
are reported too (where a step's time goes: matmuls, attention, the loss softmax, the optimiser).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ttds_ray import llm, pipeline, recipes, tasks
from ttds_ray.artifacts import RunDir, write_json
from ttds_ray.config import load_config


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def profile_ops(step, batches: list, top: int = 15) -> dict:
    """Run ``step(b)`` for every batch under ``torch.profiler`` (CPU); returns the ``top`` ops by self CPU time as
    ``{"ops": [{"op", "self_ms_per_step", "share", "calls_per_step"}], "self_ms_per_step": total}`` (ms per step,
    share of all ops' self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            step(b)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    n = len(batches)
    return {"self_ms_per_step": total / 1e3 / n,
            "ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                     "share": e.self_cpu_time_total / total, "calls_per_step": e.count / n} for e in events[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with finished tokenizer stage")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each form")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each form first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cpu-fast preset uses 1)")
    parser.add_argument("--profile", type=int, default=0, help="packed steps to profile after the timing (0 = none)")
    parser.add_argument("--out", type=Path, help="write the measurement as JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.profile < 0:
        parser.error("--steps and --threads must be >= 1, --warmup and --profile >= 0")
    if not (args.run / "config.yaml").is_file():
        parser.error(f"--run {args.run} is not a run directory (no config.yaml); pass one with a finished tokenizer stage")
    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    cfg = load_config(run.root / "config.yaml")
    torch.manual_seed(cfg.seed)
    model, tok, vocab, _ = recipes.build_recommender_lm(cfg, run)
    models = {"padded": model, "packed": copy.deepcopy(model)}
    item_t, user_t = recipes.load_sid_tables(run)
    item_tok, user_tok = vocab.item_tokens(item_t.codes), vocab.user_tokens(user_t.codes)
    samples = tasks.build_task_samples(recipes.task_context(cfg, run, tok), cfg.tasks, seed=cfg.seed, epoch=0)
    spe, _, _ = pipeline.llm_budget(len(samples), cfg)
    batches = recipes.epoch_batches(len(samples), spe, cfg.llm.batch_size, cfg.seed, 0)
    n = args.warmup + args.steps
    if len(batches) < n + args.profile:
        parser.error(f"the run's epoch has {len(batches)} batches; lower --steps/--warmup/--profile to at most that")
    sid = vocab.item_token_ids.flatten() if cfg.llm.loss_vocab == "sid" else None
    opts = {k: llm.make_optimizer(m, cfg.llm, n) for k, m in models.items()}
    forms = {"padded": tasks.collate, "packed": tasks.pack}
    ms = {k: [] for k in forms}
    losses = {k: [] for k in forms}
    shape = {k: [] for k in forms}
    real = []
    load0 = _loadavg()
    for i, idx in enumerate(batches[:n]):
        rows = tasks.render_batch([samples[j] for j in idx], item_tok, user_tok)
        real.append(sum(min(len(r["input_ids"]), cfg.llm.max_length) for r in rows))
        for k, form in forms.items():
            t0 = time.perf_counter()
            b = form(rows, tok.pad_token_id, cfg.llm.max_length)
            loss = llm.train_step(models[k], *opts[k], b, sid_ids=sid)
            if i >= args.warmup:
                ms[k].append((time.perf_counter() - t0) * 1e3)
                shape[k].append(tuple(b["input_ids"].shape))
            losses[k].append(loss)
    load1 = _loadavg()
    out = {"run": str(args.run), "backbone": cfg.llm.backbone, "batch_size": cfg.llm.batch_size,
           "max_length": cfg.llm.max_length, "threads": args.threads, "steps": args.steps,
           "real_tokens_per_batch": float(np.mean(real[args.warmup:])), "loadavg_before": load0, "loadavg_after": load1,
           "first_step_loss": {k: v[0] for k, v in losses.items()},
           "last_step_loss": {k: v[-1] for k, v in losses.items()}}
    for k in forms:
        computed = float(np.mean([r * w for r, w in shape[k]]))
        out[k] = {"ms_per_step_median": statistics.median(ms[k]), "ms_per_step_mean": float(np.mean(ms[k])),
                  "rows_per_batch": float(np.mean([r for r, _ in shape[k]])),
                  "width": float(np.mean([w for _, w in shape[k]])), "computed_tokens_per_batch": computed,
                  "padding_share": 1.0 - out["real_tokens_per_batch"] / computed}
    out["speedup_median"] = out["padded"]["ms_per_step_median"] / out["packed"]["ms_per_step_median"]
    if args.profile:
        batches_p = [tasks.pack(tasks.render_batch([samples[j] for j in idx], item_tok, user_tok), tok.pad_token_id,
                                cfg.llm.max_length) for idx in batches[n:n + args.profile]]
        out["profile"] = profile_ops(lambda b: llm.train_step(models["packed"], *opts["packed"], b, sid_ids=sid),
                                     batches_p)
    print(json.dumps(out, indent=1))
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
