"""Recommender LM: SID tokens in the vocabulary, LoRA training of new rows, save/reload (also in a fresh
process), the mixed SID/text loss, token-grain alignment, frozen-LLM guidance and the LLM text encoder."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from ttds_ray import llm
from ttds_ray.config import LLMConfig
from ttds_ray.decoding import SIDTrie
from ttds_ray.evaluate import TTDSRanker
from ttds_ray.tasks import collate

torch.set_num_threads(1)
TINY = dict(backbone="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2)
LEVELS, K, USER_LEVELS, USER_K = 3, 8, 2, 4
N_ITEMS, N_USERS, TOP = 30, 20, 10


@pytest.fixture(scope="module")
def tok_and_vocab():
    tok = llm.load_tokenizer("tiny")
    base = len(tok)
    vocab = llm.add_sid_tokens(tok, LEVELS, K, USER_LEVELS, USER_K)
    return tok, vocab, base


def _cfg(finetune: str, **kw) -> LLMConfig:
    # LLMConfig itself allows tiny + lora (only TTDSConfig refuses it): the code paths are the same.
    return LLMConfig(**TINY, finetune=finetune, lr=1e-2, warmup_steps=0, **kw)


def _model(cfg, base, tok, vocab):
    model = llm.build_backbone(cfg, base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return llm.wrap_for_training(model, cfg, vocab.new_token_ids)


def _batch(vocab):
    ids = torch.tensor([[5, 6, 7] + vocab.item_token_ids[:, 1].tolist() + vocab.item_token_ids[:, 3].tolist()])
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _effective_rows(model, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embedding and lm_head weight ``(V, D)`` as the model computes with them (peft rows merged),
    read through the modules' forward, not through llm's helpers."""
    with torch.no_grad():
        inp = model.get_input_embeddings()(torch.arange(n_vocab))                  # (V, D)
        out = model.get_output_embeddings()(torch.eye(inp.shape[1])).T             # (V, D)
    return inp.clone(), out.clone()


# ---------------------------------------------------------------- tokenizer


def test_sid_tokens_are_atomic_and_round_trip_before_and_after_save_load(tok_and_vocab, tmp_path):
    tok, vocab, _ = tok_and_vocab
    strings = (llm.sid_token_strings("i", LEVELS, K) + llm.sid_token_strings("u", USER_LEVELS, USER_K))
    ids = vocab.new_token_ids
    text = "user <u1_2><u2_3> bought <i1_3><i2_0><i3_7> then"
    tok.save_pretrained(tmp_path)
    back = llm.load_tokenizer(str(tmp_path))
    for t in (tok, back):
        assert [t.encode(s, add_special_tokens=False) for s in strings] == [[i] for i in ids]
        assert [t.decode([i]) for i in ids] == strings
        enc = t.encode(text, add_special_tokens=False)
        assert t.encode(t.decode(enc), add_special_tokens=False) == enc
        assert enc[6:9] == [int(vocab.item_token_ids[l, k]) for l, k in enumerate([3, 0, 7])]
        assert enc[2:4] == [int(vocab.user_token_ids[l, k]) for l, k in enumerate([2, 3])]
    assert torch.equal(llm.sid_vocab_from_tokenizer(back, LEVELS, K, USER_LEVELS, USER_K).item_token_ids,
                       vocab.item_token_ids)


# ---------------------------------------------------------------- training the new rows


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("loss_vocab", ["full", "sid"])
def test_one_step_trains_the_new_token_rows_only(tok_and_vocab, finetune, loss_vocab):
    """One AdamW step on SID labels moves the new SID rows of the input embedding AND of lm_head
    (effective, peft-merged weights) and leaves the pretrained rows (incl. the prompt's) as built."""
    tok, vocab, base = tok_and_vocab
    cfg = _cfg(finetune)
    model = _model(cfg, base, tok, vocab)
    sid = vocab.item_token_ids.flatten()
    in0, out0 = _effective_rows(model, len(tok))
    opt, sched = llm.make_optimizer(model, cfg, 10)
    llm.train_step(model, opt, sched, _batch(vocab), sid_ids=sid if loss_vocab == "sid" else None)
    in1, out1 = _effective_rows(model, len(tok))
    used = torch.tensor(sorted(set(_batch(vocab)["input_ids"][0, 3:].tolist())))
    assert (in1[used] - in0[used]).abs().amax(-1).min() > 1e-4                # every SID row in the batch moved
    assert (out1[sid] - out0[sid]).abs().amax(-1).min() > 1e-4                 # every SID row of the head moved
    fresh = llm.build_backbone(cfg, base, seed=0).get_input_embeddings().weight[:10]   # tied: also the head rows
    assert torch.equal(in1[:10], fresh) and torch.equal(out1[:10], fresh)


