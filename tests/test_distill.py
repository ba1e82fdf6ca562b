"""llm.distill_cf: SASRec's next-item distribution marginalised onto the semantic-ID trie (distill.py), its
soft targets carried through render / pack / collate to the right labels, the mixed loss, and the LLM recipe
training with the teacher (the config's checks of the keys: tests/test_config.py)."""
import numpy as np
import pytest
import torch

from ttds_ray import distill, llm, tasks
from ttds_ray.cf import SASRec

torch.set_num_threads(1)
L, K, N = 3, 4, 40


def _codes(seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(N, L))
    return codes


def test_code_distributions_is_the_item_distribution_summed_over_each_branch_of_the_trie():
    rng = np.random.default_rng(1)
    codes = _codes()
    probs = torch.as_tensor(rng.dirichlet(np.ones(N), size=5), dtype=torch.float64)
    target_items = rng.integers(0, N, size=5)
    target = torch.as_tensor(codes[target_items])
    q = distill.code_distributions(probs, torch.as_tensor(codes), target, K)
    assert q.shape == (5, L, K)
    for r in range(5):
        for lv in range(L):
            prefix = (codes[:, :lv] == codes[target_items[r], :lv]).all(1)
            want = np.array([probs[r].numpy()[prefix & (codes[:, lv] == c)].sum() for c in range(K)])
            np.testing.assert_allclose(q[r, lv].numpy(), want / want.sum(), atol=1e-12)
    # a teacher sure of the target gives the target's codes, one-hot at every level
    sure = torch.zeros(5, N, dtype=torch.float64)
    sure[torch.arange(5), torch.as_tensor(target_items)] = 1
    hard = distill.code_distributions(sure, torch.as_tensor(codes), target, K)
    assert torch.equal(hard.argmax(-1), target) and torch.allclose(hard.amax(-1), torch.ones(5, L, dtype=torch.float64))


def _tok_table():
    """Item i's tokens: 1000 + 10 * level + code; users: 2000 + 10 * level + code (3 levels, 2 user levels)."""
    codes = _codes()
    item_tok = 1000 + 10 * np.arange(L) + codes
    user_tok = 2000 + 10 * np.arange(2) + np.zeros((5, 2), dtype=np.int64)
    return codes, item_tok, user_tok


def _samples():
    ph = tasks.item_ph
    return [
        {"ids": [5, 6, tasks.user_ph(1), 7] + [ph(3), ph(8), ph(2)], "resp": [0, 0, 0, 0, 1, 1, 1]},  # seqrec window
        {"ids": [5, 9, 9, ph(4)], "resp": [0, 0, 0, 1]},                                             # item2id-like
        {"ids": [5, tasks.user_ph(2), 6, ph(7)], "resp": [0, 0, 0, 1]},                               # user2items-like
        {"ids": [7, ph(1), ph(5)], "resp": [0, 0, 1]},                               # loss_on=target: last item only
    ]


def test_trailing_windows_finds_the_seqrec_windows_only():
    got = distill.trailing_windows(_samples())
    assert [(i, p.tolist()) for i, p in got] == [(0, [4, 5, 6]), (3, [1, 2])]


class _Oracle(SASRec):
    """A 'SASRec' whose distribution at every position is one-hot on a fixed item (records its inputs)."""

    def __init__(self, sure_of: int):
        super().__init__(N, hidden=8, n_layers=1, max_len=20)
        self.sure_of, self.seen = sure_of, []

    def forward(self, seq):
        self.seen.append(seq.clone())
        return torch.zeros(*seq.shape, self.hidden)

    def score_all(self, h):
        out = torch.full((len(h), N), -1e4)
        out[:, self.sure_of] = 1e4
        return out


def test_attach_puts_each_soft_target_on_its_items_code_tokens_and_survives_pack_and_collate():
    codes, item_tok, user_tok = _tok_table()
    samples = _samples()
    rendered = tasks.render_batch(samples, item_tok, user_tok)
    teacher_model = _Oracle(sure_of=11)
    teacher = distill.CFTeacher(teacher_model).attach(samples, rendered, codes, K, 2)
    # window 0 targets items 8 and 2 (item 3 has no history), window 3 targets item 5 (loss on the last only)
    assert teacher.shape == (3 * L, K)
    seq = teacher_model.seen[0]
    assert seq.tolist() == [[3, 8], [-1, 1]]                  # each window without its last item, left-padded
    for r, s in zip(rendered, samples):
        assert len(r["soft"]) == len(r["input_ids"])
    labelled = [(i, t) for i, r in enumerate(rendered) for t, x in enumerate(r["soft"]) if x >= 0]
    assert len(labelled) == 3 * L
    for i, t in labelled:
        row = rendered[i]["soft"][t]
        level = row % L
        assert rendered[i]["labels"][t] == rendered[i]["input_ids"][t] and 1000 + 10 * level <= rendered[i]["labels"][t] < 1000 + 10 * level + K
    # teacher sure of item 11: level 0 one-hot on item 11's first code; deeper levels given the target's prefix
    q = distill.code_distributions(torch.eye(N)[[11, 11, 11]], torch.as_tensor(codes),
                                   torch.as_tensor(codes[[8, 2, 5]]), K)
    torch.testing.assert_close(teacher, q.reshape(-1, K))
    for to_batch in (tasks.pack, tasks.collate):
        b = to_batch(rendered, 0, 64)
        sel = b["soft"] >= 0
        assert int(sel.sum()) == 3 * L and bool((b["labels"][sel] != -100).all())
        got = sorted(zip(b["soft"][sel].tolist(), b["labels"][sel].tolist()))
        want = sorted((r["soft"][t], r["labels"][t]) for r in rendered for t in range(1, len(r["soft"])) if r["soft"][t] >= 0)
        assert got == want                                    # each soft row stays on its own label


