"""Hyperparameter sweeps, the Ray-free half: search spaces, trials, the shared stage store, results. No Ray import.

Reads a base config and a search-space YAML (``tune_spaces/``, format in docs/TUNING.md). Writes the sweep
directory ``<output_dir>/sweeps/<name>/``: ``stages/`` (finished stages shared by every trial, one file lock
per stage hash), ``trials/<trial_id>/`` (one run directory per trial, with ``trial.json`` and
``valid_curve.jsonl``), ``results.csv`` / ``results.md``, ``objective.png``, ``best.yaml`` and ``best_run``.
The Ray Tune driver (OptunaSearch + ASHA) is ``tune_ray.py``; it calls :func:`execute_trial` in every trial.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import fcntl
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from . import pipeline
from .artifacts import STAGES, Files, RunDir, atomic_write_bytes, read_json, write_json
from .config import TTDSConfig, _known_keys, _load_trees, _merge, _yaml_load, dump_yaml, load_config, parse_overrides
from .errors import ConfigError

log = logging.getLogger("ttds_ray")

#: The objective: NDCG@10 on a seeded sample of validation users (the recipe's and evaluate_split's key).
METRIC = "valid_ndcg@10"
MODE = "max"
#: Stages a trial builds or reuses; the test-split eval stage never runs inside a sweep.
TRIAL_STAGES = STAGES[:STAGES.index("llm") + 1]
KINDS = ("uniform", "loguniform", "int", "choice")
_OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
        "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
        "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b}
_TOP_KEYS = {"description", "num_samples", "valid_users", "seed", "n_startup_trials", "max_concurrent",
             "trial_resources", "asha", "fixed", "switches", "space"}
_ASHA_KEYS = {"grace_period", "reduction_factor", "max_t"}
_SPEC_KEYS = set(KINDS) | {"step", "log", "when", "otherwise"}
_RESERVED = {"name", "output_dir"}          # set by the sweep for every trial


# ----------------------------------------------------------------------------- search spaces

@dataclasses.dataclass(frozen=True)
class Param:
    """One sampled value: a dotted config key (or a switch name) and its distribution.

    ``when`` holds ``(key, op, value)`` conditions, all of which must hold for the value to be sampled
    (define-by-run: keys sampled earlier in the file, switches, or the base config); otherwise the key
    gets ``otherwise`` (if given) or keeps the base config's value.
    """
    key: str
    kind: str                       # uniform | loguniform | int | choice
    values: tuple                   # (low, high) or the choices
    step: float | int | None = None
    log: bool = False
    when: tuple = ()
    otherwise: Any = None
    has_otherwise: bool = False     # a flag, not a sentinel object: the space is pickled (searcher checkpoints)
    switch: bool = False

    def suggest(self, trial) -> Any:
        """Sample with an Optuna trial (``suggest_float`` / ``suggest_int`` / ``suggest_categorical``)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        lo, hi = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, lo, hi, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, lo, hi, log=self.kind == "loguniform", step=self.step)

    def holds(self, lookup: Callable[[str], Any]) -> bool:
        return all(_OPS[op](lookup(k), v) for k, op, v in self.when)

    def candidates(self) -> list:
        """Values to check against the config model: the bounds (or every choice) and ``otherwise``."""
        return list(self.values) + ([self.otherwise] if self.has_otherwise else [])


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search-space file (see :func:`load_space`)."""
    path: str
    params: tuple[Param, ...]                  # switches first, then config keys, each in file order
    fixed: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    num_samples: int = 8
    valid_users: int = 300
    seed: int = 0
    n_startup_trials: int = 5
    max_concurrent: int = 1
    trial_resources: dict = dataclasses.field(default_factory=lambda: {"CPU": 0.1})
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 100

    @property
    def config_params(self) -> list[Param]:
        return [p for p in self.params if not p.switch]

    def suggest(self, trial, base: dict) -> dict:
        """Define-by-run sampling (Optuna): sample every parameter whose conditions hold, in order.

        Args:
            trial: an Optuna trial (or Ray's capturing wrapper of one).
            base: the base config (with ``fixed``) as a nested dict, for conditions on keys not sampled.

        Returns:
            The constant values set by ``otherwise`` (key -> value); sampled values live in ``trial.params``.
        """
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}

        def lookup(key: str) -> Any:
            return values[key] if key in values else _dotted_get(base, key)
        for p in self.params:
            if p.holds(lookup):
                values[p.key] = p.suggest(trial)
            elif p.has_otherwise:
                values[p.key] = constants[p.key] = p.otherwise
        return constants

    def overrides(self, params: dict) -> list[str]:
        """``key=value`` overrides of a trial: ``fixed`` then the sampled config keys (switches dropped)."""
        keys = {p.key for p in self.config_params}
        items = list(self.fixed.items()) + [(k, v) for k, v in params.items() if k in keys]
        return [f"{k}={_yaml_value(v)}" for k, v in items]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params"] = [{**dataclasses.asdict(p), "values": list(p.values), "when": [list(w) for w in p.when]}
                       for p in self.params]
        return d


def _yaml_value(v: Any) -> str:
    """A value as an override spells it (JSON is YAML; ``1e-05`` reads back as a float in config.py)."""
    return json.dumps(v)


def _dotted_get(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_leaf_keys() -> list[str]:
    """Every settable (leaf) dotted key of :class:`TTDSConfig`."""
    keys = _known_keys(TTDSConfig)
    return [k for k in keys if not any(o.startswith(k + ".") for o in keys)]


def _unknown_key(key: str, where: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_when(key: str, when: Any, where: str, known_names: set[str], leaves: set[str]) -> tuple:
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}: '{key}': 'when' must map keys to conditions, e.g. "
                          "when: {dynamic.rounds: {gt: 0}}")
    out = []
    for ref, cond in when.items():
        if ref == key:
            raise ConfigError(f"{where}: '{key}': a condition cannot refer to the key itself")
        if ref not in known_names and ref not in leaves:
            raise ConfigError(f"{where}: '{key}': condition on '{ref}', which is neither a switch, a key sampled "
                              "earlier in this file, nor a config key")
        if isinstance(cond, dict):
            for op, v in cond.items():
                if op not in _OPS:
                    raise ConfigError(f"{where}: '{key}': unknown condition '{op}' on '{ref}'; use one of "
                                      f"{', '.join(_OPS)}")
                if op in ("in", "not_in") and not isinstance(v, list):
                    raise ConfigError(f"{where}: '{key}': condition '{op}' on '{ref}' needs a list")
                out.append((ref, op, tuple(v) if isinstance(v, list) else v))
        else:
            out.append((ref, "eq", cond))
    return tuple(out)


def _parse_param(key: str, spec: Any, where: str, *, switch: bool, known_names: set[str], leaves: set[str]
                 ) -> Param:
    """One entry of ``space:`` / ``switches:``; raises ConfigError naming ``key`` on a bad range."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: '{key}': expected a mapping such as {{loguniform: [1.0e-5, 1.0e-3]}}, "
                          f"got {spec!r}")
    extra = set(spec) - _SPEC_KEYS
    if extra:
        raise ConfigError(f"{where}: '{key}': unknown field(s) {sorted(extra)}; a range is one of "
                          f"{', '.join(KINDS)} plus optional step, log, when, otherwise")
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: '{key}': give exactly one of {', '.join(KINDS)} (got {kinds or 'none'})")
    kind, vals = kinds[0], spec[kinds[0]]
    step, log_ = spec.get("step"), spec.get("log", False)
    if kind == "choice":
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{where}: '{key}': choice needs a non-empty list of values")
        if any(isinstance(v, (dict, list)) for v in vals):
            raise ConfigError(f"{where}: '{key}': choice values must be scalars (numbers, strings, true/false, null)")
        if len({json.dumps(v) for v in vals}) != len(vals):
            raise ConfigError(f"{where}: '{key}': choice lists a value twice: {vals}")
        if step is not None or log_:
            raise ConfigError(f"{where}: '{key}': step/log do not apply to choice")
        values: tuple = tuple(vals)
    else:
        if not (isinstance(vals, list) and len(vals) == 2 and all(_is_num(v) for v in vals)):
            raise ConfigError(f"{where}: '{key}': {kind} needs [low, high] (two finite numbers), got {vals!r}")
        lo, hi = vals
        if not lo < hi:
            raise ConfigError(f"{where}: '{key}': bad range {kind} [{lo}, {hi}]: low must be < high")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: '{key}': bad range loguniform [{lo}, {hi}]: low must be > 0")
        if kind == "int":
            if not all(isinstance(v, int) for v in vals):
                raise ConfigError(f"{where}: '{key}': int range needs integer bounds, got [{lo}, {hi}]")
            if log_ and lo < 1:
                raise ConfigError(f"{where}: '{key}': bad range int [{lo}, {hi}] with log: low must be >= 1")
            if step is not None and not (isinstance(step, int) and step >= 1):
                raise ConfigError(f"{where}: '{key}': int step must be an integer >= 1")
        elif log_:
            raise ConfigError(f"{where}: '{key}': 'log' applies to int ranges; use loguniform")
        if step is not None and kind != "int":
            if kind == "loguniform" or not (_is_num(step) and 0 < step <= hi - lo):
                raise ConfigError(f"{where}: '{key}': step must be > 0 and <= high - low (uniform only)")
        values = (lo, hi)
    when = _parse_when(key, spec["when"], where, known_names, leaves) if "when" in spec else ()
    if "otherwise" in spec and not when:
        raise ConfigError(f"{where}: '{key}': 'otherwise' needs a 'when'")
    return Param(key=key, kind=kind, values=values, step=step, log=bool(log_), when=when,
                 otherwise=spec.get("otherwise"), has_otherwise="otherwise" in spec, switch=switch)