# ---------------------------------------------------------------- save / reload


def _items_and_users(vocab):
    """Unique 3-level codes of N_ITEMS items and N_USERS seqrec-like prompts (pretrained token ids)."""
    rng = np.random.default_rng(0)
    flat = rng.choice(K ** LEVELS, size=N_ITEMS, replace=False)
    codes = np.stack([flat // K ** 2, flat // K % K, flat % K], axis=1)
    prompts = [rng.integers(100, 5000, size=int(rng.integers(3, 12))).tolist() for _ in range(N_USERS)]
    return codes, prompts


def _rank(model, tok, codes, prompts) -> list[list[int]]:
    """Top-TOP item_idx per prompt, trie-constrained beam search (the eval path)."""
    vocab = llm.sid_vocab_from_tokenizer(tok, LEVELS, K, USER_LEVELS, USER_K)
    ranker = TTDSRanker(model, SIDTrie(codes, vocab.item_token_ids), tok.pad_token_id, n_beams=TOP)
    return ranker.rank(prompts, batch_size=8).tolist()


def _train_on_users(model, cfg, vocab, codes, prompts, steps: int):
    """A few steps of seqrec-like training: prompt -> SID of item (first prompt token mod N_ITEMS)."""
    sid_tokens = vocab.item_tokens(codes)                                     # (N, L)
    samples = [{"input_ids": p + sid_tokens[p[0] % N_ITEMS].tolist(),
                "labels": [-100] * len(p) + sid_tokens[p[0] % N_ITEMS].tolist()} for p in prompts]
    batch = collate(samples, 2, 64)
    opt, sched = llm.make_optimizer(model, cfg, steps)
    for _ in range(steps):
        llm.train_step(model, opt, sched, batch, sid_ids=vocab.item_token_ids.flatten())


_FRESH_PROCESS = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_llm
from ttds_ray import llm
from ttds_ray.config import LLMConfig
a = json.load(open(sys.argv[1]))
model, tok, _ = llm.load_llm(a["dir"], LLMConfig(**a["cfg"]))
print("RANKED=" + json.dumps(test_llm._rank(model, tok, np.array(a["codes"]), a["prompts"])))
"""


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_save_and_reload_reproduce_logits_and_top10(tok_and_vocab, tmp_path, finetune):
    """save_llm/load_llm give the same logits and the same top-10 items for 20 users, in this process
    and (for the LoRA adapter) in a fresh one; the model is trained away from its init first."""
    tok, vocab, base = tok_and_vocab
    cfg = _cfg(finetune)
    model = _model(cfg, base, tok, vocab)
    codes, prompts = _items_and_users(vocab)
    at_init = _rank(model, tok, codes, prompts)
    _train_on_users(model, cfg, vocab, codes, prompts, steps=4)
    model.eval()
    ranked = _rank(model, tok, codes, prompts)
    assert ranked != at_init                                                   # training changed the rankings
    assert all(len(set(r)) == TOP and min(r) >= 0 for r in ranked)
    llm.save_llm(model, tok, tmp_path, {"backbone": "tiny", "finetune": finetune, "base_vocab_size": base})
    back, back_tok, _ = llm.load_llm(tmp_path, cfg)
    b = _batch(vocab)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=b["input_ids"]).logits, back(input_ids=b["input_ids"]).logits,
                              atol=1e-5)
    assert _rank(back, back_tok, codes, prompts) == ranked
    if finetune != "lora":
        return
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"dir": str(tmp_path), "cfg": cfg.model_dump(), "codes": codes.tolist(),
                                "prompts": prompts}))
    code = _FRESH_PROCESS.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", code, str(args)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RANKED="))
    assert json.loads(line[len("RANKED="):]) == ranked


# ---------------------------------------------------------------- losses


def _mixed_batch(vocab, tok):
    """Two left-padded rows: prompt -> item SID (row 0); prompt -> item SID + a title + eos (row 1)."""
    text = tok.encode(" red shoe", add_special_tokens=False) + [tok.eos_token_id]
    rows = [([5, 6, 7, 8], vocab.item_token_ids[:, 1].tolist()),
            ([9, 10], vocab.item_token_ids[:, 3].tolist() + text)]
    return collate([{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in rows], tok.pad_token_id, 64)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_mixed_loss_uses_the_sid_softmax_at_sid_labels_and_the_full_softmax_at_text(tok_and_vocab, finetune):
    tok, vocab, base = tok_and_vocab
    cfg = _cfg(finetune, lora_dropout=0.0)
    model = _model(cfg, base, tok, vocab)
    sid = vocab.item_token_ids.flatten()
    opt, sched = llm.make_optimizer(model, cfg, 10)
    llm.train_step(model, opt, sched, _batch(vocab))               # trained rows differ from the base rows
    model.eval()
    b = _mixed_batch(vocab, tok)
    got = llm.lm_loss(model, b, sid_ids=sid)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=llm.position_ids_from_mask(b["attention_mask"])).logits    # (B, T, V)
    nll, sid_list = [], sid.tolist()
    for r, t in zip(*torch.nonzero(b["labels"] != -100, as_tuple=True)):
        y, row = int(b["labels"][r, t]), logits[r, t - 1]
        nll.append(-(row[sid].log_softmax(-1)[sid_list.index(y)] if y in sid_list else row.log_softmax(-1)[y]))
    assert len(nll) == 2 * LEVELS + 3 and sum(int(y) not in sid_list for y in b["labels"][b["labels"] != -100]) == 3
    assert torch.allclose(got, torch.stack(nll).mean(), atol=1e-5)
    assert not torch.allclose(got, llm.lm_loss(model, b), atol=1e-3)           # differs from the full softmax
    b["labels"][:] = -100
    with pytest.raises(ValueError, match="no labelled position"):
        llm.lm_loss(model, b, sid_ids=sid)


def test_rows_are_initialised_from_titles(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    cfg = LLMConfig(**TINY, finetune="full")
    model = llm.build_backbone(cfg, base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    codes = np.array([[0, 1, 2], [0, 2, 3]])
    llm.init_sid_rows(model, tok, vocab, codes, ["red shoe", "blue hat"], np.array([[1, 2]]), [[0, 1]])
    emb = model.get_input_embeddings().weight
    t = [emb[tok.encode(x, add_special_tokens=False)].mean(0) for x in ("red shoe", "blue hat")]
    assert torch.allclose(llm.title_vectors(model, tok, ["red shoe", "blue hat"]), torch.stack(t), atol=1e-6)
    assert torch.allclose(emb[vocab.item_token_ids[0, 0]], (t[0] + t[1]) / 2, atol=1e-6)
    assert torch.allclose(emb[vocab.item_token_ids[1, 1]], t[0], atol=1e-6)
    assert torch.allclose(emb[vocab.user_token_ids[0, 1]], (t[0] + t[1]) / 2, atol=1e-6)


def test_codebook_init_keeps_each_levels_geometry_at_the_text_rows_scale(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    model = llm.build_backbone(LLMConfig(**TINY, finetune="full"), base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(1)
    # residual levels shrink: level l's vectors are 10**-l of level 0's
    item_books = torch.randn(LEVELS, K, 6, generator=g) * (10.0 ** -torch.arange(LEVELS))[:, None, None]
    user_books = torch.randn(USER_LEVELS, USER_K, 5, generator=g)
    llm.init_sid_rows_from_codebooks(model, vocab, item_books, user_books, seed=0)
    emb = model.get_input_embeddings().weight.detach()
    text_rms = emb[:base].pow(2).mean().sqrt()
    for books, ids in ((item_books, vocab.item_token_ids), (user_books, vocab.user_token_ids)):
        for l in range(books.shape[0]):
            rows = emb[ids[l]]                                                   # (K, D)
            assert torch.isclose(rows.pow(2).mean().sqrt(), text_rms, rtol=1e-4)
            # the map is orthonormal up to the level's scale: pairwise distances are proportional
            ratio = torch.cdist(rows, rows) / torch.cdist(books[l], books[l]).clamp_min(1e-12)
            off = ~torch.eye(len(rows), dtype=torch.bool)
            assert ratio[off].std() / ratio[off].mean() < 1e-4
    with pytest.raises(ValueError, match="item codebooks are"):
        llm.init_sid_rows_from_codebooks(model, vocab, item_books[:, :K - 1], user_books, seed=0)


def _tied_model(tok_and_vocab, finetune: str, dtype=torch.float32):
    tok, vocab, base = tok_and_vocab
    cfg = _cfg(finetune, loss_vocab="sid")
    model = llm.build_backbone(cfg, base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(1)
    item_books = torch.randn(LEVELS, K, 6, generator=g) * (10.0 ** -torch.arange(LEVELS))[:, None, None]
    llm.init_sid_rows_from_codebooks(model, vocab, item_books, torch.randn(USER_LEVELS, USER_K, 5, generator=g), seed=0)
    model = llm.wrap_for_training(model, cfg, vocab.new_token_ids).to(dtype)
    return cfg, model, llm.TiedIDRows(model, vocab.item_token_ids, item_books, seed=0).to(dtype), item_books


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_tied_id_rows_start_at_the_codebook_init_and_stay_the_map_of_the_code_vectors(tok_and_vocab, finetune):
    tok, vocab, base = tok_and_vocab
    cfg, model, tie, books = _tied_model(tok_and_vocab, finetune)
    items, users = vocab.item_token_ids.flatten(), vocab.user_token_ids.flatten()
    w0 = _effective_rows(model, len(tok))[0]
    assert torch.allclose(w0[items], tie.rows().detach(), atol=1e-6)
    opt, sched = llm.make_optimizer(model, cfg, 10, tuple(tie.parameters()))
    proj0 = tie.proj.detach().clone()
    for _ in range(3):
        llm.train_step(llm.LMLoss(model, items), opt, sched, _batch(vocab), tie=tie)
    inp, out = _effective_rows(model, len(tok))
    assert torch.allclose(inp[items], tie.rows().detach(), atol=1e-6) and torch.allclose(out[items], inp[items])
    assert not torch.allclose(inp[items], w0[items], atol=1e-4) and not torch.allclose(tie.proj.detach(), proj0)
    # every level's rows are one affine map of that level's code vectors: rows - b_l = scale_l * books_l @ P^T
    r = (inp[items].reshape(LEVELS, K, -1) - tie.bias.detach()[:, None]) / tie.scale.detach()[:, None, None]
    assert torch.allclose(r, books @ tie.proj.detach().T, atol=1e-5)
    new_books = books + 0.1
    tie.set_codebooks(new_books)
    assert torch.allclose(_effective_rows(model, len(tok))[0][items], tie.rows().detach(), atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        tie.set_codebooks(books[:, :K - 1])


def test_tied_id_rows_gradient_is_the_chain_rule_of_the_rows_gradient(tok_and_vocab):
    """pull_grad's gradient of the map's bias equals the finite-difference derivative of the loss (float64)."""
    tok, vocab, base = tok_and_vocab
    cfg, model, tie, _ = _tied_model(tok_and_vocab, "full", torch.float64)
    model.eval()
    items = vocab.item_token_ids.flatten()
    b = _batch(vocab)

    def loss() -> torch.Tensor:
        return llm.lm_loss(model, b, sid_ids=items)
    loss().backward()
    tie.pull_grad()
    delta = llm._token_layer(model.get_input_embeddings()).trainable_tokens_delta["default"]
    assert torch.all(delta.grad[tie.rows_at] == 0)                    # the rows themselves are not stepped
    v = torch.randn(tie.bias.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps, f = 1e-4, []          # small (the loss is curved at this scale), not tiny (lm_loss takes logits to float32)
    with torch.no_grad():
        for sign in (1, -1):
            tie.bias += sign * eps * v
            tie.write()
            f.append(float(loss()))
            tie.bias -= sign * eps * v
    assert (f[0] - f[1]) / (2 * eps) == pytest.approx(float((tie.bias.grad * v).sum()), rel=2e-3)
    assert tie.proj.grad is not None and tie.proj.grad.abs().sum() > 0


def test_tied_id_rows_refuse_a_model_without_trainable_item_rows(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    plain = llm.build_backbone(_cfg("full"), base, seed=0)
    plain.resize_token_embeddings(len(tok), mean_resizing=False)
    books = torch.randn(LEVELS, K, 6)
    with pytest.raises(ValueError, match="trainable tokens"):
        llm.TiedIDRows(plain, vocab.item_token_ids, books, seed=0)
    _, model, _, _ = _tied_model(tok_and_vocab, "full")
    with pytest.raises(ValueError, match="item codebooks are"):
        llm.TiedIDRows(model, vocab.item_token_ids, books[:, :K - 1], seed=0)


def test_token_alignment_loss_trains_the_sid_rows_under_lora(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    cfg = _cfg("lora")
    model = _model(cfg, base, tok, vocab)
    codes = np.array([[0, 1, 2], [0, 2, 3], [5, 1, 7], [6, 6, 6]])
    titles = ["red shoe", "blue hat", "green tea", "wooden chess board"]
    ids = torch.as_tensor(vocab.item_tokens(codes))                           # (B, L)
    text = llm.title_vectors(model, tok, titles)                              # (B, D)
    loss = llm.token_alignment_loss(model, ids, text)
    with torch.no_grad():
        e = model.get_input_embeddings()(torch.arange(len(tok)))             # (V, D)
        want = (1 - F.cosine_similarity(e[ids].sum(1), text, dim=-1)).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    delta = model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]    # (n_new, D)
    row_of = {t: r for r, t in enumerate(vocab.new_token_ids)}
    used = sorted({row_of[int(t)] for t in ids.flatten()})
    unused = sorted(set(range(len(row_of))) - set(used))
    assert (delta.grad[used].norm(dim=-1) > 0).all() and (delta.grad[unused] == 0).all()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        step_loss = llm.token_alignment_loss(model, ids, text)
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    with pytest.raises(ValueError, match="item_token_ids"):
        llm.token_alignment_loss(model, ids, text[:2])


def test_train_step_adds_the_aux_loss_but_reports_the_lm_loss(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    ids = torch.as_tensor(vocab.item_tokens(np.array([[1, 1, 1], [3, 3, 3]])))         # the rows _batch uses
    rows = []
    for with_aux, as_module in ((False, False), (True, False), (True, True)):
        cfg = _cfg("lora")
        model = _model(cfg, base, tok, vocab)
        text = llm.title_vectors(model, tok, ["red shoe", "blue hat"])
        opt, sched = llm.make_optimizer(model, cfg, 10)
        aux = (lambda: 10.0 * llm.token_alignment_loss(model, ids, text)) if with_aux else None  # noqa: B023
        torch.manual_seed(0)                                                           # same LoRA dropout
        step_on = llm.LMLoss(model) if as_module else model      # the form Ray Train's DDP wraps
        rows.append((llm.train_step(step_on, opt, sched, _batch(vocab), aux_loss=aux),
                     _effective_rows(model, len(tok))[0][ids.flatten()]))
    assert rows[0][0] == pytest.approx(rows[1][0], abs=1e-6)
    assert not torch.allclose(rows[0][1], rows[1][1], atol=1e-5)
    assert rows[2][0] == pytest.approx(rows[1][0], abs=1e-6) and torch.allclose(rows[2][1], rows[1][1])


# ---------------------------------------------------------------- frozen-LLM guidance


def _gpt2():
    """GPT-2 has absolute positions, so a wrong position id changes its output (Llama's RoPE does not)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32,
                                                                 n_layer=2, n_head=4, bos_token_id=0,
                                                                 eos_token_id=0))
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", ["lora", "gpt2"])
def test_llm_guidance_is_batch_size_invariant_and_sums_to_one(tok_and_vocab, kind):
    tok, vocab, base = tok_and_vocab
    rng = np.random.default_rng(1)
    if kind == "gpt2":
        model, level1, pad = _gpt2(), torch.arange(200, 208), 0
        prompts = [rng.integers(1, 200, size=int(n)).tolist() for n in rng.integers(1, 15, size=7)]
    else:
        cfg = _cfg("lora")
        model, level1, pad = _model(cfg, base, tok, vocab), vocab.item_token_ids[0], tok.pad_token_id
        opt, sched = llm.make_optimizer(model, cfg, 10)
        llm.train_step(model, opt, sched, _batch(vocab))
        prompts = [rng.integers(100, 5000, size=int(n)).tolist() + vocab.user_token_ids[:, 1].tolist()
                   for n in rng.integers(1, 15, size=7)]
    model.train()
    runs = [llm.llm_guidance(model, prompts, pad, level1, batch_size=bs) for bs in (1, 3, 32)]
    assert model.training
    hidden, probs = runs[0]
    assert hidden.shape == (7, 32) and probs.shape == (7, 8)
    assert hidden.dtype == probs.dtype == torch.float32
    for h, p in runs[1:]:
        torch.testing.assert_close(h, hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(p, probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))
    model.eval()
    with torch.no_grad():                                   # each prompt alone, unpadded, through the LM's own logits
        want = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1, level1].softmax(-1) for p in prompts])
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- LLM text encoder


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, tok_and_vocab):
    """A small Llama from config + the SmolLM2 tokenizer, saved as an HF directory (no hub access)."""
    tok = llm.load_tokenizer("tiny")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    out = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.eval(), tok


