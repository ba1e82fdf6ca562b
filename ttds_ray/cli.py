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

from .artifacts import Files

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ttds-ray: train, evaluate and manage TTDS generative recommenders on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: fetch public data into the local cache.")
app.add_typer(data_app, name="data")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Semantic-ID tokenizer (twin towers) diagnostics.")
app.add_typer(tokenizer_app, name="tokenizer")
config_app = typer.Typer(no_args_is_help=True, help="Configs: print the resolved config of a file + overrides.")
app.add_typer(config_app, name="config")


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
          overwrite: bool = typer.Option(False, help="Rebuild every stage, even those already finished with the same settings."),
          stop_after: Optional[str] = typer.Option(None, help="Stop after a stage: data, embeddings, cf, tokenizer or llm."),
          static_index: bool = typer.Option(False, "--static-index", help="Ablation: fix the item index before LLM "
                                            "training (no dynamic re-indexing rounds; same LLM budget)."),
          reuse_from: Optional[Path] = typer.Option(None, help="Another run directory whose finished stages "
                                                    "built from the same settings are hard-linked in instead of "
                                                    "recomputed (e.g. a static/dynamic pair sharing the tokenizer)."),
          no_ray: bool = typer.Option(False, "--no-ray", help="Run every stage in this process, one worker, "
                                      "without Ray (debugging; same recipes and artifacts)."),
          device: str = typer.Option("cpu", help="With --no-ray: the torch device, e.g. cpu, cuda, cuda:1."),
          ) -> None:
    """Run the main job: data -> embeddings -> SASRec -> twin towers -> LLM (LoRA or full) -> eval."""
    from .config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(config, (overrides or []) + (["dynamic.static_index=true"] if static_index else []))
    except ConfigError as e:
        _fail(e)
    from .errors import TTDSError

    try:
        if no_ray:
            from . import pipeline
            metrics = pipeline.run(cfg, pipeline.LocalBackend(device), overwrite=overwrite, stop_after=stop_after,
                                   reuse_from=reuse_from)
        else:
            from .train import run_training
            metrics = run_training(cfg, overwrite=overwrite, stop_after=stop_after, reuse_from=reuse_from)
    except TTDSError as e:          # ConfigError, DataError, BackboneUnavailable, EncoderUnavailable, ...
        _fail(e)
    if metrics:
        typer.echo(_metrics_table(metrics))
        typer.echo(f"users evaluated: {metrics['n_users_evaluated']} of {metrics['n_users_total']}; "
                   f"job wall {metrics['job_wall_s']} s; run dir {cfg.run_dir}")


@config_app.command("show")
def config_show(config: Path = typer.Argument(..., help="YAML config (see configs/)."),
                overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. llm.lr=1e-4"),
                ) -> None:
    """Print every key of the resolved config with its value and source (default / file / override)."""
    from .config import config_sources, format_config_sources
    from .errors import TTDSError

    try:
        rows = config_sources(config, overrides or [])
    except TTDSError as e:
        _fail(e)
    typer.echo(format_config_sources(rows))


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
    except OSError as e:
        _fail(DataError(f"cannot write the data cache: {e}; pass --cache-dir or set TTDS_DATA_CACHE to a "
                        "writable directory"))
    typer.echo(str(path))


