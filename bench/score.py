"""Batch-scoring throughput (users/s) and the same figure as a fraction of the model's forward-FLOP bound.

    python bench/score.py --run runs/quickstart-ml100k --out bench_score.json [--ray 2] [--threads 2]

Measures, on one run directory:
- ``steady``: the in-process scorer (``batch.ScoreUDF``, the UDF the Ray actors run) over every chunk of
  users, model already loaded and warmed up; best and median of ``--repeats`` passes;
- ``job``: the whole in-process job, ``batch.score(use_ray=False)`` (model load, inputs, parquet write);
- ``ray`` (with ``--ray N``): the whole Ray Data job with N actors (``ray.init`` + actor start included).

FLOP bound. Per user, counted from the prompts and beam widths the scorer actually used (one untimed
counting pass records them), useful work only (no padding, causal attention):

    per-token(c)  = 2 * N_ne + 4 * n_layer * d_attn * c              (dense layers + QK^T and AV at context c)
    prompt pass   = 2 * N_ne * T + 2 * n_layer * d_attn * T * (T + 1) + 2 * d_model * V
    beam steps    = sum_{l=0}^{M-2} w_l * (per-token(T + l + 1) + 2 * d_model * V),  w_l = min(W, K^(l+1))
    FLOPs/user    = prompt pass + beam steps

N_ne = parameters other than the input embedding and the LM head (LoRA adapters included), T = prompt tokens,
V = LM-head rows (the logits are computed over the whole vocabulary, one row per prompt and per beam:
``logits_to_keep=1``), M = item semantic-ID levels, K = codes per level, W = beam width. The bound in users/s
is the measured float32 ``torch.matmul`` FLOP/s (best of 10 ``--matmul-n`` square products at the same thread
count) divided by FLOPs/user; the reported fraction is measured users/s over that bound.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ttds_ray import batch  # noqa: E402
from ttds_ray.evaluate import TTDSRanker  # noqa: E402


def matmul_flops(n: int, threads: int, reps: int = 10) -> float:
    """Peak (best of ``reps``) FLOP/s of an (n, n) @ (n, n) float32 torch.matmul at ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def model_dims(rec) -> dict:
    """N_ne, n_layer, d_model, d_attn, V of the run's LLM, and the item ID shape (M levels, K codes)."""
    model = rec.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    skip = {id(p) for mod in (emb, head) for p in mod.parameters()}   # incl. peft wrappers' copies / row deltas
    n_ne = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"n_params_non_embedding": int(n_ne), "n_layer": int(cfg.num_hidden_layers),
            "d_model": int(cfg.hidden_size), "d_attn": int(cfg.num_attention_heads * head_dim),
            "lm_head_rows": int(head.weight.shape[0]), "levels": int(rec.item_table.n_levels),
            "codebook_size": int(rec.item_table.codebook_size)}


def flops_per_prompt(T: int, W: int, d: dict) -> float:
    """Forward FLOPs of one prompt of T tokens + beam search of width W (module docstring)."""
    n_ne, L, da, dm, V = d["n_params_non_embedding"], d["n_layer"], d["d_attn"], d["d_model"], d["lm_head_rows"]
    head = 2 * dm * V
    f = 2 * n_ne * T + 2 * L * da * T * (T + 1) + head
    for lvl in range(d["levels"] - 1):
        w = min(W, d["codebook_size"] ** (lvl + 1))
        f += w * (2 * n_ne + 4 * L * da * (T + lvl + 1) + head)
    return float(f)