def test_encode_texts_llm_is_mask_aware_mean_pooling(tiny_lm_dir):
    path, model, tok = tiny_lm_dir
    texts = ["red shoe", "a far longer description of a wide blue hat with a brim", "green tea"]
    vecs = llm.encode_texts_llm(str(path), texts, batch_size=16)
    alone = llm.encode_texts_llm(str(path), texts[:1], batch_size=1)
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs[0], alone[0], atol=1e-5)                   # padding does not leak in

    def by_hand(ids):
        with torch.no_grad():
            h = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)   # (D,)
        return F.normalize(h, dim=0).numpy()

    np.testing.assert_allclose(alone[0], by_hand(tok.encode(texts[0])), atol=1e-5)
    short = llm.encode_texts_llm(str(path), texts[1:2], max_tokens=3)
    np.testing.assert_allclose(short[0], by_hand(tok.encode(texts[1])[:3]), atol=1e-5)
    np.testing.assert_allclose(llm.encode_texts_llm(str(path), [""])[0], by_hand([tok.eos_token_id]), atol=1e-5)
    with pytest.raises(ValueError, match="randomly initialised"):
        llm.encode_texts_llm("tiny", texts)


# ---------------------------------------------------------------- likelihood of a semantic ID (dynamic.accept=llm)


