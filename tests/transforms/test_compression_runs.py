"""compression=...: wired into runs: the bytes counted are the encoding's, DP clips the decoded
update, TopK's memory survives a resume, and the combinations that cannot work are refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from src.run import build_module, build_trainer, train
from src.transforms.compression import TopK
from src.transforms.privacy import update_norm
from tests.conftest import RecordingMean, refusal


def _metrics(cfg) -> list[dict]:
    with (Path(cfg.paths.output_dir) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "compression", ["compression=topk", "compression=qsgd", "compression=lora_quant"]
)
def test_up_bytes_count_the_encoding_actually_sent(make_digits_config, compression):
    cfg = make_digits_config(compression, "fl.rounds=1")
    train(cfg)
    module = build_module(cfg, Path(cfg.paths.output_dir) / "probe")
    shared = {n: t for n, t in module.model.named_parameters() if t.requires_grad}
    (compressor,) = [t for t in module.transforms.transforms if t.name == compression[12:]]
    expected = cfg.fl.clients_per_round * compressor.encoded_nbytes(shared)
    row = _metrics(cfg)[0]
    assert float(row["comm/up_bytes"]) == expected
    assert expected < 0.2 * float(row["comm/down_bytes"])  # against float32 in full


def test_dp_clips_the_decoded_sparse_update(make_digits_config, tmp_path):
    """compression before privacy: what the server sums is sparse and inside the clip ball."""
    cfg = make_digits_config(
        "compression=topk", "compression.fraction=0.05", "privacy=dp_fedavg",
        "privacy.clip=0.05", "fl.rounds=1",
    )  # fmt: skip
    module = build_module(cfg, tmp_path)
    names = [type(t).__name__ for t in module.transforms.transforms]
    assert names[-2:] == ["TopK", "DPFedAvg"]
    start = {n: t.detach().clone() for n, t in module.model.named_parameters()}
    module.aggregator = RecordingMean()
    build_trainer(cfg, logger=False, enable_checkpointing=False).fit(module)
    topk = module.transforms.transforms[-2]
    for upload in module.aggregator.uploads:
        delta = {n: upload[n] - start[n] for n in upload}
        assert update_norm(upload, {n: start[n] for n in upload}) <= 0.05 * (1 + 1e-5)
        for d in delta.values():
            assert int((d != 0).sum()) <= topk.k(d.numel())


def test_topk_memory_survives_a_resume(make_digits_config, tmp_path):
    args = ("compression=topk", "compression.fraction=0.05", "fl.eval_every=1")
    whole = make_digits_config(*args, "fl.rounds=3")
    train(whole)
    expected = _metrics(whole)
    resumed_dir = f"paths.output_dir={tmp_path / 'resumed'}"
    train(make_digits_config(*args, "fl.rounds=2", resumed_dir))
    rest = make_digits_config(*args, "fl.rounds=3", "resume=auto", resumed_dir)
    train(rest)
    got = _metrics(rest)
    keys = [k for k in expected[0] if not k.startswith("time/")]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expected]
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["fedsweep"]["transforms"]["topk"]["residuals"]  # the memory was checkpointed


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["compression=topk", "aggregator=median"], "ranks each coordinate"),
        (["compression=topk", "aggregator=trimmed_mean"], "ranks each coordinate"),
        (["compression=topk", "trainer.processes=2"], "topk keeps per-client state"),
        (["compression=topk", "compression.fraction=0"], "compression.fraction"),
        (["compression=qsgd", "compression.bits=0"], "compression.bits"),
    ],
)
def test_combinations_that_cannot_work_are_refused(make_digits_config, overrides, named):
    cfg = make_digits_config(*overrides)
    assert named in refusal(cfg, cfg.paths.output_dir)


def test_qsgd_with_a_coordinatewise_rule_is_allowed(make_digits_config):
    cfg = make_digits_config("compression=qsgd", "aggregator=median", "fl.rounds=1")
    assert train(cfg)["status"] == "completed"


def test_topk_without_memory_keeps_nothing(make_digits_config, tmp_path):
    cfg = make_digits_config("compression=topk", "compression.error_feedback=false", "fl.rounds=1")
    module = build_module(cfg, tmp_path)
    build_trainer(cfg, logger=False, enable_checkpointing=False).fit(module)
    topk = next(t for t in module.transforms.transforms if isinstance(t, TopK))
    assert topk.residuals == {} and not module.transforms.client_memory
