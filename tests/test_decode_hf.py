"""Our beam search against HF ``generate`` + ``prefix_allowed_tokens_fn`` on a trained tiny model (issue 12).

A 500-item catalogue (3 levels x 16 codes), a tiny Llama trained for a few seconds with the training loss
(``llm.lm_loss``, ``loss_vocab='sid'``) on synthetic next-item sequences, so its distributions are peaked like a
trained recommender's rather than near-uniform. HF's reference decoder is bench/decode.py's ``HFDecoder``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ttds_ray import llm
from ttds_ray.decoding import SIDTrie, beam_search

N_ITEMS, N_LEVELS, N_CODES, N_TEXT = 500, 3, 16, 40        # text tokens 0..39 (0 = pad, 1 = bos), then SID tokens
N_USERS, HISTORY, BEAMS, TOL = 50, 5, 20, 1e-4
LEVEL_TOKEN_IDS = N_TEXT + torch.arange(N_LEVELS * N_CODES).view(N_LEVELS, N_CODES)   # (M, K)
INSTRUCTION = [1, 7, 8, 9, 10]                             # bos + a fixed "instruction"


def _bench_decode():
    """bench/decode.py as a module (HFDecoder, agreement, integrity)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _catalogue(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """500 distinct SIDs; an item's level-1 code is its cluster (16 clusters): ``(codes (N, M), cluster (N,))``."""
    cluster = rng.integers(0, N_CODES, N_ITEMS)
    codes, seen = np.zeros((N_ITEMS, N_LEVELS), np.int64), set()
    for i in range(N_ITEMS):
        while True:
            sid = (int(cluster[i]), *rng.integers(0, N_CODES, N_LEVELS - 1).tolist())
            if sid not in seen:
                seen.add(sid)
                codes[i] = sid
                break
    return codes, cluster


def _sequences(rng: np.random.Generator, cluster: np.ndarray, n: int) -> np.ndarray:
    """``(n, HISTORY + 1)`` item sequences: the next item stays in the cluster of the last one w.p. 0.8, and within a
    cluster prefers a few popular items (Zipf), so the next-item distribution is learnable and peaked."""
    members = [np.flatnonzero(cluster == c) for c in range(N_CODES)]
    weight = [1.0 / np.arange(1, len(m) + 1) ** 1.2 for m in members]
    seqs = np.zeros((n, HISTORY + 1), np.int64)
    seqs[:, 0] = rng.integers(0, N_ITEMS, n)
    for t in range(1, HISTORY + 1):
        for u in range(n):
            c = cluster[seqs[u, t - 1]] if rng.random() < 0.8 else rng.integers(0, N_CODES)
            seqs[u, t] = rng.choice(members[c], p=weight[c] / weight[c].sum())
    return seqs


def _prompt(history: np.ndarray, sid_tokens: np.ndarray) -> list[int]:
    return INSTRUCTION + sid_tokens[history].reshape(-1).tolist()


@pytest.fixture(scope="module")
def trained():
    """``(model, trie, prompts, last loss)``: a tiny Llama trained 150 steps with lm_loss(sid_ids=...) (~5 s)."""
    torch.set_num_threads(1)             # small matmuls: a second thread only adds contention on a shared machine
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    codes, cluster = _catalogue(rng)
    sid_tokens = LEVEL_TOKEN_IDS[torch.arange(N_LEVELS), torch.from_numpy(codes)].numpy()   # (N, M)
    config = transformers.LlamaConfig(vocab_size=N_TEXT + N_LEVELS * N_CODES, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    train = _sequences(rng, cluster, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sid_ids = LEVEL_TOKEN_IDS.flatten()
    for step in range(150):
        rows = train[rng.integers(0, len(train), 32)]
        ids = torch.tensor([_prompt(r[:-1], sid_tokens) + sid_tokens[r[-1]].tolist() for r in rows])
        labels = torch.full_like(ids, -100)
        labels[:, -N_LEVELS:] = ids[:, -N_LEVELS:]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss = llm.lm_loss(model, batch, sid_ids=sid_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = _sequences(rng, cluster, N_USERS)
    prompts = [_prompt(r[:-rng.integers(1, 3)][-HISTORY:], sid_tokens) for r in test]   # lengths differ: padding
    return model, SIDTrie(codes, LEVEL_TOKEN_IDS), prompts, loss.item()


def _batch(prompts: list[list[int]]) -> dict:
    from ttds_ray.tasks import collate

    return collate([{"input_ids": p} for p in prompts], 0, 64)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_vocab", ["sid", "full"])
def test_top20_equals_hf_generate_with_prefix_allowed_tokens(trained, loss_vocab):
    """50 users, 20 beams: our top-20 equals HF's (same items, same order) for every user, or differs only where
    both decoders' scores agree within TOL at every rank (float ties; shown in the message). HF scores 'full'
    natively; for 'sid' a hook on the LM head leaves only the SID rows, so its log-softmax is the training one."""
    bench = _bench_decode()
    model, trie, prompts, loss = trained
    assert loss < 4.0, f"the tiny model did not train (loss {loss:.2f} nats; uniform over 16 codes is 2.77 x 3)"
    batch = _batch(prompts)
    ours = beam_search(model, trie, batch["input_ids"], batch["attention_mask"], n_beams=BEAMS, loss_vocab=loss_vocab)
    hf_items, hf_scores = bench.HFDecoder(model, trie, 0, BEAMS)(batch, sid_only=loss_vocab == "sid")
    a = bench.agreement(ours.item_idx.numpy(), ours.scores.numpy(), hf_items, hf_scores, TOL)
    assert a["agree_within_tol"] == N_USERS, f"{a['exact']} exact + {a['tie_only']} tie-only of {N_USERS}: {a}"
    assert a["max_score_gap"] < TOL
    assert bench.integrity(ours.item_idx.numpy(), trie.n_items) == {"invalid_id_rate": 0.0, "duplicate_rate": 0.0}
    assert bench.integrity(hf_items, trie.n_items) == {"invalid_id_rate": 0.0, "duplicate_rate": 0.0}
    # a peaked, trained model: the top item clearly ahead for most users, so the agreement is not vacuous
    assert float(np.median(ours.scores[:, 0] - ours.scores[:, 1])) > 1e-3


def test_a_trained_model_scores_differently_under_the_two_softmaxes(trained):
    """The two scorings are not interchangeable: on the model trained with the SID softmax, 'full' and 'sid' give
    other scores (the full normaliser holds text tokens the model learned nothing about)."""
    model, trie, prompts, _ = trained
    batch = _batch(prompts[:10])
    sid = beam_search(model, trie, batch["input_ids"], batch["attention_mask"], n_beams=BEAMS, loss_vocab="sid")
    full = beam_search(model, trie, batch["input_ids"], batch["attention_mask"], n_beams=BEAMS, loss_vocab="full")
    assert (sid.scores >= full.scores - 1e-4).all() and not torch.allclose(sid.scores, full.scores, atol=1e-3)


def test_a_loaded_run_decodes_with_the_softmax_it_was_trained_with(tiny_run):
    """Recommender.from_run -> llm.load_llm tags the model with the run's llm.loss_vocab ('sid' in the tiny run's
    config), so Recommender.rank / TTDSRanker score with it without being told: the same lists and scores as an
    explicit loss_vocab='sid', not those of 'full'."""
    from ttds_ray import tasks
    from ttds_ray.evaluate import eval_histories
    from ttds_ray.recommender import Recommender

    cfg, run, _ = tiny_run
    assert cfg.llm.loss_vocab == "sid"
    rec = Recommender.from_run(run.root)
    assert getattr(rec.model, llm.DECODE_SCORING_ATTR) == "sid"
    rows = np.arange(min(6, len(rec.splits)))
    hist = eval_histories(rec.splits, rows, "test", cfg.data.max_history)
    user_codes = rec.user_table.codes[rec.splits.user_idx[rows]]
    items, scores = rec.rank(hist, user_codes, n_beams=10)
    delattr(rec.model, llm.DECODE_SCORING_ATTR)            # now beam_search's own default ('full')
    full_items, full_scores = rec.rank(hist, user_codes, n_beams=10)
    rec.model.ttds_loss_vocab = "sid"
    assert (scores >= full_scores - 1e-4).all() and not np.allclose(scores, full_scores, atol=1e-3)
    prompts = tasks.build_eval_prompts([h.tolist() for h in hist], rec.item_tokens,
                                       rec.user_tokens[rec.splits.user_idx[rows]], rec.pieces, cfg.tasks,
                                       max_history=cfg.data.max_history, max_length=cfg.llm.max_length)
    batch = tasks.collate([{"input_ids": p} for p in prompts], rec.tok.pad_token_id, cfg.llm.max_length)
    explicit = beam_search(rec.model, rec.trie, batch["input_ids"], batch["attention_mask"], n_beams=10,
                           loss_vocab="sid")
    np.testing.assert_array_equal(items, explicit.item_idx.numpy())
    np.testing.assert_allclose(scores, explicit.scores.numpy(), atol=1e-5, rtol=0)


def test_a_run_with_popularity_correction_ranks_by_log_p_minus_beta_log_train_counts(tiny_run):
    """eval.popularity_correction = beta: the Recommender's trie carries the training-split counts + 1 as its item
    prior, and an exhaustive search (W = N) returns every item with score log p - beta * log q, i.e. the plain
    search's scores shifted item by item (valid and test targets never enter q)."""
    from ttds_ray import data
    from ttds_ray.evaluate import eval_histories
    from ttds_ray.recommender import Recommender

    cfg, run, _ = tiny_run
    plain = Recommender(cfg, run)
    corrected = Recommender(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"popularity_correction": 0.5})}),
                            run)
    assert plain.trie.node_log_prior is None
    counts = data.train_item_counts(plain.splits, plain.n_items)
    np.testing.assert_array_equal(corrected.trie.item_prior, counts + 1.0)
    rows = np.arange(min(4, len(plain.splits)))
    hist = eval_histories(plain.splits, rows, "test", cfg.data.max_history)
    user_codes = plain.user_table.codes[plain.splits.user_idx[rows]]
    n = plain.n_items
    items, scores = plain.rank(hist, user_codes, n_beams=n)
    c_items, c_scores = corrected.rank(hist, user_codes, n_beams=n)
    log_q = np.log((counts + 1.0) / (counts + 1.0).sum())
    for r in range(len(rows)):
        by_item = dict(zip(items[r].tolist(), scores[r].tolist()))
        assert sorted(by_item) == sorted(c_items[r].tolist()) == list(range(n))
        expected = np.array([by_item[i] - 0.5 * log_q[i] for i in c_items[r]])
        np.testing.assert_allclose(c_scores[r], expected, atol=2e-4, rtol=0)
    assert not np.array_equal(items, c_items)


