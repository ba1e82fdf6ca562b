"""The eight tuning-task builders on a hand-made 5-user log, rendering, stats, per-epoch templates."""
import numpy as np
import pytest

from ttds_ray.config import TasksConfig, TaskWeights
from ttds_ray.tasks import (TASKS, TEMPLATES, TaskContext, build_eval_prompts, build_task_samples, cooccurrence,
                            example_text, item_facets, item_ph, neighbour_users, PromptPieces, render, render_batch,
                            task_stats, user_ph)
from tests.test_tasks import FakeTok

TITLES = ["apple", "bread", "cheese", "dates from oman", "eggs", "figs"]   # "dates from o" after 12 tokens
TEXT = ["title: apple; brand: Acme; categories: Food,Fruit",
        "title: bread; brand: Bakery; categories: Food,Baked",
        "title: cheese; brand: Acme; categories: Food,Dairy",
        "title: dates from oman; categories: Food,Fruit",
        "title: eggs",                                                       # no facets
        "title: figs; brand: Zest &amp; Co; categories: Food>Fruit>Dried"]
SEQS = [[0, 1, 2], [1, 2, 3, 5], [4], [4, 5], [3, 0]]                      # users 0..4, training items


def _ctx():
    return TaskContext(train_seqs=SEQS, titles=TITLES, item_text=TEXT, tok=FakeTok(), max_history=2,
                       use_user_sid=True)


def _only(task, weight=1.0, **kw):
    """Config with just ``task`` on (SEQS has 4 seqrec windows: weight 250 = 1000 samples)."""
    return TasksConfig(weights=TaskWeights(**{t: (weight if t == task else 0.0) for t in TASKS}),
                       title_history_len=2, co_topk=2, profile_terms=2, **kw)


def _text(ids):
    return "".join(f"<i{(-1 - x) // 2}>" if x < 0 and x % 2 else f"<u{(-2 - x) // 2}>" if x < 0
                   else "</s>" if x == 3 else chr(x - 1000) for x in ids)


def _pair(s):
    """A sample as readable ``(prompt, response)``: placeholders <iN>/<uN>, eos </s>."""
    k = s["resp"].index(1)
    assert all(s["resp"][k:]), "response is one tail block"
    return _text(s["ids"][:k]), _text(s["ids"][k:])


def _pairs(task, expected, weight=250.0, **kw):
    """Sampled task: build many samples; the set of (prompt, response) must equal every template
    filled with every expected (fields, response), nothing else."""
    samples = build_task_samples(_ctx(), _only(task, weight, **kw), seed=0, epoch=0)
    assert len(samples) == round(weight * 4) and {s["task"] for s in samples} == {task}
    want = {(tpl.format(**f), r) for f, r in expected for tpl in TEMPLATES[task]}
    assert {_pair(s) for s in samples} == want


def test_seqrec_every_window_once_user_in_prompt_loss_on_all_items():
    samples = build_task_samples(_ctx(), _only("seqrec"), seed=0, epoch=0)
    got = [_pair(s) for s in samples]
    want = [("<u0>", "<i0><i1><i2>"), ("<u1>", "<i2><i3><i5>"), ("<u3>", "<i4><i5>"), ("<u4>", "<i3><i0>")]
    assert len(got) == 4
    for (prompt, resp), (user, items) in zip(got, want):
        assert resp == items and prompt in {t.format(user=user) for t in TEMPLATES["seqrec"]}


def test_seqrec_targets_and_weight_below_one():
    tgt = build_task_samples(_ctx(), _only("seqrec", seqrec_loss_on="target"), seed=0, epoch=0)
    # positions j >= 1: u0 j=1,2; u1 j=1,2,3; u3 j=1; u4 j=1 -> 7 samples, loss on the last item only
    assert [_text([s["ids"][-1]]) for s in tgt] == ["<i1>", "<i2>", "<i2>", "<i3>", "<i5>", "<i5>", "<i0>"]
    assert all(s["resp"][-1] == 1 and s["resp"].count(1) == 1 for s in tgt)
    half = [_pair(s)[1] for s in build_task_samples(_ctx(), _only("seqrec", 0.5), seed=0, epoch=0)]
    assert len(half) == len(set(half)) == 2                      # a subset of distinct windows
    assert set(half) < {"<i0><i1><i2>", "<i2><i3><i5>", "<i4><i5>", "<i3><i0>"}


