"""Wall time of the likelihood gate's scoring (``dynamic.accept=llm``): one prompt pass shared by the old and the
proposed ID against one full pass per ID.

    python bench/gate.py --run runs/dynamic/beauty-s0-fresh-cb-llm-2400 --items 1000 --out results/gate-<date>.json

A gated round (``dynamic.likelihood_gate``) scores each proposed mover on up to ``dynamic.accept_contexts`` of its
training contexts under its old and its new semantic ID (``llm.code_logprobs``). This script loads a finished
run's LLM and final item IDs, draws ``--items`` items (seeded), gives each a proposed ID (another item's ID, a
random permutation: the gate needs only two valid IDs per item), builds the gate's contexts and prompts as the LLM
stage does (``dynamic.target_contexts``, ``tasks.build_eval_prompts``, the stored user IDs) and times, alternating
the two forms ``--repeats`` times so machine load hits both alike: ``two passes`` = one teacher-forced pass over
prompt + ID per ID (:func:`full_pass_logprobs`, how the gate scored before), ``shared`` = ``code_logprobs`` with both IDs as ``(2, M, L)`` (the prompt once, its
key/value cache reused for both IDs' tokens; what the gate calls). Reports seconds of each, the speed-up, contexts
scored, the largest absolute difference of the two forms' log-probabilities (float rounding only) and how many
gate decisions (gain > ``dynamic.accept_margin``) differ. 1 thread, CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def full_pass_logprobs(model, prompts: list[list[int]], codes: np.ndarray, pad_id: int, sid_ids, batch_size: int = 64
                       ) -> torch.Tensor:
    """float32 ``(M,)``: log p(ID | prompt) from one teacher-forced pass over prompt + ID per row, batched as the gate
    did before ``code_logprobs`` shared the prompt pass (the baseline of this benchmark; same result up to float
    rounding, checked here as ``max_abs_diff``)."""
    from ttds_ray import llm
    from ttds_ray.tasks import collate

    n_levels, out = codes.shape[1], torch.zeros(len(prompts))
    if sid_ids is not None and not bool((sid_ids[1:] > sid_ids[:-1]).all()):
        raise ValueError("full_pass_logprobs: sid_ids must be increasing (the SID vocabulary's L*K ids)")
    col = codes if sid_ids is None else np.searchsorted(sid_ids.numpy(), codes)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        b = collate([{"input_ids": list(prompts[i]) + codes[i].tolist()} for i in rows], pad_id,
                    max(len(prompts[i]) for i in rows) + n_levels)
        mask = b["attention_mask"]
        h = model.get_decoder()(input_ids=b["input_ids"], attention_mask=mask,
                                position_ids=llm.position_ids_from_mask(mask)).last_hidden_state[:, -n_levels - 1:-1]
        logp = llm._head_logits(model, h.reshape(-1, h.shape[-1]), sid_ids).float().log_softmax(-1)
        out[torch.as_tensor(rows)] = logp.gather(1, torch.as_tensor(col[rows]).reshape(-1, 1)).view(
            len(rows), n_levels).sum(1)
    return out


def gate_timing(run_dir: Path, *, n_items: int, repeats: int, seed: int = 0) -> dict:
    """Time the gate's two scoring forms on ``n_items`` items of a finished run (see the module docstring).

    Returns:
        ``{"run", "items", "contexts", "prompt_tokens_mean", "two_passes_s" (per repeat), "shared_s",
        "speedup" (median ratio), "max_abs_diff" (nats), "decisions_differ", "threads"}``.

    Raises:
        StageMissing: the run has no finished llm stage.
        ValueError: ``n_items`` or ``repeats`` < 1.
    """
    from ttds_ray import dynamic, llm, tasks
    from ttds_ray.artifacts import RunDir
    from ttds_ray.recommender import Recommender

    if n_items < 1 or repeats < 1:
        raise ValueError(f"--items and --repeats must be >= 1, got {n_items}, {repeats}")
    torch.set_num_threads(1)
    rec = Recommender.from_run(RunDir(run_dir).root)
    cfg, sp = rec.cfg, rec.splits
    train_seqs = [list(map(int, s)) for s in sp.train_items]
    old = rec.item_table.codes
    rng = np.random.default_rng(seed)
    items = np.sort(rng.choice(len(old), size=min(n_items, len(old)), replace=False))
    proposed = old.copy()
    proposed[items] = old[rng.permutation(items)]                      # other items' IDs: valid, mostly different
    pos, users, hist = dynamic.target_contexts(train_seqs, items, cfg.dynamic.accept_contexts,
                                               max_history=cfg.data.max_history, seed=seed)
    user_tok = rec.user_tokens[sp.user_idx[users]] if cfg.tasks.use_user_sid else None
    prompts = tasks.build_eval_prompts(hist, rec.item_tokens, user_tok, rec.pieces, cfg.tasks,
                                       max_history=cfg.data.max_history, max_length=cfg.llm.max_length)
    ids = rec.vocab.item_token_ids.numpy()
    lv = np.arange(ids.shape[0])[None, :]
    cand = np.stack([ids[lv, t[items[pos]]] for t in (old, proposed)])   # (2, M, L) vocab ids
    sid = rec.vocab.item_token_ids.flatten() if cfg.llm.loss_vocab == "sid" else None
    pad = rec.tok.pad_token_id
    two, shared, a, b = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = torch.stack([full_pass_logprobs(rec.model, prompts, c, pad, sid) for c in cand])
        two.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = llm.code_logprobs(rec.model, prompts, cand, pad, sid_ids=sid)
        shared.append(time.perf_counter() - t0)

    def decisions(lp: torch.Tensor) -> np.ndarray:
        n = np.bincount(pos, minlength=len(items))
        gain = np.bincount(pos, weights=(lp[1] - lp[0]).numpy(), minlength=len(items))
        return (gain / np.maximum(n, 1) > cfg.dynamic.accept_margin) & (n > 0)

    return {"run": str(run_dir), "items": int(len(items)), "contexts": int(len(prompts)),
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])), "id_levels": int(ids.shape[0]),
            "two_passes_s": [round(x, 2) for x in two], "shared_s": [round(x, 2) for x in shared],
            "speedup": round(statistics.median(two) / statistics.median(shared), 2),
            "max_abs_diff": float((a - b).abs().max()), "decisions_differ": int((decisions(a) != decisions(b)).sum()),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    from ttds_ray.artifacts import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a run directory with a finished llm stage")
    p.add_argument("--items", type=int, default=1000, help="proposed movers to score (seeded draw)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.items < 1 or args.repeats < 1:
        p.error(f"--items and --repeats must be >= 1, got {args.items}, {args.repeats}")
    if not (args.run / "llm").is_dir():
        p.error(f"{args.run}: no finished llm stage")
    res = {**gate_timing(args.run, n_items=args.items, repeats=args.repeats),
           "loadavg": Path("/proc/loadavg").read_text().split()[:3], "date": time.strftime("%Y-%m-%d")}
    if args.out is not None:
        write_json(args.out, res)
    print(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
