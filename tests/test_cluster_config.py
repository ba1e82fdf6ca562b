"""cluster.yaml validates against Ray's launcher schema, offline (no cloud SDK needed)."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def validate_cluster_config(path: Path) -> dict:
    """Ray's own launcher validation (a private API, wrapped in this one place)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_is_valid():
    cfg = validate_cluster_config(REPO / "cluster.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_validation_rejects_a_bad_key(tmp_path):
    bad = yaml.safe_load((REPO / "cluster.yaml").read_text())
    bad["max_wokers"] = 4                                   # a typo: unknown keys are rejected
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception):
        validate_cluster_config(p)
