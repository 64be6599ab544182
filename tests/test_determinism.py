"""Same config + same seed => the same metrics (DESIGN §7), and a client's work depends only on
(seed, round, client), not on which clients ran before it (DESIGN §3.5)."""

import csv

import torch
from hydra.utils import instantiate

from src.run import build_module, train
from tests.conftest import RecordingMean

TIMING = {"time/round_s"}  # wall-clock columns are the only ones allowed to differ


def _metrics(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def test_same_seed_gives_identical_metrics(make_digits_config, tmp_path):
    runs = []
    for name in ("first", "second"):
        cfg = make_digits_config(
            "alg=fedlora", "fl.rounds=2", f"paths.output_dir={tmp_path / name}"
        )
        train(cfg)
        runs.append(_metrics(tmp_path / name / "metrics.csv"))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2 and float(runs[0][-1]["val/global_acc"]) > 0


def test_a_clients_upload_does_not_depend_on_the_clients_before_it(
    make_digits_config, tmp_path, monkeypatch
):
    import src.federated.orchestrator as orchestrator

    sample = orchestrator.sample_clients
    uploads = {}
    for order in ("forward", "reversed"):
        if order == "reversed":  # the same sampled clients, run in the opposite order
            monkeypatch.setattr(orchestrator, "sample_clients", lambda *a: sample(*a)[::-1])
        cfg = make_digits_config("alg=fedavg", "fl.rounds=1", "fl.clients_per_round=3")
        module = build_module(cfg, tmp_path / order)
        module.aggregator = RecordingMean()
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False).fit(module)
        recorded = module.aggregator
        uploads[order] = dict(zip(recorded.client_ids, recorded.uploads, strict=True))
    assert list(uploads["forward"]) == list(uploads["reversed"])[::-1]
    for client_id, upload in uploads["forward"].items():
        for name, tensor in upload.items():
            assert torch.equal(tensor, uploads["reversed"][client_id][name]), (client_id, name)
