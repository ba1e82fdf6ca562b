"""Decoding speed: our trie-constrained beam search vs HF ``generate`` with ``prefix_allowed_tokens_fn``.

    python bench/decode.py --run runs/quickstart-ml100k --out results/decode-<date>.json [--presets tiny smollm2]

Both decoders get the same model, the same prompts (the evaluation prompts of the run's test split,
``tasks.build_eval_prompts``, as ``Recommender.rank`` builds them), 20 beams and 20 returned sequences, at batch
1 and 32. Presets:
- ``tiny``: the run's own trained LM (``Recommender.from_run``);
- ``smollm2``: SmolLM2-135M-Instruct built on the SAME run's SID vocabulary as training starts it
  (``recipes.build_recommender_lm``: SID rows initialised from item titles, LoRA r=8 with trainable SID rows),
  with the LoRA B matrices randomised (std ``--lora-std``) so the adapter is not the identity. Untrained: a
  trained SmolLM2 run does not exist on this machine (the speed does not depend on the weights' values).

Reported per preset and batch size:
- users/s of ``beam_search`` with the scoring the run was trained with (``llm.loss_vocab``, 'sid' for every
  shipped config) and with 'full' (log-softmax over the whole vocabulary, the pre-issue-12 path), best and
  median of ``--repeats`` passes; users/s of HF ``generate`` (``--hf-repeats`` passes);
- the invalid-ID rate (returned SIDs that are no catalogue item) and duplicate rate (items returned twice for
  one user) of both decoders;
- top-20 agreement with HF, per scoring: HF scores 'full' natively; for 'sid' a forward hook on the LM head
  sets every non-SID logit to -inf, so HF's log-softmax over V becomes the log-softmax over the SID rows (an
  extra, untimed HF pass, on the first ``--sid-agree-users`` users: SmolLM2's HF decoding is slow here). A
  user agrees exactly when the 20 items are the same in the same order; else "tie-only" when both score
  vectors agree within ``--tol`` nats at every rank and every common item's scores agree within ``--tol``;
- the forward-FLOP bound: FLOPs/user from ``bench/score.py``'s model (``flops_per_prompt``) with V = the LM-head
  rows the scoring actually needs (M * K for 'sid', the vocabulary for 'full'), over the measured float32
  matmul FLOP/s (``bench/score.py``'s ``matmul_flops``); fraction = users/s / bound;
- where the time goes (batch 32, one pass under ``torch.profiler``): the share of each ``decode.*`` range of
  ``beam_search`` (``decode.constraint`` = trie lookups + masking) and the top operators.

Every measurement records /proc/loadavg before and after (this machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from score import flops_per_prompt, matmul_flops, model_dims  # noqa: E402  (bench/score.py)
from ttds_ray import tasks  # noqa: E402
from ttds_ray.decoding import SIDTrie, beam_search, resolve_loss_vocab  # noqa: E402
from ttds_ray.evaluate import eval_histories, select_eval_users  # noqa: E402
from ttds_ray.recommender import Recommender  # noqa: E402

RANGES = ("decode.prefill", "decode.step_forward", "decode.logprobs", "decode.constraint", "decode.select",
          "decode.cache_reorder", "decode.tree_mask")


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages (strings, as /proc/loadavg has them)."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def eval_prompts(rec: Recommender, n_users: int, seed: int) -> list[list[int]]:
    """The test-split evaluation prompts of ``n_users`` seeded users, as ``Recommender.rank`` builds them."""
    cfg, sp = rec.cfg, rec.splits
    rows = select_eval_users(len(sp), n_users, seed)
    hist = eval_histories(sp, rows, "test", cfg.data.max_history)
    user_tok = rec.user_tokens[sp.user_idx[rows]] if cfg.tasks.use_user_sid else None
    return tasks.build_eval_prompts([h.tolist() for h in hist], rec.item_tokens, user_tok, rec.pieces, cfg.tasks,
                                    max_history=cfg.data.max_history, max_length=cfg.llm.max_length)


def batches(rec: Recommender, prompts: list[list[int]], batch_size: int) -> list[dict]:
    """Left-padded ``{input_ids, attention_mask}`` batches (``tasks.collate``), built before any timing."""
    return [tasks.collate([{"input_ids": p} for p in prompts[s:s + batch_size]], rec.tok.pad_token_id,
                          rec.cfg.llm.max_length) for s in range(0, len(prompts), batch_size)]


class HFDecoder:
    """HF ``generate`` with beam search constrained by ``prefix_allowed_tokens_fn`` over a Python dict trie
    (prefix of SID token ids -> allowed next ids), the usual way to constrain HF decoding to a catalogue."""

    def __init__(self, model, trie: SIDTrie, pad_id: int, n_beams: int):
        self.model, self.pad_id, self.n_beams = model, pad_id, n_beams
        self.n_levels = trie.n_levels
        tokens = trie.level_token_ids[torch.arange(trie.n_levels), torch.from_numpy(trie.codes)].tolist()  # (N, M)
        self.item_of = {tuple(t): i for i, t in enumerate(tokens)}
        self.allowed: dict[tuple, list[int]] = {}
        for t in tokens:
            for lvl in range(self.n_levels):
                nxt = self.allowed.setdefault(tuple(t[:lvl]), [])
                if t[lvl] not in nxt:
                    nxt.append(t[lvl])
        self.sid_rows = trie.level_token_ids.reshape(-1)

    def __call__(self, batch: dict, sid_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(item_idx int64 (B, W), scores float32 (B, W))``, best first; -1 for a SID that is no item.
        ``sid_only``: score with the log-softmax over the SID rows (the hook described in the module docstring)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prompt_len = ids.shape[1]
        hook = None
        if sid_only:
            keep = torch.zeros(self.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
            keep[self.sid_rows] = True
            hook = self.model.get_output_embeddings().register_forward_hook(
                lambda _m, _i, out: out.masked_fill(~keep.to(out.device), float("-inf")))
        try:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, num_beams=self.n_beams, num_return_sequences=self.n_beams,
                max_new_tokens=self.n_levels, min_new_tokens=self.n_levels, do_sample=False, length_penalty=0.0,
                early_stopping=True, pad_token_id=self.pad_id, return_dict_in_generate=True, output_scores=True,
                prefix_allowed_tokens_fn=lambda _b, sent: self.allowed.get(tuple(sent[prompt_len:].tolist()),
                                                                           [self.pad_id]))
        finally:
            if hook is not None:
                hook.remove()
        gen = out.sequences[:, prompt_len:].tolist()
        items = np.array([self.item_of.get(tuple(g), -1) for g in gen], dtype=np.int64).reshape(len(ids), -1)
        return items, out.sequences_scores.float().cpu().numpy().reshape(len(ids), -1)


def ours(model, trie: SIDTrie, n_beams: int, loss_vocab: str):
    """Our decoder as ``batch -> (item_idx (B, W), scores (B, W))`` numpy arrays."""
    def run(batch: dict) -> tuple[np.ndarray, np.ndarray]:
        res = beam_search(model, trie, batch["input_ids"], batch["attention_mask"], n_beams=n_beams,
                          loss_vocab=loss_vocab)
        return res.item_idx.cpu().numpy(), res.scores.float().cpu().numpy()
    return run


def timed(decode, chunks: list[dict], n_users: int, repeats: int) -> dict:
    """users/s of ``decode`` over all chunks, ``repeats`` passes after an untimed warm-up on the first prompt; the
    results of the last pass (item_idx, scores) are returned under 'items' / 'scores'."""
    decode({k: v[:1] for k, v in chunks[0].items()})
    passes, load = [], [loadavg()]
    for _ in range(repeats):
        t = time.perf_counter()
        res = [decode(c) for c in chunks]
        passes.append(n_users / (time.perf_counter() - t))
    load.append(loadavg())
    return {"users_per_s_best": max(passes), "users_per_s_median": statistics.median(passes),
            "passes_users_per_s": passes, "loadavg_before_after": load,
            "items": np.concatenate([r[0] for r in res]), "scores": np.concatenate([r[1] for r in res])}


def integrity(items: np.ndarray, n_items: int) -> dict:
    """Invalid-ID rate (entries that are no catalogue item) and duplicate rate (entries repeating an earlier item
    of the same user) over all returned entries."""
    invalid = (items < 0) | (items >= n_items)
    dup = sum(len(row[row >= 0]) - len(set(row[row >= 0].tolist())) for row in items)
    return {"invalid_id_rate": float(invalid.mean()), "duplicate_rate": float(dup / items.size)}


def agreement(a_items, a_scores, b_items, b_scores, tol: float) -> dict:
    """Top-W agreement of two decoders (rows = users): exact (same items, same order), same set, and tie-only
    (differences explained by scores equal within ``tol``: see the module docstring); the largest score gap."""
    exact = same_set = tie_only = 0
    worst = 0.0
    examples = []
    for ia, sa, ib, sb in zip(a_items, a_scores, b_items, b_scores):
        gap_rank = float(np.max(np.abs(sa - sb)))
        common = {i: s for i, s in zip(ia.tolist(), sa.tolist())}
        gap_item = max([abs(common[i] - s) for i, s in zip(ib.tolist(), sb.tolist()) if i in common], default=0.0)
        worst = max(worst, gap_rank, gap_item)
        if ia.tolist() == ib.tolist():
            exact += 1
        elif gap_rank <= tol and gap_item <= tol:
            tie_only += 1
        elif len(examples) < 3:
            examples.append({"ours": ia.tolist(), "hf": ib.tolist(), "ours_scores": sa.tolist(),
                             "hf_scores": sb.tolist()})
        same_set += set(ia.tolist()) == set(ib.tolist())
    n = len(a_items)
    return {"users": n, "exact": exact, "tie_only": tie_only, "same_set": same_set,
            "agree_within_tol": exact + tie_only, "max_score_gap": worst, "tol": tol, "disagreements": examples}


def profile(decode, chunk: dict) -> dict:
    """One batch under ``torch.profiler`` (CPU): each ``decode.*`` range's share of the whole call, and the 12
    operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("decode.total"):
            decode(chunk)
    ev = {e.key: e for e in prof.key_averages()}
    total = ev["decode.total"].cpu_time_total
    shares = {r: (ev[r].cpu_time_total / total if r in ev else 0.0) for r in RANGES}
    ops = sorted((e for e in prof.key_averages() if not e.key.startswith("decode.")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"total_ms": total / 1e3, "range_share": shares,
            "top_ops_self_share": {e.key: e.self_cpu_time_total / total for e in ops}}


def smollm2_model(rec: Recommender, lora_std: float, seed: int):
    """SmolLM2 + LoRA on ``rec``'s run's SID vocabulary as training starts it, LoRA B randomised (eval mode)."""
    from ttds_ray.recipes import build_recommender_lm

    cfg = rec.cfg.model_copy(update={"llm": rec.cfg.llm.model_copy(update={"backbone": "smollm2",
                                                                           "finetune": "lora"})})
    model, _, vocab, _ = build_recommender_lm(cfg, rec.run)
    if not torch.equal(vocab.item_token_ids, rec.vocab.item_token_ids):
        raise RuntimeError("SmolLM2's SID token ids differ from the run's: the tokenizers do not match")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * lora_std)
    model.eval()
    setattr(model, "ttds_loss_vocab", rec.cfg.llm.loss_vocab)
    return model