@pytest.mark.parametrize("kind", ["tiny-sid", "tiny-full", "gpt2"])
def test_code_logprobs_is_the_training_loss_of_the_id_tokens_at_any_batch_size(tok_and_vocab, kind):
    tok, vocab, base = tok_and_vocab
    rng = np.random.default_rng(2)
    if kind == "gpt2":                                       # absolute positions: left padding must not shift them
        model, pad, sid = _gpt2(), 0, None
        ids = torch.arange(200, 200 + LEVELS * K).view(LEVELS, K)
        prompts = [rng.integers(1, 200, size=int(n)).tolist() for n in rng.integers(1, 15, size=6)]
    else:
        cfg = _cfg("full")
        model, pad, ids = _model(cfg, base, tok, vocab), tok.pad_token_id, vocab.item_token_ids
        opt, sched = llm.make_optimizer(model, cfg, 10)
        llm.train_step(model, opt, sched, _batch(vocab))
        sid = ids.flatten() if kind == "tiny-sid" else None
        prompts = [rng.integers(100, 5000, size=int(n)).tolist() for n in rng.integers(1, 15, size=6)]
    codes = ids.numpy()[np.arange(LEVELS)[None, :], rng.integers(0, K, size=(6, LEVELS))]     # (M, L) vocab ids
    model.train()
    runs = [llm.code_logprobs(model, prompts, codes, pad, sid_ids=sid, batch_size=bs) for bs in (1, 4, 64)]
    assert model.training and runs[0].shape == (6,) and bool((runs[0] < 0).all())
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], atol=1e-5, rtol=0)
    model.eval()
    for p, c, got in zip(prompts, codes.tolist(), runs[0]):   # one unpadded row through the training loss
        b = collate([{"input_ids": p + c, "labels": [-100] * len(p) + c}], pad, 64)
        with torch.no_grad():
            want = -LEVELS * float(llm.lm_loss(model, b, sid_ids=sid))
        assert float(got) == pytest.approx(want, abs=1e-4)
    other = ids.numpy()[np.arange(LEVELS)[None, :], rng.integers(0, K, size=(6, LEVELS))]
    both = llm.code_logprobs(model, prompts, np.stack([codes, other]), pad, sid_ids=sid, batch_size=4)
    assert both.shape == (2, 6)                              # C candidates per prompt on one shared prompt pass
    torch.testing.assert_close(both[0], runs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], llm.code_logprobs(model, prompts, other, pad, sid_ids=sid), atol=1e-5, rtol=0)
    for bad in (codes[:3], codes[None, :, :0], np.zeros((0, 6, LEVELS), dtype=np.int64), codes[0]):
        with pytest.raises(ValueError, match="codes must be"):
            llm.code_logprobs(model, prompts, bad, pad, sid_ids=sid)
    if sid is not None:
        with pytest.raises(ValueError, match="not among sid_ids"):
            llm.code_logprobs(model, prompts, np.full((6, LEVELS), 5), pad, sid_ids=sid)


