"""Batch scoring job: top-k items for every user of a trained run (or a parquet file of histories),
with Ray Data map_batches over an actor pool holding the model; writes one parquet file atomically.

Local (embedded Ray):   python jobs/score.py --run runs/quickstart-ml100k --out scores.parquet
On a running cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                            python jobs/score.py --run /abs/runs/quickstart-ml100k --out /abs/scores.parquet
Raw histories:          python jobs/score.py --run RUN --histories hist.parquet --out scores.parquet
Options: python jobs/score.py --help (the same as `ttds-ray score`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (or the job's working_dir copy)

import typer  # noqa: E402

from ttds_ray.cli import score  # noqa: E402

if __name__ == "__main__":
    typer.run(score)