def test_item2id_and_id2item_cover_catalogue_titles_cut_to_max_title_tokens():
    _pairs("item2id", [({"title": t[:12]}, f"<i{i}>") for i, t in enumerate(TITLES)])
    _pairs("id2item", [({"item": f"<i{i}>"}, t[:12] + "</s>") for i, t in enumerate(TITLES)])


def test_title_history_last_titles_to_next_item():
    _pairs("title_history", [({"titles": "apple"}, "<i1>"), ({"titles": "apple; bread"}, "<i2>"),
                             ({"titles": "bread"}, "<i2>"), ({"titles": "bread; cheese"}, "<i3>"),
                             ({"titles": "cheese; dates from o"}, "<i5>"), ({"titles": "eggs"}, "<i5>"),
                             ({"titles": "dates from o"}, "<i0>")])


def test_user2items_any_training_item_of_the_user():
    _pairs("user2items", [({"user": f"<u{u}>"}, f"<i{i}>") for u, seq in enumerate(SEQS) for i in seq])


def test_co_interaction_table_window_topk_and_sampling():
    ptr, nbr, cnt = cooccurrence(SEQS, 6, window=2, topk=2)
    # window 2: u1's (1, 5) are 3 apart, so not a pair; (1, 2) co-occur for users 0 and 1
    table = {i: list(zip(nbr[ptr[i]:ptr[i + 1]].tolist(), cnt[ptr[i]:ptr[i + 1]].tolist())) for i in range(6)}
    assert table == {0: [(1, 1), (2, 1)], 1: [(2, 2), (0, 1)], 2: [(1, 2), (0, 1)], 3: [(0, 1), (1, 1)],
                     4: [(5, 1)], 5: [(2, 1), (3, 1)]}
    edges = [(i, j) for i, row in table.items() for j, _ in row]
    _pairs("co_interaction", [({"item": f"<i{i}>"}, f"<i{j}>") for i, j in edges])
    many = build_task_samples(_ctx(), _only("co_interaction", 500.0), seed=0, epoch=0)
    from_1 = [_pair(s)[1] for s in many if item_ph(1) in s["ids"][:-1]]
    assert abs(from_1.count("<i2>") / len(from_1) - 2 / 3) < 0.1            # p(j | i) ∝ count(i, j)


def test_neighbour_users_next_item_after_a_shared_item():
    # only users 0 and 1 share >= 2 items ({1, 2}); u1's sequence 1 -> 2, 2 -> 3 gives u0 {2, 3};
    # u0's sequence 1 -> 2 gives u1 {2} (2 is u0's last item, nothing follows it)
    assert [n.tolist() for n in neighbour_users(SEQS, min_overlap=2)] == [[1], [0], [], [], []]
    _pairs("neighbour_users", [({"user": "<u0>"}, "<i2>"), ({"user": "<u0>"}, "<i3>"), ({"user": "<u1>"}, "<i2>")],
           neighbour_min_overlap=2)
    # overlap 1: v counts only if a shared item has a successor in v's sequence: u4 [3, 0] shares
    # only its last item 0 with u0, u3 [4, 5] only its last item 5 with u1, u2 [4] has no successor;
    # u1's neighbours by overlap: u0 (2 items) before u4 (1)
    assert [n.tolist() for n in neighbour_users(SEQS, min_overlap=1)] == [[1], [0, 4], [3], [], [0, 1]]


def test_user2profile_top_facets_and_facet_parsing():
    assert item_facets(TEXT[5]) == ["Zest & Co", "Dried"]
    assert item_facets("title: Heat; release_year: 1995; class: Action Crime Thriller") == \
        ["Action", "Crime", "Thriller"]
    assert item_facets("title: x; description: brand: no; genres: Sci-Fi|Film-Noir") == ["Sci-Fi", "Film-Noir"]
    # u0: Acme x2, Fruit, Bakery, ... ; u1: all once -> first two seen; u2: no facets (skipped);
    # u3: eggs has none, figs -> Zest & Co, Dried; u4: Fruit x2, Acme
    _pairs("user2profile", [({"user": "<u0>"}, "Acme, Fruit</s>"), ({"user": "<u1>"}, "Bakery, Baked</s>"),
                            ({"user": "<u3>"}, "Zest & Co, Dried</s>"), ({"user": "<u4>"}, "Fruit, Acme</s>")])


