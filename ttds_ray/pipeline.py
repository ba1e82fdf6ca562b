"""The pipeline: the one list of stages, what each stage reads and writes, and the run loop. No Ray import.

Stages (DESIGN §3), in data-flow order, each one directory of the run (artifacts.py contract):
data -> embeddings -> cf -> tokenizer -> llm -> eval. A stage is skipped when it finished with the
same settings from the same inputs (:meth:`RunDir.is_complete`), and rebuilt otherwise together with
everything downstream.

The compute of a stage runs on a :class:`Backend`: :class:`LocalBackend` runs it in this process (tests,
debugging: ``ttds-ray train --no-ray``); ``train.RayBackend`` runs it on Ray Data and Ray Train
(``jobs/train.py``, ``ray job submit``). Both hand the same recipes (``recipes.py``) the same inputs, so
a stage's artifacts do not depend on the backend beyond floating-point reduction order.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd

from . import cf, data, dynamic, embeddings, evaluate, ingest, llm, recipes, storage, tasks, towers
from .artifacts import STAGES, Files, RunDir, atomic_write_bytes, read_json, write_json
from .config import DataConfig, EmbeddingsConfig, TTDSConfig, dump_yaml
from .errors import CollisionError, ConfigError
from .plots import plot_code_usage, plot_curve, plot_terms
from .sids import SIDTable

log = logging.getLogger("ttds_ray")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A training dataset of a stage: parquet file(s), an optional row transform, and the key columns.

    The backend reads ``paths`` (Ray Data ``read_parquet`` + ``map_batches(transform)``, sharded across the
    Ray Train workers by ``get_dataset_shard``; in-process: pandas), and a worker gets its shard as a
    DataFrame sorted by ``key`` (``recipes.WorkerEnv.dataset``), so row order never depends on block order.

    Attributes:
        paths: parquet files, read in this order.
        key: columns whose values identify a row (unique), the sort order of a shard.
        transform: a pure, importable ``DataFrame -> DataFrame`` function (e.g. ``cf.window_rows``), or None.
        kwargs: keyword arguments of ``transform``.
    """
    paths: tuple[str, ...]
    key: tuple[str, ...]
    transform: Callable | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def read_local(self) -> pd.DataFrame:
        """The whole dataset in this process (pandas), transformed and sorted by ``key``."""
        import pyarrow.parquet as pq
        df = pd.concat([pq.read_table(p).to_pandas() for p in self.paths], ignore_index=True)
        return sort_shard(self.transform(df, **self.kwargs) if self.transform else df, self.key)


def local_datasets(specs: dict[str, DatasetSpec]) -> Callable[[str], pd.DataFrame]:
    """``recipes.WorkerEnv.dataset`` in one process: each dataset read once (pandas) and handed out per epoch."""
    cache: dict[str, pd.DataFrame] = {}

    def dataset(name: str) -> pd.DataFrame:
        if name not in cache:
            cache[name] = specs[name].read_local()
        return cache[name]
    return dataset


def sort_shard(df: pd.DataFrame, key) -> pd.DataFrame:
    """``df`` sorted by the key columns (stable), with a fresh index."""
    return df.sort_values(list(key), kind="stable").reset_index(drop=True)


class Backend(Protocol):
    """Where the compute of a stage runs. ``fit`` returns the final checkpoint files and metrics of a
    recipe run (``recipes.RECIPES[stage]``); ``datasets`` are the stage's training datasets by name."""

    def normalize(self, interactions: pd.DataFrame) -> pd.DataFrame: ...

    def prepare(self, dcfg: DataConfig, seed: int) -> data.Prepared:
        """The data stage's compute: read, validate, dedupe, k-core, remap, sequences (optional: a backend without
        it gets ``ingest.prepare_with(dcfg, seed, backend.normalize)``)."""
        ...

    def encode_items(self, items: pd.DataFrame, ecfg: EmbeddingsConfig) -> np.ndarray: ...

    def fit(self, cfg: TTDSConfig, run: RunDir, stage: str, *, datasets: dict[str, DatasetSpec] | None = None,
            extra: dict | None = None, num_workers: int | None = None) -> tuple[dict[str, bytes], dict]: ...

    def cleanup(self, cfg: TTDSConfig, run: RunDir, stage: str) -> None: ...


