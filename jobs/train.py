"""Main job: train and evaluate TTDS end to end (data -> embeddings -> SASRec -> towers -> LLM -> eval).

Local (embedded Ray):   python jobs/train.py --config configs/quickstart.yaml
On a running cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                            python jobs/train.py --config configs/quickstart.yaml
Overrides are dotted:   python jobs/train.py --config configs/quickstart.yaml llm.epochs=2 eval.max_users=100
"""
from ttds_ray.cli import app

if __name__ == "__main__":
    app(["train", *__import__("sys").argv[1:]])
