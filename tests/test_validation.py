"""Every user-facing key is checked before training: one line naming the key, the value and what
is allowed. Fast: composed configs go to validate_config / check_dataset_matches directly; the
CLI cases stop before any training."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from src.config_checks import check_dataset_matches, validate_config
from src.errors import ConfigError
from src.run import build_module
from tests.conftest import CONF_DIR, compose_config, run_main

QUICK = ["experiment=quickstart"]

# (overrides, what the message must contain: the key, the value, what is allowed)
BAD_VALUES = [
    (["seed=-1"], ["seed must be >= 0, got -1"]),
    (["partitioner.alpha=abc"], ["partitioner.alpha='abc' must be a number (float)"]),
    (
        ["partitioner.test_fraction=0"],
        ["partitioner.test_fraction must be in (0, 1), got 0", "val/personal_acc"],
    ),
    (["fl.checkpoint_every=0"], ["fl.checkpoint_every must be >= 1, got 0"]),
    (["fl.rounds=2.5"], ["fl.rounds=2.5 must be an integer (int)"]),
    (["fl.rounds=2.0"], ["fl.rounds=2.0 must be an integer (int)"]),
    (["fl.eval_batch_size=true"], ["fl.eval_batch_size=true must be an integer (int)"]),
    (["optim=sgd", "optim.momentum=-1"], ["optim.momentum must be in [0, 1), got -1"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay must be >= 0, got -0.1"]),
    (
        ["optim=adamw", "optim.betas=[0.9,1.5]"],
        ["optim.betas must be two numbers in [0, 1), got [0.9, 1.5]"],
    ),
    (["optim.eps=0"], ["optim.eps must be > 0, got 0"]),
    (
        ["trainer.precision=16-mixed"],
        ["trainer.precision must be 32-true or bf16-mixed, got 16-mixed", "loss scaler"],
    ),
    (["trainer.precision=bf16-true"], ["got bf16-true: it casts every parameter", "LoRA"]),
    (
        ["optim=sgd", "optim.momentum=0", "+optim.nesterov=true"],
        ["optim=sgd: torch.optim.SGD refuses these settings: Nesterov momentum"],
    ),
    (["+alg.foo=1"], ["alg.foo is not an option of alg=fedavg; its keys are: name"]),
    (["+optim.momentum=0.5"], ["optim.momentum is not an option of optim=adamw", "betas"]),
    (["+data.loader.foo=1"], ["data.loader.foo is not an option of data=digits", "image_size"]),
    (
        ["aggregator=krum", "aggregator.num_byzantine=x"],
        ["aggregator.num_byzantine='x' must be an integer (int)"],
    ),
    (["alg=fedlora", "alg.trainable=[head,3]"], ["alg.trainable=['head', 3] must be a list"]),
    (["alg=perfed", "alg.use_lora=maybe"], ["alg.use_lora='maybe' must be true or false"]),
    (["model.arch=5"], ["model.arch=5 must be a string or null"]),
    (["++fault.on_error=retry"], ["fault.on_error='retry' must be one of 'stop', 'drop'"]),
    (["fault.fail_fraction=1.5"], ["fault.fail_fraction must be in [0, 1], got 1.5"]),
    (["resume=null"], ["resume=null must be a string"]),
    (["fl.sampling=size"], ["fl.sampling='size' must be one of 'uniform', 'by_samples'"]),
    (["fl.eval_clients=11"], ["fl.eval_clients must be all or in [1, fl.num_clients=10], got 11"]),
    (
        ["model.num_heads=4", "model.embed_dim=30"],
        ["model.embed_dim must be >= 1 and a multiple of model.num_heads=4, got 30"],
    ),
    (["model.depth=0"], ["model.depth must be >= 1, got 0"]),
    (["model.patch_size=0"], ["model.patch_size must be >= 1, got 0"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio must be > 0, got 0"]),
    (["model.drop_path_rate=1"], ["model.drop_path_rate must be in [0, 1), got 1"]),
    (
        ["model=qwen_tiny", "data=departments", "model.hidden_size=66"],
        ["model.hidden_size must be >= 1 and a multiple of model.num_attention_heads=4, got 66"],
    ),
    (["data=synthetic", "data.loader.noise=-1"], ["data.loader.noise must be >= 0, got -1"]),
    (
        ["privacy=dp_fedavg", "fl.sampling=by_samples"],
        ["fl.sampling=by_samples with privacy=dp_fedavg", "q = m / N"],
    ),
    (
        ["alg=scaffold", "optim=adamw"],
        ["alg=scaffold needs plain SGD clients", "got torch.optim.AdamW", "optim.momentum=0"],
    ),
    (["alg=scaffold", "optim=sgd"], ["alg=scaffold needs plain SGD", "got optim.momentum=0.9"]),
]


@pytest.mark.parametrize("overrides, expected", BAD_VALUES, ids=lambda v: " ".join(v)[:60])
def test_bad_value_names_key_value_and_what_is_allowed(overrides, expected, tmp_path):
    cfg = compose_config([*QUICK, *overrides], tmp_path)
    with pytest.raises(ConfigError) as refused:  # the keys, then what the classes declare
        validate_config(cfg)
        build_module(cfg, tmp_path / "run")
    message = str(refused.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.channels=3"], "data.channels=3 but data=digits has 1-channel images"),
        (["data.loader.image_size=8"], "data.image_size=16 but data=digits has 8x8 images"),
        (["data.num_classes=5"], "data.num_classes=5 but data=digits has label 9"),
        (["model.img_size=8"], "model.img_size=8 but data=digits has 16x16 images"),
        (["model.in_chans=3"], "model.in_chans=3 but data=digits has 1-channel images"),
        (["model.num_classes=5"], "model.num_classes=5 but data=digits has label 9"),
    ],
)
def test_loaded_images_must_match_the_data_keys(overrides, expected, tmp_path):
    cfg = compose_config([*QUICK, "data=digits", *overrides], tmp_path)
    validate_config(cfg)  # each value alone is fine: only the loaded images disagree
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        check_dataset_matches(cfg, instantiate(cfg.data.loader))


def test_matching_dataset_passes(tmp_path):
    cfg = compose_config(
        [*QUICK, "data=synthetic", "data.channels=3", "data.image_size=8"], tmp_path
    )
    check_dataset_matches(cfg, instantiate(cfg.data.loader, num_train=50, num_test=20))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = ("alg", "aggregator", "attack", "partitioner", "optim", "model", "data")
PARTNER = {"qwen": "data=departments", "qwen_tiny": "data=departments"}
PARTNER |= {"dolly": "model=qwen_tiny", "departments": "model=qwen_tiny"}


@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_option_passes_with_its_defaults(group, option, tmp_path):
    extra = [PARTNER[option]] if option in PARTNER else []
    validate_config(compose_config([*QUICK, f"{group}={option}", *extra], tmp_path))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["seed=-1"], "seed must be >= 0, got -1"),
        (["+alg.foo=1"], "alg.foo is not an option of alg=fedavg"),
        (
            ["privacy=dp_fedavg", "aggregator=krum"],
            "privacy=dp_fedavg works with aggregator=mean only",
        ),
        (["model.img_size=8"], "model.img_size=8 but data=digits has 16x16 images"),
        (
            ["attack=sign_flip", "attack.fraction=0.5", "fl.eval_clients=6"],
            "fl.eval_clients=6 but only 5 clients are honest and have a local test split",
        ),
        (
            ["trainer.accelerator=mps"],
            "trainer.accelerator=mps trainer.devices=1: Lightning refuses",
        ),
        (
            ["alg=fedsa-flora", "alg.cluster.enabled=true", "alg.cluster.k=6"],
            "alg.cluster.k=6 but k-means sees at most 5 clients a round",
        ),
        (
            ["alg=fedsa-flora", "alg.cluster.enabled=true", "fl.clients_per_round=3"],
            "alg.cluster.max_k=5 but k-means sees at most 3 clients a round",
        ),
        (
            ["aggregator=krum", "aggregator.m=6"],
            "aggregator=krum needs at least 6 uploads per round (aggregator.m=6",
        ),
        (
            ["fault.fail_fraction=0.6", "fault.nan_fraction=0.5"],
            "fault.fail_fraction=0.6 plus fault.nan_fraction=0.5 is more than every sampled",
        ),
    ],
)
def test_cli_gives_one_line_and_exit_code_2(overrides, expected, tmp_path, monkeypatch, capfd):
    args = [*QUICK, "logger=none", f"hydra.run.dir={tmp_path}", *overrides]
    code, output = run_main(args, monkeypatch, capfd)
    assert code == 2
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert expected in line


@pytest.mark.parametrize(
    "args, key",
    [
        ([*QUICK, "hydra.run.dir=/proc/fedsweep-x"], "hydra.run.dir=/proc/fedsweep-x"),
        (
            ["-m", *QUICK, "seed=0,1", "hydra.sweep.dir=/proc/fedsweep-y"],
            "hydra.sweep.dir=/proc/fedsweep-y",
        ),
    ],
)
def test_uncreatable_output_folder_gives_one_line(args, key, monkeypatch, capfd):
    code, output = run_main([*args, "logger=none"], monkeypatch, capfd)
    assert code == 2, output[-1500:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "ERROR" in line]
    assert f"{key} cannot be created" in line
    assert "point " + key.split("=")[0] + " at a folder you can write" in line
