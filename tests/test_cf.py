"""Tests for ttds_ray.cf (SASRec, the collaborative-embedding stage). Pure torch, no Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ttds_ray.cf import (CFEmbeddings, SASRec, cf_embeddings, encode_users, item_embeddings,
                         load_sasrec, make_optimizer, make_training_batches, save_sasrec,
                         score_users, train_step, training_windows)
from ttds_ray.config import CFConfig

torch.set_num_threads(1)
N_ITEMS, MAX_LEN = 12, 8
TINY = CFConfig(hidden=16, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.0, epochs=1,
                batch_size=16, lr=1e-2)


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec.from_config(TINY, N_ITEMS).eval()


def test_shapes(model):
    seq = torch.tensor([[-1, -1, 3, 4, 5], [0, 1, 2, 3, 11]])
    hidden = model(seq)
    assert hidden.shape == (2, 5, 16)
    assert torch.isfinite(hidden).all()
    assert torch.all(hidden[0, :2] == 0), "padded positions are zeroed"
    assert model.score_all(hidden[:, -1]).shape == (2, N_ITEMS)
    assert item_embeddings(model).shape == (N_ITEMS, 16)
    users = encode_users(model, [[1, 2], [], [3] * 20], MAX_LEN)
    assert users.shape == (3, 16) and users.dtype == np.float32
    assert np.all(users[1] == 0), "an empty history encodes to zeros"
    scores = score_users(model, [[1, 2], [3]], MAX_LEN)
    assert scores.shape == (2, N_ITEMS) and scores.dtype == np.float32


def test_left_padding_does_not_change_last_hidden_state(model):
    padded = model(torch.tensor([[-1, -1, -1, 3, 4, 5]]))[0, -1]
    unpadded = model(torch.tensor([[3, 4, 5]]))[0, -1]
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)
    batched = encode_users(model, [[3, 4, 5], [1, 2, 3, 4, 5, 6, 7]], MAX_LEN)
    alone = encode_users(model, [[3, 4, 5]], MAX_LEN)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


def test_later_items_do_not_change_earlier_hidden_states(model):
    a = model(torch.tensor([[-1, 1, 2, 3, 4, 5]]))
    b = model(torch.tensor([[-1, 1, 2, 3, 9, 10]]))
    torch.testing.assert_close(a[0, :4], b[0, :4])
    assert not torch.allclose(a[0, 4:], b[0, 4:])


def test_training_windows_targets_are_next_items_and_never_padding():
    seqs = [[5, 6, 7], [1], [], list(range(11))]            # users 1 and 2 contribute nothing
    win = training_windows(seqs, max_len=4)
    np.testing.assert_array_equal(win["seq"], [[-1, -1, 5, 6], [6, 7, 8, 9]])
    np.testing.assert_array_equal(win["target"], [[-1, -1, 6, 7], [7, 8, 9, 10]])
    strided = training_windows(seqs, max_len=4, stride=4)  # user 3's history cut into 3 windows
    np.testing.assert_array_equal(strided["seq"], [[-1, -1, 5, 6], [6, 7, 8, 9], [2, 3, 4, 5],
                                                   [-1, -1, 0, 1]])
    np.testing.assert_array_equal(strided["target"], [[-1, -1, 6, 7], [7, 8, 9, 10], [3, 4, 5, 6],
                                                      [-1, -1, 1, 2]])
    rng = np.random.default_rng(0)
    batches = list(make_training_batches(seqs, 4, 1, rng))
    assert len(batches) == 2
    for b in batches:
        assert b["seq"].dtype == np.int64 and b["target"].shape == (1, 4)
        assert np.all((b["seq"] >= 0) == (b["target"] >= 0)), "target at every real position only"


def _cycle_users(n_users: int, rng: np.random.Generator) -> list[list[int]]:
    """Synthetic task: each next item = (previous + 1) mod N."""
    out = []
    for _ in range(n_users):
        start, length = rng.integers(N_ITEMS), rng.integers(3, 15)
        out.append([(start + k) % N_ITEMS for k in range(length)])
    return out


def test_train_step_learns_next_item_cycle():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users = _cycle_users(64, rng)
    model = SASRec.from_config(TINY, N_ITEMS)
    opt = make_optimizer(model, TINY)
    losses = []
    for _ in range(13):                                      # 13 epochs x 4 batches = 52 steps
        losses += [train_step(model, opt, b) for b in make_training_batches(users, MAX_LEN, 16, rng)]
    assert losses[-1] < 0.5 * losses[0], losses
    test = _cycle_users(50, rng)
    top1 = score_users(model, test, MAX_LEN).argmax(1)
    hr1 = np.mean(top1 == np.array([(s[-1] + 1) % N_ITEMS for s in test]))
    assert hr1 > 0.8, hr1


def test_sasrec_and_embeddings_round_trip(model, tmp_path):
    save_sasrec(model, TINY, N_ITEMS, tmp_path)
    loaded = load_sasrec(tmp_path)
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 0, 1]]
    np.testing.assert_array_equal(score_users(model, seqs, MAX_LEN), score_users(loaded, seqs, MAX_LEN))
    emb = cf_embeddings(loaded, seqs)
    emb.save(tmp_path)
    back = CFEmbeddings.load(tmp_path)
    np.testing.assert_array_equal(back.items, emb.items)
    np.testing.assert_array_equal(back.users, emb.users)
    assert back.users.shape == (3, 16)


def test_embeddings_load_rejects_wrong_dtype(tmp_path):
    CFEmbeddings(items=np.zeros((3, 4), np.float32), users=np.zeros((2, 4), np.float32)).save(tmp_path)
    np.save(tmp_path / "cf_users.npy", np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError, match="cf_users.npy"):
        CFEmbeddings.load(tmp_path)


def test_erase_popularity_leaves_no_linear_read_out_of_log_count():
    """An embedding with popularity planted along a random direction (plus its norm): after the erasure every
    direction has zero covariance with log(1 + count), the rest of the space is untouched, zero stays zero."""
    from ttds_ray.cf import erase_popularity

    rng = np.random.default_rng(0)
    counts = rng.zipf(1.8, size=500).clip(max=5000) - 1
    y = np.log1p(counts)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    emb = rng.normal(size=(500, 16)) + np.outer(y, u) * 2.0
    emb[7] = 0.0
    before = np.linalg.lstsq(np.c_[emb, np.ones(500)], y, rcond=None)[0]
    assert np.corrcoef(np.c_[emb, np.ones(500)] @ before, y)[0, 1] > 0.8        # popularity is readable
    out = erase_popularity(emb, counts)
    assert out.dtype == np.float32 and out.shape == emb.shape
    cov = ((out - out.mean(0)) * (y - y.mean())[:, None]).mean(0)
    assert np.abs(cov).max() < 1e-5                                             # no direction co-varies
    assert np.abs(out[7]).max() == 0.0
    v = ((emb - emb.mean(0)) * (y - y.mean())[:, None]).mean(0)
    v /= np.linalg.norm(v)
    np.testing.assert_allclose(out + np.outer(emb @ v, v), emb, atol=1e-5)     # only that direction went
    np.testing.assert_array_equal(erase_popularity(emb, np.full(500, 3)), emb.astype(np.float32))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        erase_popularity(emb, counts - 10)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        erase_popularity(emb, counts[:10])
