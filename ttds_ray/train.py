"""Ray layer of the main job: the pipeline's stages (pipeline.py) on Ray Data and Ray Train.

:class:`RayBackend` implements ``pipeline.Backend``: Ray Data ``map_batches`` for normalising the log
and for text-embedding batch inference, one ``TorchTrainer`` per trained stage whose workers run the
stage's recipe (recipes.py) with ``ray.train.report`` checkpoints, ``prepare_model`` (DDP) and the
worker's device. Everything else (which stages, what they read and write, reuse) is in pipeline.py.
An interrupted stage resumes from its last Ray Train checkpoint under ``<run>/ray_results/``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import data, pipeline, recipes, storage
from .artifacts import STAGES, RunDir
from .config import EmbeddingsConfig, TTDSConfig, config_from_dict

log = logging.getLogger("ttds_ray")

#: Environment every Ray process gets: no token auth on local clusters (Ray 2.60 default), no usage stats, the
#: V1 parquet reader (V2 spawns a reader actor per pass: seconds on 2 cores), no hub access.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}


# ----------------------------------------------------------------------------- Ray session

def init_ray(cfg: TTDSConfig) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` if given (e.g. under ``ray job submit``), else
    start an embedded local cluster. Idempotent."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    addr = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if addr:  # a running cluster (e.g. inside `ray job submit`): keep the job's own runtime_env
        ray.init(address=addr)
        return
    # Pin the State API (dashboard) address for every process of this cluster: Ray Train's placement-group
    # cleaner looks the controller up through it, and with a second local Ray instance on the machine its
    # auto-detection fails ("Found multiple active Ray instances"), leaking the placement group of a trial
    # that Tune stopped, so the next trial never starts (measured in a sweep).
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"     # this new cluster's dashboard
    env = {"env_vars": {k: os.environ[k] for k in (*RAY_ENV, "RAY_API_SERVER_ADDRESS")}}
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_port=port, runtime_env=env)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(metrics: dict, files: dict[str, bytes] | None = None) -> None:
    """ray.train.report with an optional checkpoint made of in-memory files (rank 0 only)."""
    if files and ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            for name, blob in files.items():
                Path(d, name).parent.mkdir(parents=True, exist_ok=True)
                Path(d, name).write_bytes(blob)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _ckpt_files(ckpt: Checkpoint | None) -> dict[str, bytes]:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        return {str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


def _shard_frame(name: str, key: list[str]) -> pd.DataFrame:
    """This worker's shard of dataset ``name`` (``get_dataset_shard``, one full pass) sorted by ``key``."""
    parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=4096, batch_format="pandas"))
    return pipeline.sort_shard(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=key), key)


class FaultInjector:
    """Test hook: raise once when ``stage`` reaches optimiser step ``step`` (a marker file under the run
    directory records that it fired, so the restarted worker group runs on)."""

    def __init__(self, run_dir: str, stage: str, step: int):
        self.marker = Path(run_dir) / "work" / f"fault-{stage}-{step}.fired"
        self.stage, self.step = stage, step

    def __call__(self, stage: str, step: int) -> None:
        if stage == self.stage and step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(os.getpid()))
            raise RuntimeError(f"injected fault at {stage} step {step}")


def _worker_loop(config: dict) -> None:
    """Ray Train worker: the stage's recipe, resumed from the latest checkpoint if there is one. The stage's
    datasets come from Ray Data shards, read anew each epoch (``recipes.WorkerEnv.dataset``)."""
    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(cfg.ray.torch_threads or os.cpu_count() or 1)
    ctx = ray.train.get_context()
    keys = config["keys"]
    fault = config.get("fault")
    env = recipes.WorkerEnv(report=_report, wrap_model=ray.train.torch.prepare_model,
                            device=ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu"),
                            rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                            dataset=lambda name: _shard_frame(name, keys[name]),
                            fault=FaultInjector(config["run_dir"], *fault) if fault else (lambda stage, step: None))
    # a shared run (URI): bring the stage's inputs into this node's working copy (no-op for a local/NFS path)
    root = storage.pull_stages(config["run_uri"], STAGES[:STAGES.index(config["stage"])])
    recipe = recipes.RECIPES[config["stage"]](cfg, RunDir(root), env, **config["extra"])
    recipe.load_state_dict(_ckpt_files(ray.train.get_checkpoint()))
    recipe.fit()


