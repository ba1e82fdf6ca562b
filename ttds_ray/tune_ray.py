"""Ray Tune driver of a hyperparameter sweep: OptunaSearch (TPE, seeded, define-by-run) and ASHA over one trial
function that runs the pipeline with the trial's overrides (:func:`sweep.execute_trial`) and reports validation
NDCG@10 after every LLM epoch. Spaces, the shared stage store and the results are Ray-free, in ``sweep.py``.

Reads a base config and a search space; writes the sweep directory (:class:`sweep.SweepPaths`) and Tune's
experiment state under ``<sweep>/tune/`` (what ``--resume`` restores with ``Tuner.restore``).

Ray 2.60 pattern (Train V2): a Tune trial *function* builds and fits the TorchTrainers of its stages; the LLM
stage's trainer forwards its per-epoch reports to Tune through a ``TuneReportCallback``. The function holds
``trial_resources`` (default 0.1 CPU); each TorchTrainer asks for the trial config's ``ray.num_workers`` x
``ray.cpus_per_worker`` CPUs (and GPUs with ``ray.use_gpu``). Keep the dashboard on: a trial that ASHA stops
leaks its Train placement group without it (ray-project/ray#54305).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import optuna
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import pipeline, sweep
from .artifacts import read_json, write_json
from .config import load_config
from .errors import ConfigError
from .train import RayBackend, init_ray

log = logging.getLogger("ttds_ray")

TUNE_STATUS = "tune_status.json"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What every trial needs (pickled into the trial actors)."""
    root: str
    base_config: str                    # absolute path of the base config file
    base_overrides: tuple[str, ...]
    space: sweep.SearchSpace
    base_config_shown: str = ""         # the path as the user gave it (best.yaml, results.md)

    @property
    def paths(self) -> sweep.SweepPaths:
        return sweep.SweepPaths(Path(self.root))


class CurveWriter(UserCallback):
    """Ray Train callback: appends the LLM stage's per-epoch validation reports to the trial's
    ``valid_curve.jsonl`` (the results table reads it, also for trials ASHA stopped)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = str(run_dir)

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and sweep.METRIC in metrics[0]:
            sweep.append_curve(self.run_dir, metrics[0])


class EpochReports(TuneReportCallback):
    """:class:`CurveWriter` + forwards those reports to Ray Tune (so ASHA can stop the trial). Reports
    without the metric (re-index rounds) are not forwarded: every result Tune sees carries it."""

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.curve = CurveWriter(run_dir)

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and sweep.METRIC in metrics[0]:
            self.curve.after_report(run_context, metrics, checkpoint)
            super().after_report(run_context, [metrics[0]], None)


class DefineByRun:
    """OptunaSearch's define-by-run space (a picklable callable: the searcher is checkpointed for --resume)."""

    def __init__(self, space: sweep.SearchSpace, base: dict):
        self.space, self.base = space, base

    def __call__(self, trial):
        return self.space.suggest(trial, self.base) or None


