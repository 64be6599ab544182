"""How a CPU run uses its cores (trainer.processes, src/engine/layout.py): forked processes give the
metrics of one process (up to float summation order, as trainer=ddp does: tests/engine/test_ddp.py),
the automatic choice follows the probe, and the check after the first round falls back to one
process when the processes lost; fl.parallel_clients=auto is checked the same way."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import src.engine.layout
from src.contract.ranks import Ranks
from src.engine.layout import Layout, choose_layout
from src.run import build_module, train
from tests.conftest import digits_config, run_cli, run_main
from tests.engine.test_ddp import SMALL, _assert_same_metrics, _rows


def _children() -> list[str]:
    """This process's live child processes (a forked rank left behind would be one)."""
    found = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as children:
            found += children.read().split()
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[dict], int]:
    """The reference: fedsa-flora (private states, personal evaluation) in one process."""
    folder = tmp_path_factory.mktemp("one")
    summary = train(digits_config(folder, "alg=fedsa-flora", *SMALL))
    return _rows(folder / "run" / "metrics.csv"), sum(summary["partition"]["test_samples"])


def test_two_forked_processes_give_the_one_process_metrics_and_end(one_process, tmp_path):
    before = _children()
    train(digits_config(tmp_path, "alg=fedsa-flora", *SMALL, "trainer.processes=2"))
    rows, test_samples = one_process
    _assert_same_metrics(_rows(tmp_path / "run" / "metrics.csv"), rows, test_samples)
    assert _children() == before  # the forked rank ended with the fit


@pytest.mark.parametrize("lost", [True, False])
def test_the_check_after_round_one_falls_back_only_when_processes_lost(
    lost, one_process, tmp_path, monkeypatch, caplog
):
    """The probe's threads rate decides the estimate: absurdly fast threads make the processes
    lose (fall back to one process for round 2), absurdly slow ones make them win (kept).
    Either way the metrics are the one-process run's."""
    threads_rate = 1e9 if lost else 1e-9
    chosen = Layout(2, 1, "a probe (test)", threads_rate, 2 * threads_rate, cores=2)
    monkeypatch.setattr("src.run.layout_for", lambda *args: chosen)
    with caplog.at_level(logging.INFO, logger="src.engine.orchestrator"):
        train(digits_config(tmp_path, "alg=fedsa-flora", *SMALL))
    checks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layout check")]
    assert len(checks) == 1, checks
    assert checks[0].endswith("trains from round 2 on" if lost else ": kept"), checks[0]
    rows, test_samples = one_process
    _assert_same_metrics(_rows(tmp_path / "run" / "metrics.csv"), rows, test_samples)


def test_auto_chooses_processes_only_on_a_clear_and_worthwhile_gain(tmp_path, monkeypatch):
    module = build_module(digits_config(tmp_path, *SMALL), tmp_path)
    rates = {}
    monkeypatch.setattr(
        src.engine.layout, "compare_rates", lambda module, batches, cores, bf16: rates["now"]
    )
    rates["now"] = (100.0, 200.0)  # processes twice as fast
    layout = choose_layout(module, cores=2, rounds=1000, memory_free=2**40)
    assert (layout.processes, layout.threads) == (2, 1) and "s saved in 1000 rounds" in layout.why
    rates["now"] = (100.0, 105.0)  # within the margin: not clearly faster
    layout = choose_layout(module, cores=2, rounds=1000, memory_free=2**40)
    assert (layout.processes, layout.threads) == (1, 2) and "not faster by 10%" in layout.why
    rates["now"] = (1e4, 2e4)  # faster, but a 1-round run would not repay starting them
    layout = choose_layout(module, cores=2, rounds=1, memory_free=2**40)
    assert layout.processes == 1 and "not worth starting" in layout.why
    layout = choose_layout(module, cores=2, rounds=1000, memory_free=0)
    assert layout.processes == 1 and "GiB available" in layout.why
    assert choose_layout(module, cores=1, rounds=1000).why == "one core available"


def test_the_real_probe_times_both_layouts_and_leaves_the_model_as_it_was(tmp_path):
    module = build_module(digits_config(tmp_path, *SMALL), tmp_path)
    before = {n: t.clone() for n, t in module.model.state_dict().items()}
    served, children = module.federation.train.served_samples, _children()
    layout = choose_layout(module, cores=2, rounds=2, memory_free=2**40)
    assert layout.threads_rate > 0 and layout.processes_rate > 0, layout
    assert "samples/s with 1 x 2 threads" in layout.why
    after = module.model.state_dict()
    assert all((after[n] == t).all() for n, t in before.items())
    assert module.federation.train.served_samples == served  # not counted as the run's work
    assert _children() == children  # the probe's neighbour processes ended


@pytest.mark.parametrize("lost", [True, False])
def test_parallel_clients_auto_is_checked_after_the_first_round(
    lost, tmp_path, monkeypatch, caplog
):
    alone_s = 1e-9 if lost else 1e9  # the probe's one-client step: absurdly fast or slow
    monkeypatch.setattr(
        "src.engine.client_loop.choose_group_size", lambda *a: (2, "a probe (test)", alone_s)
    )
    with caplog.at_level(logging.INFO, logger="src.engine.client_loop"):
        train(digits_config(tmp_path, "alg=fedavg", *SMALL, "fl.parallel_clients=auto"))
    checks = [r.getMessage() for r in caplog.records if "auto check" in r.getMessage()]
    assert len(checks) == 1, checks
    assert checks[0].endswith("from round 2 on" if lost else ": kept"), checks[0]


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], "use one of them"),
        (["trainer.threads=2"], "forked processes run one thread each"),
    ],
)
def test_forked_processes_with_another_multi_process_setting_are_refused(
    overrides, says, tmp_path, monkeypatch, capfd
):
    args = ["experiment=quickstart", "logger=none", "trainer.processes=2", *overrides]
    code, output = run_main([*args, f"hydra.run.dir={tmp_path}"], monkeypatch, capfd)
    assert code == 2 and "trainer.processes=2" in output and says in output, output


@pytest.mark.slow  # 10-25 s; the forked path itself is in make test (above, and test_interrupt.py)
def test_a_sweep_of_forked_runs_runs_every_job_once(tmp_path: Path):
    """A forked rank ends its process with the fit: it never goes on to the sweep's next job."""
    done = run_cli(
        "-m", "experiment=quickstart", "logger=none", *SMALL, "trainer.processes=2",
        "trainer.enable_progress_bar=false", "seed=0,1", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.name[0] for p in tmp_path.glob("*/summary.json")) == ["0", "1"]
    logged = (done.stdout + done.stderr).count("fitting alg=fedavg")
    assert logged == 2, done.stdout[-3000:]  # rank 0 of each job, once


def test_each_rank_scores_its_part_and_only_rank_0_after_a_fall_back():
    """The evaluation's split (`Ranks.part`): contiguous parts covering every item once; after
    the layout check fell back, rank 0 holds all of them and the others none."""
    items = torch.arange(11)
    ranks = [Ranks() for _ in range(3)]
    for rank, r in enumerate(ranks):
        r.size, r.rank = 3, rank
    assert torch.equal(torch.cat([r.part(items) for r in ranks]), items)
    for r in ranks:
        r.first_trains_all = True
    assert [len(r.part(items)) for r in ranks] == [11, 0, 0]
    assert [r.working for r in ranks] == [1, 1, 1]
