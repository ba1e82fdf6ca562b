"""Scale-out figures of the LLM stage on Ray Train: samples/s per worker with 1 and 2 workers, the 2-worker
scaling efficiency, and the time a fault costs (restart + resume from the last checkpoint).

    ttds-ray data fetch movielens-100k
    python bench/scale.py --out results/scale-$(date +%F).json [--base runs/quickstart-ml100k]

Every measurement trains the LLM stage (``pipeline.stage_llm`` on ``train.RayBackend``) of the quickstart
config (MovieLens-100K) on a private copy of one finished base run (data, embeddings, SASRec, towers; built
first with the local backend when ``--base`` has none), with ``dynamic.rounds=0`` so that only training is
timed, and ``ray.cpus_per_worker=0.5`` so that Ray Data keeps CPU to read the samples.

- ``samples_per_s_per_worker``: optimiser steps x ``llm.batch_size`` / the worker's wall time in the training
  loop (rank 0; setup and model load excluded), as the recipe reports it;
- ``efficiency_2w`` = 2-worker total samples/s / (2 x the 1-worker samples/s at the same thread count);
- ``fault``: the same tiny run twice with checkpoints every ``--ckpt-every`` steps, once clean and once with a
  worker raising after step ``--fault-at`` (``RayBackend(inject_fault=...)``); the difference of the two stage
  wall times is what the fault cost (worker-group restart, model rebuild, the steps since the checkpoint).

Time it alone: Ray workers run at a lower CPU priority than an interactive shell.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from ttds_ray import pipeline  # noqa: E402
from ttds_ray.artifacts import STAGES, Files, RunDir  # noqa: E402
from ttds_ray.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = STAGES[:STAGES.index("llm")]


def base_run(base: Path) -> Path:
    """A run with finished data..tokenizer stages of the quickstart config (built if missing)."""
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"output_dir={base.parent}", f"name={base.name}"])
    if not all(RunDir(base).is_complete(s, cfg.stage_hash(s)) for s in UPSTREAM):
        print(f"building the base run {base} (data .. tokenizer, local backend)", flush=True)
        pipeline.run(cfg, pipeline.LocalBackend(), stop_after="tokenizer")
    return base


def llm_stage(base: Path, work: Path, name: str, overrides: list[str], fault=None) -> dict:
    """Train the LLM stage of a copy of ``base`` on Ray; returns wall seconds and the stage's numbers."""
    from ttds_ray.train import RayBackend, init_ray

    cfg = load_config(REPO / "configs/quickstart.yaml", [f"output_dir={work}", f"name={name}", "dynamic.rounds=0",
                                                         "ray.cpus_per_worker=0.5", *overrides])
    run = RunDir(cfg.run_dir)
    for s in UPSTREAM:
        pipeline.link_stage(RunDir(base).stage_dir(s), run.stage_dir(s))
    pipeline.save_config(cfg, run)
    init_ray(cfg)
    backend = RayBackend(inject_fault=fault)
    backend.cleanup(cfg, run, "llm")
    t = time.perf_counter()
    pipeline.stage_llm(cfg, run, backend)
    wall = time.perf_counter() - t
    backend.cleanup(cfg, run, "llm")
    n = run.manifest("llm")["numbers"]
    out = {"overrides": overrides, "stage_wall_s": round(wall, 1), "steps": n["steps"],
           "steps_per_worker": n["steps_per_worker"], "samples_per_s_per_worker": n["samples_per_s_per_worker"],
           "resumed_at_steps": n["resumed_at_steps"], "final_loss": n["final_loss"]}
    print(json.dumps({name: out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=REPO / "runs/quickstart-ml100k")
    ap.add_argument("--work", type=Path, default=REPO / "runs/bench-scale")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny-steps", type=int, default=60)
    ap.add_argument("--smollm2-steps", type=int, default=6)
    ap.add_argument("--fault-at", type=int, default=30)
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], choices=["tiny", "smollm2", "fault"])
    args = ap.parse_args()
    base = base_run(args.base.resolve())
    work = args.work.resolve()
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "loadavg_start": os.getloadavg()}, "base": str(base)}
    presets = {"tiny": [f"llm.max_steps={args.tiny_steps}"],
               "smollm2": [f"llm.max_steps={args.smollm2_steps}", "llm.backbone=smollm2", "llm.finetune=lora",
                           "llm.batch_size=8"]}
    for preset, extra in presets.items():
        if preset in args.skip:
            continue
        r = {"1w_1thread": llm_stage(base, work, f"{preset}-w1t1", [*extra, "ray.num_workers=1", "ray.torch_threads=1"]),
             "2w_1thread": llm_stage(base, work, f"{preset}-w2t1", [*extra, "ray.num_workers=2", "ray.torch_threads=1"]),
             "1w_2threads": llm_stage(base, work, f"{preset}-w1t2", [*extra, "ray.num_workers=1", "ray.torch_threads=2"])}
        one, two = r["1w_1thread"]["samples_per_s_per_worker"], r["2w_1thread"]["samples_per_s_per_worker"]
        r["efficiency_2w"] = round(2 * two / (2 * one), 3)
        r["speedup_2w_vs_1w_2threads"] = round(2 * two / r["1w_2threads"]["samples_per_s_per_worker"], 3)
        res[preset] = r
    if "fault" not in args.skip:
        f = [f"llm.max_steps={args.tiny_steps}", f"ray.checkpoint_every_steps={args.ckpt_every}",
             "ray.num_workers=1", "ray.torch_threads=2", "ray.max_failures=1"]
        clean = llm_stage(base, work, "fault-clean", f)
        hit = llm_stage(base, work, "fault-hit", f, fault=("llm", args.fault_at))
        res["fault"] = {"clean": clean, "faulted": hit, "fault_at_step": args.fault_at, "ckpt_every": args.ckpt_every,
                        "fault_cost_s": round(hit["stage_wall_s"] - clean["stage_wall_s"], 1),
                        "same_final_loss": abs(hit["final_loss"] - clean["final_loss"]) <= 1e-5 * abs(clean["final_loss"])}
    res["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in res.items() if k in ("tiny", "smollm2", "fault")}, indent=1))


if __name__ == "__main__":
    main()
