"""The online app on Ray Serve (serve_app.py): requests arriving together meet in one @serve.batch call, a bad
request in a batch never fails the good ones nor the replica, cold-start items work through Serve, and the
Serve config file in serve_apps/ is valid for Serve's own schema."""
import socket
import threading
from pathlib import Path

import pytest
import requests
import yaml

from conftest import copy_run

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(ray_session, tiny_run, tmp_path_factory):
    from ray import serve

    from ttds_ray.serve_app import build_app

    run_dir = copy_run(tiny_run[1].root, tmp_path_factory.mktemp("serve") / "run")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"run_dir": str(run_dir), "max_batch_size": 8, "batch_wait_timeout_s": 0.2})
    serve.run(app, name="ttds", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
    yield url
    serve.shutdown()


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(serve_url):
    meta = requests.get(f"{serve_url}/metadata", timeout=30).json()
    items = [i["item_id"] for i in requests.get(f"{serve_url}/search", params={"q": "", "limit": 3},
                                                timeout=30).json()["items"]]
    bodies = [{"history": ["ghost-item"]} if i % 4 == 3 else {"user_id": "ghost-user"} if i % 4 == 2 else
              {"history": items, "k": 5} for i in range(16)]
    out = [None] * len(bodies)

    def call(i):
        out[i] = requests.post(f"{serve_url}/recommend", json=bodies[i], timeout=120)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for body, r in zip(bodies, out):
        if body.get("user_id") == "ghost-user":
            assert r.status_code == 404 and r.json()["unknown_ids"] == ["ghost-user"]
        elif body["history"] == ["ghost-item"]:
            assert r.status_code == 422 and r.json()["unknown_ids"] == ["ghost-item"]
        else:
            assert r.status_code == 200 and len(r.json()["items"]) == 5
    good = [r.json()["items"] for b, r in zip(bodies, out) if r.status_code == 200]
    assert all(g == good[0] for g in good)                      # same request, same answer in any batch
    after = requests.get(f"{serve_url}/metadata", timeout=30).json()
    assert after["batches"]["largest"] > 1, after["batches"]     # requests met in one @serve.batch call
    assert after["batches"]["calls"] > meta["batches"]["calls"]
    again = requests.post(f"{serve_url}/recommend", json=bodies[0], timeout=60)
    assert again.status_code == 200 and again.json()["items"] == good[0]


def test_bad_bytes_and_cold_start_through_serve(serve_url):
    r = requests.post(f"{serve_url}/recommend", data=b"\xff{", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 400
    r = requests.post(f"{serve_url}/items", json={"item_id": "serve-cold", "text": "brass laboratory weights set"},
                      timeout=120)
    assert r.status_code == 201, r.text
    sid = r.json()["semantic_id"]
    assert requests.get(f"{serve_url}/items/serve-cold", timeout=30).json()["semantic_id"] == sid
    r = requests.post(f"{serve_url}/recommend", json={"history": ["serve-cold"], "k": 3}, timeout=60)
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert requests.get(f"{serve_url}/healthz", timeout=30).status_code == 200


def test_serve_config_files_match_serve_schema_and_our_settings():
    from ray.serve.schema import ServeDeploySchema

    from ttds_ray.serving import ServeSettings

    for path in sorted((REPO / "serve_apps").glob("*.yaml")):
        cfg = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        assert cfg.http_options.host == "127.0.0.1", path
        for app in cfg.applications:
            assert app.import_path == "ttds_ray.serve_app:build_app"
            ServeSettings(**app.args)                            # strict: unknown keys or wrong types fail
            dep = {d.name: d for d in app.deployments}["TTDS"]
            assert dep.max_ongoing_requests >= app.args.get("max_batch_size", 16), path
