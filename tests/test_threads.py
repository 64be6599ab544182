"""trainer.threads and the OpenMP spin-wait (src/threads.py)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from src import threads
from src.config_checks import validate_config
from src.errors import ConfigError
from src.run import set_threads, train
from src.threads import usable_cores
from tests.conftest import ROOT, compose_config


def test_auto_uses_the_idle_cores_of_the_cpu_affinity_divided_among_parallel_jobs(monkeypatch):
    assert usable_cores() == set(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "usable_cores", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "busy_cores", lambda cores: set())
    assert threads.thread_count("auto")[0] == 4
    assert threads.thread_count("auto", parallel_jobs=2)[0] == 2
    assert threads.thread_count("auto", parallel_jobs=10)[0] == 1
    monkeypatch.setattr(threads, "busy_cores", lambda cores: {1})
    count, why = threads.thread_count("auto")
    assert count == 3 and "3 idle of the 4 cores" in why
    assert threads.thread_count(3) == (3, "trainer.threads")


def test_a_core_kept_busy_by_another_process_is_seen_as_busy():
    core = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    neighbour = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # it starts spinning
        assert core in threads.busy_cores({core}, seconds=0.3)
    finally:
        neighbour.kill()
        neighbour.wait()


def test_the_setting_reaches_torch():
    before = torch.get_num_threads()
    try:
        set_threads(compose_config(["trainer.threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_thread_count_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match="trainer.threads") as refused:
        validate_config(compose_config([f"trainer.threads={value}"]))
    assert value in str(refused.value) and "auto" in str(refused.value)


@pytest.mark.parametrize("given, expected", [(None, "10000"), ("300000", "300000")])
def test_openmp_spin_wait_is_bounded_unless_the_environment_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_KEYS}
    if given:
        env["GOMP_SPINCOUNT"] = given
    probe = "import src, os; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == expected, out.stderr


def test_summary_records_the_thread_count_a_run_used(make_digits_config):
    before = torch.get_num_threads()
    try:
        cfg = make_digits_config("fl.rounds=1", "model.depth=1", "trainer.threads=1")
        assert train(cfg)["cpu_threads"] == 1
    finally:
        torch.set_num_threads(before)
