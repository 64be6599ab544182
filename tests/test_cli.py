"""The command line: sweeps run every job in its own folder, one failing job does not stop the
others, and bad input stops a run with one clear line before any training."""

import json
import subprocess
import sys

from tests.conftest import ROOT, run_cli

_run = run_cli


def _multirun(tmp_path, *overrides: str, expect_failed: bool = False) -> list:
    quick = ["experiment=quickstart", "logger=none", "fl.rounds=1"]
    done = _run(
        "-m", *quick, "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}", *overrides
    )
    assert (done.returncode != 0) == expect_failed, done.stderr[-2000:]
    return sorted(p for p in tmp_path.iterdir() if p.is_dir()), done.stdout + done.stderr


def test_a_failing_job_does_not_stop_the_sweep_but_fails_its_exit_code(tmp_path):
    jobs, output = _multirun(
        tmp_path, "alg=fedavg,fedlora", "fl.clients_per_round=2,99", expect_failed=True
    )
    assert len(jobs) == 4
    # folders named by the overrides that vary only (fl.rounds, trainer.* and logger are fixed)
    assert [j.name for j in jobs] == [
        "0_alg=fedavg,fl.clients_per_round=2",
        "1_alg=fedavg,fl.clients_per_round=99",
        "2_alg=fedlora,fl.clients_per_round=2",
        "3_alg=fedlora,fl.clients_per_round=99",
    ]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["status"] for s in summaries] == ["completed", "failed", "completed", "failed"]
    for job, summary, alg in zip(jobs[::2], summaries[::2], ["fedavg", "fedlora"], strict=True):
        assert summary["config"]["alg"]["name"] == alg  # each job its own complete folder
        assert (job / "metrics.csv").is_file()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / ".hydra" / "config.yaml").is_file()
    assert "fl.clients_per_round" in summaries[1]["error"]
    (report,) = [line for line in output.splitlines() if "job(s) of the sweep failed" in line]
    assert "2 job(s)" in report and report.endswith(f"{jobs[1].name}, {jobs[3].name}")
    # one progress line per finished job: i/N, the overrides that vary, the final metric, the time
    progress = [line for line in output.splitlines() if line.startswith("job ")]
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"], progress
    assert progress[0].startswith("job 1/4 alg=fedavg fl.clients_per_round=2: ")
    metric = summaries[0]["final"]["val/personal_acc"]
    assert f"val/personal_acc {metric:.4g} in " in progress[0] and progress[0].endswith(" s")
    assert ": FAILED: " in progress[1] and "fl.clients_per_round" in progress[1]
    assert "experiment=" not in "".join(progress)  # fixed overrides are not repeated
    # at the end: a table of the jobs (a column per varying key, the metric, the time) and the
    # command that compares them
    lines = output.splitlines()
    start = lines.index(f"sweep of 4 jobs in {tmp_path}:")
    header, *rows = lines[start + 1 : start + 6]
    assert header.split() == [
        "#",
        "alg",
        "fl.clients_per_round",
        "val/personal_acc",
        "time",
        "(s)",
    ]
    assert rows[0].split()[:4] == ["1", "fedavg", "2", f"{metric:.4g}"]
    assert rows[1].split()[:4] == ["2", "fedavg", "99", "FAILED"]
    assert lines[start + 6] == f"compare them: python -m src.report {tmp_path}"


def test_bad_input_stops_with_one_clear_line_and_exit_code_2(tmp_path):
    """The real command line; tests/test_errors.py covers every kind of bad input in-process."""
    done = _run(
        "experiment=quickstart", "logger=none", f"hydra.run.dir={tmp_path}", "partitioner.alpha=0"
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "partitioner.alpha must be > 0" in errors[0], output[-2000:]
    assert not (tmp_path / "metrics.csv").exists()  # stopped before any training


def test_rank_study_prints_its_four_parts():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.rank_study",
            "d=10",
            "k=10",
            "client_ranks=[20,25,30]",
            "global_rank=100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for part in ("(a) stacking", "(b) truncated SVD", "(c) dilution", "(d) truncation waste"):
        assert part in out
    assert "global stacked rank 75" in out
    assert "capped" in out
    assert "zeropad 50% of c" in out and "rank_aware keeps 100%" in out
    assert "90 of 100 dimensions stay zero" in out


def test_sweep_plan_counts_the_jobs_and_names_the_keys_that_vary():
    from src.sweep_report import sweep_plan

    assert sweep_plan(["experiment=quickstart", "alg=fedavg,fedlora", "seed=0,1,2"]) == (
        6,
        {"alg", "seed"},
    )
    assert sweep_plan(["alg=fedavg", "seed=range(3)"]) == (3, {"seed"})
    assert sweep_plan(["optim.lr=interval(0.01,0.1)"]) == (None, {"optim.lr"})  # not countable


def test_run_names_keep_the_swept_keys_and_drop_the_noise_keys():
    from src.run_names import run_name

    job = [
        "experiment=quickstart",
        "alg=fedlora",
        "seed=1",
        "fl.rounds=5",
        "aggregator=svd",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "+paths.data_dir=/d",
        "hydra.sweep.dir=/s",
    ]
    # a 3-key sweep (alg, aggregator, seed): only those, sorted
    assert run_name(job, {"alg", "aggregator", "seed"}) == "aggregator=svd,alg=fedlora,seed=1"
    # outside a sweep: everything but the noise keys
    assert run_name(job) == "aggregator=svd,alg=fedlora,fl.rounds=5,seed=1"
    assert run_name(["trainer=cpu", "logger=none"]) == "default"


def test_a_command_line_key_replaces_the_presets_sweep_of_it(monkeypatch):
    """experiment=stragglers_cpu sweeps alg and seed; alg=fedavg seed=0,1 on the command line
    makes 2 jobs (Hydra's basic sweeper), so the progress lines count 2 and only seed varies."""
    from omegaconf import OmegaConf

    from src.sweep_report import SweepProgress

    monkeypatch.delenv("FEDSWEEP_SWEEP_KEYS", raising=False)
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"alg": "fedavg,fedprox,fednova", "seed": "0,1,2"},
                },
                "overrides": {"task": ["experiment=stragglers_cpu", "alg=fedavg", "seed=0,1"]},
            }
        }
    )
    progress = SweepProgress()
    progress.on_multirun_start(config)
    assert (progress.total, progress.varying) == (2, {"seed"})
    progress.on_multirun_end(config)