def test_user_tasks_need_user_ids():
    ctx = TaskContext(train_seqs=SEQS, titles=TITLES, item_text=TEXT, tok=FakeTok(), max_history=2,
                      use_user_sid=False)
    cfg = TasksConfig(weights=TaskWeights(**{t: 1.0 for t in TASKS}))
    samples = build_task_samples(ctx, cfg, seed=0, epoch=0)
    assert {s["task"] for s in samples} == set(TASKS) - {"user2items", "neighbour_users", "user2profile"}
    assert not any(x < 0 and x % 2 == 0 for s in samples for x in s["ids"])   # no user placeholder anywhere


def test_templates_resampled_per_epoch_and_reproducible():
    cfg = TasksConfig(weights=TaskWeights(**{t: 5.0 for t in TASKS}))
    e0, again, e1 = (build_task_samples(_ctx(), cfg, seed=3, epoch=e) for e in (0, 0, 1))
    assert e0 == again
    assert e0 != e1
    for task in TASKS:           # the prompts (template choices) differ within every task
        assert [_pair(s)[0] for s in e0 if s["task"] == task] != [_pair(s)[0] for s in e1 if s["task"] == task]
    off = TasksConfig(weights=TaskWeights(**{t: (0.0 if t == "item2id" else 5.0) for t in TASKS}))
    assert [s for s in build_task_samples(_ctx(), off, seed=3, epoch=0) if s["task"] == "id2item"] == \
        [s for s in e0 if s["task"] == "id2item"]           # switching one task off leaves the others alone


def test_render_expands_placeholders_labels_only_on_response():
    item_tokens = np.array([[10, 11], [12, 13], [14, 15]])
    user_tokens = np.array([[90, 91, 92]])
    s = {"task": "x", "ids": [5, item_ph(1), user_ph(0), 6, item_ph(2)], "resp": [0, 0, 0, 1, 1]}
    assert render(s, item_tokens, user_tokens) == {"input_ids": [5, 12, 13, 90, 91, 92, 6, 14, 15],
                                                   "labels": [-100] * 6 + [6, 14, 15]}
    t = {"task": "y", "ids": np.array([item_ph(0), 7]), "resp": np.array([1, 1])}   # arrays (from Ray Data) too
    assert render_batch([s, t], item_tokens, user_tokens) == [render(s, item_tokens, user_tokens),
                                                              {"input_ids": [10, 11, 7], "labels": [10, 11, 7]}]
    with pytest.raises(ValueError, match="user placeholders"):
        render(s, item_tokens, None)


def test_task_stats_and_example_text():
    enc = FakeTok().encode
    samples = [{"task": "a", "ids": enc("h") + [item_ph(0)], "resp": [0, 1]},
               {"task": "a", "ids": [user_ph(0)] + enc("hi") + [item_ph(0)], "resp": [0, 0, 0, 1]},
               {"task": "b", "ids": [item_ph(1), 3], "resp": [0, 1]}]
    # rendered lengths with L=3, L_u=2: 1+3, 2+2+3, 3+1
    assert task_stats(samples, 3, 2) == {"a": {"n": 2, "mean_tokens": 5.5}, "b": {"n": 1, "mean_tokens": 4.0}}
    item_tokens, user_tokens = np.array([enc("ABC"), enc("DEF")]), np.array([enc("xy")])
    assert example_text(samples[1], FakeTok(), item_tokens, user_tokens) == "xyhi ||| ABC"
    assert example_text(samples[2], FakeTok(), item_tokens, user_tokens) == "DEF ||| <3>"


def test_training_seqrec_prompt_is_the_eval_prompt():
    item_tokens, user_tokens = np.arange(12).reshape(6, 2) + 100, np.arange(10).reshape(5, 2) + 900
    cfg = _only("seqrec", 20.0)
    (p0,) = build_eval_prompts([SEQS[0][:2]], item_tokens, user_tokens[:1], PromptPieces.build(FakeTok()), cfg,
                               max_history=2)
    rendered = [render(s, item_tokens, user_tokens)["input_ids"] for s in
                build_task_samples(_ctx(), cfg, seed=0, epoch=0) if s["ids"][-1] == item_ph(2)]
    enc = FakeTok().encode
    assert p0 == enc("User ") + [900, 901] + enc(" interacted with these items in order:") + [100, 101, 102, 103]
    assert p0 + [104, 105] in rendered                          # the window items 0, 1 -> 2 of user 0


