"""Recommender LM: SID tokens in the vocabulary, LoRA training of new rows, save/reload, losses."""
import numpy as np
import pytest
import torch

from ttds_ray import llm
from ttds_ray.config import LLMConfig

torch.set_num_threads(1)
TINY = dict(backbone="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2)


@pytest.fixture(scope="module")
def tok_and_vocab():
    tok = llm.load_tokenizer("tiny")
    base = len(tok)
    vocab = llm.add_sid_tokens(tok, 3, 8, 2, 4)
    return tok, vocab, base


def _model(cfg, base, tok, vocab):
    model = llm.build_backbone(cfg, base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return llm.wrap_for_training(model, cfg, vocab.new_token_ids)


def _batch(vocab):
    ids = torch.tensor([[5, 6, 7] + vocab.item_token_ids[:, 1].tolist() + vocab.item_token_ids[:, 3].tolist()])
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_sid_tokens_are_atomic_and_survive_save_load(tok_and_vocab, tmp_path):
    tok, vocab, _ = tok_and_vocab
    text = "".join(f"<i{l + 1}_{k}>" for l, k in enumerate([3, 0, 7]))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [int(vocab.item_token_ids[l, k]) for l, k in enumerate([3, 0, 7])]
    tok.save_pretrained(tmp_path)
    back = llm.load_tokenizer(str(tmp_path))
    assert back.encode(text, add_special_tokens=False) == ids
    assert torch.equal(llm.sid_vocab_from_tokenizer(back, 3, 8, 2, 4).item_token_ids, vocab.item_token_ids)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_one_step_trains_the_new_token_rows_only(tok_and_vocab, finetune):
    tok, vocab, base = tok_and_vocab
    cfg = LLMConfig(**TINY, finetune=finetune, lr=1e-2, warmup_steps=0)
    model = _model(cfg, base, tok, vocab)
    emb = lambda: model.get_input_embeddings()(vocab.item_token_ids.flatten()).detach().clone()  # noqa: E731
    before = emb()
    opt, sched = llm.make_optimizer(model, cfg, 10)
    llm.train_step(model, opt, sched, _batch(vocab))
    assert not torch.allclose(before, emb())
    old_rows = model.get_input_embeddings()(torch.arange(10)).detach()
    assert torch.allclose(old_rows, llm.build_backbone(cfg, base, seed=0).get_input_embeddings().weight[:10])


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_save_and_reload_reproduce_logits(tok_and_vocab, tmp_path, finetune):
    tok, vocab, base = tok_and_vocab
    cfg = LLMConfig(**TINY, finetune=finetune, lr=1e-2, warmup_steps=0)
    model = _model(cfg, base, tok, vocab)
    opt, sched = llm.make_optimizer(model, cfg, 10)
    for _ in range(2):
        llm.train_step(model, opt, sched, _batch(vocab))
    model.eval()
    llm.save_llm(model, tok, tmp_path, {"backbone": "tiny", "finetune": finetune, "base_vocab_size": base})
    back, _, _ = llm.load_llm(tmp_path, cfg)
    b = _batch(vocab)
    with torch.no_grad():
        a = model(input_ids=b["input_ids"]).logits
        c = back(input_ids=b["input_ids"]).logits
    assert torch.allclose(a, c, atol=1e-5)


def test_sid_loss_is_the_restricted_softmax(tok_and_vocab):
    tok, vocab, base = tok_and_vocab
    cfg = LLMConfig(**TINY, finetune="full")
    model = _model(cfg, base, tok, vocab).eval()
    b = _batch(vocab)
    sid = vocab.item_token_ids.flatten()
    got = llm.lm_loss(model, b, sid_ids=sid)
    logits = model(input_ids=b["input_ids"]).logits[0, :-1][:, sid]           # (T-1, S)
    tgt = b["labels"][0, 1:]
    keep = tgt != -100
    y = torch.tensor([sid.tolist().index(int(t)) for t in tgt[keep]])
    want = torch.nn.functional.cross_entropy(logits[keep], y)
    assert torch.allclose(got, want, atol=1e-5)
    b["labels"][0, 2] = 5                                                      # a text label
    with pytest.raises(ValueError, match="loss_vocab=sid"):
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
    assert torch.allclose(emb[vocab.item_token_ids[0, 0]], (t[0] + t[1]) / 2, atol=1e-6)
    assert torch.allclose(emb[vocab.item_token_ids[1, 1]], t[0], atol=1e-6)
    assert torch.allclose(emb[vocab.user_token_ids[0, 1]], (t[0] + t[1]) / 2, atol=1e-6)