def parse_space(tree: Any, base_config: str | Path, base_overrides: list[str] | None = None, *,
                source: str = "<space>") -> SearchSpace:
    """Parse and validate a search space against the config model; nothing runs.

    Every ``space:`` / ``fixed:`` key must be a settable config key; every range must be well-formed and
    every value it can take (both bounds, each choice, ``otherwise``) must give a valid config with the base
    config and ``fixed``.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    where = f"search space {source}"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: must hold a mapping with a 'space:' section")
    extra = set(tree) - _TOP_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(extra)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    space_tree, switches_tree = tree.get("space") or {}, tree.get("switches") or {}
    fixed = tree.get("fixed") or {}
    if not isinstance(space_tree, dict) or not space_tree:
        raise ConfigError(f"{where}: 'space:' must map at least one dotted config key to a range")
    if not isinstance(switches_tree, dict) or not isinstance(fixed, dict):
        raise ConfigError(f"{where}: 'switches:' and 'fixed:' must be mappings")
    leaves = config_leaf_keys()
    leaf_set = set(leaves)
    base_ovs = list(base_overrides or [])
    base_cfg = load_config(base_config, base_ovs)           # the base itself must be valid first
    for key in fixed:
        if key not in leaf_set or key in _RESERVED:
            raise _unknown_key(key, f"{where}: fixed", leaves) if key not in leaf_set else \
                ConfigError(f"{where}: fixed: '{key}' is set by the sweep for every trial")
    fixed_ovs = [f"{k}={_yaml_value(v)}" for k, v in fixed.items()]
    try:
        load_config(base_config, base_ovs + fixed_ovs)
    except ConfigError as e:
        raise ConfigError(f"{where}: 'fixed' does not give a valid config: {e}") from None
    params: list[Param] = []
    names: set[str] = set()
    for name, spec in switches_tree.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)) or name in leaf_set:
            raise ConfigError(f"{where}: switch '{name}': a switch name is a plain identifier that is not a "
                              "config key")
        params.append(_parse_param(name, spec, where, switch=True, known_names=names, leaves=leaf_set))
        names.add(name)
    for key, spec in space_tree.items():
        if key not in leaf_set:
            raise _unknown_key(key, where, leaves)
        if key in _RESERVED:
            raise ConfigError(f"{where}: '{key}' is set by the sweep for every trial; it cannot be swept")
        if key in fixed:
            raise ConfigError(f"{where}: '{key}' is both in 'fixed' and in 'space'")
        params.append(_parse_param(key, spec, where, switch=False, known_names=names, leaves=leaf_set))
        names.add(key)
    order = {p.key: i for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for ref, _, _ in p.when:
            if order.get(ref, -1) > i:
                raise ConfigError(f"{where}: '{p.key}': its condition refers to '{ref}', which is sampled later; "
                                  "list it before (conditions are evaluated in file order, define-by-run)")
    for p in params:
        if p.switch:
            continue
        for v in p.candidates():
            try:
                load_config(base_config, base_ovs + fixed_ovs + [f"{p.key}={_yaml_value(v)}"])
            except ConfigError as e:
                msg = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: '{p.key}': value {v!r} of its {p.kind} range is not valid for the "
                                  f"config: {msg}") from None
    opts = _options(tree, where)
    if opts.get("valid_users") is None:
        opts["valid_users"] = base_cfg.eval.max_users or 300
    return SearchSpace(path=str(source), params=tuple(params), fixed=dict(fixed),
                       description=str(tree.get("description") or ""), **opts)


def _options(tree: dict, where: str) -> dict:
    out: dict = {}
    for key in ("num_samples", "valid_users", "seed", "n_startup_trials", "max_concurrent"):
        if key in tree:
            v = tree[key]
            lo = 0 if key in ("seed", "n_startup_trials") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{where}: '{key}' must be an integer >= {lo}, got {v!r}")
            out[key] = v
    asha = tree.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - _ASHA_KEYS:
        raise ConfigError(f"{where}: 'asha' takes {', '.join(sorted(_ASHA_KEYS))}")
    for key, v in asha.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (2 if key == "reduction_factor" else 1):
            raise ConfigError(f"{where}: asha.{key} must be an integer >= {2 if key == 'reduction_factor' else 1}")
        out[key] = v
    res = tree.get("trial_resources")
    if res is not None:
        if not isinstance(res, dict) or not res or not all(_is_num(v) and v >= 0 for v in res.values()):
            raise ConfigError(f"{where}: trial_resources maps resource names to amounts >= 0, e.g. {{CPU: 0.1}}")
        out["trial_resources"] = dict(res)
    return out


def load_space(path: str | Path, base_config: str | Path, base_overrides: list[str] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file (:func:`parse_space`).

    Raises:
        ConfigError: missing file, bad YAML, an unknown key or a bad range (named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space '{p}' does not exist; see tune_spaces/")
    try:
        tree = _yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"search space '{p}' is not valid YAML: {e}") from None
    return parse_space(tree, base_config, base_overrides, source=str(p))


def base_tree(base_config: str | Path, base_overrides: list[str], space: SearchSpace) -> dict:
    """The base config (file + overrides + ``fixed``) as the nested dict conditions are evaluated on."""
    cfg = load_config(base_config, list(base_overrides) + space.overrides({}))
    return cfg.to_dict()


# ----------------------------------------------------------------------------- the sweep directory

@dataclasses.dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps things (``<output_dir>/sweeps/<name>/``)."""
    root: Path

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def trial(self, trial_id: str) -> Path:
        return self.trials / trial_id