def _learnt_contexts(tok_and_vocab):
    """A tiny LM trained on two contexts: item 0 follows context [2] and gets ID A, item 1 follows [3] and gets B."""
    from ttds_ray.dynamic import GateInputs

    tok, vocab, base = tok_and_vocab
    cfg = _cfg("full")
    model = _model(cfg, base, tok, vocab)
    seqs = [[2, 0], [3, 1], [2, 0]]
    render = lambda hist, users: [[400 + 7 * h for h in hs] for hs in hist]      # noqa: E731
    A, B = [0, 0, 0], [1, 1, 1]
    tok_of = lambda c: vocab.item_token_ids[torch.arange(LEVELS), torch.as_tensor(c)].tolist()  # noqa: E731
    rows = [{"input_ids": render([[2]], None)[0] + tok_of(A), "labels": [-100] + tok_of(A)},
            {"input_ids": render([[3]], None)[0] + tok_of(B), "labels": [-100] + tok_of(B)}]
    opt, sched = llm.make_optimizer(model, cfg, 40)
    for _ in range(40):
        llm.train_step(model, opt, sched, collate(rows, tok.pad_token_id, 16), sid_ids=vocab.item_token_ids.flatten())
    return model, GateInputs(seqs, render, vocab.item_token_ids, vocab.item_token_ids.flatten(), max_history=5), A, B


