"""Client faults: a client that raises an injected failure or uploads non-finite values is
dropped and counted, the round goes on with the rest; a client that raises anything else stops
the run (ClientError), unless fault.on_error=drop; a round in which every client fails stops the
run with a clear error, leaving the checkpoint of the last completed round to resume from."""

from __future__ import annotations

import csv
import logging
import re

import pytest
import torch

from src.algorithms import FedAvg
from src.contract.sharing import all_finite
from src.engine.sampling import sample_clients
from src.errors import AllClientsFailedError, ClientError
from src.run import train
from src.transforms.faults import ClientFaults

INJECTED = "raised injected failure (fault.fail_fraction)"
NONFINITE = "uploaded non-finite values"


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
    assert [float(r["clients/dropped"]) for r in rows] == [1.0, 1.0]  # 1 raises per round
    assert [float(r["clients/nonfinite"]) for r in rows] == [2.0, 2.0]  # 2 send NaN per round
    assert summary["status"] == "completed"
    assert all(torch.isfinite(torch.tensor(float(r["val/global_acc"]))) for r in rows)
    raised = [m for m in caplog.messages if INJECTED in m]
    poisoned = [m for m in caplog.messages if NONFINITE in m]
    assert len(raised) == 2 and len(poisoned) == 4  # per round: 1 and 2, each naming its client
    assert all(re.fullmatch(r"round [12]: client \d+ .*; dropped", m) for m in raised + poisoned)

    dropped = summary["dropped_clients"]
    assert all(set(d) == {"round", "client", "reason"} for d in dropped)
    for round_no in (1, 2):
        this_round = [d for d in dropped if d["round"] == round_no]
        reasons = sorted(d["reason"] for d in this_round)
        assert reasons == sorted([INJECTED, NONFINITE, NONFINITE]), this_round
        assert len({d["client"] for d in this_round}) == 3  # three different clients
        for d in this_round:  # the log names the same client for the same reason
            line = f"round {round_no}: client {d['client']} {d['reason']}; dropped"
            assert line in caplog.messages, (line, caplog.messages)
    assert len(dropped) == 6


def test_faulty_clients_follow_the_seed_and_never_overlap():
    faults = ClientFaults(fail_fraction=0.3, nan_fraction=0.3)
    faults.begin_round(list(range(10)), seed=0, round_idx=4)
    first = (faults.failing, faults.poisoned)
    faults.begin_round(list(range(10)), seed=0, round_idx=4)
    assert (faults.failing, faults.poisoned) == first
    assert len(first[0]) == 3 and len(first[1]) == 3 and not first[0] & first[1]


def test_a_round_where_every_client_fails_stops_with_a_usable_checkpoint(
    make_digits_config, tmp_path, monkeypatch
):
    real_begin_round = ClientFaults.begin_round

    def second_round_all_fail(self, sampled, seed, round_idx):
        real_begin_round(self, sampled, seed, round_idx)
        self.failing = set(sampled) if round_idx == 1 else set()

    monkeypatch.setattr(ClientFaults, "begin_round", second_round_all_fail)
    with pytest.raises(AllClientsFailedError, match="round 2: all 5 sampled clients failed"):
        train(make_digits_config("fl.rounds=3"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["fedsweep"]["rounds_done"] == 1

    monkeypatch.setattr(ClientFaults, "begin_round", real_begin_round)  # the fault is gone: resume
    summary = train(make_digits_config("fl.rounds=3", "resume=auto"))
    assert summary["rounds_done"] == 3
    assert [r["round"] for r in _rows(tmp_path / "run" / "metrics.csv")] == ["1", "2", "3"]


def test_a_client_raising_a_real_error_stops_the_run_unless_on_error_drop(
    make_digits_config, monkeypatch
):
    cfg = make_digits_config()
    bad = sample_clients(cfg.fl.num_clients, cfg.fl.clients_per_round, cfg.seed, 0)[0]
    real_local_update = FedAvg.local_update

    def broken_for_one_client(self, model, state, run):
        if run.client_id == bad:
            raise ValueError("broken client")
        return real_local_update(self, model, state, run)

    monkeypatch.setattr(FedAvg, "local_update", broken_for_one_client)
    with pytest.raises(ClientError, match=rf"round 1: client {bad} raised ValueError") as raised:
        train(cfg)
    assert isinstance(raised.value.__cause__, ValueError)
    assert str(raised.value.__cause__) == "broken client"

    summary = train(make_digits_config("fault.on_error=drop"))
    assert summary["status"] == "completed"
    reason = "raised ValueError: broken client"
    assert {"round": 1, "client": bad, "reason": reason} in summary["dropped_clients"]
    assert all(d["client"] == bad and d["reason"] == reason for d in summary["dropped_clients"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_among_many_tensors(bad):
    tensors = [torch.randn(7, 5), torch.randn(300, dtype=torch.float64), torch.arange(4)]
    assert all_finite(tensors)
    tensors[1][123] = bad
    assert not all_finite(tensors)


def test_all_finite_keeps_a_huge_finite_upload_whose_norm_overflows():
    huge = torch.full((10,), 1e30)  # finite float32, but the sum of squares overflows
    assert not torch.linalg.vector_norm(huge).isfinite()
    assert all_finite([huge, torch.ones(3)])