def test_a_batch_without_seqrec_windows_gets_no_teacher():
    codes, item_tok, user_tok = _tok_table()
    samples = _samples()[1:3]
    rendered = tasks.render_batch(samples, item_tok, user_tok)
    assert distill.CFTeacher(_Oracle(0)).attach(samples, rendered, codes, K, 2) is None
    assert all(set(r["soft"]) == {-1} for r in rendered)
    with pytest.raises(ValueError, match="temperature"):
        distill.CFTeacher(_Oracle(0), temperature=0)


@pytest.fixture(scope="module")
def lm():
    tok = llm.load_tokenizer("tiny")
    base = len(tok)
    vocab = llm.add_sid_tokens(tok, L, K, 2, 4)
    cfg = llm.LLMConfig(backbone="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, finetune="full")
    model = llm.build_backbone(cfg, base, seed=0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():                      # a peaked (not near-uniform) untrained softmax
        model.get_output_embeddings().weight.mul_(30)
    return model.eval(), vocab


def _lm_batch(vocab, codes):
    item_tok = vocab.item_tokens(codes)
    samples = [{"ids": [5, 6, 7] + [tasks.item_ph(i) for i in (3, 8, 2)], "resp": [0, 0, 0, 1, 1, 1]},
               {"ids": [9, 10] + [tasks.item_ph(i) for i in (1, 5)], "resp": [0, 0, 1, 1]}]
    rendered = tasks.render_batch(samples, item_tok, None)
    return samples, rendered


def test_the_mixed_loss_is_the_nll_blended_with_the_teachers_cross_entropy(lm):
    model, vocab = lm
    codes = _codes()
    sid = vocab.item_token_ids.flatten()
    samples, rendered = _lm_batch(vocab, codes)
    rng = np.random.default_rng(0)
    probs = torch.as_tensor(rng.dirichlet(np.ones(N), size=3), dtype=torch.float32)
    q = distill.code_distributions(probs, torch.as_tensor(codes), torch.as_tensor(codes[[8, 2, 5]]), K)
    teacher = distill.CFTeacher(_Oracle(0))
    teacher.attach(samples, rendered, codes, K, 2)          # only for the soft rows; the matrix is replaced below
    b = tasks.pack(rendered, 0, 64)
    b["teacher"] = q.reshape(-1, K)
    with torch.no_grad():
        plain = llm.lm_loss(model, b, sid_ids=sid)
        assert torch.equal(llm.lm_loss(model, b, sid_ids=sid, distill=0.0), plain)
        mixed = llm.lm_loss(model, b, sid_ids=sid, distill=0.3)
        logits = model(input_ids=b["input_ids"], attention_mask=llm.model_attention_mask(model, b["attention_mask"]),
                       position_ids=b["position_ids"]).logits
    want, sid_list = [], sid.tolist()
    for r, t in zip(*torch.nonzero(b["labels"] != -100, as_tuple=True)):
        logp = logits[r, t - 1][sid].log_softmax(-1)
        y = sid_list.index(int(b["labels"][r, t]))
        nll = -logp[y]
        row = int(b["soft"][r, t])
        if row >= 0:
            lv = y // K
            nll = 0.7 * nll - 0.3 * (b["teacher"][row] * logp[lv * K:(lv + 1) * K]).sum()
        want.append(nll)
    assert len(want) == 5 * L and int((b["soft"] >= 0).sum()) == 3 * L
    torch.testing.assert_close(mixed, torch.stack(want).mean(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed, plain, atol=1e-3)
    b["teacher"] = torch.nn.functional.one_hot(torch.as_tensor(codes[[8, 2, 5]]), K).float().reshape(-1, K)
    with torch.no_grad():                                   # a one-hot teacher on the true codes is the plain loss
        torch.testing.assert_close(llm.lm_loss(model, b, sid_ids=sid, distill=0.3), plain)
    with pytest.raises(ValueError, match="sid_ids"):
        llm.lm_loss(model, b, distill=0.3)


def test_llm_recipe_trains_with_the_sasrec_teacher(tiny_run):
    """The recipe loads the run's SASRec, attaches soft targets to its batches and trains: the losses are those of
    the mixed objective (different from the run without it), finite, and the final model still decodes."""
    from conftest import llm_recipe
    from ttds_ray.config import config_from_dict

    cfg, run, _ = tiny_run
    d = cfg.to_dict()
    d["llm"].update(distill_cf=0.5, loss_vocab="sid", max_steps=6)
    d["dynamic"].update(rounds=0)
    runs = {}
    for lam in (0.0, 0.5):
        d["llm"]["distill_cf"] = lam
        rec = llm_recipe(config_from_dict(d), run)
        assert (rec.teacher is not None) == (lam > 0)
        soft_rows = []
        if rec.teacher is not None:                           # count the soft targets the batches carried
            attach = rec.teacher.attach
            def counting(*a, **kw):
                out = attach(*a, **kw)
                soft_rows.append(0 if out is None else len(out))
                return out
            rec.teacher.attach = counting
        rec.fit()
        runs[lam] = (rec.losses, soft_rows, {n: p.detach().clone() for n, p in rec.base.named_parameters()})
    (plain, _, w0), (mixed, soft_rows, w1) = runs[0.0], runs[0.5]
    assert len(plain) == len(mixed) == len(soft_rows) == 6 and np.isfinite(mixed).all() and sum(soft_rows) > 0
    # same initial weights and batches, another objective: other gradients, so other weights after 6 steps
    assert max(float((w0[n] - w1[n]).abs().max()) for n in w0) > 1e-4
