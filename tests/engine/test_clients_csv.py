"""clients.csv: what happened to each client in each round (src/outputs.py ClientRecorder)."""

from __future__ import annotations

import csv

from src.run import train
from tests.conftest import digits_config


def _rows(folder):
    with (folder / "run" / "clients.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_trained_and_every_scored_client_has_a_row(tmp_path):
    cfg = digits_config(
        tmp_path, "fl.rounds=3", "fl.eval_every=2", "fl.num_clients=6", "fl.clients_per_round=2",
        "attack=sign_flip", "attack.fraction=0.34", "fault.fail_fraction=0.5", "trainer.threads=1",
    )  # fmt: skip
    summary = train(cfg)
    rows = _rows(tmp_path)
    for round_done in (1, 2, 3):
        this = [r for r in rows if r["round"] == str(round_done)]
        trained = [r for r in this if r["trained"] == "1"]
        assert len(trained) == 2 and all(r["sampled"] == "1" for r in trained)
        # fault.fail_fraction=0.5 drops one of the two sampled clients every round
        assert sum(r["dropped"] != "" for r in this) == 1
        scored = [r for r in this if r["personal_acc"] != ""]
        assert bool(scored) == (round_done in (2, 3))  # evaluated rounds: every 2nd and the last
    malicious = set(summary["malicious_clients"])
    assert {int(r["client"]) for r in rows if r["malicious"] == "1"} <= malicious
    last = {
        int(r["client"]): float(r["personal_acc"])
        for r in rows
        if r["round"] == "3" and r["personal_acc"]
    }
    expected = {
        c["client"]: c["personal_acc"] for c in summary["per_client"] if c["client"] in last
    }
    assert set(last) == {c["client"] for c in summary["per_client"] if not c["malicious"]}
    for client, acc in last.items():
        assert abs(acc - expected[client]) < 1e-5
    sizes = {c["client"]: c["train_samples"] for c in summary["per_client"]}
    assert all(int(r["train_samples"]) == sizes[int(r["client"])] for r in rows)
