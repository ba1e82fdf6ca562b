"""The online app without Ray (serving.py + Recommender): responses, every bad input as a 4xx naming the
problem, cold-start items (unique IDs, recommendable at once, persisted, safe under concurrency) and
batch-composition independence. The same app under Ray Serve (@serve.batch) is tested in test_serve_ray.py."""
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import copy_run
from ttds_ray.recommender import RecRequest, Recommender
from ttds_ray.serving import ServeSettings, TTDSService, create_app


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """A private copy of the tiny run behind the app (the tests add items to it)."""
    run_dir = copy_run(tiny_run[1].root, tmp_path_factory.mktemp("served") / "run")
    svc = TTDSService(ServeSettings(run_dir=str(run_dir), max_body_bytes=20_000, max_batch_requests=4))
    return svc, TestClient(create_app(svc))


def test_recommend_for_a_user_and_a_history(served):
    svc, c = served
    user = svc.rec.user_ids[0]
    r = c.post("/recommend", json={"user_id": user, "k": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["items"]) == 5 and len({i["item_id"] for i in out["items"]}) == 5
    seen = set(np.asarray(svc.rec.item_ids)[svc.rec.user_history(user)])
    assert not seen & {i["item_id"] for i in out["items"]}            # exclude_seen is the default
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert out["user_semantic_id"] == svc.rec._user_sid[0]
    assert out["truncated_history"] is (len(svc.rec.user_history(user)) > svc.rec.cfg.data.max_history)
    for i in out["items"]:
        assert i == {**i, **{k: svc.rec.item(i["item_id"])[k] for k in ("title", "semantic_id")}}
    hist = svc.rec.item_ids[:3]
    r = c.post("/recommend", json={"history": hist, "k": 3, "exclude_seen": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert r.json()["user_semantic_id"] == svc.rec.user_semantic_id(hist)


def test_exclude_seen_still_returns_k_items_when_the_top_beams_are_seen(served):
    svc, c = served
    # the history holds the model's own top items: without widening the beam they would leave < k
    top = c.post("/recommend", json={"history": svc.rec.item_ids[:2], "k": 20, "exclude_seen": False}).json()
    hist = [i["item_id"] for i in top["items"]][:15]
    r = c.post("/recommend", json={"history": hist, "k": 10})
    assert r.status_code == 200 and len(r.json()["items"]) == 10
    assert not set(hist) & {i["item_id"] for i in r.json()["items"]}


def test_a_history_over_the_limit_keeps_the_most_recent_items_and_says_so(served):
    svc, c = served
    mh = svc.rec.cfg.data.max_history
    long = (svc.rec.item_ids * 3)[:mh + 7]
    r = c.post("/recommend", json={"history": long, "k": 4, "exclude_seen": False})
    assert r.status_code == 200 and r.json()["truncated_history"] is True
    # the prompt holds the most recent mh items (the user tower reads the whole history, so compare at the
    # prompt level with the same user semantic ID)
    rows = np.asarray([svc.rec._item_row[i] for i in long])
    codes = svc.rec._user_codes([rows])
    idx, _ = svc.rec.rank([rows[-mh:]], codes, n_beams=svc.rec.cfg.eval.n_beams)
    assert [i["item_id"] for i in r.json()["items"]] == [svc.rec.item_ids[j] for j in idx[0][:4]]
    idx_old, _ = svc.rec.rank([rows[:mh]], codes, n_beams=svc.rec.cfg.eval.n_beams)
    assert not np.array_equal(idx_old[0], idx[0]) or len(set(long[:mh])) == len(set(long[-mh:]))


@pytest.mark.parametrize("body,status,needle", [
    ({"user_id": "no-such-user"}, 404, "no-such-user"),
    ({"history": ["nope-1", "nope-2"]}, 422, "nope-1, nope-2"),
    ({"history": []}, 422, "history is empty"),
    ({}, 422, "exactly one of user_id or history"),
    ({"user_id": "x", "history": ["y"]}, 422, "exactly one of user_id or history"),
    ({"history": ["a"], "k": 0}, 422, "k:"),
    ({"history": ["a"], "k": 101}, 422, "k:"),
    ({"history": ["a"], "k": "5"}, 422, "k:"),
    ({"history": ["a"], "exclude_seen": "yes"}, 422, "exclude_seen"),
    ({"history": [1, 2]}, 422, "history"),
    ({"history": "abc"}, 422, "history"),
    ({"user_id": "u", "kk": 3}, 422, "kk"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(served, body, status, needle):
    _, c = served
    r = c.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    if status == 404 or "nope" in needle:
        assert r.json()["unknown_ids"]


@pytest.mark.parametrize("raw,status,needle", [
    (b'{"history": ["a", ', 400, "malformed JSON"),
    (b'\xff\xfe{"user_id": "1"}', 400, "not valid UTF-8"),
    (b'{"history": [' + b",".join([b'"x"'] * 5000) + b"]}", 413, "over the limit"),
])
def test_malformed_non_utf8_and_oversized_bodies(served, raw, status, needle):
    svc, c = served
    r = c.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["detail"]
    ok = c.post("/recommend", json={"user_id": svc.rec.user_ids[1], "k": 2})       # the next request is fine
    assert ok.status_code == 200


def test_batch_endpoint_answers_each_request_and_bounds_the_count(served):
    svc, c = served
    good = {"user_id": svc.rec.user_ids[2], "k": 3}
    r = c.post("/recommend/batch", json={"requests": [good, {"user_id": "ghost"}, {"history": ["ghost-item"]}]})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res[0]["items"]) == 3
    assert res[1]["status"] == 404 and res[1]["unknown_ids"] == ["ghost"]
    assert res[2]["status"] == 422 and res[2]["unknown_ids"] == ["ghost-item"]
    assert res[0] == c.post("/recommend", json=good).json()
    mixed = c.post("/recommend/batch", json={"requests": [{"k": 0}, good, {}]}).json()["results"]
    assert mixed[0]["status"] == mixed[2]["status"] == 422 and "k" in mixed[0]["detail"]
    assert mixed[1] == res[0]                                    # a malformed neighbour fails alone
    over = c.post("/recommend/batch", json={"requests": [good] * 5})
    assert over.status_code == 413 and "limit is 4" in over.json()["detail"]
    assert c.post("/recommend/batch", json={"requests": []}).status_code == 422


def test_a_request_result_does_not_depend_on_its_batch(served):
    svc, _ = served
    reqs = [RecRequest(user_id=svc.rec.user_ids[3], k=5), RecRequest(history=svc.rec.item_ids[5:9], k=12),
            RecRequest(user_id="ghost"), RecRequest(user_id=svc.rec.user_ids[4], k=3, exclude_seen=False)]
    together = svc.rank_batch(reqs)
    for req, got in zip(reqs, together):
        alone = svc.rank_batch([req])[0]
        if isinstance(alone, Exception):
            assert type(got) is type(alone)
        else:
            assert got.item_ids == alone.item_ids and np.allclose(got.scores, alone.scores, atol=1e-5)


def test_item_lookup_search_metadata_health_docs(served):
    svc, c = served
    item = svc.rec.item_ids[0]
    r = c.get(f"/items/{item}")
    assert r.status_code == 200 and r.json()["title"] == svc.rec.titles[0] and r.json()["cold_start"] is False
    assert c.get("/items/ghost").status_code == 404
    word = svc.rec.titles[0].split()[0]
    found = c.get("/search", params={"q": word}).json()["items"]
    assert found and all(word.lower() in f["title"].lower() for f in found)
    m = c.get("/metadata").json()
    assert m["n_items"] == svc.rec.n_items and m["backbone"] == "tiny" and len(m["id_table_sha256"]) == 64
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.get("/docs").status_code == 200 and "/recommend" in c.get("/openapi.json").json()["paths"]
    assert c.get("/").status_code == 200 and c.get("/").text.lower().lstrip().startswith("<!doctype html")


def test_cold_start_item_gets_a_unique_id_is_recommendable_at_once_and_survives_a_restart(served):
    svc, c = served
    n0 = svc.rec.n_items
    r = c.post("/items", json={"item_id": "cold-1", "title": "Digital microscope",
                               "text": "A USB digital microscope with 1000x zoom and eight LED lights"})
    assert r.status_code == 201, r.text
    sid = r.json()["semantic_id"]
    assert r.json()["modalities"] == ["text"] and r.json()["cold_start"] is True
    assert svc.rec.n_items == n0 + 1 and len(set(svc.rec._item_sid)) == svc.rec.n_items
    assert c.get("/items/cold-1").json()["semantic_id"] == sid
    # in the trie: an exhaustive beam over the catalogue ranks it; a history may hold it
    everything = c.post("/recommend", json={"history": svc.rec.item_ids[:2], "k": 100, "exclude_seen": False})
    assert everything.status_code == 200
    if svc.rec.n_items <= 100:
        assert "cold-1" in {i["item_id"] for i in everything.json()["items"]}
    assert c.post("/recommend", json={"history": ["cold-1"], "k": 3}).status_code == 200
    co = c.post("/items", json={"item_id": "cold-2", "text": "safety goggles", "co_items": svc.rec.item_ids[:3]})
    assert co.status_code == 201 and co.json()["modalities"] == ["text", "collaborative"]
    # a restart (a new process loading the run) sees both with the same IDs
    again = Recommender.from_run(svc.rec.run.root)
    assert again.item("cold-1")["semantic_id"] == sid and again.n_items == n0 + 2
    assert again.id_table_sha256() == svc.rec.id_table_sha256()


@pytest.mark.parametrize("body,status,needle", [
    ({"item_id": "cold-x", "text": "   "}, 422, "text is empty"),
    ({"item_id": "cold-x", "text": ""}, 422, "text"),
    ({"item_id": "cold-x"}, 422, "text"),
    ({"item_id": "cold-x", "text": "ok", "co_items": ["ghost"]}, 422, "ghost"),
    ({"item_id": "cold-x", "text": "ok", "price": 3}, 422, "price"),
])
def test_bad_new_items_are_refused_and_add_nothing(served, body, status, needle):
    svc, c = served
    n0 = svc.rec.n_items
    r = c.post("/items", json=body)
    assert r.status_code == status and needle in r.json()["detail"]
    assert svc.rec.n_items == n0 and c.get("/items/cold-x").status_code == 404


def test_an_existing_item_id_is_a_conflict(served):
    svc, c = served
    r = c.post("/items", json={"item_id": svc.rec.item_ids[0], "text": "anything"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]


def test_concurrent_additions_from_two_processes_never_share_a_semantic_id(tiny_run, tmp_path):
    """Two Recommenders on one run dir (as two Serve replicas) add items from 8 threads at once."""
    run_dir = copy_run(tiny_run[1].root, tmp_path / "run")
    a, b = Recommender.from_run(run_dir), Recommender.from_run(run_dir)
    text = "stainless steel lab tweezers"          # the same text: the same greedy ID for every item
    errors = []

    def add(rec, i):
        try:
            rec.add_item(f"c{i}", text)
        except Exception as e:          # noqa: BLE001 (collected and asserted below)
            errors.append(e)
    threads = [threading.Thread(target=add, args=(a if i % 2 else b, i)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    fresh = Recommender.from_run(run_dir)
    sids = [fresh.item(f"c{i}")["semantic_id"] for i in range(8)]
    assert len(set(sids)) == 8 and len(set(fresh._item_sid)) == fresh.n_items
    a.sync(), b.sync()
    assert a.id_table_sha256() == b.id_table_sha256() == fresh.id_table_sha256()
    stored = json.loads((run_dir / "cold_start" / "items.json").read_text())
    assert [e["item_id"] for e in stored] and len(stored) == 8


def test_online_answers_equal_the_library_for_the_same_users(served):
    """POST /recommend {user_id} == Recommender.recommend(user_ids=...) (the batch job is checked against the
    same call and against `ttds-ray evaluate` in test_batch_score.py)."""
    svc, c = served
    for user in svc.rec.user_ids[5:8]:
        for exclude_seen in (True, False):
            want = svc.rec.recommend(user_ids=[user], k=7, exclude_seen=exclude_seen)[0]
            got = c.post("/recommend", json={"user_id": user, "k": 7, "exclude_seen": exclude_seen}).json()
            assert [i["item_id"] for i in got["items"]] == want.item_ids
            np.testing.assert_allclose([i["score"] for i in got["items"]], want.scores, rtol=1e-6)


@pytest.mark.parametrize("method,path,status", [("GET", "/nowhere", 404), ("GET", "/recommend", 405),
                                                ("GET", "/items/a%2Fb", 404)])
def test_router_errors_keep_the_error_body_shape(served, method, path, status):
    _, c = served
    r = c.request(method, path)
    assert r.status_code == status and r.json()["status"] == status and r.json()["detail"]


@pytest.mark.parametrize("item_id", [" padded ", "a/b", "tab\tid", "nul\x00"])
def test_new_item_ids_that_could_not_be_looked_up_are_refused(served, item_id):
    _, c = served
    r = c.post("/items", json={"item_id": item_id, "text": "a drill"})
    assert r.status_code == 422 and "plain id" in r.json()["detail"]


def test_a_damaged_or_deleted_cold_start_list_is_a_clear_503_and_a_deletion_resets(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run[1].root, tmp_path / "run")
    svc = TTDSService(ServeSettings(run_dir=str(run_dir)))
    c = TestClient(create_app(svc))
    n0 = svc.rec.n_items
    assert c.post("/items", json={"item_id": "cold-a", "text": "a brass hinge", "title": "  "}).status_code == 201
    assert c.get("/items/cold-a").json()["title"] == "a brass hinge"           # a blank title falls back
    path = run_dir / "cold_start" / "items.json"
    good = path.read_text()
    path.write_text(good[: len(good) // 2])                                      # truncated by hand
    for r in (c.get("/healthz"), c.get("/search", params={"q": "x"}), c.get("/metadata"),
              c.post("/recommend", json={"user_id": svc.rec.user_ids[0]})):
        assert r.status_code == 503 and "items.json" in r.json()["detail"], r.text
    bad = json.loads(good)
    bad[0]["codes"] = [999] * len(bad[0]["codes"])                               # an out-of-range ID
    path.write_text(json.dumps(bad))
    r = c.post("/recommend", json={"user_id": svc.rec.user_ids[0]})
    assert r.status_code == 503 and "invalid semantic ID" in r.json()["detail"]
    path.unlink()                                                                # deleted: back to trained items
    r = c.post("/recommend", json={"user_id": svc.rec.user_ids[0], "k": 3})
    assert r.status_code == 200 and svc.rec.n_items == n0
    assert c.get("/items/cold-a").status_code == 404
    assert c.post("/items", json={"item_id": "cold-b", "text": "a steel hinge"}).status_code == 201
    assert Recommender.from_run(run_dir).n_items == n0 + 1