def test_likelihood_gate_moves_an_item_only_to_an_id_the_llm_prefers(tok_and_vocab):
    from ttds_ray.dynamic import likelihood_gate

    model, gate, A, B = _learnt_contexts(tok_and_vocab)
    pad, U0, U1 = tok_and_vocab[0].pad_token_id, [2, 2, 2], [3, 3, 3]
    old = np.array([A, U1, [4, 4, 4], [5, 5, 5]])           # item 0 holds its learnt ID, item 1 an unlearnt one
    proposed = np.array([U0, B, [4, 4, 4], [6, 6, 6]])      # the round proposes the reverse; item 3 has no context
    codes, st = likelihood_gate(model, old, proposed, gate, pad_id=pad, contexts=4, margin=0.0, seed=0)
    assert codes.tolist() == [A, B, [4, 4, 4], [5, 5, 5]]   # item 1 moves to B, item 0 keeps A, item 3 stays
    assert st["proposed"] == 3 and st["scored"] == 2 and st["accepted"] == 1 and st["gain_accepted_mean"] > 0
    codes, st = likelihood_gate(model, old, proposed, gate, pad_id=pad, contexts=4, margin=1e6, seed=0)
    assert codes.tolist() == old.tolist() and st["accepted"] == 0           # a margin no move clears


