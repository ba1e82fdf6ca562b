"""Main job: train and evaluate TTDS end to end (data -> embeddings -> SASRec -> towers -> LLM -> eval).

Local (embedded Ray):   python jobs/train.py --config configs/quickstart.yaml
On a running cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                            python jobs/train.py --config configs/quickstart.yaml
Overrides are dotted:   python jobs/train.py --config configs/quickstart.yaml llm.epochs=2 eval.max_users=100
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (or the job's working_dir copy)

import typer  # noqa: E402

from ttds_ray.cli import train  # noqa: E402

if __name__ == "__main__":
    typer.run(train)
