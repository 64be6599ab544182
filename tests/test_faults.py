"""Client faults: a client that raises or uploads non-finite values is dropped and counted, the
round goes on with the rest; a round in which every client fails stops the run with a clear
error, leaving the checkpoint of the last completed round to resume from."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from src.errors import AllClientsFailedError
from src.federated.faults import ClientFaults
from src.run import train


def _rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_failing_and_nan_clients_are_dropped_and_counted(make_digits_config, tmp_path, caplog):
    cfg = make_digits_config(
        "fl.rounds=2", "fl.clients_per_round=5", "fault.fail_fraction=0.2", "fault.nan_fraction=0.4"
    )
    with caplog.at_level(logging.WARNING):
        summary = train(cfg)
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [float(r["clients/dropped"]) for r in rows] == [3.0, 3.0]  # 1 raises + 2 send NaN
    assert summary["status"] == "completed"
    assert all(torch.isfinite(torch.tensor(float(r["val/global_acc"]))) for r in rows)
    raised = [m for m in caplog.messages if "ClientFault: simulated failure" in m]
    poisoned = [m for m in caplog.messages if "uploaded non-finite values" in m]
    assert len(raised) == 2 and len(poisoned) == 4  # per round: 1 and 2, each naming its client
    assert all("client " in m and "dropped" in m for m in raised + poisoned)


def test_faulty_clients_follow_the_seed_and_never_overlap():
    faults = ClientFaults(fail_fraction=0.3, nan_fraction=0.3)
    faults.plan(list(range(10)), seed=0, round_idx=4)
    first = (faults.failing, faults.poisoned)
    faults.plan(list(range(10)), seed=0, round_idx=4)
    assert (faults.failing, faults.poisoned) == first
    assert len(first[0]) == 3 and len(first[1]) == 3 and not first[0] & first[1]


def test_a_round_where_every_client_fails_stops_with_a_usable_checkpoint(
    make_digits_config, tmp_path, monkeypatch
):
    real_plan = ClientFaults.plan

    def second_round_all_fail(self, sampled, seed, round_idx):
        real_plan(self, sampled, seed, round_idx)
        self.failing = set(sampled) if round_idx == 1 else set()

    monkeypatch.setattr(ClientFaults, "plan", second_round_all_fail)
    with pytest.raises(AllClientsFailedError, match="round 2: all 5 sampled clients failed"):
        train(make_digits_config("fl.rounds=3"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["fedsweep"]["rounds_done"] == 1

    monkeypatch.setattr(ClientFaults, "plan", real_plan)  # the fault is gone: resume
    summary = train(make_digits_config("fl.rounds=3", "resume=auto"))
    assert summary["rounds_done"] == 3
    assert [r["round"] for r in _rows(tmp_path / "run" / "metrics.csv")] == ["1", "2", "3"]
