"""SIDTrie and trie-constrained beam search on a tiny random Llama (no tokenizer: ints only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from ttds_ray.decoding import BeamResult, SIDTrie, beam_search

torch.set_num_threads(1)

N_LEVELS, N_CODES, FIRST_SID_ID = 3, 8, 100  # level l code k -> vocab id 100 + l*8 + k (ids 100..123)
LEVEL_TOKEN_IDS = FIRST_SID_ID + torch.arange(N_LEVELS * N_CODES).view(N_LEVELS, N_CODES)  # (M, K)


@pytest.fixture(scope="module")
def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the 0.02-std init, so rankings are not near-ties
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model


def random_codes(n_items: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = rng.choice(N_CODES ** N_LEVELS, size=n_items, replace=False)  # distinct SIDs
    return np.stack([flat // N_CODES ** 2, flat // N_CODES % N_CODES, flat % N_CODES], axis=1).astype(np.int64)


def random_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) ids in [0, 100) and their mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(0, 100, (length,), generator=gen)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


def log_softmax_as_trained(logits: torch.Tensor, loss_vocab: str) -> torch.Tensor:
    """The slow way: full logits `(..., V)` -> log-softmax over all V ('full') or over the M * K SID rows only
    ('sid', -inf elsewhere), as ``llm.lm_loss`` normalises SID labels with ``loss_vocab='sid'``."""
    logits = logits.float()
    if loss_vocab == "sid":
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[LEVEL_TOKEN_IDS.flatten()] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.log_softmax(-1)


def brute_force_scores(model, prompt: torch.Tensor, codes: np.ndarray, loss_vocab: str = "full") -> torch.Tensor:
    """Summed log-probs of every item's M SID tokens after `prompt` (1-D, unpadded): float `(N,)`."""
    sid_ids = LEVEL_TOKEN_IDS[torch.arange(N_LEVELS), torch.from_numpy(codes)]  # (N, M)
    seqs = torch.cat([prompt.expand(len(codes), -1), sid_ids], dim=1)  # (N, T + M)
    with torch.no_grad():
        logp = log_softmax_as_trained(model(input_ids=seqs).logits, loss_vocab)  # (N, T + M, V)
    t = prompt.numel()
    picked = logp[:, t - 1: t - 1 + N_LEVELS].gather(2, sid_ids.unsqueeze(-1)).squeeze(-1)  # (N, M)
    return picked.sum(dim=1)


def test_trie_never_emits_unknown_sid(tiny_llama):
    codes = random_codes(40, seed=1)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    catalogue = {tuple(row) for row in codes.tolist()}
    for seed in range(3):
        input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=seed)
        result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=10)
        assert isinstance(result, BeamResult)
        assert result.item_idx.shape == (4, 10) and result.scores.shape == (4, 10)
        assert result.item_idx.dtype == torch.int64 and result.scores.dtype == torch.float32
        for items, scores in zip(result.item_idx.tolist(), result.scores):
            assert all(0 <= i < 40 for i in items)
            assert all(tuple(codes[i].tolist()) in catalogue for i in items)
            assert len(set(items)) == len(items)
            assert torch.isfinite(scores).all() and (scores[:-1] >= scores[1:]).all()