def test_user_ids_from_the_current_history_match_the_towers_ids_of_that_history(tiny_run):
    """eval.user_ids=history: a known user's ID is the user tower's ID of the history before the target. For
    'valid' (the training history) it is the tokenizer stage's stored ID; for 'test' it is the ID of training +
    validation items; serving a known user gives what serving the same logged history as a raw history gives."""
    from ttds_ray.evaluate import evaluate_ttds
    from ttds_ray.recommender import Recommender

    cfg, run, _ = tiny_run
    stored = Recommender(cfg, run)
    fresh = Recommender(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"user_ids": "history"})}), run)
    sp = stored.splits
    rows = np.arange(len(sp))
    np.testing.assert_array_equal(fresh.known_user_codes(rows, "valid"), stored.known_user_codes(rows, "valid"))
    np.testing.assert_array_equal(stored.known_user_codes(rows, "test"), stored.user_table.codes[sp.user_idx[rows]])
    test_codes = fresh.known_user_codes(rows, "test")
    want = stored._user_codes([np.append(sp.train_items[r], sp.valid_target[r]) for r in rows])
    np.testing.assert_array_equal(test_codes, want)
    assert (test_codes != stored.user_table.codes[sp.user_idx[rows]]).any()   # the validation item moves some IDs
    # evaluation prompts use them: the same metrics as ranking with the recomputed IDs by hand
    got, ranked, _ = evaluate_ttds(fresh, sp, rows[:6], "test", fresh.cfg)
    hist = [np.append(sp.train_items[r], sp.valid_target[r])[-cfg.data.max_history:] for r in rows[:6]]
    by_hand, _ = fresh.rank(hist, test_codes[:6], n_beams=cfg.eval.n_beams)
    np.testing.assert_array_equal(ranked, by_hand)
    # serving: a known user == the same logged history sent as a raw history (which always gets a fresh ID)
    users = [fresh.user_ids[r] for r in rows[:3]]
    logged = [[fresh.item_ids[i] for i in fresh.user_history(u)] for u in users]
    a = fresh.recommend(user_ids=users, k=5)
    b = fresh.recommend(histories=logged, k=5)
    assert [x.item_ids for x in a] == [x.item_ids for x in b]
    assert [x.user_semantic_id for x in a] == [x.user_semantic_id for x in b]