def run_preset(name: str, rec: Recommender, args, peak: float) -> dict:
    """Every measurement of one preset (module docstring)."""
    trained = resolve_loss_vocab(rec.model, None)
    dims = model_dims(rec)
    prompts = eval_prompts(rec, args.users[name], args.seed)
    lens = [len(p) for p in prompts]
    n_sid = rec.trie.n_levels * rec.trie.codebook_size
    flops = {lv: float(np.mean([flops_per_prompt(T, args.beams, {**dims, "lm_head_rows": rows}) for T in lens]))
             for lv, rows in (("sid", n_sid), ("full", dims["lm_head_rows"]))}
    hf = HFDecoder(rec.model, rec.trie, rec.tok.pad_token_id, args.beams)
    out = {"model": dims, "loss_vocab_trained": trained, "users": len(prompts), "prompt_tokens_mean": float(np.mean(lens)),
           "gflops_per_user": {k: v / 1e9 for k, v in flops.items()},
           "bound_users_per_s": {k: peak / v for k, v in flops.items()}, "batch": {}}
    for bs in args.batch_sizes:
        n = len(prompts) if bs > 1 else min(len(prompts), args.batch1_users[name])
        chunks = batches(rec, prompts[:n], bs)
        res: dict = {"users": n}
        for lv in ("sid", "full"):
            r = timed(ours(rec.model, rec.trie, args.beams, lv), chunks, n, args.repeats[name])
            res[f"ours_{lv}"] = r
            print(f"[{name} b={bs}] ours {lv}: {r['users_per_s_best']:.2f} users/s (median "
                  f"{r['users_per_s_median']:.2f}), load {r['loadavg_before_after']}", flush=True)
        r = timed(hf, chunks, n, args.hf_repeats)
        res["hf"] = r
        print(f"[{name} b={bs}] HF generate: {r['users_per_s_best']:.2f} users/s, load {r['loadavg_before_after']}",
              flush=True)
        if bs == max(args.batch_sizes):       # agreement, integrity and profile on the big batch
            n_sid = min(n, args.sid_agree_users[name])     # HF with the SID-row hook: untimed, on the first users
            hf_sid = [hf(c, sid_only=True) for c in batches(rec, prompts[:n_sid], bs)]
            hf_sid_items, hf_sid_scores = np.concatenate([x[0] for x in hf_sid]), np.concatenate([x[1] for x in hf_sid])
            res["agreement"] = {
                "full": agreement(res["ours_full"]["items"], res["ours_full"]["scores"], r["items"], r["scores"],
                                  args.tol),
                "sid": agreement(res["ours_sid"]["items"][:n_sid], res["ours_sid"]["scores"][:n_sid], hf_sid_items,
                                 hf_sid_scores, args.tol)}
            res["integrity"] = {k: integrity(res[k]["items"], rec.trie.n_items) for k in ("ours_sid", "ours_full")}
            res["integrity"]["hf"] = integrity(r["items"], rec.trie.n_items)
            res["integrity"]["hf_sid"] = integrity(hf_sid_items, rec.trie.n_items)
            res["profile"] = {lv: profile(ours(rec.model, rec.trie, args.beams, lv), chunks[0])
                              for lv in ("sid", "full")}
            res["profile_loadavg"] = loadavg()
            for lv in ("full", "sid"):
                a = res["agreement"][lv]
                print(f"[{name}] agreement ({lv}): {a['exact']}/{a['users']} exact, {a['tie_only']} tie-only, "
                      f"max gap {a['max_score_gap']:.2e}", flush=True)
        for k in ("ours_sid", "ours_full", "hf"):
            res[k].pop("items"), res[k].pop("scores")
        for lv in ("sid", "full"):
            ups = res[f"ours_{lv}"]["users_per_s_best"]
            res[f"ours_{lv}"]["speedup_vs_hf"] = ups / res["hf"]["users_per_s_best"]
            res[f"ours_{lv}"]["fraction_of_bound"] = ups / out["bound_users_per_s"][lv]
        out["batch"][str(bs)] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart-ml100k"))
    ap.add_argument("--out", required=True, type=Path, help="JSON results file")
    ap.add_argument("--presets", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--tiny-users", type=int, default=64)
    ap.add_argument("--smollm2-users", type=int, default=32)
    ap.add_argument("--batch1-users", type=int, nargs=2, default=[16, 4], metavar=("TINY", "SMOLLM2"),
                    help="users timed at batch 1 (a subset of the same prompts)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--repeats", type=int, nargs=2, default=[3, 2], metavar=("TINY", "SMOLLM2"),
                    help="timed passes of our decoder")
    ap.add_argument("--sid-agree-users", type=int, nargs=2, default=[64, 8], metavar=("TINY", "SMOLLM2"),
                    help="users of the 'sid' agreement check (an extra, untimed HF pass with the SID-row hook)")
    ap.add_argument("--hf-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--tol", type=float, default=1e-4, help="nats: scores this close count as tied")
    ap.add_argument("--lora-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.users = {"tiny": args.tiny_users, "smollm2": args.smollm2_users}
    for key in ("batch1_users", "repeats", "sid_agree_users"):
        setattr(args, key, dict(zip(("tiny", "smollm2"), getattr(args, key))))

    torch.set_num_threads(args.threads)
    load0 = loadavg()
    peak = matmul_flops(args.matmul_n, args.threads)
    print(f"matmul {args.matmul_n}^3 float32 at {args.threads} threads: {peak / 1e9:.1f} GFLOP/s; load {load0}",
          flush=True)
    rec = Recommender.from_run(args.run)
    results = {"run": str(args.run), "beams": args.beams, "threads": args.threads, "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "matmul_n": args.matmul_n, "matmul_gflops": peak / 1e9,
               "loadavg_start": load0, "presets": {}}
    for name in args.presets:
        if name == "smollm2":
            rec.model = smollm2_model(rec, args.lora_std, args.seed)
            results["smollm2_model"] = ("untrained SmolLM2-135M-Instruct on the run's SID vocabulary (title-initialised "
                                        f"SID rows, LoRA r=8 with B ~ N(0, {args.lora_std}^2)); no trained SmolLM2 run")
        results["presets"][name] = run_preset(name, rec, args, peak)
    results["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, p in results["presets"].items():
        print(f"\n{name}: {p['users']} users, prompt {p['prompt_tokens_mean']:.1f} tokens, GFLOP/user "
              f"sid {p['gflops_per_user']['sid']:.3f} full {p['gflops_per_user']['full']:.3f}")
        print("| batch | decoder | users/s (best) | median | x HF | fraction of FLOP bound |\n|---|---|---|---|---|---|")
        for bs, r in p["batch"].items():
            for k in ("ours_sid", "ours_full", "hf"):
                x = r[k]
                print(f"| {bs} | {k} | {x['users_per_s_best']:.2f} | {x['users_per_s_median']:.2f} | "
                      f"{x.get('speedup_vs_hf', 1.0):.1f} | {x.get('fraction_of_bound', float('nan')):.3f} |")
            if "profile" in r:
                for lv, pr in r["profile"].items():
                    print(f"  profile {lv} (b={bs}, {pr['total_ms']:.0f} ms): " +
                          ", ".join(f"{k.split('.')[1]} {v:.1%}" for k, v in pr["range_share"].items()))
                print(f"  integrity: {r['integrity']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
