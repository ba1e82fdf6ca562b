"""`ttds-ray` command line: train, data fetch, eval; thin over the library.

Reads config YAML files and flags; writes run directories (train.py) and the data cache (data.py).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ttds-ray: train, evaluate and manage TTDS generative recommenders on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: fetch public data into the local cache.")
app.add_typer(data_app, name="data")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {type(e).__name__}: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _metrics_table(metrics: dict) -> str:
    models = metrics.get("models", {})
    keys = [k for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10") if any(k in m for m in models.values())]
    lines = ["| model | " + " | ".join(keys) + " | users |", "|---" * (len(keys) + 2) + "|"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys)
                     + f" | {m.get('n_users')} |")
    return "\n".join(lines)


@app.command()
def train(config: Path = typer.Option(..., "--config", "-c", help="YAML config (see configs/)."),
          overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. llm.lr=1e-4 eval.max_users=100"),
          overwrite: bool = typer.Option(False, help="Rebuild a run directory made by a different config."),
          stop_after: Optional[str] = typer.Option(None, help="Stop after this stage (data|embeddings|cf|tokenizer|llm)."),
          ) -> None:
    """Run the main job: data -> embeddings -> SASRec -> twin towers -> LoRA LLM -> eval."""
    from .config import ConfigError, load_config
    from .data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as e:
        _fail(e)
    from .llm import BackboneUnavailable
    from .embeddings import EncoderUnavailable
    from .quantizer import CollisionError
    from .train import run_training

    try:
        metrics = run_training(cfg, overwrite=overwrite, stop_after=stop_after)
    except (ConfigError, DataError, BackboneUnavailable, EncoderUnavailable, CollisionError) as e:
        _fail(e)
    if metrics:
        typer.echo(_metrics_table(metrics))
        typer.echo(f"users evaluated: {metrics['n_users_evaluated']} of {metrics['n_users_total']}; "
                   f"job wall {metrics['job_wall_s']} s; run dir {cfg.run_dir}")


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument(..., help="Dataset name: movielens-100k"),
               cache_dir: Optional[Path] = typer.Option(None, help="Default: $TTDS_DATA_CACHE or ~/.cache/ttds_ray/data"),
               ) -> None:
    """Download a public dataset (sha256-verified) into the data cache and print its path."""
    from .data import DATASETS, DataError, default_cache_dir

    if name not in DATASETS:
        _fail(ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}"))
    try:
        path = DATASETS[name](cache_dir or default_cache_dir())
    except DataError as e:
        _fail(e)
    typer.echo(str(path))


@app.command("metrics")
def show_metrics(run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Print a run's metrics table."""
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        _fail(FileNotFoundError(f"{path} does not exist; the run has not finished its eval stage"))
    metrics = json.loads(path.read_text())
    typer.echo(_metrics_table(metrics))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