def test_cooccurrence_and_neighbours_match_brute_force():
    """Vectorised tables == plain loops, on random logs with repeated items and empty users."""
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 30, size=int(rng.integers(0, 9))).tolist() for _ in range(120)]
    for m in (1, 2, 3):
        want = []
        for u, su in enumerate(seqs):
            found = sorted((-len(set(su) & set(sv)), v) for v, sv in enumerate(seqs)
                           if v != u and len(set(su) & set(sv)) >= m
                           and any(sv[p] in set(su) for p in range(len(sv) - 1)))
            want.append([v for _, v in found][:50])
        assert [n.tolist() for n in neighbour_users(seqs, min_overlap=m, scan=10 ** 9, chunk=37)] == want
    pairs = [{(s[p], s[q]) for p in range(len(s)) for q in range(len(s)) if 0 < abs(p - q) <= 3 and s[p] != s[q]}
             for s in seqs]
    ptr, nbr, cnt = cooccurrence(seqs, 30, window=3, topk=4)
    for i in range(30):
        counts = sorted((-sum((i, j) in ps for ps in pairs), j) for j in range(30))
        assert list(zip(nbr[ptr[i]:ptr[i + 1]].tolist(), (-cnt[ptr[i]:ptr[i + 1]]).tolist())) == \
            [(j, c) for c, j in counts if c < 0][:4]


def _heldout_run(tmp_path):
    """A data stage on a hand-made log, as the pipeline leaves it, plus what the log's construction says.

    8 users; each user's last two items are its validation and test targets. Users 0-5 end with two items
    nobody else has ("held v<u>", "held t<u>", brand Held<u>, so leaked text is visible too); users 6 and 7
    end with items that other users have in training, which only their position makes held out.

    Returns:
        ``(run, train, exclusive)``: the RunDir, per user_idx the item_idx of its training prefix (from the
        construction, not from the split), and the item_idx of the 12 held-out-only items.
    """
    import pandas as pd

    from ttds_ray import data
    from ttds_ray.artifacts import RunDir

    shared = [f"p{k}" for k in range(8)]
    seqs = {}
    for u in range(8):
        train = [shared[(3 * u + t) % 8] for t in range(4 + u % 3)]
        seqs[f"u{u}"] = train + ([f"held v{u}", f"held t{u}"] if u < 6 else [shared[(u + 1) % 8], shared[u % 8]])
    rows = [(u, i, t) for u, seq in seqs.items() for t, i in enumerate(seq)]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(order=range(len(rows)))
    ids = sorted({i for _, i, _ in rows})
    brand = {i: (f"Held{i[-1]}" if i.startswith("held") else f"B{i}") for i in ids}
    items = pd.DataFrame({"item_id": ids, "title": ids,
                          "text": [f"title: {i}; brand: {brand[i]}; categories: Top,C{brand[i]}" for i in ids]})
    prep = data.prepare(data.RawData(data.normalize_interactions_batch(log), items), kcore=0, seed=0)
    run = RunDir(tmp_path / "run")
    prep.save(run.stage_dir("data"))
    (run.stage_dir("data") / "MANIFEST.json").write_text("{}")
    idx = dict(zip(prep.items["item_id"], prep.items["item_idx"].tolist()))
    user = dict(zip(prep.sequences["user_id"], prep.sequences["user_idx"].tolist()))
    train = {user[u]: [idx[i] for i in seq[:-2]] for u, seq in seqs.items()}
    return run, train, {idx[i] for i in ids if i.startswith("held")}


def _is_window(items, seq):
    return any(seq[a:a + len(items)] == items for a in range(len(seq) - len(items) + 1))


