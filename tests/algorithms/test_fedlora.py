"""fedlora shares only LoRA + head: the backbone never changes and never crosses the network."""

import pytest
import torch

from src.aggregators import ZeroPadAggregator
from src.run import build_module, build_trainer
from tests.conftest import ONE_BLOCK_VIT, RecordingMean, digits_config


@pytest.fixture(scope="module")  # one run, only read by the tests below
def one_round(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("one_round")
    cfg = digits_config(tmp_path, "alg=fedlora", "fl.rounds=1", *ONE_BLOCK_VIT)
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingMean()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
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


class RecordingZeroPad(ZeroPadAggregator):
    """zeropad, remembering each client's upload and the full resident LoRA factors it trained."""

    def _add(self, upload, weight, client_id):
        full = {n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n}
        self.seen.append((client_id, {n: t.clone() for n, t in upload.items()}, full))
        super()._add(upload, weight, client_id)


def test_a_rank_rk_client_trains_and_uploads_exactly_rank_rk(make_digits_config, tmp_path):
    cfg = make_digits_config(
        "alg=fedlora", "alg.client_ranks=[2,4,8]", "aggregator=zeropad", "fl.rounds=1"
    )
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingZeroPad(name="zeropad")
    module.aggregator.model, module.aggregator.seen = module.model, []
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)

    alg = module.algorithm
    assert {alg.client_rank(cid) for cid, _, _ in module.aggregator.seen} == {2, 4, 8}
    for client_id, upload, full in module.aggregator.seen:
        r = alg.client_rank(client_id)
        for pair in alg.pairs:
            assert upload[pair.a].shape == (r, full[pair.a].shape[1])
            assert upload[pair.b].shape == (full[pair.b].shape[0], r)
            assert not full[pair.a][r:].any() and not full[pair.b][:, r:].any()  # held at zero
            update = alg.lora_ranks.scale(r) * full[pair.b].double() @ full[pair.a].double()
            assert torch.linalg.matrix_rank(update).item() <= r
            assert upload[pair.b].abs().sum() > 0  # it did train
