#!/usr/bin/env bash
# GPU smoke test: a short end-to-end run with ray.use_gpu=true on a small MovieLens-100K slice, then the
# Recommender on the GPU. Run it on a machine with one CUDA GPU and a CUDA build of torch installed.
# Usage: bash bench/gpu_smoke.sh [OUT_DIR]      (prints the metrics table and the stage wall times)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/ttds-gpu-smoke}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_DATA_USE_DATASOURCE_V2=0 HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(0))"
ttds-ray data fetch movielens-100k
python jobs/train.py --config configs/quickstart.yaml name=gpu-smoke output_dir="$OUT" ray.use_gpu=true \
    cf.epochs=2 tokenizer.epochs=10 llm.max_steps=200 eval.max_users=200
python - "$OUT/gpu-smoke" <<'PY'
import sys, time
from ttds_ray import Recommender
rec = Recommender.from_run(sys.argv[1], device="cuda")
t0 = time.time()
out = rec.recommend(user_ids=rec.user_ids[:64], k=10)
print(f"recommend: 64 users on {rec.device} in {time.time() - t0:.2f} s; first: {out[0].item_ids[:5]}")
PY
