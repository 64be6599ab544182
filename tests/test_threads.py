"""trainer.threads and the OpenMP wait policy (src/threads.py)."""

import os
import subprocess
import sys

import pytest
import torch

from src.config_checks import validate_config
from src.errors import ConfigError
from src.run import set_threads
from src.threads import thread_count, usable_cores
from tests.conftest import ROOT, compose_config


def test_auto_uses_the_cores_of_the_cpu_affinity_divided_among_parallel_jobs():
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    assert thread_count("auto")[0] == cores
    assert thread_count("auto", parallel_jobs=2)[0] == max(1, cores // 2)
    assert thread_count("auto", parallel_jobs=10 * cores)[0] == 1
    assert thread_count(3) == (3, "trainer.threads")


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


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_environment_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    probe = "import src, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == expected, out.stderr
