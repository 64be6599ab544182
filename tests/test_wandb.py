"""logger=wandb offline writes a real run file: summary, group, tags, resolved config."""

import csv
import json
from pathlib import Path

from src.loggers import wandb_logged_in
from src.run import train
from tests.wandb_records import read_run


def test_offline_wandb_run_has_val_global_acc_in_its_summary(make_digits_config, tmp_path):
    cfg = make_digits_config("logger=wandb", "logger.mode=offline", "fl.rounds=2")
    summary = train(cfg)
    run_files = list(Path(cfg.paths.output_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    run = read_run(run_files[0])
    assert run["summary"]["val/global_acc"] == summary["final"]["val/global_acc"]
    # one history row per round, charted against `round` (1-based, as metrics.csv), and no
    # other row (the per-client table is in the summary)
    assert [row["round"] for row in run["history"]] == [1, 2]
    assert [row["trainer/global_step"] for row in run["history"]] == [1, 2]
    assert run["axes"]["*"] == "round"
    assert run["config"]["alg"]["name"] == "fedavg"  # the resolved config is the run config
    assert any(key.startswith("clients") for key in run["summary"])  # the per-client table
    # clients.csv as a table: which clients were sampled (their ids) in which round
    table = run["summary"]["client_rounds"]
    saved = json.loads((run_files[0].parent / "files" / table["path"]).read_text())
    with (Path(cfg.paths.output_dir) / "clients.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert saved["columns"] == list(rows[0])
    sampled = [(r[0], r[1]) for r in saved["data"] if r[2] == 1]  # round, client, sampled
    assert sampled == [(int(r["round"]), int(r["client"])) for r in rows if r["sampled"] == "1"]
    assert len(sampled) == 2 * cfg.fl.clients_per_round


def test_mode_defaults_to_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert wandb_logged_in() is False
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in() is True


def test_a_resumed_run_continues_its_wandb_run_without_repeating_rounds(make_digits_config):
    first = make_digits_config("logger=wandb", "logger.mode=offline", "fl.rounds=1")
    train(first)
    train(make_digits_config("logger=wandb", "logger.mode=offline", "fl.rounds=2", "resume=auto"))
    run_files = sorted(Path(first.paths.output_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    assert len({path.name for path in run_files}) == 1  # run-<id>.wandb: the same W&B run id
    steps = [
        [row["round"] for row in read_run(path)["history"] if "train/loss" in row]
        for path in run_files
    ]
    assert steps == [[1], [2]]


def test_logger_csv_writes_one_metrics_file_counted_in_rounds(make_digits_config):
    cfg = make_digits_config("logger=csv", "fl.rounds=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("metrics*.csv")) == [
        "metrics.csv"
    ]
    with (run / "metrics.csv").open() as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["1", "2"]