def encode_item_batch(batch: pd.DataFrame, ecfg: EmbeddingsConfig) -> pd.DataFrame:
    """Item text -> semantic embeddings (all-MiniLM-L6-v2, or the backbone LLM's mean-pooled hidden states).

    Args:
        batch: columns ``item_idx``, ``text``. Returns: columns ``item_idx``, ``emb`` (float32 ``(D,)`` each).
    """
    emb = embeddings.encode_with(ecfg, batch["text"].tolist())
    return pd.DataFrame({"item_idx": batch["item_idx"].to_numpy(), "emb": list(emb)})


class LocalBackend:
    """Every stage in this process, one worker, on ``device`` (no Ray)."""

    def __init__(self, device: str = "cpu"):
        import torch
        self.device = torch.device(device)

    def normalize(self, interactions: pd.DataFrame) -> pd.DataFrame:
        return data.normalize_interactions_batch(interactions)

    def prepare(self, dcfg: DataConfig, seed: int) -> data.Prepared:
        """pandas, in this process (``ingest.prepare_with``); byte-identical to ``train.RayBackend.prepare``."""
        return ingest.prepare_with(dcfg, seed, self.normalize)

    def encode_items(self, items: pd.DataFrame, ecfg: EmbeddingsConfig) -> np.ndarray:
        out = encode_item_batch(items, ecfg)
        return np.stack(out["emb"].to_numpy()).astype(np.float32)

    def fit(self, cfg, run, stage, *, datasets=None, extra=None, num_workers=None):
        if cfg.ray.torch_threads:
            import torch
            torch.set_num_threads(cfg.ray.torch_threads)
        last: dict = {"files": {}, "metrics": {}}

        def report(metrics: dict, files: dict | None) -> None:
            last["metrics"] = metrics
            if files:
                last["files"] = files
        env = recipes.WorkerEnv(report=report, device=self.device, dataset=local_datasets(datasets or {}))
        recipes.RECIPES[stage](cfg, run, env, **dict(extra or {})).fit()
        return last["files"], last["metrics"]

    def cleanup(self, cfg, run, stage):
        pass


# ----------------------------------------------------------------------------- stages

def stage_data(cfg: TTDSConfig, run: RunDir, backend: Backend) -> None:
    """Read the raw log (validated), normalise it, k-core + remap, save parquet (DESIGN §2, docs/DATA.md): on the
    backend's ``prepare`` (Ray Data on ``train.RayBackend`` for data.format logs/amazon, pandas on LocalBackend).

    Raises:
        DataError; CollisionError: the catalogue does not fit the item ID space (checked here for logs/amazon,
            whose catalogue is only known once prepared).
    """
    prepare = getattr(backend, "prepare", None)
    prepared = (prepare(cfg.data, cfg.seed) if prepare is not None
                else ingest.prepare_with(cfg.data, cfg.seed, backend.normalize))
    _check_item_id_space(cfg, len(prepared.items))
    with run.write_stage("data", config_hash=cfg.stage_hash("data"), numbers=dict(prepared.stats)) as (d, _):
        prepared.save(d)
    log.info("data: %s", json.dumps(prepared.stats))


def stage_embeddings(cfg: TTDSConfig, run: RunDir, backend: Backend) -> None:
    """Item text -> semantic embeddings ``(N_items, D)`` float32, row i = item_idx i."""
    prepared = data.Prepared.load(run.require("data"))
    emb = backend.encode_items(prepared.items[["item_idx", "text"]], cfg.embeddings)
    if emb.shape[0] != len(prepared.items):
        raise RuntimeError(f"embeddings: {emb.shape[0]} rows for {len(prepared.items)} items")
    with run.write_stage("embeddings", config_hash=cfg.stage_hash("embeddings"),
                         numbers={"shape": list(emb.shape), "text_encoder": cfg.embeddings.text_encoder}) as (d, _):
        embeddings.save_npy(d / Files.ITEM_TEXT, emb)