def test_beam_search_with_w_ge_n_items_matches_brute_force(tiny_llama):
    codes = random_codes(12, seed=2)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([6, 4], seed=5)
    result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16)
    assert result.item_idx.shape == (2, 12)  # W' = min(W, n_items)
    for row in range(2):
        prompt = input_ids[row][attention_mask[row].bool()]
        expected = brute_force_scores(tiny_llama, prompt, codes)  # (N,)
        order = torch.argsort(expected, descending=True)
        assert result.item_idx[row].tolist() == order.tolist()
        torch.testing.assert_close(result.scores[row], expected[order], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_results(tiny_llama):
    trie = SIDTrie(random_codes(40, seed=3), LEVEL_TOKEN_IDS)
    batch_ids, batch_mask = random_prompts([4, 11], seed=7)  # row 0 is left-padded by 7
    alone = beam_search(tiny_llama, trie, batch_ids[:1, -4:], batch_mask[:1, -4:], n_beams=8)
    batched = beam_search(tiny_llama, trie, batch_ids, batch_mask, n_beams=8)
    assert batched.item_idx[0].tolist() == alone.item_idx[0].tolist()
    torch.testing.assert_close(batched.scores[0], alone.scores[0], atol=1e-4, rtol=0)


def test_left_padding_keeps_absolute_positions():
    """Llama's RoPE is blind to a constant position shift, so the test above cannot catch a
    missing `position_ids`; GPT-2's learned absolute positions do (0.18 nats off without them)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    trie = SIDTrie(random_codes(40, seed=3), LEVEL_TOKEN_IDS)
    batch_ids, batch_mask = random_prompts([4, 11], seed=7)
    alone = beam_search(model, trie, batch_ids[:1, -4:], batch_mask[:1, -4:], n_beams=8)
    batched = beam_search(model, trie, batch_ids, batch_mask, n_beams=8)
    assert batched.item_idx[0].tolist() == alone.item_idx[0].tolist()
    torch.testing.assert_close(batched.scores[0], alone.scores[0], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")   # peft reads a deprecated alias
def test_beam_search_works_through_peft(tiny_llama):
    peft = pytest.importorskip("peft")
    trie = SIDTrie(random_codes(12, seed=4), LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([3, 5], seed=9)
    plain = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5)
    lora = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:  # LoRA B is zero-initialised, so the wrapped model must give the same beams
        wrapped = beam_search(lora, trie, input_ids, attention_mask, n_beams=5)
    finally:
        lora.unload()
    assert wrapped.item_idx.tolist() == plain.item_idx.tolist()
    torch.testing.assert_close(wrapped.scores, plain.scores, atol=1e-5, rtol=0)


def test_trie_masks_and_steps_follow_the_catalogue():
    codes = np.array([[0, 1, 2], [0, 1, 3], [5, 0, 0]])
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    assert trie.n_items == 3 and trie.n_nodes == 1 + 2 + 2 + 3
    root = trie.root_nodes(2)
    assert trie.allowed(root)[0].nonzero().view(-1).tolist() == [0, 5]
    node = trie.step(root, torch.tensor([0, 4]))  # code 4 leads nowhere
    assert node[1] == -1 and not trie.allowed(node)[1].any()
    node = trie.step(trie.step(node, torch.tensor([1, 0])), torch.tensor([3, 0]))
    assert trie.item_of_leaf(node).tolist() == [1, -1]
    assert trie.item_of_leaf(root).tolist() == [-1, -1]  # inner node is not an item


def test_trie_rejects_duplicate_sids_naming_them():
    codes = np.array([[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    with pytest.raises(ValueError, match=r"\(1, 2, 3\) -> items \[0, 2\]"):
        SIDTrie(codes, LEVEL_TOKEN_IDS)


def test_trie_rejects_bad_codes_and_shapes():
    with pytest.raises(ValueError, match="outside"):
        SIDTrie(np.array([[0, 8, 0]]), LEVEL_TOKEN_IDS)
    with pytest.raises(ValueError, match="outside"):
        SIDTrie(np.array([[0, -1, 0]]), LEVEL_TOKEN_IDS)
    with pytest.raises(ValueError, match="shape"):
        SIDTrie(np.array([[0, 1]]), LEVEL_TOKEN_IDS)
    with pytest.raises(ValueError, match="same vocab id"):
        SIDTrie(np.array([[0, 1, 2]]), torch.zeros(3, 8, dtype=torch.int64))
    trie = SIDTrie(np.array([[0, 1, 2]]), LEVEL_TOKEN_IDS)
    with pytest.raises(ValueError, match=r"\(0, 1, 2\) -> items \[0, 1\]"):
        trie.add_items(np.array([[0, 1, 2]]))  # clashes with an existing item
    assert trie.n_items == 1


def test_add_items_makes_cold_start_item_reachable(tiny_llama):
    codes = random_codes(12, seed=6)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    catalogue = {tuple(row) for row in codes.tolist()}
    new_code = next((a, b, c) for a in range(8) for b in range(8) for c in range(8) if (a, b, c) not in catalogue)
    new_idx = trie.add_items(np.array([new_code]))
    assert new_idx.tolist() == [12] and trie.n_items == 13
    input_ids, attention_mask = random_prompts([5], seed=11)
    result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=13)  # exhaustive
    assert sorted(result.item_idx[0].tolist()) == list(range(13))
    all_codes = np.concatenate([codes, np.array([new_code])])
    expected = brute_force_scores(tiny_llama, input_ids[0], all_codes)
    pos = result.item_idx[0].tolist().index(12)
    torch.testing.assert_close(result.scores[0, pos], expected[12], atol=1e-4, rtol=0)


def test_beam_search_rejects_right_padding(tiny_llama):
    trie = SIDTrie(random_codes(5, seed=0), LEVEL_TOKEN_IDS)
    input_ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        beam_search(tiny_llama, trie, input_ids, torch.tensor([[1, 1, 0]]), n_beams=3)


def test_more_beams_than_codes_per_level(tiny_llama):
    """W > K: level-1 keeps all K prefixes, later levels fill up to W' = min(W, n_items)."""
    codes = random_codes(40, seed=8)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([6], seed=3)
    result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=30)
    assert result.item_idx.shape == (1, 30)
    assert (result.item_idx >= 0).all() and len(set(result.item_idx[0].tolist())) == 30
    expected = brute_force_scores(tiny_llama, input_ids[0], codes)
    torch.testing.assert_close(result.scores[0], expected[result.item_idx[0]], atol=1e-4, rtol=0)


