"""Every option of every config group composes; bad values fail before training."""

import pytest
from omegaconf import OmegaConf

from src.config_checks import ConfigError, validate_config
from tests.conftest import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_option_composes(group, option, tmp_path):
    # text data and language models come as a pair (validate_config refuses a mix)
    partner = {"dolly": "model=qwen_tiny", "departments": "model=qwen_tiny"}
    partner |= {"qwen": "data=departments", "qwen_tiny": "data=departments"}
    extra = [partner[option]] if option in partner else []
    cfg = compose_config([f"{group}={option}", *extra], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["fl"]["rounds"] >= 1
    if group not in ("experiment", "hparams_search"):  # those two are global presets
        assert group in container


def test_groups_required_by_the_design_exist():
    required = {
        "alg": {"fedavg", "fedlora"},
        "model": {"vit", "vit_small32", "qwen", "qwen_tiny"},
        "data": {"cifar10", "mnist", "fashion_mnist", "digits", "dolly", "departments"},
        "partitioner": {"dirichlet", "iid", "shards", "natural"},
        "aggregator": {"mean"},
        "trainer": {"default", "cpu", "gpu"},
        "logger": {"wandb", "csv", "none"},
        "experiment": {"quickstart"},
    }
    for group, options in required.items():
        assert options <= set(_options(group)), group


def test_defaults_match_the_design(tmp_path):
    cfg = compose_config([], tmp_path, for_tests=False)
    assert (cfg.alg.name, cfg.model.name, cfg.data.name) == ("fedavg", "vit", "cifar10")
    assert (cfg.partitioner.name, cfg.aggregator.name) == ("dirichlet", "mean")
    assert cfg.logger.name == "wandb"
    assert cfg.trainer.accelerator == "auto"


def test_data_shape_flows_into_the_model(tmp_path):
    cfg = compose_config(["data=mnist", "model=vit_small32"], tmp_path)
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes) == (28, 1, 10)


@pytest.mark.parametrize(
    "model,optimizer,lr",
    [
        ("vit", "torch.optim.SGD", 0.05),
        ("vit_small32", "torch.optim.AdamW", 0.001),
        ("qwen", "torch.optim.AdamW", 0.0003),
        ("qwen_tiny", "torch.optim.AdamW", 0.01),
    ],
)
def test_each_model_picks_its_client_optimizer(model, optimizer, lr, tmp_path):
    cfg = compose_config([f"model={model}"], tmp_path)
    assert (cfg.optim._target_, cfg.optim.lr) == (optimizer, lr)


@pytest.mark.parametrize(
    "overrides,optimizer,lr",
    [
        (["optim=sgd"], "torch.optim.SGD", 0.05),  # sgd's own lr, not the model's AdamW lr
        (["optim.lr=0.02"], "torch.optim.AdamW", 0.02),
        (["experiment=quickstart"], "torch.optim.AdamW", 0.001),
        (["experiment=quickstart", "optim=sgd", "optim.lr=0.1"], "torch.optim.SGD", 0.1),
    ],
)
def test_the_command_line_overrides_the_models_optimizer(overrides, optimizer, lr, tmp_path):
    cfg = compose_config(["model=vit_small32", *overrides], tmp_path)
    assert (cfg.optim._target_, cfg.optim.lr) == (optimizer, lr)


@pytest.mark.parametrize("model", ["vit", "vit_small32", "qwen_tiny"])
def test_scaffold_picks_plain_sgd_over_the_models_optimizer(model, tmp_path):
    cfg = compose_config([f"model={model}", "alg=scaffold"], tmp_path)
    assert (cfg.optim._target_, cfg.optim.momentum) == ("torch.optim.SGD", 0.0)


@pytest.mark.parametrize(
    "override,key",
    [
        ("fl.clients_per_round=50", "fl.clients_per_round"),
        ("partitioner.alpha=0", "partitioner.alpha"),
        ("fl.rounds=0", "fl.rounds"),
        ("optim.lr=-1", "optim.lr"),
    ],
)
def test_bad_values_name_the_key(override, key, tmp_path):
    cfg = compose_config(["experiment=quickstart", override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_bad_lora_rank_names_the_key(tmp_path):
    cfg = compose_config(["experiment=quickstart", "alg=fedlora", "alg.lora.r=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"alg\.lora\.r"):
        validate_config(cfg)
