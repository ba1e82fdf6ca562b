"""Config loading: strict keys, typed values, dotted overrides, shipped YAML files validate."""
import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from ttds_ray.config import (ConfigError, TTDSConfig, config_from_dict, config_sources, format_config_sources,
                             load_config, parse_overrides)

REPO = Path(__file__).resolve().parents[1]


#: stage_hash("tokenizer"/"llm"/"eval") of the config "data: {path: x}" as commit f0db1d2 computed them (before the
#: keys tokenizer.cf_erase_popularity and eval.popularity_correction existed).
GOLDEN_DEFAULT_HASHES = ["472e7c1cc3ce", "a8210d82610b", "6ba0671db0da"]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = _write(tmp_path, "data: {path: x}\ntokenizer:\n  item: {codebok_size: 8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "tokenizer.item.codebok_size" in str(e.value)
    assert "tokenizer.item.codebook_size" in str(e.value)
    assert str(p) in str(e.value)


def test_all_errors_are_reported_together(tmp_path):
    p = _write(tmp_path, "data: {path: x, kcore: -1}\nllm: {lr: abc}\nbogus: 1\n")
    msg = str(pytest.raises(ConfigError, load_config, p).value)
    assert "data.kcore" in msg and "llm.lr" in msg and "bogus" in msg


def test_overrides_are_typed_and_dotted(tmp_path):
    p = _write(tmp_path, "data: {path: x}\n")
    cfg = load_config(p, ["llm.lr=1e-4", "eval.max_users=7", "tokenizer.item.n_levels=2", "eval.ks=[1,3]"])
    assert cfg.llm.lr == 1e-4 and cfg.eval.max_users == 7 and cfg.tokenizer.item.n_levels == 2
    assert cfg.eval.ks == (1, 3)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["llm.lr"])
    with pytest.raises(ConfigError, match="llm.lrr"):
        load_config(p, ["llm.lrr=1"])


def test_missing_file_and_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(_write(tmp_path, "seed: 1\n"))