def stage_cf(cfg: TTDSConfig, run: RunDir, backend: Backend) -> None:
    """Train SASRec (:class:`recipes.SASRecRecipe`); save weights + item/user collaborative embeddings."""
    prepared, splits = recipes.load_splits(run)
    windows = DatasetSpec((str(run.require("data") / "sequences.parquet"),), key=("user_idx", "win"),
                          transform=cf.window_rows, kwargs={"max_len": cfg.cf.max_len, "stride": cfg.cf.window_stride})
    files, metrics = backend.fit(cfg, run, "cf", datasets={"train": windows})
    model = cf.SASRec.from_config(cfg.cf, len(prepared.items))
    model.load_state_dict(recipes.load_state(files[recipes.WEIGHTS]))
    model.eval()
    emb = cf.cf_embeddings(model, [s.tolist() for s in splits.train_items])
    with run.write_stage("cf", config_hash=cfg.stage_hash("cf"), numbers={
            "final_loss": metrics.get("loss"), "steps_per_worker": metrics.get("steps_per_worker")}) as (d, _):
        cf.save_sasrec(model, cfg.cf, len(prepared.items), d)
        emb.save(d)
    log.info("cf: SASRec trained, final loss %.4f", metrics.get("loss", float("nan")))


def stage_tokenizer(cfg: TTDSConfig, run: RunDir, backend: Backend) -> None:
    """Train the twin towers (:class:`recipes.TokenizerRecipe`, 1 worker); export unique item IDs, user
    IDs and diagnostics (code usage, reconstruction, loss terms per epoch)."""
    prepared, _ = recipes.load_splits(run)
    files, _ = backend.fit(cfg, run, "tokenizer", num_workers=1)
    history = json.loads(files[Files.TOWER_HISTORY])
    x = recipes.tower_inputs(run, cfg.tokenizer)
    with run.write_stage("tokenizer", config_hash=cfg.stage_hash("tokenizer")) as (d, numbers):
        for name in ("item", "user"):
            atomic_write_bytes(d / Files.tower(name), files[Files.tower(name)])
            tower = towers.load_tower(d / Files.tower(name))
            if name == "item":
                table, stats = towers.export_item_sids(tower, x["item_s"], x["item_c"], cfg.tokenizer,
                                                       item_names=prepared.items["item_id"].tolist())
                ids = prepared.items["item_id"].tolist()
            else:
                table, stats = towers.export_user_sids(tower, x["user_s"], x["user_c"])
                ids = prepared.sequences["user_id"].tolist()
            table.save(d / Files.sids(name), ids, prefix="i" if name == "item" else "u")
            stats["n_entities"] = len(table.codes)
            stats["sid_sha256"] = table.content_hash()
            stats.update(towers.reconstruction_errors(tower, x[f"{name}_s"], x[f"{name}_c"]))
            stats["final_terms"] = {k: v[-1] for k, v in history[name].items() if v}
            numbers[name] = stats
            plot_code_usage(table.codes, table.codebook_size, d / f"{name}_code_usage.png",
                            title=f"{name} tower: entities per code")
            plot_terms(history[name], d / f"{name}_losses.png", title=f"{name} tower loss terms")
        write_json(d / Files.TOKENIZER_STATS, numbers)
        write_json(d / Files.TOWER_HISTORY, history)
    log.info("tokenizer: %s", json.dumps({k: {m: v[m] for m in ("codes_used", "entropy") if m in v}
                                          for k, v in numbers.items()}))