class _BiasedLM(torch.nn.Module):
    """Wraps an LM and adds a fixed bias to its logits: an LM that prefers tokens decoding must refuse."""

    def __init__(self, lm: torch.nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer("bias", bias)

    def forward(self, **kwargs):
        out = self.lm(**kwargs)
        out.logits = out.logits + self.bias
        return out


def test_top_k_holds_only_catalogue_items_even_when_the_lm_prefers_padding_and_unknown_codes(tiny_llama):
    """The trie, not the LM, decides what can be emitted: +30 nats on the padding id and on every
    level-1 code no item starts with changes nothing about validity (no -1, no foreign item, no repeat)."""
    codes = random_codes(200, seed=12)
    codes = codes[np.isin(codes[:, 0], [0, 1])][:20]                 # level-1 codes 2..7 lead to no item
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    bias = torch.zeros(300)
    bias[0] = 30.0                                                   # the padding id of random_prompts
    bias[LEVEL_TOKEN_IDS[0, 2:]] = 30.0
    input_ids, attention_mask = random_prompts([5, 9, 3], seed=2)
    result = beam_search(_BiasedLM(tiny_llama, bias), trie, input_ids, attention_mask, n_beams=10)
    assert result.item_idx.shape == (3, 10)
    for items, scores in zip(result.item_idx.tolist(), result.scores):
        assert all(0 <= i < len(codes) for i in items) and len(set(items)) == len(items)
        assert torch.isfinite(scores).all()


def test_excluded_items_are_masked_per_prompt_and_the_rest_rank_exactly(tiny_llama):
    """exclude= (exclude_seen): an exhaustive search returns exactly the brute-force ranking of the items not
    excluded; prompts without exclusions in the same batch are unaffected."""
    codes = random_codes(12, seed=2)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([6, 4], seed=5)
    banned = [3, 7, 7, 11, 99]                    # a repeat and an id outside the catalogue are ignored
    res = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16, exclude=[banned, []])
    plain = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16)
    prompt = input_ids[0][attention_mask[0].bool()]
    expected = brute_force_scores(tiny_llama, prompt, codes)
    order = [i for i in torch.argsort(expected, descending=True).tolist() if i not in banned]
    assert res.item_idx[0, :9].tolist() == order and res.item_idx[0, 9:].tolist() == [-1, -1, -1]
    torch.testing.assert_close(res.scores[0, :9], expected[order], atol=1e-4, rtol=0)
    assert res.item_idx[1].tolist() == plain.item_idx[1].tolist()


def test_a_narrow_beam_skips_prefixes_whose_items_are_all_excluded(tiny_llama):
    """With W = 3 and the model's own top items excluded, the search still returns 3 allowed items: a beam is
    never spent on a prefix that leads only to excluded items."""
    codes = random_codes(40, seed=3)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([5], seed=1)
    top = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=40).item_idx[0].tolist()
    first = codes[top[0], 0]
    banned = [i for i in range(40) if codes[i, 0] == first] + top[:5]   # the best level-1 subtree and more
    res = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=3, exclude=[banned])
    got = res.item_idx[0].tolist()
    assert len(got) == 3 and -1 not in got and not set(got) & set(banned)
    assert all(codes[i, 0] != first for i in got)
    counts = trie.unseen_counts([banned])[0]
    assert int(counts[0]) == 40 - len(set(banned)) and int(counts[trie.item_path[top[0], 0]]) == 0


# --- Trie layout (issue 12): the compact trie must decode exactly as the dense (nodes x K) one did ----------------

def valid_children(codes: np.ndarray, excluded: set = frozenset()) -> dict[tuple, set[int]]:
    """Brute force: every prefix of an item not in `excluded` -> the set of codes that continue it."""
    out: dict[tuple, set[int]] = {}
    for i, row in enumerate(codes.tolist()):
        if i in excluded:
            continue
        for level in range(len(row)):
            out.setdefault(tuple(row[:level]), set()).add(row[level])
    return out


def node_prefixes(trie: SIDTrie) -> dict[int, tuple]:
    """Node id -> its prefix, read off `item_path` (the node of item i at depth l + 1 spells codes[i, :l + 1])."""
    out = {trie.root: ()}
    for i, path in enumerate(trie.item_path.tolist()):
        for level, node in enumerate(path):
            out[node] = tuple(trie.codes[i, : level + 1].tolist())
    return out


def assert_allowed_children_match_brute_force(trie: SIDTrie) -> None:
    prefixes = node_prefixes(trie)
    assert sorted(prefixes) == list(range(trie.n_nodes))          # every node is the prefix of some item
    expected = valid_children(trie.codes)
    allowed = trie.allowed(torch.arange(trie.n_nodes))             # (n_nodes, K)
    for node, prefix in prefixes.items():
        assert set(allowed[node].nonzero().view(-1).tolist()) == expected.get(prefix, set()), (node, prefix)
        for code in expected.get(prefix, ()):                      # and the step lands on the node of prefix + code
            child = int(trie.step(torch.tensor([node]), torch.tensor([code]))[0])
            assert prefixes[child] == prefix + (code,)
    assert not trie.allowed(torch.tensor([-1])).any()              # a dead beam continues nowhere


