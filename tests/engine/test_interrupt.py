"""A pre-empted run (SIGTERM, as SLURM sends) stops at the next client boundary with a non-zero
exit code, one line, a summary with "status": "interrupted" and its checkpoint; the same command
then resumes it to the end."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ONE_BLOCK_VIT, ROOT


# trainer.processes=2: the signal reaches rank 0, which passes it to the forked rank; both stop
# at the same round boundary
@pytest.mark.parametrize("layout", [[], ["trainer.processes=2"]], ids=["one", "forked"])
def test_sigterm_writes_an_interrupted_summary_and_the_run_resumes(layout, tmp_path):
    command = [
        sys.executable,
        "-m",
        "src.run",
        "experiment=quickstart",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "fl.rounds=12",  # a one-block ViT: 0.2-0.5 s a round, so the stop lands mid-run
        "fl.eval_every=12",
        "fl.local_epochs=1",
        *ONE_BLOCK_VIT,
        *layout,
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # wait for the first completed round, then pre-empt
        lines.append(line)
        if "round 1/12" in line:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 143, "".join(lines)[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert 1 <= summary["rounds_done"] < 12
    (message,) = [line for line in lines if "interrupted by SIGTERM" in line]
    assert "checkpoints/last.ckpt holds" in message
    assert "Traceback" not in "".join(lines)

    resumed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_done"] == 12