def test_no_sample_contains_a_heldout_target_position(tmp_path):
    """No training sample of any task holds a user's validation or test target at its held-out position.

    The samples come from the pipeline's own TaskContext (recipes.task_context on a data stage). Every
    interaction-derived sample must be derivable from the users' training prefixes alone: items that occur
    only as held-out targets, and their titles / brands, appear in none of them (prompt or response); a
    seqrec sample of user u is a window of u's training prefix; user2items answers with an item of it;
    title_history, co_interaction and neighbour_users pairs are ones the training prefixes contain.
    item2id / id2item are catalogue lookups (titles are metadata): one item, no user.
    """
    from ttds_ray import recipes
    from ttds_ray.config import DataConfig, TTDSConfig

    run, train, exclusive = _heldout_run(tmp_path)
    assert len(exclusive) == 12
    cfg = TTDSConfig(data=DataConfig(path="unused", max_history=3),
                     tasks=TasksConfig(weights=TaskWeights(**{t: 5.0 for t in TASKS}), window_stride=2,
                                       neighbour_min_overlap=1, profile_terms=2, co_topk=50))
    ctx = recipes.task_context(cfg, run, FakeTok())
    seqs = list(train.values())
    th_len, title_cut, window = cfg.tasks.title_history_len, cfg.tasks.max_title_tokens, cfg.data.max_history
    titles = [t[:title_cut] for t in ctx.titles]
    title_history = {(tpl.format(titles="; ".join(titles[i] for i in seq[max(0, j - th_len):j])), f"<i{seq[j]}>")
                     for seq in seqs for j in range(1, len(seq)) for tpl in TEMPLATES["title_history"]}
    co_pairs = {(s[p], s[q]) for s in seqs for p in range(len(s)) for q in range(len(s))
                if 0 < abs(p - q) <= window and s[p] != s[q]}
    seen = set()
    for epoch in (0, 1):
        for s in build_task_samples(ctx, cfg.tasks, seed=0, epoch=epoch):
            task, ids = s["task"], s["ids"]
            items = [(-1 - x) // 2 for x in ids if x < 0 and x % 2]
            users = [(-2 - x) // 2 for x in ids if x < 0 and x % 2 == 0]
            seen.add(task)
            if task in ("item2id", "id2item"):
                assert len(items) == 1 and not users, (task, _pair(s))
                continue
            assert not set(items) & exclusive, (task, _pair(s))
            assert "held" not in _text(ids).lower(), (task, _pair(s))       # no held-out title or brand
            if task == "seqrec":
                assert len(users) == 1 and _is_window(items, train[users[0]]), (task, _pair(s))
            elif task == "user2items":
                assert items[0] in train[users[0]], (task, _pair(s))
            elif task == "title_history":
                assert _pair(s) in title_history, (task, _pair(s))
            elif task == "co_interaction":
                assert tuple(items) in co_pairs, (task, _pair(s))
            elif task == "neighbour_users":
                mine = set(train[users[0]])
                assert any(v != users[0] and seq[p] in mine and seq[p + 1] == items[0]
                           for v, seq in train.items() for p in range(len(seq) - 1)), (task, _pair(s))
    assert seen == set(TASKS)


@pytest.mark.parametrize("loss_on", ["all_items", "target"])
def test_seqrec_prefix_user_ids_hold_no_target_of_the_sample(loss_on):
    """tasks.seqrec_user_ids=prefix: each seqrec prompt's user placeholder is the row of the ID of the items before
    a cut c in the window (``prefix_user_rows`` layout), every cut of [max(start, 1), end - 1] is drawn (only the
    last with loss_on=target), and exactly the items from c on carry the loss."""
    from ttds_ray.tasks import prefix_user_rows, seqrec_windows

    off = prefix_user_rows(SEQS)
    np.testing.assert_array_equal(off, [0, 2, 5, 5, 6, 7])
    row_of = {len(SEQS) + off[u] + k - 1: (u, k) for u, s in enumerate(SEQS) for k in range(1, len(s))}
    samples = build_task_samples(_ctx(), _only("seqrec", 250.0, seqrec_loss_on=loss_on, seqrec_user_ids="prefix"),
                                 seed=0, epoch=0)
    seen = {}
    for smp in samples:
        ids, resp = np.asarray(smp["ids"]), np.asarray(smp["resp"])
        users = [int(x) for x in ids if x < 0 and x % 2 == 0]
        assert len(users) == 1
        u, c = row_of[(-2 - users[0]) // 2]
        items = [(-1 - int(x)) // 2 for x in ids if x < 0 and x % 2]
        (s, e), = [(s, e) for s, e in seqrec_windows(len(SEQS[u]), max_history=2, stride=10, loss_on=loss_on)
                   if SEQS[u][s:e] == items]
        assert max(s, 1) <= c <= e - 1
        loss = resp[-len(items):]
        assert resp[:-len(items)].sum() == 0
        assert loss.tolist() == [int(s + i >= c) for i in range(e - s)]
        seen.setdefault((u, s, e), set()).add(c)
    want = {(u, s, e): set(range(max(s, 1), e)) if loss_on == "all_items" else {e - 1}
            for u, seq in enumerate(SEQS) if len(seq) >= 2
            for s, e in seqrec_windows(len(seq), max_history=2, stride=10, loss_on=loss_on)}
    assert seen == want
