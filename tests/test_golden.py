"""Behaviour unchanged: every golden run (`tests/golden.py`) gives the metrics.csv recorded in
`tests/golden/`, byte for byte (slow: ~3 min). On another machine than the recording one the
reference is recorded afresh from the source commit, in a git worktree, so the check stays exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.golden import differing, machine

GOLDEN = Path(__file__).parent / "golden"
ROOT = GOLDEN.parents[1]


def _reference(tmp_path: Path) -> Path:
    if (GOLDEN / "MACHINE").read_text() == machine():
        return GOLDEN
    source = (GOLDEN / "SOURCE").read_text().split()[0]
    tree, files = tmp_path / "source", tmp_path / "reference"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), source], check=True
    )
    try:
        subprocess.run(
            [sys.executable, "-m", "tests.golden", "record", str(files)], cwd=tree, check=True
        )
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
        )
    return files


@pytest.mark.slow
def test_every_golden_run_gives_the_recorded_metrics(tmp_path):
    assert differing(_reference(tmp_path), tmp_path / "now") == []