def test_user_ids_bench_ranks_validation_with_the_current_and_an_older_id(tiny_run, tmp_path):
    """bench/user_ids.py: 'current' is the validation evaluation itself (stored IDs), 'stale' ranks the same prompts
    with the user tower's ID of the history without its last item; the summary's difference is theirs."""
    import importlib.util

    from conftest import REPO
    from ttds_ray.evaluate import evaluate_ttds
    from ttds_ray.recommender import Recommender
    spec = importlib.util.spec_from_file_location("bench_user_ids", REPO / "bench" / "user_ids.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg, run, _ = tiny_run
    got = mod.stale_vs_current(run.root, None)
    rec = Recommender(cfg, run)
    sp = rec.splits
    rows = np.asarray(got["users"])
    _, ranked, _ = evaluate_ttds(rec, sp, rows, "valid", cfg)
    stale = rec._user_codes([sp.train_items[r][:-1] for r in rows])
    assert 0 < got["changed"] <= 1 and (stale != rec.user_table.codes[sp.user_idx[rows]]).any()
    hist = [sp.train_items[r][-cfg.data.max_history:] for r in rows]
    by_hand, _ = rec.rank(hist, stale, n_beams=cfg.eval.n_beams)
    targets = sp.valid_target[rows]
    for name, lists in (("current", ranked), ("stale", by_hand)):
        want = [list(row).index(t) + 1 if t in row else 0 for row, t in zip(lists.tolist(), targets.tolist())]
        assert got[name] == want
    summary = mod.summarise({0: got, 1: got})
    cur, old = summary["NDCG@10"]["current"][0], summary["NDCG@10"]["stale"][0]
    assert summary["NDCG@10"]["bootstrap"]["diff"] == pytest.approx(cur - old)
    with pytest.raises(SystemExit):                          # a pattern without {seed} is a usage error
        mod.main(["--runs", str(run.root), "--seeds", "0", "--out", str(tmp_path / "u.json")])


def test_gate_bench_scores_both_ids_like_one_full_pass_per_id(tiny_run):
    """bench/gate.py: the gate's shared prompt pass (``code_logprobs`` with (2, M, L) IDs) against one teacher-forced
    pass per ID: the same log-probabilities up to float rounding and the same gate decisions."""
    import importlib.util

    from conftest import REPO
    spec = importlib.util.spec_from_file_location("bench_gate", REPO / "bench" / "gate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, run, _ = tiny_run
    got = mod.gate_timing(run.root, n_items=8, repeats=1)
    assert got["items"] == 8 and got["contexts"] > 8 and got["id_levels"] >= 2
    assert got["max_abs_diff"] < 1e-4 and got["decisions_differ"] == 0
    assert len(got["two_passes_s"]) == len(got["shared_s"]) == 1
    with pytest.raises(ValueError, match="must be >= 1"):
        mod.gate_timing(run.root, n_items=0, repeats=1)


def test_seqrec_prefix_user_ids_are_the_towers_ids_of_each_training_prefix(tiny_run):
    """tasks.seqrec_user_ids=prefix: the LLM recipe renders seqrec prompts with a table whose first U rows are the
    stored IDs and whose row U + off[u] + k - 1 is the user tower's ID of the user's first k training items; a full
    training sequence encodes to its stored ID (the tokenizer stage and the encoder agree)."""
    from conftest import llm_recipe
    from ttds_ray import recipes, tasks
    from ttds_ray.config import config_from_dict

    cfg, run, _ = tiny_run
    d = cfg.to_dict()
    d["tasks"]["seqrec_user_ids"] = "prefix"
    d["llm"]["max_steps"] = 4
    d["dynamic"].update(rounds=1, accept="llm", final_freeze=0.5)   # a gated round reads per-prefix rows too
    c = config_from_dict(d)
    rec = llm_recipe(c, run)
    seqs, U = rec.train_seqs, len(rec.train_seqs)
    off = tasks.prefix_user_rows(seqs)
    assert rec.prompt_user_tok.shape == (U + off[-1], rec.user_tok.shape[1])
    np.testing.assert_array_equal(rec.prompt_user_tok[:U], rec.user_tok)
    enc = recipes.UserEncoder.load(run, c, len(rec.item_codes))
    users = [u for u in range(U) if len(seqs[u]) >= 3][:5]
    hist = [np.asarray(seqs[u][:k]) for u in users for k in range(1, len(seqs[u]))]
    rows = [U + off[u] + k - 1 for u in users for k in range(1, len(seqs[u]))]
    np.testing.assert_array_equal(rec.prompt_user_tok[rows], rec.vocab.user_tokens(enc.codes(hist)))
    full = enc.codes([np.asarray(seqs[u]) for u in users])
    np.testing.assert_array_equal(rec.vocab.user_tokens(full), rec.user_tok[users])
    assert (rec.prompt_user_tok[rows] != np.repeat(rec.user_tok[users], [len(seqs[u]) - 1 for u in users], 0)).any()
    some = np.array([U + off[-1] - 1, U, U + 3])                     # only some rows (the logged examples')
    part = recipes.prompt_user_tokens(c, run, rec.vocab, enc.codes([np.asarray(q) for q in seqs]), seqs,
                                     len(rec.item_codes), only=some)
    np.testing.assert_array_equal(part[some], rec.prompt_user_tok[some])
    assert (np.delete(part[U:], some - U, axis=0) == -1).all()
    rounds = rec.prefix_off()
    np.testing.assert_array_equal(rounds, off)
    rec.fit()
    assert len(rec.losses) == 4 and np.isfinite(rec.losses).all() and len(rec.rounds) == 1
