"""DDP client sharding (trainer=ddp): a 2-process CPU run equals the 1-process run.

Clients are seeded by (seed, round, client), so the processes train exactly the clients one
process would; what may differ is the float summation order where ranks' partial sums meet
(the all_reduce of the mean's weighted float32 sums, and the evaluation's per-rank totals).
That moves parameters by ~1e-7 relative after two rounds, so losses must agree to 1e-4 relative
and an accuracy by at most one sample flipping at a near tie."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from src.run import train
from tests.conftest import CONF_DIR, ONE_BLOCK_VIT, digits_config, run_cli

SMALL = [
    "fl.rounds=2",
    "fl.eval_every=1",
    "fl.local_epochs=1",
    "fl.num_clients=6",
    "fl.clients_per_round=4",
    *ONE_BLOCK_VIT,
]
ALGS = ["fedavg", "fedlora", "fedsa-flora"]  # fedsa-flora: private states and personal evaluation


def _rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _assert_same_metrics(ddp: list[dict], single: list[dict], test_samples: int) -> None:
    assert [r["round"] for r in ddp] == [r["round"] for r in single] == [1.0, 2.0]
    for got, want in zip(ddp, single, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if key.startswith("time/"):
                continue
            if "acc" in key:
                assert got[key] == pytest.approx(value, abs=1.0 / test_samples + 1e-12), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def _ddp_run(alg: str, folder: Path) -> Path:
    """One run of `alg` in 2 gloo processes (trainer=ddp), written to `folder`."""
    done = run_cli(
        "experiment=quickstart",
        "logger=none",
        *SMALL,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.enable_progress_bar=false",
        f"alg={alg}",
        f"hydra.run.dir={folder}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


# fedsa-flora (private states and personal evaluation) in make test; each run spawns 2 processes
# (about 18 s), so fedavg and fedlora are slow
@pytest.mark.parametrize(
    "alg",
    [pytest.param(a, marks=pytest.mark.slow) if a != "fedsa-flora" else a for a in ALGS],
)
def test_two_process_ddp_run_matches_one_process(alg, tmp_path):
    job = _ddp_run(alg, tmp_path / "ddp")
    single = train(digits_config(tmp_path, f"alg={alg}", *SMALL))
    test_samples = sum(single["partition"]["test_samples"])
    _assert_same_metrics(
        _rows(job / "metrics.csv"), _rows(tmp_path / "run" / "metrics.csv"), test_samples
    )
    # one set of outputs, written by rank 0 only
    files = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert files == [
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "checkpoints/last.ckpt",
        "clients.csv",
        "metrics.csv",
        "run.log",
        "summary.json",
    ]
    # clients.csv by rank 0 alone: each (round, client) once, as in one process
    with (job / "clients.csv").open() as f:
        keys = [(row["round"], row["client"]) for row in csv.DictReader(f)]
    with (tmp_path / "run" / "clients.csv").open() as f:
        assert keys == [(row["round"], row["client"]) for row in csv.DictReader(f)]


@pytest.fixture
def one_rank_process_group():
    """A real (gloo) process group of one rank, so the DDP code paths run in this process."""
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "alg, aggregator",
    [("fedavg", "median")],
)
def test_gathered_uploads_and_private_states_give_the_same_run(
    alg, aggregator, one_rank_process_group, tmp_path
):
    """Under DDP, aggregators that need every upload get them by all_gather (copied out of the
    model, added in sampled order) and private states by all_gather; with one rank the result
    must be bit-identical to the plain path."""
    overrides = [f"alg={alg}", f"aggregator={aggregator}", *SMALL]
    distributed = train(digits_config(tmp_path / "ddp", *overrides))
    assert not dist.is_initialized()  # a run ends its process group (a sweep's next job makes one)
    plain = train(digits_config(tmp_path / "plain", *overrides))
    for key, value in plain["final"].items():
        if not key.startswith("time/"):
            assert distributed["final"][key] == value, key


def test_slurm_launcher_config_sends_sweep_jobs_to_submitit():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.tasks_per_node=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 4)
    assert cfg.trainer.strategy._target_ == "src.engine.distributed.ClientShardingStrategy"
