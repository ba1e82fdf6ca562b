"""Recommender API without Ray (issue 8 item 1); the behaviour on a trained run is tested in test_job_train.py."""
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_importing_the_recommender_leaves_ray_out():
    mods = _modules_after("from ttds_ray import Recommender; Recommender.from_run")
    assert "ttds_ray.recommender" in mods
    assert "ray" not in mods


def test_evaluation_and_cli_evaluate_import_no_ray():
    mods = _modules_after("import ttds_ray.evaluate, ttds_ray.cli; from ttds_ray.cli import evaluate")
    assert "ray" not in mods


def test_python_dash_m_works_like_the_command():
    out = subprocess.run([sys.executable, "-m", "ttds_ray", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout
