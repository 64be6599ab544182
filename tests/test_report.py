"""A real 2-algorithm x 2-seed digits sweep (W&B offline): `python -m src.report` gives one row
per group with the means of its CSVs, valid PNG plots, and lists broken job folders instead of
failing; every job's W&B run carries the sweep's group, the algorithm as job type, the tags, the
resolved config, the final/best metrics and the per-client table."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import pytest
from PIL import Image

from src.report import main as report_main
from tests.conftest import run_cli
from tests.wandb_records import read_run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    done = run_cli(
        "-m",
        "experiment=quickstart",
        "logger=wandb",
        "logger.mode=offline",
        "fl.rounds=2",
        "fl.eval_every=1",
        "fl.local_epochs=1",
        "model.depth=1",  # a one-block ViT: the report, not the learning, is under test
        "model.embed_dim=32",
        "model.num_heads=2",
        "trainer.enable_progress_bar=false",
        "alg=fedavg,fedlora",
        "seed=0,1",
        f"hydra.sweep.dir={folder}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def _final(job, key: str) -> float:
    with (job / "metrics.csv").open() as f:
        return float(list(csv.DictReader(f))[-1][key])


def test_report_has_one_row_per_group_with_the_means_of_its_runs(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    broken = copy / "9_broken"  # a job folder whose metrics.csv is garbage
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "overrides.yaml").write_text("- alg=fedavg\n")
    (broken / "metrics.csv").write_text("round,val/global_acc\n1,not-a-number\n")
    failed = copy / "8_failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    (running,) = [j for j in copy.iterdir() if j.name.startswith("3_")]  # fedlora, seed 1
    (running / "summary.json").unlink()  # a run still in progress has no summary yet

    report_main([str(copy)])
    report = (copy / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(rows) == 2  # fedavg and fedlora, each over seeds 0 and 1
    for alg in ("fedavg", "fedlora"):
        (row,) = [r for r in rows if f"alg={alg}" in r]
        assert "seed" not in row.split("|")[1]
        jobs = [j for j in copy.iterdir() if j.is_dir() and f"alg={alg}" in j.name]
        assert len(jobs) == 2
        values = [_final(j, "val/global_acc") for j in jobs]
        expected = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        assert row.split("|")[3].strip() == expected  # final global_acc: mean ± std over seeds
        assert row.split("|")[2].strip() == ("2 (1 running)" if alg == "fedlora" else "2")
    assert "9_broken" in report and "ValueError" in report  # skipped with a note
    assert "8_failed" in report and "boom" in report
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "per_client_accuracy.png"):
        with Image.open(copy / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    assert "report written to" in capsys.readouterr().out


def test_wandb_runs_of_a_sweep_share_the_group_and_carry_tags_config_and_summary(sweep):
    jobs = sorted(j for j in sweep.iterdir() if j.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        run = read_run(run_file)
        summary = json.loads((job / "summary.json").read_text())
        alg, seed = summary["config"]["alg"]["name"], summary["config"]["seed"]
        # the sweep's name: its preset, the keys it varies, its folder
        assert run["run"]["group"] == f"quickstart alg,seed {sweep.name}"
        assert run["run"]["job_type"] == alg
        assert set(run["run"]["tags"]) >= {alg, "vit_small32", "digits", "dirichlet", "mean"}
        assert f"seed={seed}" in run["run"]["tags"]
        assert run["config"]["partitioner"]["alpha"] == summary["config"]["partitioner"]["alpha"]
        final = run["summary"]
        assert final["final/val/global_acc"] == summary["final"]["val/global_acc"]
        assert final["best/val/personal_acc"] == summary["best"]["val/personal_acc"]["value"]
        assert final["total_bytes"] == summary["total_bytes"]
        assert any(key.startswith("clients") for key in final)  # the per-client table
