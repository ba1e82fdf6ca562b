"""Trie scaling: build time and memory of ``SIDTrie`` against the former dense (nodes x K) table, and the
cost of the trie in a decoding step.

    python bench/trie.py [--sizes 10000,100000,1000000] [--old-sizes 10000,100000] [--out results/trie-DATE.json]

Catalogues: N random distinct SIDs of M = 4 levels x K = 256 codes (``numpy.random.default_rng(seed)``).
Each (layout, N) is measured in a fresh Python process (so peak RSS is that build's, not an earlier one's):
- ``build_s``: wall time of the constructor, best of ``--build-reps`` (one rep at N >= 1M);
- ``nbytes``: bytes of every array the trie holds (``SIDTrie.nbytes``: tensors and the ``codes`` array);
- ``rss_delta_bytes``: peak RSS (``resource.getrusage().ru_maxrss``) after the first build minus before it,
  i.e. the build's high-water mark, transient sort buffers included;
- ``decode_ms_best`` / ``_median``: the trie's part of one beam search, without a model: B = 32 prompts x
  W = 20 beams over the M levels, each level = the lookup of every (beam, code) child, the -inf mask on random
  log-probs, top-W and the advance to the chosen children, as ``decoding.beam_search`` does; best and median
  of ``--decode-reps``. ``decode_excl_ms_*`` adds ``exclude=`` (50 random items per prompt), per-call setup
  included: former layout (B, n_nodes) unseen counts, new layout ``SIDTrie.excluded_nodes``.
At ``--compare-size`` (10k) both layouts run in one process, timed in alternation (same machine load): the
trie part as above, and ``beam_search`` itself with a tiny random Llama (2 layers, d = 64, vocab 1,124) on the
same 32 prompts; best and median ms per batch, and whether the ranked items are identical.
The 10M-item row is a least-squares line through the measured sizes below 10M (bytes and seconds are ~linear
in N); ``--sizes 10000000 --old-sizes ""`` measures it instead (~1 GB, ~2.5 GB peak).

``DenseReferenceTrie`` below is the REFERENCE: the former SIDTrie (decoding.py before issue 12), kept here
only for this comparison. torch runs on 1 thread. The machine may be shared: the load average before and
after is recorded; compare numbers from one run only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ttds_ray.artifacts import atomic_write_bytes  # noqa: E402
from ttds_ray.decoding import SIDTrie, beam_search  # noqa: E402

N_LEVELS, N_CODES = 4, 256
BATCH, BEAMS, N_EXCLUDED = 32, 20, 50


class DenseReferenceTrie:
    """REFERENCE ONLY (former layout): children int64 `(n_nodes, K)`, child id or -1; nodes numbered as SIDTrie.

    Built as the former ``SIDTrie._rebuild`` did (np.unique over the rows' prefixes per level). Implements the
    slice of SIDTrie's API that ``beam_search`` calls, with the former lookups: ``children[nodes]`` and, for
    exclusions, ``counts.gather(child) > 0`` over the dense `(B, n_nodes)` unseen counts.
    """

    def __init__(self, codes: np.ndarray, level_token_ids: torch.Tensor) -> None:
        self.level_token_ids = level_token_ids.to(torch.int64)
        self.n_levels, self.codebook_size = level_token_ids.shape
        n_items = len(codes)
        parent = np.zeros(n_items, dtype=np.int64)
        edges_parent, edges_code, edges_child = [], [], []
        item_path = np.zeros((n_items, self.n_levels), dtype=np.int64)
        offset = 1
        for level in range(self.n_levels):
            prefixes, first_row, inverse = np.unique(codes[:, : level + 1], axis=0, return_index=True,
                                                     return_inverse=True)
            edges_parent.append(parent[first_row])
            edges_code.append(prefixes[:, level])
            edges_child.append(offset + np.arange(len(prefixes), dtype=np.int64))
            parent = offset + inverse.reshape(-1)
            item_path[:, level] = parent
            offset += len(prefixes)
        self.children = torch.full((offset, self.codebook_size), -1, dtype=torch.int64)
        self.children[torch.from_numpy(np.concatenate(edges_parent)),
                      torch.from_numpy(np.concatenate(edges_code))] = torch.from_numpy(np.concatenate(edges_child))
        self.leaf_item = torch.full((offset,), -1, dtype=torch.int64)
        self.leaf_item[torch.from_numpy(parent)] = torch.arange(n_items, dtype=torch.int64)
        n_leaves = np.bincount(item_path.reshape(-1), minlength=offset).astype(np.int64)
        n_leaves[0] = n_items
        self.item_path, self.n_leaves, self.codes = torch.from_numpy(item_path), torch.from_numpy(n_leaves), codes
        self.n_items, self.n_nodes = n_items, offset

    @property
    def nbytes(self) -> int:
        tensors = (self.children, self.leaf_item, self.item_path, self.n_leaves, self.level_token_ids)
        return int(self.codes.nbytes) + sum(t.numel() * t.element_size() for t in tensors)

    def excluded_nodes(self, exclude: list, device=None) -> torch.Tensor:
        """The former per-call setup: int64 `(B, n_nodes)` unseen counts (passed back as `excluded`)."""
        counts = self.n_leaves.unsqueeze(0).repeat(len(exclude), 1)
        rows = np.concatenate([np.full(len(ex), b) for b, ex in enumerate(exclude)]).astype(np.int64)
        items = np.concatenate([np.unique(np.asarray(ex, np.int64)) for ex in exclude])
        path = self.item_path[torch.from_numpy(items)]
        counts.index_put_((torch.from_numpy(rows).repeat_interleave(self.n_levels), path.reshape(-1)),
                          torch.full((path.numel(),), -1, dtype=torch.int64), accumulate=True)
        counts[:, 0] -= torch.bincount(torch.from_numpy(rows), minlength=len(exclude))
        return counts

    def children_of(self, nodes: torch.Tensor, level=None, counts: torch.Tensor | None = None) -> torch.Tensor:
        child = self.children[nodes.clamp(min=0)].masked_fill((nodes < 0).unsqueeze(-1), -1)  # (B, W, K)
        if counts is not None:
            child = child.masked_fill(counts.gather(1, child.clamp(min=0).view(len(nodes), -1)).view_as(child) <= 0, -1)
        return child

    def item_of_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        return torch.where(nodes >= 0, self.leaf_item[nodes.clamp(min=0)], -1)


def random_codes(n_items: int, seed: int) -> np.ndarray:
    """int64 `(N, 4)`: N distinct random SIDs of 4 levels x 256 codes."""
    flat = np.random.default_rng(seed).choice(N_CODES ** N_LEVELS, size=n_items, replace=False)
    return np.stack([(flat >> (8 * (N_LEVELS - 1 - level))) & (N_CODES - 1) for level in range(N_LEVELS)], 1)


def token_ids() -> torch.Tensor:
    return 100 + torch.arange(N_LEVELS * N_CODES).view(N_LEVELS, N_CODES)


def decode_trie_part(trie, excluded_list: list | None, seed: int) -> torch.Tensor:
    """The trie's part of one beam search (no model: random log-probs); returns the final nodes `(B, W)`."""
    gen = torch.Generator().manual_seed(seed)
    excluded = trie.excluded_nodes(excluded_list) if excluded_list is not None else None
    nodes = torch.zeros(BATCH, 1, dtype=torch.int64)
    scores = torch.zeros(BATCH, 1)
    for level in range(N_LEVELS):
        width = nodes.shape[1]
        child = trie.children_of(nodes, level, excluded)                     # (B, width, K)
        allowed = child >= 0
        logp = torch.rand(BATCH, width, N_CODES, generator=gen).log()
        cand = (scores.unsqueeze(-1) + logp).masked_fill(~allowed, float("-inf"))
        scores, flat = cand.view(BATCH, -1).topk(min(BEAMS, width * N_CODES), dim=-1)
        valid = allowed.view(BATCH, -1).gather(1, flat) & torch.isfinite(scores)
        nodes = torch.where(valid, child.view(BATCH, -1).gather(1, flat), -1)
    return nodes


def timed(fn, reps: int) -> tuple[float, float]:
    """(best, median) ms of `fn()` over `reps` calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return round(min(times), 3), round(statistics.median(times), 3)


def exclusions(n_items: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_items, N_EXCLUDED, replace=False).tolist() for _ in range(BATCH)]


def measure_one(layout: str, n_items: int, build_reps: int, decode_reps: int, seed: int) -> dict:
    """One (layout, N) in this process: build time, bytes, peak RSS delta, trie part of a decode."""
    torch.set_num_threads(1)
    codes = random_codes(n_items, seed)
    cls = SIDTrie if layout == "new" else DenseReferenceTrie
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(build_reps if n_items < 1_000_000 else 1):
        start = time.perf_counter()
        trie = cls(codes, token_ids())
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            rss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    ex = exclusions(n_items, seed + 1)
    decode = timed(lambda: decode_trie_part(trie, None, seed), decode_reps)
    decode_excl = timed(lambda: decode_trie_part(trie, ex, seed), decode_reps)
    return {"layout": layout, "n_items": n_items, "n_nodes": int(trie.n_nodes), "build_s": round(min(times), 4),
            "nbytes": int(trie.nbytes), "rss_delta_bytes": int(rss_delta),
            "decode_ms_best": decode[0], "decode_ms_median": decode[1],
            "decode_excl_ms_best": decode_excl[0], "decode_excl_ms_median": decode_excl[1]}


def compare_decoding(n_items: int, seed: int, reps: int) -> dict:
    """Both layouts on one catalogue in one process, timed in alternation (so both see the same machine load):
    the trie part of a decode, and ``beam_search`` with a tiny random Llama (same prompts); ms per batch of B
    prompts, best and median of `reps` rounds, and whether the ranked items are identical."""
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100 + N_LEVELS * N_CODES, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
    codes = random_codes(n_items, seed)
    tries = {"new": SIDTrie(codes, token_ids()), "reference": DenseReferenceTrie(codes, token_ids())}
    input_ids = torch.randint(0, 100, (BATCH, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(input_ids)
    ex = exclusions(n_items, seed + 1)
    jobs = {}
    for name, trie in tries.items():
        for tag, exclude in (("", None), ("_excl", ex)):
            jobs[f"trie_part{tag}.{name}"] = lambda t=trie, e=exclude: decode_trie_part(t, e, seed)
            jobs[f"beam_search{tag}.{name}"] = lambda t=trie, e=exclude: beam_search(model, t, input_ids, mask,
                                                                                    n_beams=BEAMS, exclude=e)
    times = {key: [] for key in jobs}
    for _ in range(reps + 2):                     # round-robin; the first 2 rounds are warm-up
        for key, fn in jobs.items():
            start = time.perf_counter()
            fn()
            times[key].append(1e3 * (time.perf_counter() - start))
    out = {"n_items": n_items, "batch": BATCH, "beams": BEAMS, "reps": reps}
    for key, ts in times.items():
        out[key] = {"best_ms": round(min(ts[2:]), 3), "median_ms": round(statistics.median(ts[2:]), 3)}
    for tag, exclude in (("", None), ("_excl", ex)):
        new, ref = (beam_search(model, tries[n], input_ids, mask, n_beams=BEAMS, exclude=exclude) for n in tries)
        out[f"identical_items{tag}"] = bool(torch.equal(new.item_idx, ref.item_idx))
        out[f"max_score_diff{tag}"] = float((new.scores - ref.scores).abs().max())
    return out


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run_child(args: list[str]) -> dict:
    """Runs this script with `args` in a fresh process and returns the JSON it prints last."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/trie.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linear_fit(xs: list[float], ys: list[float], at: float) -> float:
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope * at + intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="N for the new layout")
    parser.add_argument("--old-sizes", default="10000,100000",
                        help="N for the reference dense layout (1M: ~4 GB, ~70 s per build)")
    parser.add_argument("--build-reps", type=int, default=3)
    parser.add_argument("--decode-reps", type=int, default=30)
    parser.add_argument("--compare-size", type=int, default=10_000, help="N of the decoding comparison")
    parser.add_argument("--compare-reps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default results/trie-<YYYY-MM-DD>.json)")
    parser.add_argument("--one", nargs=2, metavar=("LAYOUT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.build_reps, args.decode_reps, args.seed)))
        return
    if args.compare:
        print(json.dumps(compare_decoding(args.compare, args.seed, args.compare_reps)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    old_sizes = [int(s) for s in args.old_sizes.split(",") if s]
    common = ["--build-reps", str(args.build_reps), "--decode-reps", str(args.decode_reps), "--seed", str(args.seed)]
    load_before = loadavg()
    rows = []
    for layout, layout_sizes in (("new", sizes), ("reference", old_sizes)):
        for n in layout_sizes:
            rows.append(run_child(["--one", layout, str(n), *common]))
            print(json.dumps(rows[-1]), flush=True)
    compare = run_child(["--compare", str(args.compare_size), "--compare-reps", str(args.compare_reps), "--seed", str(args.seed)])
    new = [r for r in rows if r["layout"] == "new" and r["n_items"] < 10_000_000]
    estimate = {"n_items": 10_000_000, "fit_on": [r["n_items"] for r in new]}
    for key in ("nbytes", "build_s", "rss_delta_bytes"):   # a line needs two sizes
        estimate[key] = round(linear_fit([r["n_items"] for r in new], [r[key] for r in new], 1e7), 3) \
            if len(new) > 1 else float("nan")
    report = {
        "date": dt.date.today().isoformat(), "levels": N_LEVELS, "codes": N_CODES, "batch": BATCH, "beams": BEAMS,
        "excluded_per_prompt": N_EXCLUDED, "torch_threads": 1, "cpus": os.cpu_count(), "torch": torch.__version__,
        "numpy": np.__version__, "loadavg_before": load_before, "loadavg_after": loadavg(),
        "note": "shared machine (other engineers' jobs may run); 'reference' = former dense (nodes x K) SIDTrie",
        "rows": rows, "estimate_10m_new": estimate, "decoding_new_vs_reference": compare,
    }
    out = Path(args.out or Path(__file__).resolve().parents[1] / "results" / f"trie-{report['date']}.json")
    atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())

    print(f"\nM={N_LEVELS} x K={N_CODES}, B={BATCH} x W={BEAMS}, torch 1 thread, load {load_before} -> "
          f"{report['loadavg_after']} (shared machine)")
    print(f"{'layout':<10}{'items':>11}{'nodes':>11}{'build s':>9}{'MB':>9}{'peak RSS +MB':>14}"
          f"{'decode ms':>11}{'+excl ms':>10}   (MB = 1e6 bytes; decode: trie part, best of reps)")
    for r in rows + [{"layout": "new (fit)", "n_nodes": float("nan"), "decode_ms_best": float("nan"),
                      "decode_excl_ms_best": float("nan"), **estimate}]:
        print(f"{r['layout']:<10}{r['n_items']:>11,}{r['n_nodes']:>11,.0f}{r['build_s']:>9.3f}{r['nbytes'] / 1e6:>9.1f}"
              f"{r['rss_delta_bytes'] / 1e6:>14.1f}{r['decode_ms_best']:>11.2f}{r['decode_excl_ms_best']:>10.2f}")
    print(f"\n{compare['n_items']:,} items, B={BATCH} x W={BEAMS}, alternating layouts, ms per batch, best / median:")
    for key in ("trie_part", "trie_part_excl", "beam_search", "beam_search_excl"):
        new, ref = compare[f"{key}.new"], compare[f"{key}.reference"]
        print(f"  {key:<18} new {new['best_ms']:8.2f} / {new['median_ms']:8.2f}   reference "
              f"{ref['best_ms']:8.2f} / {ref['median_ms']:8.2f}")
    print(f"  identical items: {compare['identical_items']}, with exclude: {compare['identical_items_excl']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
