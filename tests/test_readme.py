"""The README's Usage block as a new user meets it: every command either runs offline as written
or says on its own line what it downloads. The offline ones are run here, shortened to one round
by shared overrides (fl.rounds=1, no logger, one process) into a temporary folder."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import ROOT

PREFIX = ".venv/bin/python -m src.run"
# what makes a command short; every other key stays as the README gives it
SHORT = {"fl.rounds": "1", "fl.eval_every": "1", "logger": "none", "trainer.processes": "1"}


def usage_commands() -> list[str]:
    """The `src.run` lines of the first bash block under '## Usage'."""
    usage = (ROOT / "README.md").read_text().split("\n## Usage", 1)[1]
    block = usage.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith(PREFIX)]


OFFLINE = [line for line in usage_commands() if "downloads" not in line.partition("#")[2]]


def test_the_usage_block_has_offline_commands_and_a_sweep():
    assert len(usage_commands()) >= 5
    assert any(" -m " in line for line in OFFLINE)  # the sweep runs offline too


def test_a_command_that_downloads_says_what_on_its_line():
    for line in usage_commands():
        command, _, comment = line.partition("#")
        if line not in OFFLINE:
            assert "downloads" in comment and any(ch.isdigit() for ch in comment), line


@pytest.mark.parametrize("line", OFFLINE, ids=[f"command{i + 1}" for i in range(len(OFFLINE))])
def test_an_offline_usage_command_runs(line, tmp_path, monkeypatch):
    args = [a for a in shlex.split(line.partition("#")[0])[len(PREFIX.split()) :]]
    args = [a for a in args if a.split("=", 1)[0] not in SHORT]
    args += [f"{key}={value}" for key, value in SHORT.items()]
    args += [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["src.run", *args])
    from src.run import main

    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as stop:
        assert stop.code in (0, None), f"exit code {stop.code}: {line}"
    summaries = sorted(tmp_path.rglob("summary.json"))
    jobs = 1
    if " -m " in line:  # a sweep: the product of its comma lists
        for arg in args:
            jobs *= len(arg.split("=", 1)[1].split(",")) if "," in arg else 1
    assert len(summaries) == jobs, line
    for path in summaries:
        assert json.loads(path.read_text())["status"] == "completed", path