def trial_config(base_config: str | Path, base_overrides: list[str], space: SearchSpace, params: dict,
                 run_dir: Path) -> TTDSConfig:
    """The config of one trial: base + ``fixed`` + the sampled keys, run directory ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    return load_config(base_config, list(base_overrides) + space.overrides(params)
                       + [f"output_dir={_yaml_value(str(run_dir.parent))}", f"name={_yaml_value(run_dir.name)}"])


# ----------------------------------------------------------------------------- shared stages

class StageStore:
    """Finished stages shared by the trials of a sweep: ``<root>/<stage>-<hash>/`` (hard links), one
    ``fcntl.flock`` file per stage hash so two trials never build the same stage at the same time.

    A trial asks :meth:`ensure` for each stage: present in its run dir -> nothing; in the store -> linked
    in; else it builds it under the lock and publishes it. A second trial asking for the same hash waits
    on the lock, then links the published stage. A process that dies holding a lock releases it.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, h: str) -> Path:
        return self.root / f"{stage}-{h}"

    @contextlib.contextmanager
    def lock(self, stage: str, h: str) -> Iterator[None]:
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        with open(self.root / ".locks" / f"{stage}-{h}.lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("sweep: waiting for stage %s-%s (another trial is building it)", stage, h)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def fetch(self, stage: str, h: str, run: RunDir) -> bool:
        """Link the stored stage into ``run`` if there is one built from ``run``'s current upstream stages."""
        src = self.path(stage, h)
        if not (src / Files.MANIFEST).is_file():
            return False
        man = read_json(src / Files.MANIFEST)
        if man.get("config_hash") != h or man.get("inputs", {}) != run.input_digests(stage):
            log.warning("sweep: stored stage %s was built from other inputs than %s has; building it there",
                        src, run.root)
            return False
        pipeline.link_stage(src, run.stage_dir(stage))
        return True

    def publish(self, stage: str, h: str, run: RunDir) -> None:
        """Link ``run``'s finished stage into the store (kept as is if the store already has this hash)."""
        if not (self.path(stage, h) / Files.MANIFEST).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            pipeline.link_stage(run.stage_dir(stage), self.path(stage, h))

    def ensure(self, stage: str, h: str, run: RunDir, build: Callable[[], None]) -> str:
        """Make ``run``'s stage complete with hash ``h``; returns "present", "reused" or "built"."""
        if run.is_complete(stage, h):
            return "present"
        with self.lock(stage, h):
            if self.fetch(stage, h, run):
                return "reused"
            build()
            if not run.is_complete(stage, h):
                raise RuntimeError(f"building stage {stage} of {run.root} left it incomplete")
            self.publish(stage, h, run)
            return "built"


class ValidatingBackend:
    """A ``pipeline.Backend`` that asks the LLM stage's recipe to validate after every epoch
    (``recipes.LLMRecipe(valid_users=...)``) and otherwise delegates to ``inner``."""

    def __init__(self, inner, valid_users: int):
        self.inner, self.valid_users = inner, valid_users

    def normalize(self, interactions):
        return self.inner.normalize(interactions)

    def __getattr__(self, name):     # optional Backend methods (e.g. ``prepare``) exactly as ``inner`` has them
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode_items(self, items, ecfg):
        return self.inner.encode_items(items, ecfg)

    def fit(self, cfg, run, stage, *, datasets=None, extra=None, num_workers=None):
        if stage == "llm":
            extra = {**(extra or {}), "valid_users": self.valid_users}
        return self.inner.fit(cfg, run, stage, datasets=datasets, extra=extra, num_workers=num_workers)

    def cleanup(self, cfg, run, stage):
        self.inner.cleanup(cfg, run, stage)


def run_trial_stages(cfg: TTDSConfig, backend, store: StageStore,
                     on_stage: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Every stage up to ``llm`` of ``cfg``'s run dir, each reused from ``store`` when a trial (or the base run)
    already built it with the same stage hash, else built here and published.

    Args:
        on_stage: called with ``(stage, how)`` as each stage is done.

    Returns:
        stage -> "present" | "reused" | "built".
    """
    run = RunDir(cfg.run_dir)
    out = {}
    for stage in TRIAL_STAGES:
        out[stage] = store.ensure(stage, cfg.stage_hash(stage), run,
                                  lambda s=stage: pipeline.run(cfg, backend, stop_after=s))
        if on_stage is not None:
            on_stage(stage, out[stage])
    return out


# ----------------------------------------------------------------------------- one trial

TRIAL_FILE = "trial.json"
CURVE_FILE = "valid_curve.jsonl"


def append_curve(run_dir: str | Path, metrics: dict) -> None:
    """Append one per-epoch validation report to ``<run_dir>/valid_curve.jsonl`` (one JSON object a line)."""
    row = {k: metrics[k] for k in ("epoch", "step", "loss", METRIC, "valid_hr@10") if k in metrics}
    with open(Path(run_dir) / CURVE_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def execute_trial(paths: SweepPaths, trial_id: str, base_config: str | Path, base_overrides: list[str],
                  space: SearchSpace, params: dict, backend, *, report: Callable[[dict], None] | None = None
                  ) -> dict:
    """One trial: the pipeline up to the LLM with the trial's overrides (shared stages through the
    :class:`StageStore`), then validation NDCG@10 of the saved model on ``space.valid_users`` seeded
    validation users (``evaluate.evaluate_split(split="valid")``; never the test split).

    Writes ``trials/<trial_id>/trial.json`` as it goes (status running -> completed | error) and calls
    ``report`` with the final metrics (Ray Tune's ``tune.report`` inside a sweep).

    Returns:
        The final ``trial.json`` content. Raises whatever the pipeline raised (recorded first).
    """
    from .evaluate import evaluate_split

    t0 = time.time()
    run_dir = paths.trial(trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {"trial_id": trial_id, "params": params, "overrides": space.overrides(params), "status": "running",
           "run_dir": str(run_dir.resolve()), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if (run_dir / TRIAL_FILE).is_file():     # a restarted trial (--resume) keeps its first start time
        rec["started"] = read_json(run_dir / TRIAL_FILE).get("started", rec["started"])
    write_json(run_dir / TRIAL_FILE, rec)
    try:
        cfg = trial_config(base_config, base_overrides, space, params, run_dir)
        resolved = cfg.to_dict()
        rec["values"] = {p.key: _dotted_get(resolved, p.key) for p in space.config_params}
        write_json(run_dir / TRIAL_FILE, rec)
        rec["stages"] = {}

        def on_stage(stage: str, how: str) -> None:
            rec["stages"][stage] = how
            write_json(run_dir / TRIAL_FILE, rec)
        run_trial_stages(cfg, ValidatingBackend(backend, space.valid_users), StageStore(paths.stages), on_stage)
        run = RunDir(cfg.run_dir)
        metrics, *_ = evaluate_split(cfg, run, "valid", max_users=space.valid_users, progress=False)
        ttds = metrics["models"]["TTDS"]
        n_samples = run.manifest("llm")["numbers"].get("n_samples_per_epoch", 0)
        rec.update(status="completed", metric=ttds["NDCG@10"], valid=ttds, n_valid_users=ttds["n_users"],
                   epochs=pipeline.llm_budget(n_samples, cfg)[2], stage_hashes={s: cfg.stage_hash(s) for s in STAGES},
                   wall_s=round(time.time() - t0, 1))
    except BaseException as e:
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], wall_s=round(time.time() - t0, 1))
        write_json(run_dir / TRIAL_FILE, rec)
        raise
    write_json(run_dir / TRIAL_FILE, rec)
    if report is not None:
        report({METRIC: rec["metric"], "valid_hr@10": ttds.get("HR@10"), "epoch": rec["epochs"] - 1, "final": 1})
    return rec


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass
class TrialRecord:
    """One row of the results table."""
    trial_id: str
    status: str                     # completed | stopped (ASHA) | error | running (interrupted)
    params: dict
    metric: float | None            # final validation NDCG@10, or the last per-epoch value of a stopped trial
    epochs: int | None              # LLM epochs trained
    wall_s: float | None
    run_dir: str
    curve: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    built: list[str] = dataclasses.field(default_factory=list)
    is_base: bool = False
    values: dict = dataclasses.field(default_factory=dict)   # every swept config key as the trial ran it
    started: str = ""


def read_curve(run_dir: str | Path) -> list[float]:
    """Per-epoch validation NDCG@10 of a trial (the last report per epoch wins, e.g. after a restart)."""
    path = Path(run_dir) / CURVE_FILE
    by_epoch: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                by_epoch[int(row["epoch"])] = float(row[METRIC])
            except (ValueError, KeyError):
                continue
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect_records(paths: SweepPaths, tune_status: dict[str, dict] | None = None) -> list[TrialRecord]:
    """Rows for every trial directory of the sweep, the base run first.

    Args:
        tune_status: trial_id -> {"status": "error" | "terminated", "error": str} as Ray Tune saw it
            (``tune_ray``); a trial Tune terminated while its trial.json still says running was stopped
            by ASHA.
    """
    tune_status = tune_status or {}
    out = []
    if not paths.trials.is_dir():
        return out
    for d in sorted(paths.trials.iterdir()):
        f = d / TRIAL_FILE
        if f.is_file():
            t = read_json(f)
        elif d.name in tune_status:     # failed before it could write trial.json
            t = {"trial_id": d.name, "status": "running", "params": tune_status[d.name].get("params") or {},
                 "run_dir": str(d), "started": tune_status[d.name].get("started", "")}
        else:
            continue
        curve = read_curve(d)
        status, err = t["status"], t.get("error")
        ts = tune_status.get(t["trial_id"], {})
        if status != "completed" and ts.get("status") == "terminated":
            # Tune stopped it (ASHA): removing the trial's placement group can kill its Train controller
            # first, so the trial itself may have recorded that as an error
            status, err = "stopped (ASHA)", None
        elif status == "running" and ts.get("status") == "error":
            status, err = "error", ts.get("error")
        metric = t.get("metric") if status == "completed" else (curve[-1] if curve else None)
        epochs = t.get("epochs") if status == "completed" else (len(curve) or None)
        built = [s for s, how in (t.get("stages") or {}).items() if how == "built"]
        out.append(TrialRecord(trial_id=t["trial_id"], status=status, params=t.get("params") or {}, metric=metric,
                               epochs=epochs, wall_s=t.get("wall_s"), run_dir=t.get("run_dir", str(d)), curve=curve,
                               error=err, built=built, is_base=t["trial_id"] == BASE_TRIAL,
                               values=t.get("values") or {}, started=t.get("started", "")))
    out.sort(key=lambda r: (not r.is_base, r.started, r.trial_id))
    return out


BASE_TRIAL = "base"


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    """The completed row (the base run included) with the highest final validation NDCG@10."""
    done = [r for r in records if r.status == "completed" and r.metric is not None]
    return max(done, key=lambda r: r.metric) if done else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_rows(records: list[TrialRecord], space: SearchSpace) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: trial, status, metric, epochs, wall, built stages, each parameter."""
    keys = [p.key for p in space.params]
    header = ["trial", "status", f"{METRIC} (valid, {space.valid_users} users)", "LLM epochs", "wall s",
              "stages built"] + keys      # a key a trial did not sample shows its value in that trial's config
    rows = []
    for r in records:
        status = r.status if r.status != "error" else "error: " + " ".join((r.error or "").split())[:80]
        rows.append([r.trial_id, status, "–" if r.metric is None else f"{r.metric:.4f}", _fmt(r.epochs),
                     _fmt(r.wall_s), ", ".join(r.built) or "–"]
                    + [_fmt(r.params[k] if k in r.params else r.values.get(k)) for k in keys])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def best_config_text(base_config: str | Path, base_overrides: list[str], space: SearchSpace, best: TrialRecord,
                     sweep_name: str) -> str:
    """``best.yaml``: the base config file with the best trial's overrides merged in, as a runnable config."""
    file_tree, over_tree, _ = _load_trees(base_config, list(base_overrides))
    ovs = space.overrides(best.params)
    tree = _merge(_merge(file_tree, over_tree), parse_overrides(ovs) if ovs else {})
    tree["name"] = f"{sweep_name}-best"
    head = [f"# Best config of sweep '{sweep_name}' ({space.path}): trial {best.trial_id},",
            f"# validation NDCG@10 = {best.metric:.4f} on {space.valid_users} seeded validation users (not test).",
            f"# = {base_config} + " + (" ".join(list(base_overrides) + ovs) or "(no overrides)"),
            f"# Train it and evaluate on test:  ttds-ray train --config <this file> --reuse-from {best.run_dir}"]
    return "\n".join(head) + "\n" + dump_yaml(tree)


def write_results(paths: SweepPaths, records: list[TrialRecord], space: SearchSpace, base_config: str | Path,
                  base_overrides: list[str], sweep_name: str) -> TrialRecord | None:
    """Write ``results.csv``, ``results.md``, ``objective.png``, and (when a trial completed) ``best.yaml``,
    ``best.json`` and the ``best_run`` link to the best trial's run directory. Returns the best row."""
    header, rows = results_rows(records, space)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(paths.root / "results.csv", buf.getvalue().encode())
    best = best_record(records)
    base = next((r for r in records if r.is_base and r.status == "completed"), None)
    n_done = sum(r.status == "completed" for r in records if not r.is_base)
    summary = [f"# Sweep {sweep_name}", "", f"Space: `{space.path}`; base config: `{base_config}`"
               + (f" + `{' '.join(base_overrides)}`" if base_overrides else "") + ".",
               f"Objective: {METRIC} on {space.valid_users} seeded validation users (never the test split), "
               f"maximised by OptunaSearch (TPE, seed {space.seed}) with ASHA early stopping. "
               f"{n_done} of {sum(not r.is_base for r in records)} trials completed.", ""]
    if best is not None:
        summary.append(f"Best: trial `{best.trial_id}`, {METRIC} = {best.metric:.4f}"
                       + (f" (base config: {base.metric:.4f})" if base is not None else "")
                       + f"; run dir `{best.run_dir}`; config `best.yaml`.")
        summary.append("")
    atomic_write_bytes(paths.root / "results.md", ("\n".join(summary) + markdown_table(header, rows) + "\n").encode())
    plot_sweep(records, space, paths.root / "objective.png")
    if best is not None:
        atomic_write_bytes(paths.root / "best.yaml",
                           best_config_text(base_config, base_overrides, space, best, sweep_name).encode())
        write_json(paths.root / "best.json", {"trial_id": best.trial_id, METRIC: best.metric, "params": best.params,
                                              "overrides": space.overrides(best.params), "run_dir": best.run_dir,
                                              "base_metric": base.metric if base is not None else None})
        link = paths.root / "best_run"
        tmp = paths.root / f".best_run.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(best.run_dir, paths.root), tmp)
        os.replace(tmp, link)
    return best


def plot_sweep(records: list[TrialRecord], space: SearchSpace, path: Path) -> None:
    """``objective.png``: the objective over trials (with the running best), the per-epoch validation curves,
    and the objective against every parameter (log axis for log ranges, categories for choices)."""
    from .plots import _plt, _save

    plt = _plt()
    trials = [r for r in records if not r.is_base]
    base = next((r for r in records if r.is_base and r.metric is not None), None)
    params = list(space.params)
    n = 2 + len(params)
    cols = min(3, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4.2 * cols, 3.2 * -(-n // cols)), dpi=100, squeeze=False)
    axes = axes.ravel()
    style = {"completed": dict(marker="o", color="C0"), "stopped (ASHA)": dict(marker="x", color="C1")}

    def mark(r):
        return style.get(r.status, dict(marker="v", color="C3"))
    ax = axes[0]
    best_so_far, run_best = [], -math.inf
    for i, r in enumerate(trials):
        y = r.metric if r.metric is not None else 0.0
        ax.scatter([i], [y], **mark(r), label=r.status if r.status not in [t.status for t in trials[:i]] else None)
        if r.status == "completed" and r.metric is not None:
            run_best = max(run_best, r.metric)
        best_so_far.append(run_best if run_best > -math.inf else math.nan)
    ax.plot(range(len(trials)), best_so_far, color="C2", lw=1.2, label="best completed so far")
    if base is not None:
        ax.axhline(base.metric, ls="--", color="gray", lw=0.9, label="base config")
    ax.set(title="objective over trials", xlabel="trial", ylabel=f"{METRIC} (valid)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in trials + ([base] if base else []):
        xs, ys = list(range(1, len(r.curve) + 1)), list(r.curve)
        if r.status == "completed" and r.metric is not None:      # the final metric belongs to the last epoch
            xs.append(max(r.epochs or 0, len(xs) + 1))               # (a reused LLM stage has no curve)
            ys.append(r.metric)
        if ys:
            ax.plot(xs, ys, marker=".", lw=0.8, alpha=0.8, color="gray" if r.is_base else None,
                    ls="--" if r.is_base else "-")
    ax.set(title="validation per LLM epoch", xlabel="epoch", ylabel=METRIC)
    for ax, p in zip(axes[2:], params):
        pts = [(r.params.get(p.key), r) for r in trials if r.params.get(p.key) is not None]
        if p.kind == "choice" or any(isinstance(v, (str, bool)) for v, _ in pts):
            cats = [json.dumps(c) for c in p.values] if p.kind == "choice" else sorted({json.dumps(v) for v, _ in pts})
            xs = [cats.index(json.dumps(v)) if json.dumps(v) in cats else -1 for v, _ in pts]
            ax.set_xticks(range(len(cats)), [c.strip('"') for c in cats], fontsize=7)
        else:
            if p.kind == "loguniform" or p.log:       # an 'otherwise: 0' (switched off) has no place on a log axis
                pts = [(v, r) for v, r in pts if v > 0]
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            xs = [v for v, _ in pts]
        for x, (_, r) in zip(xs, pts):
            ax.scatter([x], [r.metric if r.metric is not None else 0.0], **mark(r))
        ax.set(title=p.key + (" (switch)" if p.switch else ""), ylabel=METRIC)
    for ax in axes[n:]:
        ax.axis("off")
    _save(fig, path)