def llm_budget(n_samples: int, cfg: TTDSConfig) -> tuple[int, int, int]:
    """``(steps_per_epoch, total_steps, n_epochs)`` per worker: ``llm.epochs`` passes over the samples,
    capped by ``llm.max_steps``; static and dynamic runs of a config get the same budget."""
    spe = max(1, n_samples // (cfg.llm.batch_size * cfg.ray.num_workers))
    total = min(cfg.llm.max_steps or 10 ** 12, spe * cfg.llm.epochs)
    return spe, total, -(-total // spe)


@dataclasses.dataclass
class LLMSamples:
    """The LLM stage's training samples (one parquet file per epoch) and step budget (per worker)."""
    datasets: dict[str, DatasetSpec]   # "epoch_<k>" -> columns i (key), task, ids, resp
    task_stats: dict                   # task -> {"n", "mean_tokens", ...} of epoch 0
    n_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    @property
    def n_epochs(self) -> int:
        return len(self.datasets)


def samples_dir(cfg: TTDSConfig, run: RunDir) -> Path:
    """Where the LLM stage's sample files go while it trains: ``<run>/work/llm-<stage hash>/`` (removed when
    the stage is done; rebuilt identically if it is interrupted)."""
    return run.root / "work" / f"llm-{cfg.stage_hash('llm')}"


def _write_samples(samples: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"i": pa.array(np.arange(len(samples)), pa.int64()),
                      "task": pa.array([s["task"] for s in samples], pa.string()),
                      "ids": pa.array([list(map(int, s["ids"])) for s in samples], pa.list_(pa.int64())),
                      "resp": pa.array([list(map(int, s["resp"])) for s in samples], pa.list_(pa.int64()))})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def llm_samples(cfg: TTDSConfig, run: RunDir) -> LLMSamples:
    """Build the LLM stage's token-id samples of every epoch (templates re-sampled per epoch, DESIGN §1.5) and
    write them as parquet under :func:`samples_dir`, one file per epoch; the trainers read them through
    Ray Data (or pandas in-process), never as lists shipped from the driver.

    Raises:
        ConfigError: no task builds any sample.
    """
    tok = llm.load_tokenizer(cfg.llm.backbone)
    item_t, user_t = recipes.load_sid_tables(run)
    vocab = llm.add_sid_tokens(tok, item_t.n_levels, item_t.codebook_size, user_t.n_levels, user_t.codebook_size)
    ctx = recipes.task_context(cfg, run, tok)
    first = tasks.build_task_samples(ctx, cfg.tasks, seed=cfg.seed, epoch=0)
    if not first:
        raise ConfigError("no training samples: every tasks.weights entry is 0 or the training split is empty")
    spe, total, n_epochs = llm_budget(len(first), cfg)
    stats = tasks.task_stats(first, item_t.n_levels, user_t.n_levels)
    for name in cfg.tasks.weights.active():
        if name not in stats:
            log.warning("llm: task %s is on (weight %g) but built no samples on this data (e.g. no user has a "
                        "neighbour, no item has brand/category text, or tasks.use_user_sid=false)", name,
                        cfg.tasks.weights.active()[name])
    item_tok = vocab.item_tokens(item_t.codes)
    examples = {name: next(s for s in first if s["task"] == name) for name in stats}
    ex_rows = [(-2 - x) // 2 for ex in examples.values() for x in ex["ids"] if x < 0 and x % 2 == 0]
    user_tok = recipes.prompt_user_tokens(cfg, run, vocab, user_t.codes, ctx.train_seqs, len(item_t.codes),
                                          only=[r for r in ex_rows if r >= len(user_t.codes)])
    for name, st in stats.items():
        ex = examples[name]
        log.info("llm: task %-15s %6d samples/epoch, mean %.1f tokens; e.g. %s", name, st["n"], st["mean_tokens"],
                 tasks.example_text(ex, tok, item_tok, user_tok))
    out = samples_dir(cfg, run)
    out.mkdir(parents=True, exist_ok=True)
    datasets = {}
    for epoch in range(n_epochs):
        samples = first if epoch == 0 else tasks.build_task_samples(ctx, cfg.tasks, seed=cfg.seed, epoch=epoch)
        path = out / f"epoch_{epoch}.parquet"
        _write_samples(samples, path)
        datasets[f"epoch_{epoch}"] = DatasetSpec((str(path),), key=("i",))
    log.info("llm: %d steps (%d per epoch per worker, %d epoch(s)); re-index after steps %s", total, spe, n_epochs,
             dynamic.reindex_steps(total, cfg.dynamic))
    return LLMSamples(datasets, stats, len(first), spe, total)


#: files of the final LLM checkpoint that go into llm/ as they are (the saved LM and the refined tower)
_LLM_KEPT = ("tokenizer", "adapter", "model", Files.LLM_META, Files.ITEM_TOWER)


def stage_llm(cfg: TTDSConfig, run: RunDir, backend: Backend) -> None:
    """Fine-tune the recommender LM (:class:`recipes.LLMRecipe`) with dynamic re-indexing rounds unless
    ``dynamic.static_index``; save the LM, the final item index, losses, the round log and a loss plot."""
    s = llm_samples(cfg, run)
    work = samples_dir(cfg, run).relative_to(run.root).as_posix()
    storage.push_tree(run.root, cfg.run_uri, work)        # Ray Data read tasks on any node read the samples
    files, metrics = backend.fit(cfg, run, "llm", datasets=s.datasets, extra={
        "n_epochs": s.n_epochs, "total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch})
    state = json.loads(files[recipes.STATE])
    losses, rounds = state["losses"], state["rounds"]
    codes = recipes.load_state(files[recipes.ITEM_CODES])["codes"].numpy()
    item_t, _ = recipes.load_sid_tables(run)
    with run.write_stage("llm", config_hash=cfg.stage_hash("llm"), numbers={
            "n_samples_per_epoch": s.n_per_epoch, "tasks": s.task_stats, "steps": len(losses), "static_index":
            cfg.dynamic.is_static, "changed_per_round": [r["changed"] for r in rounds],
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
            "steps_per_worker": metrics.get("steps_per_worker"), "resumed_at_steps": state.get("resumed_at", []),
            "samples_per_s_per_worker": metrics.get("samples_per_s")}
            ) as (d, _):
        for name, blob in files.items():
            if name.split("/")[0] in _LLM_KEPT:
                atomic_write_bytes(d / name, blob)
        prepared = data.Prepared.load(run.require("data"))
        SIDTable(codes, item_t.codebook_size).save(d / Files.ITEM_SIDS, prepared.items["item_id"].tolist(), prefix="i")
        write_json(d / Files.LOSSES, losses)
        write_json(d / Files.ROUNDS, rounds)
        write_json(d / Files.TASK_STATS, s.task_stats)
        plot_curve(losses, d / Files.LOSS_PLOT, title=f"LLM training loss ({cfg.llm.backbone})",
                   ylabel="NLL (nats/token)", marks=[r["step"] for r in rounds])
    shutil.rmtree(samples_dir(cfg, run), ignore_errors=True)
    if storage.is_uri(cfg.run_uri):
        storage.delete_dir(storage.join(cfg.run_uri, *work.split("/")))
    log.info("llm: %d steps, final loss %.4f, items re-indexed per round %s", len(losses),
             np.mean(losses[-20:]) if losses else float("nan"), [r["changed"] for r in rounds])


def stage_eval(cfg: TTDSConfig, run: RunDir, backend: Backend | None = None, *, progress: bool = True) -> dict:
    """Test-split evaluation of TTDS, SASRec and popularity (``evaluate.evaluate_split``); writes
    eval/metrics.json + the TTDS rankings with their beam scores (``user_idx``, ``target``, ``ranked``, ``scores``:
    the tie policy of ``metrics.target_ranks`` can be re-applied from the file)."""
    _, splits = recipes.load_splits(run)
    rank = None
    if backend is not None and hasattr(backend, "rank") and cfg.ray.num_workers > 1:
        rank = lambda hist, user_codes: backend.rank(cfg, run, hist, user_codes)   # noqa: E731
    metrics, rows, ranked, scores = evaluate.evaluate_split(cfg, run, "test", progress=progress, rank=rank)
    with run.write_stage("eval", config_hash=cfg.stage_hash("eval"),
                         numbers={"HR@10": metrics["models"]["TTDS"].get("HR@10")}) as (d, _):
        write_json(d / Files.METRICS, metrics)
        pd.DataFrame({"user_idx": splits.user_idx[rows], "target": splits.test_target[rows],
                      "ranked": list(ranked), "scores": list(np.asarray(scores, dtype=np.float32))}
                     ).to_parquet(d / Files.RANKINGS)
    return metrics


#: The one list of stages: name -> function(cfg, run, backend), in data-flow order (== artifacts.STAGES).
STAGE_FUNCS = {"data": stage_data, "embeddings": stage_embeddings, "cf": stage_cf, "tokenizer": stage_tokenizer,
               "llm": stage_llm, "eval": stage_eval}
assert tuple(STAGE_FUNCS) == STAGES


# ----------------------------------------------------------------------------- validation and reuse

def validate_inputs(cfg: TTDSConfig) -> None:
    """Fail before any training (and before the run directory is touched) on bad input.

    Reads and prepares an LC-Rec/RecBole dataset (seconds) and checks that the item ID space can hold the
    catalogue; for data.format logs/amazon (possibly large, prepared on Ray Data in the data stage) it checks
    only what can be checked cheaply: the files exist, every parquet footer / CSV header has the mapped columns
    with usable types (``ingest.check_sources``). Then that the text encoder and the backbone can be found offline.

    Raises:
        DataError, CollisionError, EncoderUnavailable, BackboneUnavailable.
    """
    if cfg.data.format in ingest.RAW_FORMATS:
        ingest.check_sources(ingest.plan(cfg.data))
    else:
        _check_item_id_space(cfg, len(data.prepare(data.read_raw(cfg.data), kcore=cfg.data.kcore,
                                                   seed=cfg.seed).items))
    if cfg.embeddings.text_encoder == "llm":
        llm.check_backbone(cfg.embeddings.llm_backbone, "embeddings.llm_backbone")
    else:
        embeddings.minilm_path()
    llm.check_backbone(cfg.llm.backbone)


def _check_item_id_space(cfg: TTDSConfig, n_items: int) -> None:
    """CollisionError when ``n_items`` cannot get unique item semantic IDs from ``tokenizer.item``."""
    t = cfg.tokenizer.item
    if n_items > t.codebook_size ** t.n_levels:
        raise CollisionError(f"{n_items} items cannot get unique semantic IDs from {t.n_levels} levels x "
                             f"{t.codebook_size} codes ({t.codebook_size ** t.n_levels} IDs); raise "
                             "tokenizer.item.codebook_size or tokenizer.item.n_levels")


def _is_run_dir(path: Path) -> bool:
    return (Path(path) / "data" / Files.MANIFEST).is_file()


def link_stage(src: Path, dst: Path) -> None:
    """Put a copy of the finished stage directory ``src`` at ``dst``: files hard-linked (copied across file
    systems) into a temp sibling, then renamed in place of whatever ``dst`` held."""
    tmp = dst.with_name(f".{dst.name}.reuse-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, tmp, copy_function=link)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def reuse_stages(cfg: TTDSConfig, src: Path, run: RunDir) -> list[str]:
    """Hard-link (or copy) the finished stages of run directory ``src`` that were built from the same
    settings as ``cfg`` into ``run``, in stage order, stopping at the first that differs.

    Returns:
        The stages taken over. Each is linked into a temp sibling and renamed in (atomic).

    Raises:
        ConfigError: ``src`` is not a run directory, or not even its data stage can be shared.
    """
    src_run = RunDir(src)
    if not _is_run_dir(src):
        raise ConfigError(f"--reuse-from {src}: not a run directory with a finished data stage")
    taken = []
    for stage in STAGES:
        h = cfg.stage_hash(stage)
        if not src_run.is_complete(stage, h):
            changed = src_run.changed_inputs(stage)
            if src_run.is_complete(stage) and changed and src_run.manifest(stage).get("config_hash") == h:
                log.warning("--reuse-from %s: stage %s has the same settings but was built from other inputs "
                            "(%s changed since); it is rebuilt here", src, stage, ", ".join(changed))
            break
        if not run.is_complete(stage, h):
            link_stage(src_run.stage_dir(stage), run.stage_dir(stage))
        taken.append(stage)
    if not taken:
        raise ConfigError(f"--reuse-from {src}: its data stage was built from other settings (data path, "
                          "k-core or seed differ), so nothing can be shared; drop --reuse-from")
    return taken


def save_config(cfg: TTDSConfig, run: RunDir) -> None:
    """Write the resolved config; stages built from other settings are rebuilt (see stage_hash)."""
    atomic_write_bytes(run.root / Files.CONFIG, dump_yaml(cfg.to_dict()).encode())


# ----------------------------------------------------------------------------- the run loop

def run(cfg: TTDSConfig, backend: Backend, *, overwrite: bool = False, stop_after: str | None = None,
        reuse_from: str | Path | None = None, before_first_stage: Callable[[], None] | None = None) -> dict:
    """Run every stage not already finished with the same settings, in order, on ``backend``.

    A stage is reused when :meth:`RunDir.is_complete` holds for its ``cfg.stage_hash``; otherwise it
    and everything downstream are rebuilt, each swapped in atomically when done (the old version stays
    until then). ``overwrite`` rebuilds every stage. ``before_first_stage`` is called once, right before
    the first stage that is built (e.g. to start Ray); a run with every stage complete never calls it.

    Returns:
        The run's metrics (``<run>/metrics.json``: eval/metrics.json + wall seconds per stage), or ``{}``
        when stopped after an earlier stage.

    Raises:
        ConfigError / DataError / BackboneUnavailable / CollisionError: before anything is trained.
    """
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # validation must not wait on hub retries
    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"--stop-after {stop_after!r}: not a stage; stages are {', '.join(STAGES)}")
    if reuse_from is not None and not _is_run_dir(Path(reuse_from)):
        raise ConfigError(f"--reuse-from {reuse_from}: not a run directory with a finished data stage")
    if cfg.ray.storage_path:
        storage.filesystem(cfg.ray.storage_path, "ray.storage_path")
    if storage.is_uri(cfg.output_dir):          # a shared run (s3://, gs://, file://): start from what it holds
        storage.filesystem(cfg.output_dir, "output_dir")
        storage.pull_stages(cfg.run_uri, STAGES, cfg.run_dir)
    if not RunDir(cfg.run_dir).is_complete("data", cfg.stage_hash("data")):
        validate_inputs(cfg)
    rd = RunDir(cfg.run_dir)
    try:
        rd.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {rd.root}: {e}; set output_dir to a writable "
                          "directory") from None
    save_config(cfg, rd)
    storage.push_file(rd.root, cfg.run_uri, Files.CONFIG)
    if reuse_from is not None:
        if overwrite:
            log.warning("--overwrite rebuilds every stage: --reuse-from %s is ignored", reuse_from)
        else:
            log.info("reused from %s: %s", reuse_from, reuse_stages(cfg, Path(reuse_from), rd))
    handler = logging.FileHandler(rd.root / Files.TRAIN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("ttds_ray").addHandler(handler)
    logging.getLogger("ttds_ray").setLevel(logging.INFO)
    try:
        walls = {}
        rebuild = overwrite                     # once a stage is rebuilt, everything downstream is too
        for stage, fn in STAGE_FUNCS.items():
            if rd.is_complete(stage, cfg.stage_hash(stage)) and not rebuild:
                log.info("%s: already complete, skipped", stage)
            else:
                if before_first_stage is not None and not walls:
                    before_first_stage()
                if rebuild:                     # no resuming from an older run's checkpoints
                    backend.cleanup(cfg, rd, stage)
                rebuild = True
                ts = rd.stage_started[stage] = time.time()
                log.info("%s: starting", stage)
                fn(cfg, rd, backend)
                backend.cleanup(cfg, rd, stage)  # the artifacts are in place: resume checkpoints not needed
                walls[stage] = round(time.time() - ts, 1)
                log.info("%s: done in %.1f s", stage, walls[stage])
            storage.push_stage(rd.root, cfg.run_uri, stage)   # a shared run: workers of later stages read it
            if stage == stop_after:
                return {}
        metrics = read_json(rd.require("eval") / Files.METRICS)
        metrics["stage_wall_s"] = walls
        metrics["job_wall_s"] = round(time.time() - t0, 1)
        write_json(rd.root / Files.RUN_METRICS, metrics)
        storage.push_file(rd.root, cfg.run_uri, Files.RUN_METRICS)
        return metrics
    finally:
        logging.getLogger("ttds_ray").removeHandler(handler)
        handler.close()
        try:
            storage.push_file(rd.root, cfg.run_uri, Files.TRAIN_LOG)
        except Exception as e:      # never hide the run's own error behind a failed log upload
            log.warning("could not upload %s to %s: %s", Files.TRAIN_LOG, cfg.run_uri, e)