def count_work(udf, chunks) -> tuple[list[int], list[int]]:
    """Prompt lengths and beam widths the scorer feeds the model (one untimed pass, recorded at
    TTDSRanker.rank_with_scores)."""
    lens, widths = [], []
    real = TTDSRanker.rank_with_scores

    def spy(self, prompts, *a, **kw):
        lens.extend(len(p) for p in prompts)
        widths.extend([self.n_beams] * len(prompts))
        return real(self, prompts, *a, **kw)
    TTDSRanker.rank_with_scores = spy
    try:
        for c in chunks:
            udf(c)
    finally:
        TTDSRanker.rank_with_scores = real
    return lens, widths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="JSON results file")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--split", default="none", choices=["none", "test", "valid"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (in-process + matmul)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--ray", type=int, default=0, metavar="N", help="also time the Ray job with N actors")
    args = ap.parse_args()

    opts = batch.ScoreOptions(k=args.k, exclude_seen=args.exclude_seen, batch_size=args.batch_size,
                              split=None if args.split == "none" else args.split).validate()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    peak = matmul_flops(args.matmul_n, args.threads)

    t = time.perf_counter()
    udf = batch.ScoreUDF(str(args.run), asdict(opts), threads=args.threads)
    load_s = time.perf_counter() - t
    inputs = batch.load_inputs(args.run, max_users=args.max_users)
    chunks = batch.chunk_inputs(inputs, opts.batch_size)
    n_users = len(inputs)
    lens, widths = count_work(udf, chunks)            # also the warm-up pass
    dims = model_dims(udf.rec)
    per_user = [flops_per_prompt(T, W, dims) for T, W in zip(lens, widths)]
    flops_user = float(np.mean(per_user))
    bound = peak / flops_user

    passes = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for c in chunks:
            udf(c)
        passes.append(n_users / (time.perf_counter() - t))
    del udf

    tmp = args.out.with_name(args.out.stem + ".scores.parquet")
    t = time.perf_counter()
    batch.score(args.run, tmp, options=opts, max_users=args.max_users, use_ray=False, threads=args.threads,
                progress=False)
    job = n_users / (time.perf_counter() - t)
    ray_ups = None
    if args.ray:
        t = time.perf_counter()
        batch.score(args.run, tmp, options=opts, max_users=args.max_users, concurrency=args.ray, progress=False)
        ray_ups = n_users / (time.perf_counter() - t)
    tmp.unlink(missing_ok=True)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]

    rows = [("steady, in-process (best)", max(passes)), ("steady, in-process (median)", statistics.median(passes)),
            ("job, in-process (incl. load + write)", job)]
    if ray_ups is not None:
        rows.append((f"job, Ray Data {args.ray} actors (incl. ray.init)", ray_ups))
    res = {
        "run": str(args.run), "n_users": n_users, "options": asdict(opts), "threads": args.threads,
        "matmul_n": args.matmul_n, "matmul_gflops": peak / 1e9, "model": dims, "model_load_s": load_s,
        "prompt_tokens_mean": float(np.mean(lens)), "beam_width": sorted(set(widths)),
        "gflops_per_user": flops_user / 1e9, "bound_users_per_s": bound,
        "users_per_s": {name: v for name, v in rows}, "fraction_of_bound": {name: v / bound for name, v in rows},
        "steady_passes_users_per_s": passes, "loadavg_before": load_before, "loadavg_after": load_after,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"run {args.run}: {n_users} users, k={opts.k}, exclude_seen={opts.exclude_seen}, split={args.split}, "
          f"batch {opts.batch_size}, {args.threads} thread(s); load avg before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}")
    print(f"model: N_ne={dims['n_params_non_embedding']:,} L={dims['n_layer']} d={dims['d_model']} "
          f"V={dims['lm_head_rows']:,} levels={dims['levels']}x{dims['codebook_size']}; prompt {np.mean(lens):.1f} "
          f"tokens, beam {sorted(set(widths))}; {flops_user / 1e9:.4f} GFLOP/user")
    print(f"matmul {args.matmul_n}^3 float32: {peak / 1e9:.1f} GFLOP/s -> bound {bound:.1f} users/s; "
          f"model load {load_s:.1f} s")
    print("| measure | users/s | fraction of bound |\n|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.2f} | {v / bound:.3f} |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
