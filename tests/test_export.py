"""export=true: every algorithm's final models written to export/ and loaded back, each predicting
exactly what the run's resident model predicted when it deployed that model."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from src.export import export_models, load_exported
from src.run import build_module, build_trainer, train
from tests.conftest import digits_config

# every algorithm but FedDPA (whose clients weigh two adapters per input: its own test below),
# and one LoRA rule that merges products into the base weights; between them every format: the
# whole model (global, personal), a peft adapter (global, personal at rank r_k), the whole model
# with LoRA products merged, no global model (perfed)
CASES = {
    "fedavg": [],
    "fedlora": [],
    "ffa-lora": [],
    "fedprox": [],
    "scaffold": [],
    "fednova": [],
    "feddyn": [],
    "rolora": [],
    "lora-fair": [],
    "ditto": [],
    "fedsa-flora": ["alg.client_ranks=[4,8]"],
    "perfed": ["alg.d=64"],
    "fedlora-stack": ["aggregator=stack"],
}


def _fit_and_export(tmp_path, *overrides):
    cfg = digits_config(
        tmp_path, "fl.rounds=1", "fl.num_clients=4", "fl.clients_per_round=2", *overrides
    )
    module = build_module(cfg, tmp_path)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    build_trainer(cfg, logger=False, enable_checkpointing=False).fit(module)
    folders = export_models(module, tmp_path / "export")
    return module, folders


def _same_predictions(module, export_dir, which):
    images, _ = module.federation.test.batch(torch.arange(16))
    module.deploy(None if which == "global" else which)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(images)
        got = load_exported(export_dir, which)(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_back_every_model_it_wrote(case, tmp_path):
    module, folders = _fit_and_export(tmp_path, f"alg={case.removesuffix('-stack')}", *CASES[case])
    clients = list(range(4)) if module.algorithm.personalized else []
    has_global = case != "perfed"  # its server holds x in R^d, not a model
    expected = ["global"] * has_global + [f"client_{c:04d}" for c in clients]
    assert [f.name for f in folders] == expected
    for which in ["global"] * has_global + clients:
        _same_predictions(module, tmp_path / "export", which)


def test_formats_adapter_at_the_clients_rank_and_whole_model_when_merged(tmp_path):
    _fit_and_export(tmp_path / "a", "alg=fedsa-flora", "alg.client_ranks=[4,8]")
    config = json.loads((tmp_path / "a/export/client_0000/adapter_config.json").read_text())
    assert (config["r"], config["modules_to_save"]) == (4, ["head"])
    assert json.loads((tmp_path / "a/export/global/adapter_config.json").read_text())["r"] == 8
    _fit_and_export(tmp_path / "b", "alg=fedlora", "aggregator=stack")
    names = load_file(tmp_path / "b/export/global/model.safetensors")
    assert not any("lora_" in n or "base_layer" in n for n in names)


def test_feddpa_client_exports_both_adapters(tmp_path):
    module, _ = _fit_and_export(tmp_path, "alg=feddpa")
    _same_predictions(module, tmp_path / "export", "global")  # G alone
    loaded = load_exported(tmp_path / "export", 1)
    assert set(loaded.peft_config) == {"default", "local"}
    private = module.store.load(1)  # L, as the client keeps it
    weights = dict(loaded.named_parameters())
    for name, tensor in private.items():
        if ".lora_" in name:
            on_disk = "base_model.model." + name
            torch.testing.assert_close(weights[on_disk], tensor, rtol=0, atol=0)


def test_a_finished_run_exports_when_run_again_with_export_true(tmp_path):
    cfg = digits_config(tmp_path, "fl.rounds=1", "resume=auto")
    train(cfg)
    assert not (tmp_path / "run" / "export").exists()
    summary = train(digits_config(tmp_path, "fl.rounds=1", "resume=auto", "export=true"))
    assert summary["rounds_done"] == 1
    assert (tmp_path / "run" / "export" / "global" / "model.safetensors").exists()


def test_export_must_be_a_boolean(tmp_path):
    from src.config_checks import validate_config
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match="export"):
        validate_config(digits_config(tmp_path, "export=yes"))