@app.command("metrics")
def show_metrics(run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Print a run's metrics table."""
    path = run_dir / "eval" / Files.METRICS
    if not path.is_file():
        _fail(FileNotFoundError(f"{path} does not exist; the run has not finished its eval stage"))
    metrics = json.loads(path.read_text())
    typer.echo(_metrics_table(metrics))


@app.command("evaluate")
def evaluate(run_dir: Path = typer.Argument(..., help="A run directory with a finished llm stage."),
             split: str = typer.Option("valid", help="'valid' (for model selection) or 'test'."),
             max_users: Optional[int] = typer.Option(None, min=1, help="Seeded user sample; default eval.max_users."),
             ) -> None:
    """Evaluate a trained run on a split; writes <run_dir>/metrics_<split>_<users>users.json (select models on 'valid')."""
    from .artifacts import RunDir, write_json
    from .errors import TTDSError
    from .evaluate import evaluate_split
    from .recommender import load_run_config

    if split not in ("valid", "test"):
        _fail(ValueError(f"--split must be 'valid' or 'test', got {split!r}"))
    try:
        cfg = load_run_config(run_dir)
        run = RunDir(run_dir)
        run.require("llm")
        metrics, *_ = evaluate_split(cfg, run, split, max_users=max_users)
    except TTDSError as e:
        _fail(e)
    out = run_dir / Files.split_metrics(split, metrics["n_users_evaluated"])
    write_json(out, metrics)
    typer.echo(_metrics_table(metrics))
    typer.echo(f"split {split}; users evaluated: {metrics['n_users_evaluated']} of {metrics['n_users_total']}; "
               f"written to {out}")


@app.command("score")
def score(run_dir: Path = typer.Option(..., "--run", help="A run directory with finished data and llm stages."),
          out: Path = typer.Option(..., "--out", help="Output parquet (user, rank, item_id, score, semantic_id); "
                                   "replaced atomically."),
          histories: Optional[Path] = typer.Option(None, help="Parquet of raw histories: 'user' (str), 'history' "
                                                   "(list of item ids, oldest first). Default: the run's users."),
          k: int = typer.Option(10, help="Items per user."),
          exclude_seen: bool = typer.Option(True, "--exclude-seen/--no-exclude-seen",
                                            help="Drop the user's history items (as serving does)."),
          split: str = typer.Option("none", help="Prepared users: 'none' = after the whole logged history (as "
                                    "online serving); 'test' / 'valid' = the evaluation prompt."),
          batch_size: int = typer.Option(32, help="Users per UDF call and per beam-search batch."),
          concurrency: int = typer.Option(1, help="Ray Data actors, each holding the model."),
          device: str = typer.Option("cpu", help="cpu or cuda (then one GPU per actor)."),
          max_users: Optional[int] = typer.Option(None, help="Score a seeded sample of this many users (smoke runs)."),
          seed: Optional[int] = typer.Option(None, help="Seed of --max-users; default the run's seed."),
          no_ray: bool = typer.Option(False, "--no-ray", help="Run the same scorer in this process, without Ray."),
          ) -> None:
    """Batch scoring: top-k items for every user of a run (or a histories file), written to one parquet file."""
    from .batch import ScoreOptions, score as score_job
    from .errors import TTDSError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        summary = score_job(run_dir, out, histories=histories, max_users=max_users, seed=seed, use_ray=not no_ray,
                            concurrency=concurrency, device=device,
                            options=ScoreOptions(k=k, exclude_seen=exclude_seen, batch_size=batch_size,
                                                 split=None if split == "none" else split))
    except TTDSError as e:
        _fail(e)
    typer.echo(summary.line())
    for e in summary.errors[:5]:
        typer.echo(f"  not scored: row {e['pos']} user {e['user']!r}: {e['error']}")
    if summary.n_errors > 5:
        typer.echo(f"  ... {summary.n_errors - 5} more (all listed in the file's 'ttds_ray.score' metadata)")


def tokenizer_report_table(stats: dict) -> str:
    """Markdown table of ``tokenizer/tokenizer_stats.json``: one column per tower."""
    towers = [t for t in ("item", "user") if t in stats]

    def fmt(v):
        if isinstance(v, list):
            return " / ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [("entities", "n_entities"), ("codes used per level", "codes_used"),
            ("normalised entropy per level", "entropy"), ("collisions, greedy", "collisions_greedy"),
            ("collisions, after Sinkhorn", "collisions_sinkhorn"), ("collisions, final", "collisions_final"),
            ("share of users with a shared ID", "shared_share"),
            ("recon MSE s (fused / quantized)", ("rec_s_fused", "rec_s_quant")),
            ("recon MSE c (fused / quantized)", ("rec_c_fused", "rec_c_quant")),
            ("cross-modal recon MSE s<-c / c<-s", ("rec_s_from_c", "rec_c_from_s"))]
    for term in ("align_inst", "align_dist", "align_code", "kl", "rq"):
        rows.append((f"final {term}", ("final_terms", term)))
    lines = ["| | " + " | ".join(towers) + " |", "|---" * (len(towers) + 1) + "|"]
    for label, key in rows:
        cells = []
        for t in towers:
            st = stats[t]
            if isinstance(key, tuple) and key[0] == "final_terms":
                v = st.get("final_terms", {}).get(key[1], "-")
            elif isinstance(key, tuple):
                v = [st[k] for k in key] if all(k in st for k in key) else "-"
            else:
                v = st.get(key, "-")
            cells.append(fmt(v))
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@tokenizer_app.command("report")
def tokenizer_report(run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Print the tokenizer diagnostics of a run: code usage, entropy, collisions, reconstruction, alignment."""
    path = run_dir / "tokenizer" / Files.TOKENIZER_STATS
    if not path.is_file():
        _fail(FileNotFoundError(f"{path} does not exist; the run has not finished its tokenizer stage"))
    typer.echo(tokenizer_report_table(json.loads(path.read_text())))
    typer.echo(f"plots: {run_dir / 'tokenizer'}/{{item,user}}_code_usage.png, {{item,user}}_losses.png")


@app.command("tune")
def tune(config: Path = typer.Option(..., "--config", "-c", help="Base YAML config (see configs/)."),
         space: Path = typer.Option(..., "--space", help="Search space YAML (see tune_spaces/, docs/TUNING.md)."),
         overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the base config."),
         num_samples: Optional[int] = typer.Option(None, min=1, help="Trials; default the space's num_samples."),
         resume: bool = typer.Option(False, "--resume", help="Continue the interrupted sweep of the same name."),
         name: Optional[str] = typer.Option(None, help="Sweep name; default <config name>-<space stem>; the sweep "
                                            "directory is <output_dir>/sweeps/<name>."),
         max_concurrent: Optional[int] = typer.Option(None, min=1, help="Trials at once; default the space's "
                                                      "max_concurrent (1 on a 2-core machine)."),
         baseline: bool = typer.Option(False, "--baseline", help="Also train the base config itself (trial 'base', "
                                       "same budget) first, for comparison; it builds the shared stages."),
         ) -> None:
    """Hyperparameter sweep on Ray Tune (OptunaSearch TPE + ASHA) maximising validation NDCG@10; writes the
    results table, objective.png, best.yaml and best_run into the sweep directory."""
    from .errors import TTDSError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        from .tune_ray import run_sweep
        out = run_sweep(config, space, overrides or [], num_samples=num_samples, resume=resume, name=name,
                        max_concurrent=max_concurrent, baseline=baseline)
    except TTDSError as e:
        _fail(e)
    typer.echo(out["results_md"])
    typer.echo(f"sweep dir {out['sweep_dir']}" + (f"; best config {out['sweep_dir']}/best.yaml" if out["best"] else
                                                   "; no trial completed"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