class _TextEncoderUDF:
    """Ray Data callable class holding the configured text encoder (pipeline.encode_item_batch)."""

    def __init__(self, ecfg: dict):
        self.cfg = EmbeddingsConfig(**ecfg)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pipeline.encode_item_batch(batch, self.cfg)


def _worker_run_uri(cfg: TTDSConfig, run: RunDir) -> str:
    """Where a worker on any node finds the run: the URI of a shared run, else the absolute local path."""
    return cfg.run_uri if storage.is_uri(cfg.run_uri) else str(run.root.resolve())


class _RankUDF:
    """Ray Data callable class: one loaded run (``Recommender``) ranking batches of users (evaluation)."""

    def __init__(self, cfg: dict, run_uri: str, threads: int | None):
        from .recommender import Recommender
        if threads:
            torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg)
        root = storage.pull_stages(run_uri, STAGES[:STAGES.index("eval")])
        self.rec = Recommender(self.cfg, RunDir(root), "cuda" if self.cfg.ray.use_gpu else "cpu")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        codes = np.stack(batch["user_codes"].to_numpy()) if "user_codes" in batch else None
        ranked, scores = self.rec.rank([np.asarray(h, np.int64) for h in batch["history"]], codes,
                                       n_beams=self.cfg.eval.n_beams, batch_size=len(batch))
        return pd.DataFrame({"row": batch["row"].to_numpy(), "ranked": list(ranked), "scores": list(scores)})


