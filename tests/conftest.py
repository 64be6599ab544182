"""Shared fixtures: compose real configs from conf/, forced onto the CPU, outputs in tmp."""

from __future__ import annotations

# isort: off
import src  # noqa: F401  (before torch: it bounds OpenMP's spin-wait, src/threads.py)

# isort: on

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from src.aggregators import MeanAggregator

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Never reach the network from tests (W&B, HF hub).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

# Measuring the learning tests' margins (benchmarks/learning_margins.py): extra overrides for
# every composed config (e.g. "seed=1 trainer.threads=1") and a file that gets every evaluated
# round of every run, with the test that ran it. Unset in make test.
EXTRA_OVERRIDES = os.environ.get("FEDSWEEP_TEST_OVERRIDES", "").split()
MARGINS_FILE = os.environ.get("FEDSWEEP_MARGINS_FILE")
if MARGINS_FILE:
    import itertools
    import json

    from src.outputs import RoundRecorder

    _record, _runs = RoundRecorder.record, itertools.count()

    def _record_for_margins(self, round_done, metrics):
        _record(self, round_done, metrics)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        if not hasattr(self, "margins_run"):
            self.margins_run = next(_runs)
        row = {"test": test, "run": self.margins_run, "overrides": EXTRA_OVERRIDES, **self.rows[-1]}
        with open(MARGINS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")

    RoundRecorder.record = _record_for_margins


def compose_config(
    overrides: list[str] | None = None, tmp_path: Path | None = None, for_tests: bool = True
):
    """The project's config with `overrides`, outputs under tmp_path; `for_tests`: CPU, no logger,
    and `resume=never`, so that runs sharing tmp_path start afresh (resume tests ask for auto)."""
    GlobalHydra.instance().clear()
    base = (
        [
            "trainer=cpu",
            "trainer.processes=1",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "resume=never",
        ]
        if for_tests
        else []
    )
    if tmp_path is not None:
        base += [f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config", overrides=base + list(overrides or []) + EXTRA_OVERRIDES
        )


# Five iid clients, all sampled every round, two local epochs: the smallest federation in which
# the algorithms learn on digits; and a one-block ViT (about 10 k parameters), for fast runs.
FIVE_IID_CLIENTS = [
    "partitioner=iid",
    "fl.num_clients=5",
    "fl.clients_per_round=5",
    "fl.local_epochs=2",
]
ONE_BLOCK_VIT = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]
# A clearly separable task (generated class prototypes plus pixel noise, 16 px, 1,500 images):
# for learning checks of settings that learn digits too slowly to test (plain SGD on a ViT).
SEPARABLE = [
    "data=synthetic",
    "data.image_size=16",
    "data.loader.num_train=1500",
    "data.loader.num_test=300",
]


# The quickstart's own six-block ViT, for the learning tests whose thresholds were measured on it.
QUICKSTART_VIT = ["model.depth=6", "model.embed_dim=128", "model.num_heads=4"]


def digits_config(tmp_path: Path, *overrides: str):
    """A small, fast federation on scikit-learn's digits (offline): the quickstart with a
    one-block ViT, one local epoch and two rounds, unless `overrides` say otherwise."""
    fast = ["fl.rounds=2", "fl.eval_every=1", "fl.local_epochs=1", *ONE_BLOCK_VIT]
    return compose_config(["experiment=quickstart", "logger=none", *fast, *overrides], tmp_path)


def refusal(cfg, output_dir) -> str:
    """The one line that refuses `cfg` before training: building the run, or choosing its
    processes. Hydra's instantiate wraps its targets' errors: this is the ConfigError behind."""
    from src.errors import ConfigError, user_error
    from src.run import build_module, set_layout

    with pytest.raises(Exception) as info:
        set_layout(cfg, build_module(cfg, Path(output_dir)))
    error = user_error(info.value)
    assert isinstance(error, ConfigError), info.value
    assert "\n" not in str(error)
    return str(error)


@pytest.fixture
def make_digits_config(tmp_path):
    return lambda *overrides: digits_config(tmp_path, *overrides)


class RecordingMean(MeanAggregator):
    """The mean aggregator, keeping a copy of every upload and its weight for inspection."""

    def __init__(self, name: str = "mean", **kw):
        super().__init__(name, **kw)
        self.uploads: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []
        self.client_ids: list[int] = []

    def _add(self, upload, weight, client_id):
        self.uploads.append({name: t.detach().clone() for name, t in upload.items()})
        self.weights.append(weight)
        self.client_ids.append(client_id)
        super()._add(upload, weight, client_id)


class WritesAFile:
    """A pickle that, when unpickled without restriction, creates a file (os.system would do
    anything else just as well): planted in files fedsweep must load as data only."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_main(args: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """`python -m src.run ARGS` in this process (no interpreter start-up): (exit code, output).
    For runs that stop before training; `run_cli` for whole runs."""
    from src.run import main

    GlobalHydra.instance().clear()
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["src.run", *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as stopped:
            main()
    finally:  # Hydra's handlers write to this test's captured stdout, closed after it
        root.handlers[:], root.level = handlers, level
    return stopped.value.code, "\n".join(capfd.readouterr())


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m src.run ARGS` in a subprocess (offline), output captured."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "src.run", *args]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