def test_llm_item_ids_propose_what_the_llm_learnt_and_keep_the_table_unique(tok_and_vocab):
    from ttds_ray.dynamic import llm_item_ids

    model, gate, A, B = _learnt_contexts(tok_and_vocab)
    pad = tok_and_vocab[0].pad_token_id
    old = np.array([[2, 2, 2], [3, 3, 3], [4, 4, 4], [5, 5, 5]])
    proposed, st = llm_item_ids(model, old, gate, pad_id=pad, contexts=4, seed=0)
    assert proposed.tolist() == [A, B, [4, 4, 4], [5, 5, 5]] and st["scored"] == 2   # items 2, 3: no context
    held = np.array([[2, 2, 2], [3, 3, 3], A, [5, 5, 5]])    # item 2 holds A: item 0 takes its next-best last code
    proposed, _ = llm_item_ids(model, held, gate, pad_id=pad, contexts=4, seed=0)
    assert proposed[0, :2].tolist() == A[:2] and proposed[0].tolist() != A and proposed[1].tolist() == B
    assert len(np.unique(proposed, axis=0)) == len(proposed)


# ---------------------------------------------------------------- sample packing (llm.pack)


@pytest.mark.parametrize("kind,attn,loss_vocab", [("tiny", "sdpa", "sid"), ("tiny", "sdpa", "full"),
                                                   ("tiny", "eager", "sid"), ("gpt2", "sdpa", "sid")])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradient_in_fewer_rows(tok_and_vocab, kind, attn, loss_vocab):
    from ttds_ray.tasks import pack

    tok, vocab, base = tok_and_vocab
    if kind == "gpt2":                   # absolute positions: a segment's positions must restart at 0
        model, pad, ids, lo, hi = _gpt2(), 0, torch.arange(200, 200 + LEVELS * K).view(LEVELS, K), 1, 200
    else:
        model, pad, ids, lo, hi = _model(_cfg("full"), base, tok, vocab), tok.pad_token_id, vocab.item_token_ids, 100, 5000
    model.config._attn_implementation = attn
    model.eval()                                         # no dropout (GPT-2's config has some); gradients still flow
    rng = np.random.default_rng(3)
    sid = ids.flatten() if loss_vocab == "sid" else None
    samples = []
    for n in (3, 9, 4, 12, 2, 7, 5, 11):
        resp = ids[:, rng.integers(0, K)].tolist()
        prompt = rng.integers(lo, hi, size=n).tolist()
        samples.append({"input_ids": prompt + resp, "labels": [-100] * n + resp})
    packed, padded = pack(samples, pad, 64), collate(samples, pad, 64)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1] == 15
    assert len(packed["input_ids"]) < len(samples)                             # 8 samples in fewer rows
    assert sorted(packed["input_ids"][packed["input_ids"] != pad].tolist()) == \
        sorted(t for s_ in samples for t in s_["input_ids"])                 # every token once, none lost
    grads = []
    for b in (padded, packed):
        model.zero_grad()
        loss = llm.lm_loss(model, b, sid_ids=sid)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[1][0] == pytest.approx(grads[0][0], abs=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="empty sample"):
        pack([{"input_ids": [], "labels": []}], tok.pad_token_id, 64)