class TrialStatus(tune.Callback):
    """Driver-side: records how Tune ended each trial (``trials/<id>/tune_status.json``), so a trial that ASHA
    stopped or whose actor died is told apart from one still running."""

    def __init__(self, trials_dir: str | Path):
        self.trials_dir = str(trials_dir)

    def _write(self, trial, status: dict) -> None:
        d = Path(self.trials_dir) / trial.trial_id
        d.mkdir(parents=True, exist_ok=True)
        params = json.loads(json.dumps(dict(trial.config or {}), default=str))
        write_json(d / TUNE_STATUS, {**status, "params": params, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, {"status": "terminated"})

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            err = str(trial.get_error())
        except Exception:       # the error file may be missing; the status is what matters
            err = "trial failed (see the Tune log)"
        self._write(trial, {"status": "error", "error": err[-2000:]})


def trial_fn(config: dict, spec: SweepSpec) -> None:
    """One Tune trial: ``sweep.execute_trial`` on Ray Train, per-epoch and final reports to Tune."""
    trial_id = tune.get_context().get_trial_id()
    run_dir = spec.paths.trial(trial_id)
    backend = RayBackend(callbacks={"llm": [EpochReports(run_dir)]})
    sweep.execute_trial(spec.paths, trial_id, spec.base_config, list(spec.base_overrides), spec.space, dict(config),
                        backend, report=tune.report)


def _tune_status(paths: sweep.SweepPaths) -> dict[str, dict]:
    out = {}
    if paths.trials.is_dir():
        for d in paths.trials.iterdir():
            if (d / TUNE_STATUS).is_file():
                out[d.name] = read_json(d / TUNE_STATUS)
    return out


def _sweep_signature(config: Path, overrides: list[str], space_path: Path) -> dict:
    return {"base_config": str(config.resolve()), "base_overrides": list(overrides),
            "base_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "space": str(space_path), "space_sha256": hashlib.sha256(space_path.read_bytes()).hexdigest()}


def run_sweep(config: str | Path, space_path: str | Path, overrides: list[str] | None = None, *,
              num_samples: int | None = None, resume: bool = False, name: str | None = None,
              max_concurrent: int | None = None, baseline: bool = False) -> dict:
    """Run (or, with ``resume``, continue) a sweep; write the results table, plot, ``best.yaml`` and ``best_run``.

    Args:
        config: the base config file; overrides: dotted overrides applied to it (before the space's ``fixed``).
        space_path: a search-space YAML (``tune_spaces/``).
        num_samples / max_concurrent: override the space file's values.
        name: the sweep's name; default ``<config name>-<space file stem>``; the sweep directory is
            ``<output_dir>/sweeps/<name>``.
        baseline: first train the base config itself (trial ``base``, same budget and validation users) in
            this process, so the table compares the best trial with it; it also builds the shared stages.

    Returns:
        ``{"sweep_dir", "results_md", "best": best row (dict) or None, "base_metric", "n_trials"}``.

    Raises:
        ConfigError: bad base config or space (before any trial), nothing to resume, or the sweep exists.
    """
    overrides = list(overrides or [])
    config, space_path = Path(config), Path(space_path)
    base_cfg = load_config(config, overrides)
    space = sweep.load_space(space_path, config, overrides)
    if num_samples is not None:
        space = dataclasses.replace(space, num_samples=num_samples)
    if max_concurrent is not None:
        space = dataclasses.replace(space, max_concurrent=max_concurrent)
    name = name or f"{base_cfg.name}-{space_path.stem}"
    paths = sweep.SweepPaths((Path(base_cfg.output_dir) / "sweeps" / name).resolve())
    signature = _sweep_signature(config, overrides, space_path)
    sig_file = paths.root / "sweep.json"
    if resume:
        if not tune.Tuner.can_restore(str(paths.tune)):
            raise ConfigError(f"--resume: no Tune experiment to restore in {paths.tune}; run without --resume")
        old = read_json(sig_file)
        changed = [k for k in ("base_config", "base_overrides", "base_sha256", "space_sha256") if old.get(k) != signature[k]]
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} differ from the interrupted sweep in {paths.root}; "
                              "resume with the same config, overrides and space, or start a new --name")
        space = dataclasses.replace(space, num_samples=old["num_samples"], max_concurrent=old["max_concurrent"])
    elif paths.tune.exists():
        raise ConfigError(f"sweep directory {paths.root} already holds a sweep; pass --resume to continue it or "
                          "--name for a new one")
    pipeline.validate_inputs(base_cfg)           # data readable, backbone and encoder available: before any trial
    paths.root.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(sig_file, {**signature, "num_samples": space.num_samples, "max_concurrent": space.max_concurrent,
                              "space_parsed": space.to_dict()})
        (paths.root / "space.yaml").write_bytes(space_path.read_bytes())
    spec = SweepSpec(root=str(paths.root), base_config=str(config.resolve()), base_overrides=tuple(overrides),
                     space=space, base_config_shown=str(config))
    if baseline:
        _run_baseline(spec)
    # trials keep the driver's working directory, so relative paths in the config (data.path) resolve alike
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    logging.getLogger("tensorboardX").setLevel(logging.ERROR)    # "valid_ndcg@10 is illegal" once per report
    init_ray(base_cfg)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, spec=spec), dict(space.trial_resources))
    if resume:
        tuner = tune.Tuner.restore(str(paths.tune), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        searcher = OptunaSearch(space=DefineByRun(space, sweep.base_tree(config, overrides, space)),
                                metric=sweep.METRIC, mode=sweep.MODE,
                                sampler=optuna.samplers.TPESampler(seed=space.seed,
                                                                   n_startup_trials=space.n_startup_trials))
        scheduler = ASHAScheduler(metric=sweep.METRIC, mode=sweep.MODE, time_attr="training_iteration",
                                  grace_period=space.grace_period, reduction_factor=space.reduction_factor,
                                  max_t=space.max_t)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=space.num_samples,
                                        max_concurrent_trials=space.max_concurrent),
            run_config=tune.RunConfig(name=paths.tune.name, storage_path=str(paths.root),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[TrialStatus(paths.trials)]))
    grid = tuner.fit()
    log.info("sweep: Tune finished: %d trials, %d errors", len(grid), grid.num_errors)
    return summarize(spec, name)


def _run_baseline(spec: SweepSpec) -> None:
    """Trial ``base``: the base config with the sweep's budget, run in this process on Ray Train."""
    done = spec.paths.trial(sweep.BASE_TRIAL) / sweep.TRIAL_FILE
    if done.is_file() and read_json(done).get("status") == "completed":
        return
    init_ray(load_config(spec.base_config, list(spec.base_overrides)))
    backend = RayBackend(callbacks={"llm": [CurveWriter(spec.paths.trial(sweep.BASE_TRIAL))]})
    try:
        sweep.execute_trial(spec.paths, sweep.BASE_TRIAL, spec.base_config, list(spec.base_overrides), spec.space,
                            {}, backend)
    except Exception as e:          # recorded in trials/base/trial.json; the sweep goes on
        log.error("sweep: the base run failed: %s", e)


def summarize(spec: SweepSpec, name: str) -> dict:
    """Collect every trial's record and write the results (also usable on an interrupted sweep)."""
    paths = spec.paths
    records = sweep.collect_records(paths, _tune_status(paths))
    best = sweep.write_results(paths, records, spec.space, spec.base_config_shown or spec.base_config,
                               list(spec.base_overrides), name)
    base = next((r for r in records if r.is_base and r.status == "completed"), None)
    return {"sweep_dir": str(paths.root), "results_md": (paths.root / "results.md").read_text(),
            "best": dataclasses.asdict(best) if best else None, "base_metric": base.metric if base else None,
            "n_trials": sum(not r.is_base for r in records)}


__all__ = ["run_sweep", "summarize", "trial_fn", "SweepSpec"]
