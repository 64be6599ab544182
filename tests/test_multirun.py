"""`python -m src.run -m ...` runs every job in its own folder; one failing job does not stop the others."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def _multirun(tmp_path, *overrides: str) -> list:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "src.run",
            "-m",
            "experiment=quickstart",
            "logger=none",
            "fl.rounds=1",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return sorted(p for p in tmp_path.iterdir() if p.is_dir())


def test_two_job_multirun_makes_two_complete_job_folders(tmp_path):
    jobs = _multirun(tmp_path, "alg=fedavg,fedlora")
    assert len(jobs) == 2
    for job, alg in zip(jobs, ["fedavg", "fedlora"], strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["config"]["alg"]["name"] == alg
        assert (job / "metrics.csv").is_file()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / ".hydra" / "config.yaml").is_file()


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    jobs = _multirun(tmp_path, "fl.clients_per_round=99,2")
    statuses = [json.loads((job / "summary.json").read_text())["status"] for job in jobs]
    assert statuses == ["failed", "completed"]
    failed = json.loads((jobs[0] / "summary.json").read_text())
    assert "fl.clients_per_round" in failed["error"]
