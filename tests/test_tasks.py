"""seqrec samples: windows, labels, and no validation/test target ever reaching training inputs (any task)."""
import numpy as np
import pandas as pd
import torch

from ttds_ray import cf, data
from ttds_ray.config import CFConfig, TasksConfig, TaskWeights, TokenizerConfig, TowerConfig
from ttds_ray.tasks import (TASKS, PromptPieces, TaskContext, build_eval_prompts, build_seqrec_samples,
                            build_task_samples, collate, render_batch, seqrec_windows)
from ttds_ray.towers import export_user_sids, fit_tower, user_semantic_embeddings


class FakeTok:
    """Character-level stand-in: one id per character (ids 1000+ord); eos = 3."""
    eos_token_id = 3

    def encode(self, text, add_special_tokens=False):
        return [1000 + ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i - 1000) if i >= 1000 else f"<{i}>" for i in ids)


def test_windows_cover_sequence_and_respect_max_history():
    w = seqrec_windows(45, max_history=20, stride=10, loss_on="all_items")
    assert w[0] == (24, 45) and w[-1][0] == 0
    assert all(e - s <= 21 for s, e in w)
    assert seqrec_windows(4, max_history=2, stride=1, loss_on="target") == [(0, 2), (0, 3), (1, 4)]


def test_labels_all_items_vs_target():
    item_tokens = np.arange(30).reshape(10, 3) + 500          # item i -> 3 token ids
    pieces = PromptPieces(((([7, 8]), [9]),))
    seqs = [[1, 2, 3]]
    dense = build_seqrec_samples(seqs, item_tokens, None, pieces, TasksConfig(), max_history=20, seed=0)
    assert dense == [{"input_ids": [7, 8, 9] + list(range(503, 512)), "labels": [-100] * 3 + list(range(503, 512))}]
    tgt = build_seqrec_samples(seqs, item_tokens, None, pieces, TasksConfig(seqrec_loss_on="target"),
                               max_history=20, seed=0)
    assert [s["labels"][-3:] for s in tgt] == [[506, 507, 508], [509, 510, 511]]
    assert all(sum(l != -100 for l in s["labels"]) == 3 for s in tgt)


def _raw(rows):
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["order"] = np.arange(len(inter))
    items = pd.DataFrame({"item_id": sorted(inter["item_id"].unique())})
    items["title"] = "t " + items["item_id"]
    items["text"] = ("title: " + items["title"] + "; brand: " + np.where(items["item_id"] < "r", "Acme", "Zest")
                     + "; categories: Top,C" + items["item_id"])
    return data.RawData(inter, items)


def _training_inputs(raw):
    prep = data.prepare(raw, kcore=0, seed=0)
    splits = data.split_leave_one_out(prep.sequences)
    train = [t.tolist() for t in splits.train_items]
    n = len(prep.items)
    item_tokens = np.arange(n * 2).reshape(n, 2) + 100
    user_tokens = np.arange(len(train) * 2).reshape(-1, 2) + 900
    seqrec = build_seqrec_samples(train, item_tokens, user_tokens, PromptPieces.build(FakeTok()), TasksConfig(),
                                  max_history=20, seed=0)
    ctx = TaskContext(train_seqs=train, titles=prep.items["title"].tolist(), item_text=prep.items["text"].tolist(),
                      tok=FakeTok(), max_history=3, use_user_sid=True)
    cfg = TasksConfig(weights=TaskWeights(**{t: 3.0 for t in TASKS}), neighbour_min_overlap=1)
    every_task = build_task_samples(ctx, cfg, seed=0, epoch=0)
    assert {s["task"] for s in every_task} == set(TASKS)
    samples = (seqrec, every_task, render_batch(every_task, item_tokens, user_tokens))
    text = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    user_s = user_semantic_embeddings(text, train)
    batches = list(cf.make_training_batches(train, 8, 4, np.random.default_rng(0), stride=2))
    return splits, samples, user_s, batches, train, n


def _user_ids(train, n_items, user_s):
    """SASRec on the training split -> user tower -> user semantic IDs (the whole user side)."""
    torch.manual_seed(0)
    sasrec = cf.fit_sasrec(CFConfig(hidden=8, epochs=2, max_len=8, batch_size=4, window_stride=2), train,
                           n_items, seed=0)
    user_c = cf.cf_embeddings(sasrec, train).users
    tcfg = TokenizerConfig(epochs=3, batch_size=8)
    tower = fit_tower(tcfg, TowerConfig(n_levels=2, codebook_size=2, latent_dim=4, hidden_dim=8), user_s, user_c,
                      seed=0)
    return user_c, export_user_sids(tower, user_s, user_c)[0]


def test_changing_a_test_or_valid_item_leaves_every_training_input_identical():
    rows = [(u, it, t) for u, seq in {"a": "pqrst", "b": "qrsp", "c": "rstq", "d": "stpqr", "e": "tpq"}.items()
            for t, it in enumerate(seq)]
    base = _training_inputs(_raw(rows))
    base_c, base_ids = _user_ids(base[4], base[5], base[2])
    for changed in (rows[:4] + [("a", "q", 4)] + rows[5:],    # user a's test item t -> q
                    rows[:3] + [("a", "p", 3)] + rows[4:]):   # user a's valid item s -> p
        other = _training_inputs(_raw(changed))
        assert other[1] == base[1]                                      # samples of every task (+ rendered)
        assert other[2].tobytes() == base[2].tobytes()                  # user semantic inputs
        assert all((x["seq"] == y["seq"]).all() and (x["target"] == y["target"]).all()
                   for x, y in zip(other[3], base[3]))                   # SASRec batches
        user_c, ids = _user_ids(other[4], other[5], other[2])
        assert user_c.tobytes() == base_c.tobytes()                     # collaborative user inputs
        assert ids.content_hash() == base_ids.content_hash()            # user semantic IDs
        assert not (other[0].test_target == base[0].test_target).all() or \
            not (other[0].valid_target == base[0].valid_target).all()   # the change is real


def test_eval_prompt_uses_last_history_items_and_collate_left_pads():
    item_tokens = np.arange(20).reshape(10, 2) + 500
    pieces = PromptPieces((([1], [2]),))
    p = build_eval_prompts([[1, 2, 3]], item_tokens, np.array([[900, 901]]), pieces, TasksConfig(), max_history=2)
    assert p == [[1, 900, 901, 2, 504, 505, 506, 507]]
    b = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0, max_length=10)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
