"""Hyperparameter sweep: Ray Tune + OptunaSearch (TPE) + ASHA over a search space of dotted config keys.

Local (embedded Ray):   python jobs/tune.py --config configs/scientific_tiny.yaml --space tune_spaces/dynamic_schedule.yaml
Continue after a stop:  python jobs/tune.py --config ... --space ... --resume
On a running cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                            python jobs/tune.py --config ... --space ... --max-concurrent 4
Writes <output_dir>/sweeps/<name>/: results.csv/.md, objective.png, best.yaml, best_run (docs/TUNING.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (or the job's working_dir copy)

import typer  # noqa: E402

from ttds_ray.cli import tune  # noqa: E402

if __name__ == "__main__":
    typer.run(tune)
