"""Closed-loop load on the online app (Ray Serve, 127.0.0.1 only): throughput and latency percentiles with
@serve.batch on vs off, at N concurrent clients. Stops by itself after ``--duration`` seconds per point.

    python bench/serve_load.py --run runs/quickstart-ml100k --clients 1 8 32 --duration 20 --out results/serve_load.json

Each client sends POST /recommend for a random known user (k=10, exclude_seen) and sends the next request
when the answer arrives. Batching off = ``max_batch_size: 1`` (every request its own beam search). The
clients run in this process (threads), on the same machine as the replica: on a 2-core machine they take
CPU from it, so the figures are a lower bound of what the replica does alone.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_loop(url: str, users: list[str], n_clients: int, duration: float, seed: int = 0) -> dict:
    """N clients, each sending its next request as soon as the previous one is answered, for ``duration`` s."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        s = requests.Session()
        while time.monotonic() < stop:
            body = {"user_id": rng.choice(users), "k": 10}
            t = time.perf_counter()
            try:
                ok = s.post(f"{url}/recommend", json=body, timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.monotonic() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"clients": n_clients, "requests": len(lat), "errors": errors[0], "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": round(q[49] * 1e3, 1),
            "p95_ms": round(q[94] * 1e3, 1), "p99_ms": round(q[98] * 1e3, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="A finished run directory.")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=20.0, help="Seconds of load per point (bounded).")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--out", type=Path, default=None, help="JSON output (a markdown table goes next to it).")
    args = ap.parse_args(argv)
    if not 0 < args.duration <= 300 or max(args.clients) > 256:
        ap.error("--duration must be in (0, 300] s and --clients at most 256")
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from ttds_ray.recommender import load_run_config
    from ttds_ray.serve_app import build_app
    import pandas as pd

    cfg = load_run_config(args.run)
    users = pd.read_parquet(Path(args.run) / "data" / "sequences.parquet", columns=["user_id"])["user_id"].astype(str).tolist()
    ray.init(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for mode in args.modes:
            mbs = args.max_batch_size if mode == "on" else 1
            serve.run(build_app({"run_dir": str(args.run), "max_batch_size": mbs,
                                 "batch_wait_timeout_s": args.batch_wait_timeout_s}),
                      name="ttds", route_prefix="/", blocking=False)
            for _ in range(120):
                try:
                    if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            closed_loop(url, users, 2, 3.0)                     # warm-up, not reported
            for n in args.clients:
                before = requests.get(f"{url}/metadata", timeout=30).json()["batches"]
                r = {"batching": mode, "max_batch_size": mbs, **closed_loop(url, users, n, args.duration)}
                after = requests.get(f"{url}/metadata", timeout=30).json()["batches"]
                r["mean_batch"] = round((after["requests"] - before["requests"]) /
                                        max(1, after["calls"] - before["calls"]), 2)
                rows.append(r)
                print(json.dumps(r), flush=True)
            serve.delete("ttds")
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"run": str(args.run), "backbone": cfg.llm.backbone, "n_beams": cfg.eval.n_beams,
              "cpus": os.cpu_count(), "duration_s": args.duration, "rows": rows}
    lines = ["| batching | clients | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batching']} | {r['clients']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['p99_ms']} | {r['errors']} | {r['mean_batch']} |" for r in rows]
    for n in args.clients:
        on = [r for r in rows if r["clients"] == n and r["batching"] == "on"]
        off = [r for r in rows if r["clients"] == n and r["batching"] == "off"]
        if on and off and off[0]["throughput_rps"]:
            result[f"speedup_at_{n}"] = round(on[0]["throughput_rps"] / off[0]["throughput_rps"], 2)
    print("\n".join(lines))
    print({k: v for k, v in result.items() if k.startswith("speedup")})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
