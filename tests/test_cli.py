"""The `ttds-ray` CLI: help texts, report tables, clear refusals."""
import json

from typer.testing import CliRunner

from ttds_ray.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("train", "data", "tokenizer", "metrics"):
        assert cmd in out
    assert "--config" in runner.invoke(app, ["train", "--help"]).output


def test_tokenizer_report_prints_each_tower(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    stats = {"item": {"n_entities": 10, "codes_used": [4, 3], "entropy": [0.9, 0.8], "collisions_greedy": 2,
                      "collisions_sinkhorn": 0, "collisions_final": 0, "rec_s_fused": 0.5, "rec_s_quant": 0.6,
                      "final_terms": {"align_inst": 1.5}},
             "user": {"n_entities": 5, "codes_used": [2, 2], "entropy": [0.5, 0.4], "shared_share": 0.4}}
    (tmp_path / "tokenizer" / "tokenizer_stats.json").write_text(json.dumps(stats))
    res = runner.invoke(app, ["tokenizer", "report", str(tmp_path)])
    assert res.exit_code == 0
    assert "| codes used per level | 4 / 3 | 2 / 2 |" in res.output
    assert "| collisions, final | 0 | - |" in res.output
    assert "| share of users with a shared ID | - | 0.4 |" in res.output
    assert "| final align_inst | 1.5 | - |" in res.output


def test_reports_on_an_unfinished_run_fail_clearly(tmp_path):
    for args in (["tokenizer", "report", str(tmp_path)], ["metrics", str(tmp_path)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "has not finished" in res.output


def test_unknown_dataset_is_refused():
    res = runner.invoke(app, ["data", "fetch", "movielens-1b"])
    assert res.exit_code == 2 and "movielens-100k" in res.output


def test_config_show_names_each_values_source(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: /nowhere, kcore: 3}\ntokenizer: {item: {n_levels: 4}}\n")
    res = runner.invoke(app, ["config", "show", str(cfg), "tokenizer.item.latent_dim=32"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines() if line.strip()}
    assert rows["data.kcore"][1:] == ["3", "file"]
    assert rows["tokenizer.item.latent_dim"][1:] == ["32", "override"]
    assert rows["tokenizer.item.n_levels"][1:] == ["4", "file"]
    assert rows["tokenizer.item.codebook_size"][1:] == ["256", "default"]   # sibling kept, not reset
    bad = runner.invoke(app, ["config", "show", str(cfg), "data.kcore='5'"])
    assert bad.exit_code == 2 and "data.kcore" in bad.output