@pytest.mark.parametrize("n_items,seed", [(1, 0), (7, 1), (60, 2), (300, 3), (512, 4)])
def test_allowed_children_equal_the_valid_prefixes_on_random_catalogues(n_items, seed):
    codes = random_codes(n_items, seed=seed)
    assert_allowed_children_match_brute_force(SIDTrie(codes, LEVEL_TOKEN_IDS))
    trie = SIDTrie(codes[: n_items // 2], LEVEL_TOKEN_IDS)         # the same catalogue grown by add_items
    trie.add_items(codes[n_items // 2:])
    assert_allowed_children_match_brute_force(trie)
    np.testing.assert_array_equal(trie.codes, codes)


def reference_beam_search(model, prompt: torch.Tensor, codes: np.ndarray, n_beams: int,
                          excluded: set = frozenset(), loss_vocab: str = "full",
                          bias: dict | None = None) -> tuple[list[int], list[float]]:
    """Brute-force constrained beam search: one uncached forward per beam, allowed codes from `valid_children`,
    log-probs normalised as `loss_vocab` says (:func:`log_softmax_as_trained`); `bias[prefix]` (if given) is added
    to the score of every prefix it reaches."""
    allowed = valid_children(codes, excluded)
    beams = [((), 0.0)]
    for level in range(N_LEVELS):
        cands = []
        for prefix, score in beams:
            seq = torch.cat([prompt, LEVEL_TOKEN_IDS[torch.arange(level), list(prefix)]])
            with torch.no_grad():
                logits = model(input_ids=seq[None]).logits[0, -1]
                logp = log_softmax_as_trained(logits, loss_vocab)[LEVEL_TOKEN_IDS[level]]
            cands += [(prefix + (k,), score + float(logp[k]) + (bias[prefix + (k,)] if bias else 0.0))
                      for k in sorted(allowed.get(prefix, ()))]
        beams = sorted(cands, key=lambda c: -c[1])[:n_beams]
    item_of = {tuple(row): i for i, row in enumerate(codes.tolist())}
    return [item_of[p] for p, _ in beams], [s for _, s in beams]


# Recorded with the dense (nodes x K) trie before the compact layout (commit 5468af4); tiny_llama, seed 0.
GOLDEN_ITEMS = [[23, 5, 2, 22, 21, 38], [5, 2, 22, 21, 43, 38], [2, 5, 21, 22, 43, 38], [23, 5, 2, 8, 58, 38]]
GOLDEN_ITEMS_EXCLUDED = [[23, 5, 2, 22, 21, 38], [21, 8, 58, 43, 59, 38], [23, 5, 22, 43, 8, 58],
                         [23, 5, 2, 8, 58, 38]]


def test_narrow_beam_results_are_unchanged_and_equal_a_brute_force_decoder(tiny_llama):
    """W = 6 of 60 items (pruning at every level), items 50..59 added by add_items, with and without exclusions:
    the same items as the dense trie gave (GOLDEN_*), and the same items and scores as an uncached brute force."""
    codes = random_codes(60, seed=21)
    trie = SIDTrie(codes[:50], LEVEL_TOKEN_IDS)
    trie.add_items(codes[50:])
    input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=13)
    plain = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6)
    assert plain.item_idx.tolist() == GOLDEN_ITEMS
    top_first = int(codes[GOLDEN_ITEMS[2][0], 0])
    exclude = [[], GOLDEN_ITEMS[1][:3], [i for i in range(60) if codes[i, 0] == top_first], [55, 1]]
    masked = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, exclude=exclude)
    assert masked.item_idx.tolist() == GOLDEN_ITEMS_EXCLUDED
    for res, ex in ((plain, [[]] * 4), (masked, exclude)):
        for row in range(4):
            prompt = input_ids[row][attention_mask[row].bool()]
            items, scores = reference_beam_search(tiny_llama, prompt, codes, 6, set(ex[row]))
            assert res.item_idx[row].tolist() == items
            torch.testing.assert_close(res.scores[row], torch.tensor(scores), atol=1e-4, rtol=0)


def dense_reference_children(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """The former layout, built by brute force: int64 `(n_nodes, K)` child id or -1, nodes numbered depth by depth
    in SID order (the numbering the compact trie keeps)."""
    n_levels = codes.shape[1]
    prefixes = sorted({tuple(r[:level]) for r in codes.tolist() for level in range(n_levels + 1)},
                      key=lambda p: (len(p), p))
    node_id = {p: n for n, p in enumerate(prefixes)}
    table = np.full((len(prefixes), n_codes), -1, dtype=np.int64)
    for p in prefixes[1:]:
        table[node_id[p[:-1]], p[-1]] = node_id[p]
    return table


def catalogue(n_items: int, n_levels: int, n_codes: int, seed: int) -> np.ndarray:
    """(N, M) distinct random SIDs; clustered on a few level-0 codes, so some nodes are wide and some narrow."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(n_codes ** (n_levels - 1) * 3, size=n_items, replace=False)  # level-0 codes 0..2 only
    return np.stack([flat // n_codes ** (n_levels - 1 - level) % n_codes for level in range(n_levels)], 1)


@pytest.mark.parametrize("dense_max_entries", [0, 64, 1 << 20])   # CSR everywhere, mixed, dense where possible
@pytest.mark.parametrize("n_levels,n_codes,n_items", [(3, 8, 150), (4, 16, 400), (2, 300, 500)])
def test_children_of_equals_the_dense_reference_for_every_node_with_exclusions(n_levels, n_codes, n_items,
                                                                              dense_max_entries):
    codes = catalogue(n_items, n_levels, n_codes, seed=n_items)
    token_ids = torch.arange(n_levels * n_codes).view(n_levels, n_codes)
    trie = SIDTrie(codes[: n_items - 20], token_ids, dense_max_entries=dense_max_entries)
    trie.add_items(codes[n_items - 20:])                              # cold-start items reuse and open prefixes
    reference = dense_reference_children(codes, n_codes)
    assert trie.n_nodes == len(reference)
    np.testing.assert_array_equal(trie.children_of(torch.arange(-1, trie.n_nodes)).numpy(),
                                  np.concatenate([np.full((1, n_codes), -1), reference]))
    rng = np.random.default_rng(1)
    exclude = [[], rng.choice(n_items, 30).tolist(),                  # scattered items
               np.flatnonzero(codes[:, 0] == codes[0, 0]).tolist(),   # a whole level-1 subtree
               np.flatnonzero((codes[:, :-1] == codes[5, :-1]).all(1)).tolist() + [n_items + 3]]  # a parent's leaves
    excluded = trie.excluded_nodes(exclude)                           # = the nodes the dense counts zero out
    zero = (trie.unseen_counts(exclude) == 0).nonzero()                         # (row, node) sorted by row
    np.testing.assert_array_equal(torch.stack([excluded.node, excluded.row], 1), zero[:, [1, 0]][
        np.lexsort((zero[:, 0].numpy(), zero[:, 1].numpy()))])                   # same pairs, by (node, row)
    assert excluded.depth_start == torch.searchsorted(excluded.node, torch.tensor(trie.level_start)).tolist()
    np.testing.assert_array_equal(trie.step(excluded.parent, excluded.code), excluded.node)
    prefixes = node_prefixes(trie)
    any_depth = trie.children_of(torch.arange(trie.n_nodes).expand(len(exclude), -1), None, excluded)
    for level in range(n_levels + 1):                                 # beam_search's call: one depth at a time
        nodes = torch.arange(trie.level_start[level], trie.level_start[level + 1])
        nodes = torch.cat([nodes, torch.tensor([-1])]).expand(len(exclude), -1)  # (B, n_level + 1)
        got = trie.children_of(nodes, level, excluded)                            # (B, n_level + 1, K)
        torch.testing.assert_close(got[:, :-1], any_depth[:, trie.level_start[level]: trie.level_start[level + 1]])
        for b, ex in enumerate(exclude):
            allowed = valid_children(codes, set(ex))
            for j, node in enumerate(nodes[b].tolist()):
                want = reference[node].copy() if node >= 0 else np.full(n_codes, -1)
                want[[k for k in range(n_codes) if node < 0 or k not in allowed.get(prefixes[node], ())]] = -1
                np.testing.assert_array_equal(got[b, j].numpy(), want)


def test_compact_trie_decodes_like_the_dense_layout(tiny_llama):
    """beam_search over the CSR-only layout gives the recorded results too (the default layout is dense at K = 8)."""
    codes = random_codes(60, seed=21)
    trie = SIDTrie(codes[:50], LEVEL_TOKEN_IDS, dense_max_entries=0)
    trie.add_items(codes[50:])
    assert all(table is None for table in trie.dense_children)
    input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=13)
    assert beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6).item_idx.tolist() == GOLDEN_ITEMS
    top_first = int(codes[GOLDEN_ITEMS[2][0], 0])
    exclude = [[], GOLDEN_ITEMS[1][:3], [i for i in range(60) if codes[i, 0] == top_first], [55, 1]]
    res = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, exclude=exclude)
    assert res.item_idx.tolist() == GOLDEN_ITEMS_EXCLUDED


def test_trie_memory_grows_with_the_items_not_with_nodes_times_codes():
    """K = 4096: a dense child table would hold n_nodes x 4096 int64 (29 MB for 300 items); the trie holds
    O(N * M) bytes plus the (M, K) token ids and the root's dense row (~130 kB), and an empty trie still answers
    every lookup with -1."""
    token_ids = torch.arange(3 * 4096).view(3, 4096)
    codes = np.random.default_rng(0).integers(0, 4096, size=(300, 3))
    trie = SIDTrie(codes, token_ids)
    assert trie.n_nodes > 600 and trie.nbytes < 200_000
    assert trie.node_code.dtype == torch.int16
    empty = SIDTrie(np.zeros((0, 3), np.int64), token_ids)
    assert empty.n_nodes == 1 and empty.n_items == 0
    assert not empty.allowed(empty.root_nodes(2)).any()
    assert empty.item_of_leaf(torch.tensor([0, -1])).tolist() == [-1, -1]
    assert empty.excluded_nodes([[0, 1]]).node.numel() == 0
    assert empty.add_items(codes[:2]).tolist() == [0, 1] and empty.allowed(empty.root_nodes(1)).sum() == 2


def test_sids_too_wide_for_one_int64_key_build_the_same_trie():
    """M x bits(K) = 6 x 12 > 63: the build sorts with lexsort instead of one argsort of packed keys."""
    codes = np.random.default_rng(0).integers(0, 4096, size=(200, 6))
    codes[100:, :3] = codes[0, :3]                                   # half the items share a depth-3 prefix
    trie = SIDTrie(codes, torch.arange(6 * 4096).view(6, 4096))
    assert_allowed_children_match_brute_force(trie)
    assert trie.item_of_leaf(trie.item_path[:, -1]).tolist() == list(range(200))


# --- Scoring as trained (issue 12, decoding speed): 'full' is the former path, 'sid' the SID-row softmax ---------

class _LogitsOnly(torch.nn.Module):
    """The same LM seen only through its full logits (no ``get_decoder`` / ``get_output_embeddings``): with
    'sid' scoring, beam_search takes the slow way, full `(R, V)` logits indexed at the SID rows and per-beam
    cache copies, the reference for the fast path (SID head rows + shared prompt cache)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


# Recorded with beam_search as it was before the 'sid' scoring (commit 515dd7b^, full-vocabulary softmax only):
# tiny_llama, the catalogue / prompts / exclusions of test_full_scoring_is_the_default_and_unchanged_to_the_bit.
GOLDEN_FULL_SCORES = [
    [-68.05055236816406, -71.92399597167969, -76.29298400878906, -77.1594467163086, -81.57414245605469,
     -87.0369873046875],
    [-82.58673858642578, -85.65608215332031, -86.37733459472656, -86.44507598876953, -87.91397857666016,
     -88.00791931152344],
    [-72.29247283935547, -76.8335952758789, -77.486083984375, -80.49993896484375, -81.18988800048828,
     -82.98405456542969],
    [-67.68380737304688, -75.45915985107422, -76.69287872314453, -78.32003784179688, -79.07571411132812,
     -87.40098571777344]]
GOLDEN_FULL_ITEMS = [[23, 5, 2, 22, 21, 38], [21, 8, 58, 43, 59, 38], [2, 5, 21, 22, 43, 38], [23, 5, 2, 8, 58, 38]]


def test_full_scoring_is_the_default_and_unchanged_to_the_bit(tiny_llama):
    """'full' (the default without a loss_vocab and without the model attribute) gives exactly the items and the
    float32 scores the former beam_search gave (narrow beam, add_items, exclusions, left padding): the same
    operations in the same order (_StepScorer 'full' runs the former code path)."""
    codes = random_codes(60, seed=21)
    trie = SIDTrie(codes[:50], LEVEL_TOKEN_IDS)
    trie.add_items(codes[50:])
    input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=13)
    exclude = [[], [5, 2, 22], [], [55, 1]]
    explicit = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, exclude=exclude, loss_vocab="full")
    default = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, exclude=exclude)
    assert not hasattr(tiny_llama, "ttds_loss_vocab")
    assert explicit.item_idx.tolist() == GOLDEN_FULL_ITEMS == default.item_idx.tolist()
    assert torch.equal(default.scores, explicit.scores)
    # bit-equal to the recorded values in a fresh process; 1e-5 leaves room for float32 rounding that depends on
    # where the weights sit in memory (after another test's peft wrap + unload, the last bit can differ)
    torch.testing.assert_close(explicit.scores, torch.tensor(GOLDEN_FULL_SCORES), atol=1e-5, rtol=0)


def test_sid_scoring_ranks_every_item_by_the_sid_row_log_softmax_computed_the_slow_way(tiny_llama):
    """W >= N (exhaustive): 'sid' returns every item ranked by the summed log-softmax over the SID rows of the
    full logits (full forward, then index), not by the full-vocabulary scores."""
    codes = random_codes(12, seed=2)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([6, 4], seed=5)
    result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16, loss_vocab="sid")
    for row in range(2):
        prompt = input_ids[row][attention_mask[row].bool()]
        expected = brute_force_scores(tiny_llama, prompt, codes, loss_vocab="sid")  # (N,)
        order = torch.argsort(expected, descending=True)
        assert result.item_idx[row].tolist() == order.tolist()
        torch.testing.assert_close(result.scores[row], expected[order], atol=1e-4, rtol=0)
        full = brute_force_scores(tiny_llama, prompt, codes)
        assert (expected > full + 1e-3).all()          # a smaller normaliser: really another scoring


def test_sid_fast_path_equals_the_slow_way_with_a_narrow_beam_and_exclusions(tiny_llama):
    """W = 6 of 60 items, add_items, exclusions, left padding: the fast path (SID head rows, beams sharing the
    prompt cache through the tree mask) gives the items and scores of the slow way (full logits, indexed,
    per-beam caches) and of an uncached brute-force decoder."""
    codes = random_codes(60, seed=21)
    trie = SIDTrie(codes[:50], LEVEL_TOKEN_IDS)
    trie.add_items(codes[50:])
    input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=13)
    exclude = [[], [5, 2, 22], [], [55, 1]]
    fast = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, exclude=exclude, loss_vocab="sid")
    slow = beam_search(_LogitsOnly(tiny_llama), trie, input_ids, attention_mask, n_beams=6, exclude=exclude,
                       loss_vocab="sid")
    assert fast.item_idx.tolist() == slow.item_idx.tolist()
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-5, rtol=0)
    for row in range(4):
        prompt = input_ids[row][attention_mask[row].bool()]
        items, scores = reference_beam_search(tiny_llama, prompt, codes, 6, set(exclude[row]), loss_vocab="sid")
        assert fast.item_idx[row].tolist() == items
        torch.testing.assert_close(fast.scores[row], torch.tensor(scores), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*tied layer is part of the adapter.*")
def test_sid_fast_path_through_peft_lora_with_trainable_sid_rows(tiny_llama):
    """As training wraps the model (LoRA + trainable SID rows in the tied embedding / head, llm.wrap_for_training),
    with non-zero adapters: the fast path reads the merged head rows (llm.head_rows) like the model's own logits."""
    peft = pytest.importorskip("peft")
    codes = random_codes(40, seed=4)
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([3, 8, 5], seed=9)
    plain = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=7, loss_vocab="sid")
    lora = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules="all-linear",
                                                            trainable_token_indices=LEVEL_TOKEN_IDS.flatten().tolist()))
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if p.requires_grad:                    # LoRA A/B and the trainable token deltas
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        fast = beam_search(lora, trie, input_ids, attention_mask, n_beams=7, loss_vocab="sid")
        slow = beam_search(_LogitsOnly(lora), trie, input_ids, attention_mask, n_beams=7, loss_vocab="sid")
    finally:
        lora.unload()
    assert fast.item_idx.tolist() == slow.item_idx.tolist()
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-4, rtol=0)
    assert not torch.allclose(fast.scores, plain.scores, atol=1e-2)   # the adapters and token deltas do count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sid_tree_attention_keeps_positions_and_padding_apart(attn):
    """GPT-2's learned absolute positions expose a wrong position or a leaked padding / sibling key (see
    test_left_padding_keeps_absolute_positions); with either attention implementation (sdpa takes a bool tree
    mask, eager an additive one) a left-padded prompt decodes as it does alone, and as the slow way."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    trie = SIDTrie(random_codes(40, seed=3), LEVEL_TOKEN_IDS)
    batch_ids, batch_mask = random_prompts([4, 11], seed=7)
    alone = beam_search(model, trie, batch_ids[:1, -4:], batch_mask[:1, -4:], n_beams=8, loss_vocab="sid")
    batched = beam_search(model, trie, batch_ids, batch_mask, n_beams=8, loss_vocab="sid")
    slow = beam_search(_LogitsOnly(model), trie, batch_ids, batch_mask, n_beams=8, loss_vocab="sid")
    assert batched.item_idx[0].tolist() == alone.item_idx[0].tolist()
    torch.testing.assert_close(batched.scores[0], alone.scores[0], atol=1e-4, rtol=0)
    assert batched.item_idx.tolist() == slow.item_idx.tolist()
    torch.testing.assert_close(batched.scores, slow.scores, atol=1e-4, rtol=0)


def test_loss_vocab_comes_from_the_model_attribute_and_unknown_values_are_refused(tiny_llama):
    """llm.load_llm tags the model with the run's llm.loss_vocab (ttds_loss_vocab); an explicit argument wins."""
    trie = SIDTrie(random_codes(30, seed=5), LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([4, 6], seed=3)
    sid = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5, loss_vocab="sid")
    full = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5, loss_vocab="full")
    tiny_llama.ttds_loss_vocab = "sid"
    try:
        tagged = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5)
        overridden = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5, loss_vocab="full")
        tiny_llama.ttds_loss_vocab = "softmax"
        with pytest.raises(ValueError, match="ttds_loss_vocab.*'softmax'"):
            beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5)
    finally:
        del tiny_llama.ttds_loss_vocab
    assert torch.equal(tagged.scores, sid.scores) and torch.equal(overridden.scores, full.scores)
    with pytest.raises(ValueError, match="loss_vocab must be one of"):
        beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=5, loss_vocab="SID")


# ----------------------------------------------------------------------------- popularity-corrected decoding

def prefix_log_prior(codes: np.ndarray, weights: np.ndarray) -> dict[tuple, float]:
    """log q(last code | prefix) for every prefix of the catalogue, counted the slow way (dicts of sums)."""
    mass: dict[tuple, float] = {(): float(weights.sum())}
    for row, w in zip(codes.tolist(), weights.tolist()):
        for d in range(1, len(row) + 1):
            mass[tuple(row[:d])] = mass.get(tuple(row[:d]), 0.0) + w
    return {p: float(np.log(m / mass[p[:-1]])) for p, m in mass.items() if p}


def test_node_log_prior_sums_to_the_item_log_prior_along_every_path_also_after_add_items():
    codes = random_codes(60, seed=31)
    weights = np.random.default_rng(0).integers(0, 50, size=50) + 1.0
    trie = SIDTrie(codes[:50], LEVEL_TOKEN_IDS)
    trie.set_item_prior(weights)
    trie.add_items(codes[50:])                      # unseen items: the smallest weight of the catalogue
    full = np.concatenate([weights, np.full(10, weights.min())])
    slow = prefix_log_prior(codes, full)
    nlp = trie.node_log_prior.numpy()
    path = trie.item_path.numpy()
    for i, row in enumerate(codes.tolist()):
        for d in range(N_LEVELS):
            assert nlp[path[i, d]] == pytest.approx(slow[tuple(row[:d + 1])], abs=1e-5)
    np.testing.assert_allclose(nlp[path].sum(1), np.log(full / full.sum()), atol=1e-5)
    assert nlp[trie.root] == 0.0


