"""A client's work depends only on (seed, round, client), not on which clients ran before it.
Same config + seed => same metrics.csv, across processes: tests/engine/test_resume.py."""

import torch

from src.run import build_module, build_trainer
from tests.conftest import RecordingMean


def test_a_clients_upload_does_not_depend_on_the_clients_before_it(
    make_digits_config, tmp_path, monkeypatch
):
    import src.engine.schedule as orchestrator  # where a round's clients are sampled

    sample = orchestrator.sample_clients
    uploads = {}
    for order in ("forward", "reversed"):
        if order == "reversed":  # the same sampled clients, run in the opposite order
            monkeypatch.setattr(
                orchestrator, "sample_clients", lambda *a, **kw: sample(*a, **kw)[::-1]
            )
        cfg = make_digits_config("alg=fedavg", "fl.rounds=1", "fl.clients_per_round=3")
        module = build_module(cfg, tmp_path / order)
        module.aggregator = RecordingMean()
        build_trainer(cfg, logger=False, enable_checkpointing=False).fit(module)
        recorded = module.aggregator
        uploads[order] = dict(zip(recorded.client_ids, recorded.uploads, strict=True))
    assert list(uploads["forward"]) == list(uploads["reversed"])[::-1]
    for client_id, upload in uploads["forward"].items():
        for name, tensor in upload.items():
            assert torch.equal(tensor, uploads["reversed"][client_id][name]), (client_id, name)
