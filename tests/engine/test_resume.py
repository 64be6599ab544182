"""Checkpoints hold the whole federation: a run killed with SIGKILL and resumed writes the same
metrics.csv as a run that was never interrupted; same config + seed gives the same metrics.csv
in two processes; a checkpoint of another experiment is refused."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.errors import ConfigError
from src.run import train
from tests.conftest import ROOT, compose_config

RUN = [
    "resume=auto",
    "experiment=quickstart",
    "logger=none",
    "fl.rounds=4",
    "fl.eval_every=1",
    "fl.local_epochs=1",
    "fl.num_clients=6",
    "fl.clients_per_round=3",
    "trainer.threads=2",  # auto counts idle cores at start: under load two runs could differ
]


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "src.run", *RUN, *overrides, f"hydra.run.dir={out}"]
    command.append("trainer.enable_progress_bar=false")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _kill_after_first_checkpoint(out: Path, *overrides: str) -> int:
    """Start the run in a subprocess, SIGKILL it as soon as a checkpoint exists; rounds saved."""
    process = _start(out, *overrides)
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return saved["fedsweep"]["rounds_done"]


def _run_in_process(out: Path, *overrides: str) -> dict:
    paths = [f"paths.output_dir={out}", f"paths.data_dir={out.parent / 'data'}"]
    return train(compose_config([*RUN, *overrides, *paths]))


def _metrics(out: Path) -> list[dict]:
    """metrics.csv without its wall-clock columns (the only ones allowed to differ)."""
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.parametrize(
    "run",
    [
        # make test kills and resumes a run with private states on disk instead
        # (tests/engine/test_client_state.py), and resumes in-process (test_checkpoint_size.py)
        pytest.param("alg=fedavg", marks=pytest.mark.slow),
        pytest.param("alg=fedsa-flora", marks=pytest.mark.slow),
        pytest.param("alg=fedlora", marks=pytest.mark.slow),
        # the merged base weights are in the server state, not in the checkpoint's model copy
        # (tests/engine/test_checkpoint_size.py resumes it in-process in make test)
        pytest.param("alg=fedlora aggregator=stack", marks=pytest.mark.slow),
        pytest.param("alg=perfed", marks=pytest.mark.slow),
    ],
)
def test_run_killed_after_a_checkpoint_resumes_to_identical_metrics(run, tmp_path):
    killed = tmp_path / "killed"
    rounds_saved = _kill_after_first_checkpoint(killed, *run.split())
    assert 1 <= rounds_saved < 4  # killed mid-run
    resumed = _run_in_process(killed, *run.split())  # resume=auto finds checkpoints/last.ckpt
    uninterrupted = _run_in_process(tmp_path / "whole", *run.split())

    rows = _metrics(killed)
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]  # no round twice
    assert rows == _metrics(tmp_path / "whole")
    assert resumed["total_bytes"] == uninterrupted["total_bytes"]
    assert resumed["per_client"] == uninterrupted["per_client"]
    # a round the killed run wrote after its checkpoint is cut before it runs again
    assert (killed / "clients.csv").read_text() == (tmp_path / "whole" / "clients.csv").read_text()


@pytest.mark.slow  # the fedsa-flora resume case compares a subprocess with an in-process run too
def test_same_config_and_seed_give_identical_metrics_in_two_processes(tmp_path):
    process = _start(tmp_path / "subprocess", "alg=fedsa-flora")
    assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    _run_in_process(tmp_path / "here", "alg=fedsa-flora")
    assert _metrics(tmp_path / "subprocess") == _metrics(tmp_path / "here")


def test_resume_refuses_a_checkpoint_of_another_experiment_and_resume_never_starts_over(
    tmp_path,
):
    out = tmp_path / "run"
    _run_in_process(out, "fl.rounds=1")
    checkpoint = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"seed=1 \(checkpoint: 0\)"):
        _run_in_process(tmp_path / "other", "fl.rounds=1", "seed=1", f"resume={checkpoint}")
    # more rounds is a continuation, not another experiment
    longer = _run_in_process(tmp_path / "longer", "fl.rounds=2", f"resume={checkpoint}")
    assert longer["rounds_done"] == 2
    assert [row["round"] for row in _metrics(tmp_path / "longer")] == ["1", "2"]
    assert _metrics(tmp_path / "longer")[0] == _metrics(out)[0]
    fresh = _run_in_process(out, "fl.rounds=1", "seed=1", "resume=never")
    assert fresh["rounds_done"] == 1
