"""fedlora shares only LoRA + head: the backbone never changes and never crosses the network."""

import pytest
import torch
from hydra.utils import instantiate

from src.run import build_module
from tests.conftest import RecordingMean


@pytest.fixture
def one_round(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedlora", "fl.rounds=1")
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingMean()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    return module, before


def test_backbone_is_bit_identical_after_a_round(one_round):
    module, before = one_round
    changed = []
    for name, p in module.model.named_parameters():
        if "lora_" in name or name.startswith("head"):
            continue
        assert torch.equal(p.detach().cpu(), before[name].cpu()), name
        changed.append(name)
    assert len(changed) > 10  # the ViT backbone really was checked
    trained = [n for n, p in module.model.named_parameters() if "lora_B" in n]
    assert any(
        not torch.equal(dict(module.model.named_parameters())[n].detach(), before[n])
        for n in trained
    )


def test_upload_contains_only_lora_and_head(one_round):
    module, _ = one_round
    assert len(module.aggregator.uploads) == module.clients_per_round
    for upload in module.aggregator.uploads:
        assert upload, "empty upload"
        for name in upload:
            assert "lora_A" in name or "lora_B" in name or name.startswith("head."), name
        assert any("lora_A" in n for n in upload) and any(n.startswith("head.") for n in upload)


def test_up_bytes_equal_the_size_of_the_uploaded_tensors(one_round):
    module, _ = one_round
    expected = sum(
        t.numel() * t.element_size() for up in module.aggregator.uploads for t in up.values()
    )
    rows = module.recorder.rows
    assert rows[-1]["comm/up_bytes"] == expected
    lora_and_head = sum(
        p.numel() * p.element_size()
        for n, p in module.model.named_parameters()
        if "lora_" in n or n.startswith("head.")
    )
    assert expected == lora_and_head * module.clients_per_round
    assert rows[-1]["comm/down_bytes"] == expected  # the broadcast is the same tensors
