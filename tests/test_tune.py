"""Hyperparameter sweeps (ttds_ray/sweep.py, tune_ray.py): search spaces and their validation, define-by-run
conditional keys, trial overrides, the results table and best.yaml, the per-stage lock of the shared stage
store, per-epoch validation in the LLM recipe; and one 4-trial Ray Tune sweep on a small real slice (slow)."""
import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from ttds_ray import sweep
from ttds_ray.artifacts import Files, RunDir, read_json, write_json
from ttds_ray.config import load_config
from ttds_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def base(tmp_path) -> Path:
    """A small valid base config (nothing is read from data.path until a trial runs)."""
    p = tmp_path / "base.yaml"
    p.write_text(f"""
name: sweepbase
output_dir: {tmp_path / 'runs'}
data: {{path: {tmp_path / 'nodata'}}}
llm: {{backbone: tiny, finetune: full, epochs: 2}}
dynamic: {{rounds: 2}}
eval: {{max_users: 50}}
""")
    return p


def _space(tmp_path, text: str, base: Path) -> sweep.SearchSpace:
    f = tmp_path / "space.yaml"
    f.write_text(text)
    return sweep.load_space(f, base)


def test_sweep_logic_imports_no_ray():
    """Spaces, the stage store and the results are Ray-free; only tune_ray.py (and train.py, jobs/) import Ray."""
    code = "import sys, ttds_ray.sweep, ttds_ray.cli; assert 'ray' not in sys.modules, 'ray imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- parsing and validation

@pytest.mark.parametrize("space_file", SPACES, ids=lambda p: p.name)
@pytest.mark.parametrize("config", ["scientific_tiny.yaml", "scientific_smollm2.yaml", "quickstart.yaml"])
def test_shipped_spaces_validate_against_the_shipped_configs(space_file, config):
    space = sweep.load_space(space_file, REPO / "configs" / config)
    assert space.config_params and space.num_samples >= 1
    assert all(p.key in sweep.config_leaf_keys() for p in space.config_params)


def test_space_options_and_defaults(tmp_path, base):
    s = _space(tmp_path, """
num_samples: 7
seed: 3
asha: {grace_period: 2, reduction_factor: 3}
trial_resources: {CPU: 0.5, GPU: 1}
space:
  llm.lr: {loguniform: [1.0e-5, 1.0e-2]}
""", base)
    assert (s.num_samples, s.seed, s.grace_period, s.reduction_factor) == (7, 3, 2, 3)
    assert s.trial_resources == {"CPU": 0.5, "GPU": 1}
    assert s.valid_users == 50                       # default: the base config's eval.max_users
    assert [p.kind for p in s.params] == ["loguniform"]


