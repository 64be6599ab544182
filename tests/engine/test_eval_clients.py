"""fl.eval_clients=N: the personal metrics score a seeded sample of N honest clients, the same at
every evaluation, each exactly as a full evaluation scores it; time/eval_s is logged beside
time/round_s and shown in the round line."""

from __future__ import annotations

import csv
import logging
import math

import pytest

from src.run import train
from tests.conftest import digits_config


def _per_client(summary) -> list[float]:
    return [row["personal_acc"] for row in summary["per_client"]]


@pytest.mark.parametrize("alg", ["fedavg", "fedsa-flora"])  # the global model; personal models
def test_a_sample_of_clients_is_scored_as_a_full_evaluation_scores_them(alg, tmp_path):
    full = train(digits_config(tmp_path / "all", f"alg={alg}"))
    sample = train(digits_config(tmp_path / "three", f"alg={alg}", "fl.eval_clients=3"))
    scored = [i for i, acc in enumerate(_per_client(sample)) if not math.isnan(acc)]
    assert len(scored) == 3 and len(_per_client(sample)) == 10
    tests = sample["partition"]["test_samples"]
    for i in scored:  # the same model on the same samples (batched with others: 1 sample slack)
        assert _per_client(sample)[i] == pytest.approx(_per_client(full)[i], abs=1 / tests[i])
    weighted = sum(_per_client(sample)[i] * tests[i] for i in scored) / sum(
        tests[i] for i in scored
    )
    assert sample["final"]["val/personal_acc"] == pytest.approx(weighted, rel=1e-9)
    again = train(digits_config(tmp_path / "again", f"alg={alg}", "fl.eval_clients=3"))
    assert _per_client(again) == pytest.approx(_per_client(sample), nan_ok=True)  # seeded


def test_evaluation_time_is_logged_and_shown_in_the_round_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="src.engine.orchestrator"):
        train(digits_config(tmp_path, "fl.rounds=2", "fl.eval_every=2"))
    with (tmp_path / "run" / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["time/eval_s"]) > 0 and float(row["time/round_s"]) > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert lines[0].endswith("s)") and "eval" not in lines[0]  # round 1: not evaluated
    assert lines[1].endswith(
        f"(train {float(row['time/round_s']):.1f}s + eval {float(row['time/eval_s']):.1f}s)"
    )