def test_packing_is_refused_before_training_for_attention_without_4d_masks(tok_and_vocab):
    from ttds_ray.errors import ConfigError

    tok, vocab, base = tok_and_vocab
    model = _model(_cfg("full"), base, tok, vocab)
    llm.check_packing(model, _cfg("full", pack=True))                  # sdpa: fine
    model.config._attn_implementation = "flash_attention_2"
    llm.check_packing(model, _cfg("full", pack=False))                 # not packing: fine
    with pytest.raises(ConfigError, match="llm.pack=true .*flash_attention_2.*llm.pack=false"):
        llm.check_packing(model, _cfg("full", pack=True))
    with pytest.raises(ValueError, match="4D mask"):                  # and lm_loss refuses a packed batch
        llm.model_attention_mask(model, torch.ones(1, 1, 3, 3, dtype=torch.bool))


def _alignment(weight=1.0, tau=0.1, dim=4):
    ids = torch.tensor([[10, 11, 12], [13, 14, 15]])                 # L = 2 levels, K = 3 codes
    codes = np.array([[0, 1], [2, 0], [1, 1]])
    latents = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    return llm.IDAlignment(ids, codes, latents, weight=weight, tau=tau), latents


def test_id_alignment_finds_whole_known_item_ids_in_the_labels():
    align, _ = _alignment()
    # text 5; item 0 = (10, 14); item 1 = (12, 13); a lone level-2 token; item 2 = (11, 14); (10, 13) = codes (0, 0)
    # is no item's ID; a truncated ID at the end
    y = torch.tensor([5, 10, 14, 12, 13, 13, 11, 14, 10, 13, 10])
    starts, items = align.items_in(y)
    assert starts.tolist() == [1, 3, 6] and items.tolist() == [0, 1, 2]
    assert align.items_in(torch.tensor([5, 6, 7]))[0].numel() == 0 and align.items_in(torch.tensor([10]))[0].numel() == 0


def test_id_alignment_is_an_infonce_toward_the_named_items_latents_and_reaches_only_their_states():
    align, latents = _alignment(weight=0.5)
    y = torch.tensor([5, 10, 14, 12, 13, 11, 14])                    # items 0, 1, 2 start at 1, 3, 5
    aligned = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    aligned[[1, 3, 5]] = latents * 3                                   # scale does not matter: cosine
    swapped = aligned.clone()
    swapped[[1, 3, 5]] = latents[[1, 2, 0]]
    good, bad = align(aligned, y), align(swapped, y)
    z = F.normalize(latents, dim=-1)
    want = 0.5 * F.cross_entropy(z @ z.T / 0.1, torch.arange(3))
    assert float(good) == pytest.approx(float(want), rel=1e-5) and float(bad) > float(good)
    h = aligned.clone().requires_grad_(True)
    align(h, y).backward()
    assert h.grad[[1, 3, 5]].abs().sum() > 0 and h.grad[[0, 2, 4, 6]].abs().sum() == 0
    none = torch.randn(3, 4, requires_grad=True)
    out = align(none, torch.tensor([5, 6, 7]))
    out.backward()
    assert float(out.detach()) == 0.0 and none.grad is not None


def test_id_alignment_refuses_bad_tables_and_settings():
    align, latents = _alignment()
    with pytest.raises(ValueError, match="not unique"):
        align.update(np.array([[0, 1], [0, 1], [1, 1]]), latents)
    with pytest.raises(ValueError, match="do not match"):
        align.update(np.array([[0, 1], [2, 0]]), latents)
    with pytest.raises(ValueError, match="weight > 0"):
        _alignment(weight=0.0)
    with pytest.raises(ValueError, match="sid_ids"):
        llm.LMLoss(torch.nn.Linear(2, 2), None, 0.0, align)