@pytest.mark.parametrize("text, key", [
    ("space: {tokenizer.item.codebok_size: {choice: [64, 128]}}", "tokenizer.item.codebok_size"),
    ("space: {llm.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}}", "llm.learning_rate"),
    ("space: {tokenizer.item: {choice: [1, 2]}}", "tokenizer.item"),             # a section, not a value
    ("fixed: {llm.epoch: 2}\nspace: {llm.lr: {uniform: [0.001, 0.01]}}", "llm.epoch"),
])
def test_unknown_config_key_is_refused_naming_it(tmp_path, base, text, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        _space(tmp_path, text, base)


def test_unknown_key_error_suggests_the_close_key(tmp_path, base):
    with pytest.raises(ConfigError, match="did you mean 'tokenizer.item.codebook_size'"):
        _space(tmp_path, "space: {tokenizer.item.codebok_size: {choice: [64, 128]}}", base)


@pytest.mark.parametrize("spec, key, why", [
    ("llm.lr: {uniform: [0.01, 0.001]}", "llm.lr", "low must be < high"),
    ("llm.lr: {loguniform: [0, 0.01]}", "llm.lr", "low must be > 0"),
    ("dynamic.rounds: {int: [0.5, 3]}", "dynamic.rounds", "integer bounds"),
    ("dynamic.rounds: {int: [3]}", "dynamic.rounds", r"needs \[low, high\]"),
    ("llm.lora_r: {choice: []}", "llm.lora_r", "non-empty list"),
    ("llm.lora_r: {choice: [8, 8]}", "llm.lora_r", "twice"),
    ("llm.lr: {uniform: [0.001, 0.01], loguniform: [0.001, 0.01]}", "llm.lr", "exactly one"),
    ("llm.lr: {gaussian: [0.001, 0.01]}", "llm.lr", "unknown field"),
    ("llm.lr: 0.001", "llm.lr", "expected a mapping"),
    # well-formed ranges whose values the config model refuses
    ("dynamic.final_freeze: {uniform: [0.0, 0.5]}", "dynamic.final_freeze", "not valid for the config"),
    ("tokenizer.item.codebook_size: {int: [1, 8]}", "tokenizer.item.codebook_size", "not valid for the config"),
    ("tasks.seqrec_loss_on: {choice: [all_items, everything]}", "tasks.seqrec_loss_on", "everything"),
    ("dynamic.rounds: {int: [1, 3], when: {llm.finetune: lora}, otherwise: -1}", "dynamic.rounds", "-1"),
])
def test_bad_range_is_refused_naming_the_key(tmp_path, base, spec, key, why):
    with pytest.raises(ConfigError, match=why) as e:
        _space(tmp_path, f"space:\n  {spec}\n", base)
    assert f"'{key}'" in str(e.value) and "space.yaml" in str(e.value)


@pytest.mark.parametrize("text, why", [
    ("switches: {llm.lr: {choice: [true, false]}}\nspace: {llm.lr: {uniform: [0.001, 0.01]}}",
     "plain identifier that is not a config key"),
    ("space:\n  llm.lr: {uniform: [0.001, 0.01], when: {nosuch.key: 1}}", "neither a switch"),
    ("space:\n  llm.lr: {uniform: [0.001, 0.01], when: {dynamic.rounds: {bigger: 0}}}", "unknown condition 'bigger'"),
    ("space:\n  dynamic.gamma_kl: {uniform: [0.0, 1.0], when: {dynamic.rounds: {gt: 0}}}\n"
     "  dynamic.rounds: {int: [0, 3]}", "sampled later"),
    ("space:\n  llm.lr: {uniform: [0.001, 0.01], otherwise: 0.01}", "'otherwise' needs a 'when'"),
    ("space:\n  name: {choice: [a, b]}", "set by the sweep"),
    ("fixed: {llm.lr: 0.01}\nspace:\n  llm.lr: {uniform: [0.001, 0.01]}", "both in 'fixed' and in 'space'"),
    ("spaces: {llm.lr: {uniform: [0.001, 0.01]}}", "unknown top-level key"),
    ("num_samples: 0\nspace: {llm.lr: {uniform: [0.001, 0.01]}}", "num_samples"),
    ("space: {}", "at least one"),
])
def test_malformed_space_files_are_refused(tmp_path, base, text, why):
    with pytest.raises(ConfigError, match=why):
        _space(tmp_path, text, base)


def test_missing_space_file_is_refused(tmp_path, base):
    with pytest.raises(ConfigError, match="does not exist"):
        sweep.load_space(tmp_path / "nope.yaml", base)


# ----------------------------------------------------------------------------- sampling and overrides

_COND = """
switches:
  token_grain: {choice: [true, false]}
space:
  dynamic.rounds: {int: [0, 3]}
  dynamic.tokenizer_lr: {loguniform: [1.0e-6, 1.0e-3], when: {dynamic.rounds: {gt: 0}}}
  dynamic.gamma_kl: {uniform: [0.0, 1.0], when: {dynamic.rounds: {gt: 0}}}
  llm.alpha_tok: {loguniform: [0.01, 1.0], when: {token_grain: true}, otherwise: 0}
  llm.lora_r: {choice: [4, 8, 16], when: {llm.finetune: lora}}
"""


def _sample(space: sweep.SearchSpace, base_tree: dict, n: int, seed: int = 0) -> list[dict]:
    """What OptunaSearch's define-by-run hands a trial: the sampled values plus the constants returned."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.suggest(trial, base_tree)
        out.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    return out


def test_conditional_keys_are_sampled_only_when_their_condition_holds(tmp_path, base):
    space = _space(tmp_path, _COND, base)
    configs = _sample(space, sweep.base_tree(base, [], space), 40)
    on = [c for c in configs if c["dynamic.rounds"] > 0]
    off = [c for c in configs if c["dynamic.rounds"] == 0]
    assert on and off
    assert all({"dynamic.tokenizer_lr", "dynamic.gamma_kl"} <= set(c) for c in on)
    assert all(not {"dynamic.tokenizer_lr", "dynamic.gamma_kl"} & set(c) for c in off)
    # a switched-off grain gets its 'otherwise' value; a switched-on one a sampled weight in range
    assert all(c["llm.alpha_tok"] == 0 for c in configs if not c["token_grain"])
    assert all(0.01 <= c["llm.alpha_tok"] <= 1.0 for c in configs if c["token_grain"])
    # a condition on a base-config value: the base fine-tunes fully, so the LoRA rank is never sampled
    assert all("llm.lora_r" not in c for c in configs)
    lora = sweep.base_tree(base, ["llm.backbone=smollm2", "llm.finetune=lora"], space)
    assert all(c["llm.lora_r"] in (4, 8, 16) for c in _sample(space, lora, 5))


def test_space_keeps_its_conditions_through_pickling(tmp_path, base):
    """--resume unpickles OptunaSearch with its define-by-run space: 'otherwise' must survive (it once was an
    identity sentinel, so a resumed sweep handed trials a bare object() as a config value)."""
    import pickle

    space = pickle.loads(pickle.dumps(_space(tmp_path, _COND, base)))
    for c in _sample(space, sweep.base_tree(base, [], space), 20):
        assert isinstance(c["llm.alpha_tok"], (int, float)) and (c["token_grain"] or c["llm.alpha_tok"] == 0)
        assert all(isinstance(v, (int, float, bool, str)) for v in c.values())


def test_overrides_build_each_trials_config(tmp_path, base):
    space = _space(tmp_path, "fixed: {llm.epochs: 3}\n" + _COND, base)
    params = {"token_grain": True, "dynamic.rounds": 2, "dynamic.tokenizer_lr": 1.5e-05, "dynamic.gamma_kl": 0.25,
              "llm.alpha_tok": 0.3}
    ovs = space.overrides(params)
    assert ovs[0] == "llm.epochs=3" and not any(o.startswith("token_grain") for o in ovs)
    cfg = sweep.trial_config(base, [], space, params, tmp_path / "sweep" / "trials" / "t1")
    assert (cfg.dynamic.rounds, cfg.dynamic.tokenizer_lr, cfg.dynamic.gamma_kl, cfg.llm.alpha_tok) == (2, 1.5e-05, 0.25, 0.3)
    assert cfg.llm.epochs == 3 and cfg.name == "t1" and cfg.run_dir == (tmp_path / "sweep" / "trials" / "t1").resolve()
    # keys not sampled keep the base config's values; only LLM-stage keys changed, so upstream stages are shared
    other = sweep.trial_config(base, [], space, {"dynamic.rounds": 0, "llm.alpha_tok": 0}, tmp_path / "t2")
    assert other.dynamic.tokenizer_lr == load_config(base).dynamic.tokenizer_lr
    assert all(cfg.stage_hash(s) == other.stage_hash(s) for s in ("data", "embeddings", "cf", "tokenizer"))
    assert cfg.stage_hash("llm") != other.stage_hash("llm")


# ----------------------------------------------------------------------------- results and best.yaml

def _fake_trial(paths: sweep.SweepPaths, tid: str, params: dict, status: str, metric=None, curve=(), started="",
                stages=None, error=None):
    d = paths.trial(tid)
    d.mkdir(parents=True)
    rec = {"trial_id": tid, "params": params, "status": status, "run_dir": str(d), "started": started,
           "stages": stages or {}, "values": {}}
    if status == "completed":
        rec.update(metric=metric, epochs=len(curve) + 1, wall_s=12.5)
    if error:
        rec["error"] = error
    write_json(d / sweep.TRIAL_FILE, rec)
    for e, v in enumerate(curve):
        sweep.append_curve(d, {"epoch": e, "step": 10 * (e + 1), sweep.METRIC: v})
    return d


def test_results_table_plot_and_best_yaml_reproduce_the_best_trial(tmp_path, base):
    space = _space(tmp_path, _COND, base)
    paths = sweep.SweepPaths(tmp_path / "sweep")
    best_params = {"token_grain": True, "dynamic.rounds": 1, "dynamic.tokenizer_lr": 2e-05, "dynamic.gamma_kl": 0.5,
                   "llm.alpha_tok": 0.2}
    _fake_trial(paths, "base", {}, "completed", 0.020, [0.01], started="2026-01-01T00:00:00",
                stages={"data": "built", "cf": "built"})
    _fake_trial(paths, "b1", {"token_grain": False, "dynamic.rounds": 0, "llm.alpha_tok": 0}, "completed", 0.031,
                [0.02], started="2026-01-01T00:01:00", stages={"data": "reused", "llm": "built"})
    _fake_trial(paths, "a2", best_params, "completed", 0.045, [0.03], started="2026-01-01T00:02:00")
    _fake_trial(paths, "c3", {"token_grain": True, "dynamic.rounds": 3, "llm.alpha_tok": 0.9}, "running",
                curve=[0.001], started="2026-01-01T00:03:00")
    _fake_trial(paths, "d4", {"token_grain": False, "dynamic.rounds": 2, "llm.alpha_tok": 0}, "error",
                started="2026-01-01T00:04:00", error="CollisionError: prefix (3,)\n  overflows")
    _fake_trial(paths, "e5", {"token_grain": False, "dynamic.rounds": 1, "llm.alpha_tok": 0}, "running",
                started="2026-01-01T00:05:00")
    paths.trial("f6").mkdir()      # Tune saw it fail before the trial wrote trial.json
    _fake_trial(paths, "g7", {"dynamic.rounds": 2}, "error", curve=[0.002, 0.003], started="2026-01-01T00:07:00",
                error="ActorDiedError: ... its placement group was removed")   # what an ASHA stop can look like
    tune_status = {"c3": {"status": "terminated"}, "e5": {"status": "error", "error": "actor died"},
                   "g7": {"status": "terminated"},
                   "f6": {"status": "error", "error": "TypeError: bad", "params": {"dynamic.rounds": 3},
                          "started": "2026-01-01T00:06:00"}}
    records = sweep.collect_records(paths, tune_status)
    assert [r.trial_id for r in records] == ["base", "b1", "a2", "c3", "d4", "e5", "f6", "g7"]   # base first, by start
    status = {r.trial_id: r.status for r in records}
    assert status == {"base": "completed", "b1": "completed", "a2": "completed", "c3": "stopped (ASHA)",
                      "d4": "error", "e5": "error", "f6": "error", "g7": "stopped (ASHA)"}
    assert records[6].params == {"dynamic.rounds": 3} and records[6].error == "TypeError: bad"
    assert (records[7].metric, records[7].epochs, records[7].error) == (0.003, 2, None)
    c3 = records[3]
    assert c3.metric == 0.001 and c3.epochs == 1          # a stopped trial: its last per-epoch value
    best = sweep.write_results(paths, records, space, str(base), [], "mysweep")
    assert best.trial_id == "a2"
    rows = list(__import__("csv").reader((paths.root / "results.csv").open()))
    assert rows[0][:6] == ["trial", "status", f"{sweep.METRIC} (valid, 50 users)", "LLM epochs", "wall s",
                           "stages built"]
    assert [r[0] for r in rows[1:]] == ["base", "b1", "a2", "c3", "d4", "e5", "f6", "g7"]
    assert rows[3][2] == "0.0450" and rows[5][1] == "error: CollisionError: prefix (3,) overflows"
    assert rows[1][5] == "data, cf"
    md = (paths.root / "results.md").read_text()
    assert "Best: trial `a2`" in md and "(base config: 0.0200)" in md and md.count("\n| ") == 9
    assert (paths.root / "objective.png").stat().st_size > 10_000
    assert (paths.root / "best_run").resolve() == paths.trial("a2").resolve()
    # best.yaml is a runnable config that reproduces the best trial's settings (every stage hash)
    cfg = load_config(paths.root / "best.yaml")
    trial_cfg = sweep.trial_config(base, [], space, best_params, paths.trial("a2"))
    assert all(cfg.stage_hash(s) == trial_cfg.stage_hash(s) for s in ("data", "embeddings", "cf", "tokenizer",
                                                                       "llm", "eval"))
    assert cfg.name == "mysweep-best" and cfg.llm.alpha_tok == 0.2 and cfg.dynamic.tokenizer_lr == 2e-05
    assert read_json(paths.root / "best.json")["trial_id"] == "a2"
    assert "validation NDCG@10 = 0.0450" in (paths.root / "best.yaml").read_text()


def test_no_completed_trial_writes_the_table_but_no_best(tmp_path, base):
    space = _space(tmp_path, _COND, base)
    paths = sweep.SweepPaths(tmp_path / "sweep")
    _fake_trial(paths, "x", {"dynamic.rounds": 1}, "error", error="boom")
    assert sweep.write_results(paths, sweep.collect_records(paths), space, str(base), [], "s") is None
    assert (paths.root / "results.csv").is_file() and not (paths.root / "best.yaml").exists()


class _FailingBackend:
    def normalize(self, interactions):
        raise RuntimeError("worker lost")


def test_a_failing_trial_is_recorded_then_raises(tmp_path, base, lcrec_data):
    data_dir = lcrec_data.write_slice(tmp_path / "slice", 20)
    space = _space(tmp_path, "fixed: {data.kcore: 0}\n" + _COND, base)
    paths = sweep.SweepPaths(tmp_path / "sweep")
    with pytest.raises(RuntimeError, match="worker lost"):
        sweep.execute_trial(paths, "t1", base, [f"data.path={data_dir}"], space, {"dynamic.rounds": 0},
                            _FailingBackend())
    rec = read_json(paths.trial("t1") / sweep.TRIAL_FILE)
    assert rec["status"] == "error" and "worker lost" in rec["error"] and rec["values"]["dynamic.rounds"] == 0


# ----------------------------------------------------------------------------- the shared stage store

def _build_stage(run_root: str, stage: str, h: str, log_path: str, delay: float) -> None:
    """A stand-in for building ``stage``: log the build, wait, write the stage with hash ``h``."""
    with open(log_path, "a") as f:
        f.write(f"{run_root}\n")
    time.sleep(delay)
    with RunDir(run_root).write_stage(stage, config_hash=h) as (d, _):
        (d / "weights.bin").write_bytes(b"x" * 64)


def _ensure(store_root: str, run_root: str, log_path: str, delay: float, out: list | None = None) -> str:
    how = sweep.StageStore(store_root).ensure("data", "h0", RunDir(run_root),
                                              lambda: _build_stage(run_root, "data", "h0", log_path, delay))
    if out is not None:
        out.append(how)
    return how


def test_two_threads_asking_for_one_stage_hash_build_it_once(tmp_path):
    log, out = tmp_path / "builds.log", []
    threads = [threading.Thread(target=_ensure, args=(str(tmp_path / "store"), str(tmp_path / f"run{i}"), str(log),
                                                       1.0, out)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.read_text().splitlines()) == 1
    assert sorted(out) == ["built", "reused"]
    digests = {RunDir(tmp_path / f"run{i}").manifest("data")["digest"] for i in range(2)}
    assert len(digests) == 1                               # the same stage (hard links), not two builds
    a, b = (tmp_path / f"run{i}" / "data" / "weights.bin" for i in range(2))
    assert a.stat().st_ino == b.stat().st_ino
    # a third run of the same hash links it without waiting or building; one already complete is left alone
    assert _ensure(str(tmp_path / "store"), str(tmp_path / "run2"), str(log), 0) == "reused"
    assert _ensure(str(tmp_path / "store"), str(tmp_path / "run0"), str(log), 0) == "present"
    assert len(log.read_text().splitlines()) == 1


def test_two_processes_asking_for_one_stage_hash_build_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path / "store"), str(tmp_path / f"run{i}"), str(log), 2.0))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert all(RunDir(tmp_path / f"run{i}").is_complete("data", "h0") for i in range(2))


def test_a_failed_build_releases_the_lock_and_the_next_trial_builds(tmp_path):
    store = sweep.StageStore(tmp_path / "store")

    def boom():
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError):
        store.ensure("data", "h0", RunDir(tmp_path / "run0"), boom)
    assert _ensure(str(tmp_path / "store"), str(tmp_path / "run1"), str(tmp_path / "log"), 0) == "built"


def test_a_stored_stage_built_from_other_inputs_is_not_linked(tmp_path):
    src, dst = RunDir(tmp_path / "src"), RunDir(tmp_path / "dst")
    for run, tag in ((src, b"a"), (dst, b"b")):
        with run.write_stage("data", config_hash="hd") as (d, _):
            (d / "x").write_bytes(tag)
    with src.write_stage("embeddings", config_hash="he") as (d, _):
        (d / "e").write_bytes(b"e")
    store = sweep.StageStore(tmp_path / "store")
    store.publish("embeddings", "he", src)
    assert not store.fetch("embeddings", "he", dst)        # dst's data stage differs from the one it was built on


# ----------------------------------------------------------------------------- per-epoch validation (no Ray)

def test_llm_recipe_reports_validation_every_epoch_but_the_last_without_changing_training(tiny_run):
    from ttds_ray import pipeline, recipes

    cfg0, run, _ = tiny_run
    cfg = load_config(run.root / Files.CONFIG, ["llm.max_steps=null", "llm.epochs=3", f"output_dir={run.root.parent}",
                                                f"name={run.root.name}"])
    s = pipeline.llm_samples(cfg, run)
    assert s.total_steps // s.steps_per_epoch == 3

    def train(valid_users):
        reports = []
        env = recipes.WorkerEnv(report=lambda m, f: reports.append(dict(m)), progress=lambda *a: None,
                                dataset=pipeline.local_datasets(s.datasets))
        r = recipes.LLMRecipe(cfg, run, env, n_epochs=s.n_epochs, total_steps=s.total_steps,
                              steps_per_epoch=s.steps_per_epoch, valid_users=valid_users)
        r.fit()
        return r, [m for m in reports if "loss" in m]     # epoch ends (re-index rounds report too)
    r, epochs = train(8)
    assert [m["epoch"] for m in epochs] == [0, 1, 2]
    assert all(0.0 <= m[sweep.METRIC] <= 1.0 and "valid_hr@10" in m for m in epochs[:2])
    assert sweep.METRIC not in epochs[2]                  # the last epoch: the trial evaluates the saved model
    again = r.validate()
    assert again == r.validate() and set(again) >= {sweep.METRIC, "valid_hr@1", "valid_ndcg@5"}
    # validation draws no random numbers: the same run without it trains the same model
    plain, _ = train(None)
    assert plain.losses == r.losses


# ----------------------------------------------------------------------------- one real sweep (Ray Tune)

_SLOW_SPACE = """
num_samples: 4
n_startup_trials: 2
asha: {grace_period: 1, reduction_factor: 2}
switches:
  token_grain: {choice: [true, false]}
space:
  llm.lr: {loguniform: [1.0e-4, 1.0e-2]}
  dynamic.rounds: {int: [0, 1]}
  dynamic.gamma_kl: {uniform: [0.0, 0.5], when: {dynamic.rounds: {gt: 0}}}
  llm.alpha_tok: {loguniform: [0.01, 1.0], when: {token_grain: true}, otherwise: 0}
"""


def _tune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.mark.slow
def test_four_trial_sweep_on_a_real_slice_shares_stages_and_writes_results(tmp_path, lcrec_data):
    """jobs/tune.py in its own process (its own Ray cluster, dashboard on): 4 trials over LLM-stage keys of the
    tiny test config, two at a time (logical CPUs 4: each trial holds 0.1 + 1 Train worker, Ray Data gets the
    rest), so the second trial waits on the stage locks while the first builds; SASRec and the towers are built
    once for all trials; table, plot and best.yaml written; --resume."""
    from conftest import TINY_RUN_CONFIG

    data_dir = lcrec_data.write_slice(tmp_path / "slice", 40, prefix="Slice")
    (tmp_path / "job.yaml").write_text(TINY_RUN_CONFIG.format(out=tmp_path / "runs", data=data_dir))
    (tmp_path / "space.yaml").write_text(_SLOW_SPACE)
    args = ["--config", str(tmp_path / "job.yaml"), "--space", str(tmp_path / "space.yaml"), "--name", "t4",
            "--max-concurrent", "2", "llm.max_steps=null", "llm.epochs=2", "ray.num_cpus=4"]
    res = _tune(*args)
    assert res.returncode == 0, res.stderr[-4000:]
    root = tmp_path / "runs" / "sweeps" / "t4"
    trials = [read_json(p) for p in sorted((root / "trials").glob("*/trial.json"))]
    assert len(trials) == 4
    built = {s: sum(t.get("stages", {}).get(s) == "built" for t in trials) for s in sweep.TRIAL_STAGES}
    assert built["data"] == built["embeddings"] == built["cf"] == built["tokenizer"] == 1, built
    assert len(list((root / "stages").glob("cf-*"))) == len(list((root / "stages").glob("tokenizer-*"))) == 1
    for t in trials:       # every trial got SASRec and the towers: built once, linked by the others
        assert t["stages"].get("cf") in ("built", "reused") and t["stages"].get("tokenizer") in ("built", "reused")
    rows = list(__import__("csv").reader((root / "results.csv").open()))
    # a trial ASHA stopped may have recorded its Train controller dying as an error: Tune's status decides
    assert len(rows) == 5 and {r[1] for r in rows[1:]} <= {"completed", "stopped (ASHA)"}
    assert "completed" in {r[1] for r in rows[1:]}
    assert (root / "objective.png").stat().st_size > 10_000 and "| trial |" in (root / "results.md").read_text()
    best = read_json(root / "best.json")
    cfg = load_config(root / "best.yaml")
    best_trial = load_config(Path(best["run_dir"]) / Files.CONFIG)
    assert all(cfg.stage_hash(s) == best_trial.stage_hash(s) for s in sweep.TRIAL_STAGES)
    assert (root / "best_run" / "llm" / Files.MANIFEST).is_file()
    # every trial reported validation NDCG@10 after its first LLM epoch (ASHA's input)
    assert all(sweep.read_curve(root / "trials" / t["trial_id"]) for t in trials)
    # the same sweep again is refused; --resume restores the finished experiment and rewrites the table
    again = _tune(*args)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _tune(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(list(__import__("csv").reader((root / "results.csv").open()))) == 5