def test_exhaustive_corrected_search_ranks_by_log_p_minus_beta_log_q(tiny_llama):
    codes = random_codes(12, seed=2)
    weights = np.arange(12, dtype=np.float64) ** 2 + 1.0          # a strong popularity skew
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    trie.set_item_prior(weights)
    input_ids, attention_mask = random_prompts([6, 4], seed=5)
    plain = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16)
    result = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=16, prior_beta=0.5)
    log_q = torch.from_numpy(np.log(weights / weights.sum())).float()
    for row in range(2):
        prompt = input_ids[row][attention_mask[row].bool()]
        expected = brute_force_scores(tiny_llama, prompt, codes) - 0.5 * log_q
        order = torch.argsort(expected, descending=True)
        assert result.item_idx[row].tolist() == order.tolist()
        torch.testing.assert_close(result.scores[row], expected[order], atol=1e-4, rtol=0)
    assert plain.item_idx.tolist() != result.item_idx.tolist()      # the prior changed the order


def test_narrow_corrected_search_equals_a_brute_force_decoder_with_the_prefix_prior(tiny_llama):
    """W = 6 of 60 items: the correction is applied level by level (the beams keep the corrected best prefixes),
    the same as an uncached brute-force beam search that adds -beta * log q(code | prefix) at every level."""
    codes = random_codes(60, seed=21)
    weights = np.random.default_rng(1).pareto(1.0, size=60) * 10 + 1.0
    trie = SIDTrie(codes, LEVEL_TOKEN_IDS)
    trie.set_item_prior(weights)
    slow = prefix_log_prior(codes, weights)
    beta = 0.7
    input_ids, attention_mask = random_prompts([5, 9, 3, 7], seed=13)
    res = beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=6, prior_beta=beta)
    bias = {prefix: -beta * lp for prefix, lp in slow.items()}
    for row in range(4):
        prompt = input_ids[row][attention_mask[row].bool()]
        items, scores = reference_beam_search(tiny_llama, prompt, codes, 6, bias=bias)
        assert res.item_idx[row].tolist() == items
        torch.testing.assert_close(res.scores[row], torch.tensor(scores), atol=1e-4, rtol=0)


def test_prior_correction_refuses_bad_input(tiny_llama):
    trie = SIDTrie(random_codes(12, seed=2), LEVEL_TOKEN_IDS)
    input_ids, attention_mask = random_prompts([4], seed=5)
    with pytest.raises(ValueError, match="needs an item prior"):
        beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=4, prior_beta=0.3)
    with pytest.raises(ValueError, match="prior_beta must be >= 0"):
        beam_search(tiny_llama, trie, input_ids, attention_mask, n_beams=4, prior_beta=-0.1)
    with pytest.raises(ValueError, match="shape"):
        trie.set_item_prior(np.ones(11))
    for bad in (np.zeros(12), np.full(12, np.nan), -np.ones(12)):
        with pytest.raises(ValueError, match="finite and > 0"):
            trie.set_item_prior(bad)
    assert trie.node_log_prior is None                              # nothing half-set
    trie.set_item_prior(np.ones(12))
    trie.set_item_prior(None)
    assert trie.node_log_prior is None and trie.item_prior is None