def test_tiny_backbone_refuses_lora(tmp_path):
    with pytest.raises(ConfigError, match="finetune=full"):
        load_config(_write(tmp_path, "data: {path: x}\nllm: {backbone: tiny, finetune: lora}\n"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.data.path


def test_task_weights_and_dynamic_settings_are_validated(tmp_path):
    p = _write(tmp_path, "data: {path: x}\ntasks: {window_stride: 30, weights: {co_interaction: -1, user2prof: 1}}\n"
                         "dynamic: {final_freeze: 1.0}\n")
    msg = str(pytest.raises(ConfigError, load_config, p).value)
    assert "tasks.weights.co_interaction" in msg and "tasks.weights.user2profile" in msg  # suggestion
    assert "dynamic.final_freeze" in msg
    msg = str(pytest.raises(ConfigError, load_config, _write(tmp_path, "data: {path: x}\ntasks: {window_stride: 30}\n")).value)
    assert "window_stride" in msg
    off = [f"tasks.weights.{t}=0" for t in ("seqrec", "item2id", "id2item", "title_history", "user2items",
                                             "co_interaction", "neighbour_users", "user2profile")]
    assert "no tuning task is on" in str(pytest.raises(ConfigError, load_config, _write(tmp_path, "data: {path: x}\n"),
                                                       off).value)
    for bad in ("tasks.weights.seqrec=.inf", "dynamic.tokenizer_lr=.inf", "dynamic.rounds=1000000",
                "embeddings.text_encoder=llm embeddings.llm_backbone=tiny"):
        with pytest.raises(ConfigError):
            load_config(_write(tmp_path, "data: {path: x}\n"), bad.split())
    cfg = load_config(_write(tmp_path, "data: {path: x}\n"), ["dynamic.static_index=true", "tasks.weights.item2id=0"])
    assert cfg.dynamic.is_static and "item2id" not in cfg.tasks.weights.active()


def test_partial_nested_section_keeps_the_section_default():
    cfg = load_config(REPO / "configs" / "beauty.yaml", ["tokenizer.item.latent_dim=32"])
    item = cfg.tokenizer.item
    assert (item.latent_dim, item.n_levels, item.codebook_size) == (32, 4, 256)  # not TowerConfig()'s 3 levels
    assert (cfg.tokenizer.user.n_levels, cfg.tokenizer.user.codebook_size) == (2, 64)
    assert config_from_dict(cfg.to_dict()) == cfg                                # the Ray layer's round trip


@pytest.mark.parametrize("override,key", [("data.kcore='5'", "data.kcore"), ("seed=1.0", "seed"),
                                          ("cf.epochs=true", "cf.epochs"), ("ray.use_gpu=yes", "ray.use_gpu"),
                                          ("ray.use_gpu=1", "ray.use_gpu"), ("eval.ks=[1,'5']", "eval.ks.1")])
def test_types_are_strict(tmp_path, override, key):
    p = _write(tmp_path, "data: {path: x}\n")
    msg = str(pytest.raises(ConfigError, load_config, p, [override]).value)
    assert f"bad value for '{key}'" in msg


def test_yaml_scalars_bools_only_true_false_and_exponent_floats(tmp_path):
    p = _write(tmp_path, "data: {path: x}\nray: {use_gpu: TRUE, cpus_per_worker: 2}\nllm: {lr: 1e-4}\n"
                         "eval: {ks: [1, 5]}\n")
    cfg = load_config(p, ["dynamic.tokenizer_lr=2e-3", "tasks.use_user_sid=False"])
    assert cfg.ray.use_gpu is True and cfg.ray.cpus_per_worker == 2.0 and cfg.llm.lr == 1e-4
    assert cfg.dynamic.tokenizer_lr == 2e-3 and cfg.tasks.use_user_sid is False and cfg.eval.ks == (1, 5)
    assert parse_overrides(["name=yes", "data.name=off"]) == {"name": "yes", "data": {"name": "off"}}
    msg = str(pytest.raises(ConfigError, load_config, _write(tmp_path, "data: {path: x}\nray: {use_gpu: yes}\n")).value)
    assert "ray.use_gpu" in msg


def test_eval_ks_within_beam_width(tmp_path):
    p = _write(tmp_path, "data: {path: x}\n")
    for bad in (["eval.ks=[1,30]"], ["eval.ks=[0,5]"], ["eval.n_beams=5", "eval.ks=[1,10]"]):
        msg = str(pytest.raises(ConfigError, load_config, p, bad).value)
        assert "eval.ks" in msg and "eval.n_beams" in msg
    assert "eval.ks is empty" in str(pytest.raises(ConfigError, load_config, p, ["eval.ks=[]"]).value)
    assert load_config(p, ["eval.n_beams=10", "eval.ks=[1,10]"]).eval.ks == (1, 10)


def _fields(model, prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, prefix + name + ".")


def test_every_field_has_a_description():
    fields = dict(_fields(TTDSConfig))
    assert "tokenizer.item.n_levels" in fields and "tasks.weights.seqrec" in fields
    missing = [k for k, f in fields.items() if not (f.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


def test_config_sources(tmp_path):
    p = _write(tmp_path, "data: {path: x, kcore: 3}\ntokenizer:\n  item: {latent_dim: 16}\n")
    rows = config_sources(p, ["llm.lr=1e-4", "tokenizer.item.n_levels=2"])
    by_key = {k: (v, src) for k, v, src in rows}
    assert by_key["data.kcore"] == (3, "file")
    assert by_key["tokenizer.item.latent_dim"] == (16, "file")
    assert by_key["llm.lr"] == (1e-4, "override")
    assert by_key["tokenizer.item.n_levels"] == (2, "override")
    assert by_key["tokenizer.item.codebook_size"] == (256, "default")
    assert by_key["eval.ks"] == ((1, 5, 10), "default")
    assert by_key["seed"] == (0, "default")
    keys = [k for k, _, _ in rows]
    assert keys[:3] == ["name", "output_dir", "seed"] and keys.index("data.path") < keys.index("ray.use_gpu")
    assert len(keys) == len(set(keys)) and "tokenizer.item" not in keys          # leaves only
    text = format_config_sources(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["key", "value", "source"] and len(lines) == len(rows) + 1
    row = next(line for line in lines if line.startswith("llm.lr "))
    assert row.split() == ["llm.lr", "0.0001", "override"]
    assert next(line for line in lines if line.startswith("eval.ks ")).split()[-1] == "default"
    col = lines[0].index("value")
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines)  # aligned value column


@pytest.mark.parametrize("name", ["488e6941", "1e5", "yes", "007", "true_name"])
def test_a_saved_config_reads_back_the_same_strings(tmp_path, name):
    """save_config writes with the loader's own scalar rules: a hex trial id like 488e6941 (a float, inf, to the
    loader) is quoted and reads back as the same string (a sweep trial once failed on it)."""
    from ttds_ray.artifacts import Files, RunDir
    from ttds_ray.config import TTDSConfig, load_config
    from ttds_ray.pipeline import save_config

    cfg = TTDSConfig(name=name, output_dir=str(tmp_path), data={"path": "x"})
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    save_config(cfg, run)
    assert load_config(run.root / Files.CONFIG).name == name


def test_sticky_reindex_keys_need_reindex_sticky_and_fresh_or_title_keeps_the_old_stage_hash(tmp_path):
    p = _write(tmp_path, "data: {path: x}\n")
    with pytest.raises(ConfigError, match="dynamic.switch_margin"):
        load_config(p, ["dynamic.switch_margin=0.1"])
    with pytest.raises(ConfigError, match="dynamic.max_changed"):
        load_config(p, ["dynamic.max_changed=0.5"])
    for key in ("dynamic.accept_contexts=4", "dynamic.accept_margin=0.1"):      # the likelihood gate's keys
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(p, [key])
    base = load_config(p)
    sticky = load_config(p, ["dynamic.reindex=sticky", "dynamic.switch_margin=0.1"])
    assert sticky.dynamic.switch_margin == 0.1
    assert sticky.stage_hash("llm") != base.stage_hash("llm") and sticky.stage_hash("tokenizer") == base.stage_hash("tokenizer")
    d = base.to_dict()
    d["dynamic"] = {k: v for k, v in d["dynamic"].items() if k not in ("reindex", "switch_margin", "max_changed",
                                                                      "accept", "accept_contexts", "accept_margin",
                                                                      "rewarm_steps", "keep_levels")}
    d["llm"] = {k: v for k, v in d["llm"].items() if k not in ("sid_init", "pack", "distill_cf", "distill_temperature",
                                                              "align_psa", "align_tau", "sid_tie")}
    d["tokenizer"] = {k: v for k, v in d["tokenizer"].items() if k != "cf_erase_popularity"}
    d["tasks"] = {k: v for k, v in d["tasks"].items() if k != "seqrec_user_ids"}
    keys = ["seed", "data", "embeddings", "cf", "tokenizer", "llm", "tasks", "dynamic"]
    if d["embeddings"]["text_encoder"] != "llm":
        d["embeddings"] = {k: v for k, v in d["embeddings"].items() if not k.startswith("llm_")}
    legacy = hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]
    assert base.stage_hash("llm") == legacy                        # runs made before the new keys are still reused
    cb = load_config(p, ["llm.sid_init=codebook"])
    assert cb.stage_hash("llm") != base.stage_hash("llm") and cb.stage_hash("tokenizer") == base.stage_hash("tokenizer")
    assert load_config(p, ["llm.pack=true"]).stage_hash("llm") == base.stage_hash("llm")   # same maths, same stage
    gated = load_config(p, ["dynamic.accept=llm", "dynamic.accept_margin=0.1"])
    assert gated.stage_hash("llm") != base.stage_hash("llm") and gated.stage_hash("tokenizer") == base.stage_hash("tokenizer")
    erase = load_config(p, ["tokenizer.cf_erase_popularity=true"])
    assert erase.stage_hash("tokenizer") != base.stage_hash("tokenizer") and erase.stage_hash("cf") == base.stage_hash("cf")
    corrected = load_config(p, ["eval.popularity_correction=0.2"])
    assert corrected.stage_hash("eval") != base.stage_hash("eval") and corrected.stage_hash("llm") == base.stage_hash("llm")
    # Pinned: a new config key must leave the hashes of configs that do not use it unchanged, or every existing
    # run directory retrains on its next use (drop the key from stage_hash while it has its default value).
    assert [base.stage_hash(s) for s in ("tokenizer", "llm", "eval")] == GOLDEN_DEFAULT_HASHES


@pytest.mark.parametrize("yaml_text,on,stage,upstream,off,bad", [
    ("data: {path: x}\nllm: {loss_vocab: sid}\n", "llm.distill_cf=0.5", "llm", "tokenizer", "llm.distill_cf=0",
     [(["llm.distill_cf=0.5", "llm.loss_vocab=full"], "llm.loss_vocab"),
      (["llm.distill_temperature=2"], "llm.distill_temperature"), (["llm.distill_cf=1.0"], "llm.distill_cf"),
      (["llm.distill_cf=0.5", "cf.max_len=10"], "cf.max_len")]),
    ("data: {path: x}\n", "eval.user_ids=history", "eval", "llm", "eval.user_ids=training",
     [(["eval.user_ids=history", "tasks.use_user_sid=false"], "eval.user_ids"), (["eval.user_ids=latest"], "eval.user_ids")]),
    ("data: {path: x}\n", "tasks.seqrec_user_ids=prefix", "llm", "tokenizer", "tasks.seqrec_user_ids=sequence",
     [(["tasks.seqrec_user_ids=prefix", "tasks.use_user_sid=false"], "tasks.seqrec_user_ids"),
      (["tasks.seqrec_user_ids=window"], "tasks.seqrec_user_ids")]),
    ("data: {path: x}\nllm: {loss_vocab: sid}\n", "llm.align_psa=0.1", "llm", "tokenizer", "llm.align_psa=0",
     [(["llm.align_psa=0.1", "llm.loss_vocab=full"], "llm.loss_vocab"), (["llm.align_tau=0.2"], "llm.align_tau"),
      (["llm.align_psa=-1"], "llm.align_psa")]),
    ("data: {path: x}\nllm: {sid_init: codebook}\n", "llm.sid_tie=true", "llm", "tokenizer", "llm.sid_tie=false",
     [(["llm.sid_tie=true", "llm.sid_init=title"], "llm.sid_tie"), (["llm.sid_tie=maybe"], "llm.sid_tie")]),
    ("data: {path: x}\ndynamic: {reindex: sticky}\n", "dynamic.keep_levels=1", "llm", "tokenizer",
     "dynamic.keep_levels=0",
     [(["dynamic.keep_levels=1", "dynamic.reindex=fresh"], "dynamic.keep_levels"),
      (["dynamic.keep_levels=4"], "dynamic.keep_levels"), (["dynamic.keep_levels=-1"], "dynamic.keep_levels")]),
    ("data: {path: x}\n", "dynamic.rewarm_steps=20", "llm", "tokenizer", "dynamic.rewarm_steps=0",
     [(["dynamic.rewarm_steps=-1"], "dynamic.rewarm_steps"), (["dynamic.rewarm_steps=1.5"], "dynamic.rewarm_steps")]),
])
def test_a_new_switch_changes_only_its_stages_hash_keeps_it_when_off_and_refuses_bad_combinations(
        tmp_path, yaml_text, on, stage, upstream, off, bad):
    """llm.distill_cf / llm.distill_temperature, eval.user_ids, tasks.seqrec_user_ids, dynamic.rewarm_steps and llm.align_psa: on, the switch retrains (re-evaluates) its own
    stage only; at its off value the hash is that of a config without the key; a wrong combination names the key."""
    p = _write(tmp_path, yaml_text)
    base = load_config(p)
    switched = load_config(p, [on])
    assert switched.stage_hash(stage) != base.stage_hash(stage)
    assert switched.stage_hash(upstream) == base.stage_hash(upstream)
    assert load_config(p, [off]).stage_hash(stage) == base.stage_hash(stage)
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(p, overrides)


def test_static_index_ablation_of_a_rewarming_config_is_allowed(tmp_path):
    """--static-index ablates any dynamic config: dynamic.rewarm_steps, like the gate's keys, simply has no round to
    follow on a static index."""
    p = _write(tmp_path, "data: {path: x}\ndynamic: {rewarm_steps: 20, accept: llm}\n")
    cfg = load_config(p, ["dynamic.static_index=true"])
    assert cfg.dynamic.is_static and cfg.dynamic.rewarm_steps == 20
