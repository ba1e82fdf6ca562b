"""Config loading: strict keys, typed values, dotted overrides, shipped YAML files validate."""
from pathlib import Path

import pytest

from ttds_ray.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


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