class RayBackend:
    """``pipeline.Backend`` on Ray: Ray Data for the batch transforms, a TorchTrainer per trained stage
    (``ray.num_workers`` workers, ``ray.use_gpu``, ``ray.max_failures``).

    Args:
        callbacks: stage -> Ray Train callbacks of that stage's TorchTrainer (a sweep forwards the LLM
            stage's per-epoch validation to Ray Tune this way; ``tune_ray.py``).
        inject_fault: ``(stage, step)``: a worker of that stage raises once after that optimiser step (tests
            of resuming; :class:`FaultInjector`).
    """

    def __init__(self, callbacks: dict[str, list] | None = None, inject_fault: tuple[str, int] | None = None):
        self.callbacks = dict(callbacks or {})
        self.inject_fault = inject_fault

    def normalize(self, interactions: pd.DataFrame) -> pd.DataFrame:
        return ray.data.from_pandas(interactions).map_batches(data.normalize_interactions_batch,
                                                              batch_format="pandas").to_pandas()

    def prepare(self, dcfg, seed: int) -> data.Prepared:
        """The data stage: Ray Data for data.format logs/amazon (``ingest_ray.prepare_ray``), else the LC-Rec/RecBole
        readers with :meth:`normalize` on Ray Data; byte-identical to ``pipeline.LocalBackend.prepare``."""
        from . import ingest, ingest_ray
        if dcfg.format in ingest.RAW_FORMATS:
            return ingest_ray.prepare_ray(dcfg, seed)
        return ingest.prepare_with(dcfg, seed, self.normalize)

    def encode_items(self, items: pd.DataFrame, ecfg: EmbeddingsConfig) -> np.ndarray:
        out = ray.data.from_pandas(items).map_batches(
            _TextEncoderUDF, fn_constructor_args=(ecfg.model_dump(),), batch_size=1024, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1)).to_pandas().sort_values("item_idx")
        return np.stack(out["emb"].to_numpy()).astype(np.float32)

    @staticmethod
    def _ray_results(cfg: TTDSConfig, stage: str) -> storage.TrainStorage:
        return storage.train_storage_path(cfg.output_dir, cfg.name, stage, cfg.stage_hash(stage),
                                          storage_path=cfg.ray.storage_path)

    @staticmethod
    def _dataset(spec: pipeline.DatasetSpec, cfg: TTDSConfig, run: RunDir) -> ray.data.Dataset:
        ds = ray.data.read_parquet(storage.shared_paths(run.root, cfg.run_uri, spec.paths))
        if spec.transform is not None:
            ds = ds.map_batches(spec.transform, fn_kwargs=spec.kwargs, batch_format="pandas")
        return ds

    def fit(self, cfg, run, stage, *, datasets=None, extra=None, num_workers=None):
        ts = self._ray_results(cfg, stage)
        specs = dict(datasets or {})
        loop_config = {"cfg": cfg.to_dict(), "run_dir": str(run.root.resolve()), "run_uri": _worker_run_uri(cfg, run),
                       "stage": stage,
                       "extra": dict(extra or {}), "keys": {k: list(v.key) for k, v in specs.items()},
                       "fault": self.inject_fault if self.inject_fault and self.inject_fault[0] == stage else None}
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_config,
            datasets={k: self._dataset(v, cfg, run) for k, v in specs.items()} or None,
            scaling_config=ScalingConfig(num_workers=num_workers or cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            run_config=RunConfig(name=ts.name, storage_path=ts.storage_path,
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=self.callbacks.get(stage)))
        result = trainer.fit()
        return _ckpt_files(result.checkpoint), dict(result.metrics or {})

    def rank(self, cfg: TTDSConfig, run: RunDir, histories: list[np.ndarray], user_codes: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
        """TTDS rankings of users on ``ray.num_workers`` Ray Data actors (evaluation on several workers).

        Users go in blocks of ``eval.batch_size`` (the in-process batches, so the padding and hence the scores
        are the same), each block to one actor; the output is put back in input order by row number.

        Returns:
            ``(item_idx int64 (U, W), scores float32 (U, W))``, best first, -1 / -inf pads.

        Raises:
            RuntimeError: a user came back twice or not at all.
        """
        bs = cfg.eval.batch_size
        cols = {"row": np.arange(len(histories)), "history": [np.asarray(h, np.int64) for h in histories]}
        if user_codes is not None:
            cols["user_codes"] = list(np.asarray(user_codes, np.int64))
        frame = pd.DataFrame(cols)
        blocks = [frame.iloc[i:i + bs] for i in range(0, len(frame), bs)]
        out = ray.data.from_pandas(blocks).map_batches(
            _RankUDF, fn_constructor_args=(cfg.to_dict(), _worker_run_uri(cfg, run), cfg.ray.torch_threads),
            batch_size=bs, batch_format="pandas", num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.ray.num_workers, len(blocks))))).to_pandas()
        got = np.sort(out["row"].to_numpy())
        if not np.array_equal(got, np.arange(len(histories))):
            raise RuntimeError(f"distributed ranking returned rows {got.tolist()[:20]} for {len(histories)} users")
        out = out.sort_values("row")
        w = max((len(r) for r in out["ranked"]), default=0)

        def stack(col, dtype, pad):
            return np.stack([np.pad(np.asarray(r, dtype), (0, w - len(r)), constant_values=pad) for r in out[col]]) \
                if len(out) else np.zeros((0, 0), dtype)
        return stack("ranked", np.int64, -1), stack("scores", np.float32, -np.inf)

    def cleanup(self, cfg, run, stage):
        """Drop the stage's Ray Train checkpoints (kept only for resuming an interrupted stage)."""
        storage.delete_dir(self._ray_results(cfg, stage).path,
                           "ray.storage_path" if cfg.ray.storage_path else "output_dir")


def run_training(cfg: TTDSConfig, *, overwrite: bool = False, stop_after: str | None = None,
                 reuse_from: str | Path | None = None) -> dict:
    """``pipeline.run`` on :class:`RayBackend` (connecting to, or starting, a Ray cluster first).

    Raises:
        ConfigError / DataError / BackboneUnavailable / CollisionError: before anything is trained.
    """
    return pipeline.run(cfg, RayBackend(), overwrite=overwrite, stop_after=stop_after, reuse_from=reuse_from,
                        before_first_stage=lambda: init_ray(cfg))
