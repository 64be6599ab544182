"""Config checks that run before anything is built: one clear line naming the key."""

from __future__ import annotations

import math
from typing import Literal

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.config_types import check_targets, check_value, option, show
from src.errors import ConfigError

_ABSENT = object()


def _at_least(low):
    return lambda v, c: v >= low, f">= {low}"


def _above(low):
    return lambda v, c: v > low, f"> {low}"


_FRACTION = (lambda v, c: 0 <= v <= 1, "in [0, 1]")
_BELOW_ONE = (lambda v, c: 0 <= v < 1, "in [0, 1)")
_ANY = (None, "")
_AUTO_OR_COUNT = (lambda v, c: v == "auto" or v >= 1, "auto or >= 1")
_FL_COUNTS = ("rounds", "num_clients", "local_epochs", "batch_size", "eval_every")
_FL_COUNTS += ("eval_batch_size", "checkpoint_every")


def _finite(test, allowed):
    """A range test that also refuses inf (and nan, which fails every comparison)."""
    return lambda v, c: v is not None and math.isfinite(v) and test(v), allowed


def _null_or(test, allowed):
    return lambda v, c: v is None or (math.isfinite(v) and test(v)), f"null or {allowed}"


# privacy=dp_fedavg (src/transforms/privacy.py)
_PRIVACY_RULES = (
    ("privacy.clip", float, *_finite(lambda v: v > 0, "> 0 (finite)")),
    ("privacy.noise_multiplier", float, *_finite(lambda v: v >= 0, ">= 0 (finite)")),
    ("privacy.delta", float, lambda v, c: 0 < v < 1, "in (0, 1)"),
    ("privacy.target_epsilon", float | None, *_null_or(lambda v: v > 0, "> 0")),
    ("privacy.adaptive_clip", bool, None, ""),
    ("privacy.target_quantile", float, lambda v, c: 0 < v < 1, "in (0, 1)"),
    ("privacy.clip_lr", float, *_finite(lambda v: v > 0, "> 0 (finite)")),
    ("privacy.clipped_count_stddev", float | None, *_null_or(lambda v: v > 0, "> 0")),
)


def _multiple_of(key):
    """>= 1 and a multiple of the config's `key` (when the model has that key)."""

    def test(v, c):
        divisor = OmegaConf.select(c, key)
        return v >= 1 and (divisor is None or v % divisor == 0)

    return test, f">= 1 and a multiple of {key}={{c.{key}}}"


# the architecture keys of the model options (vit_small32; qwen_tiny): what timm / transformers
# would otherwise stop on with an assertion. The divisor comes first, so it is >= 1 when used.
_MODEL_RULES = (
    *((f"model.{key}", int, *_at_least(1)) for key in ("depth", "num_heads", "patch_size")),
    ("model.embed_dim", int, *_multiple_of("model.num_heads")),
    ("model.mlp_ratio", float, *_above(0)),
    *((f"model.{key}", float, *_BELOW_ONE) for key in ("drop_rate", "drop_path_rate")),
    *((f"model.{key}", int, *_at_least(1)) for key in ("num_hidden_layers", "intermediate_size")),
    ("model.num_key_value_heads", int, *_at_least(1)),
    ("model.num_attention_heads", int, *_multiple_of("model.num_key_value_heads")),
    ("model.hidden_size", int, *_multiple_of("model.num_attention_heads")),
)

# (key, type, test of the value, what is allowed; "{c.x}" reads the config). Absent keys pass.
RULES = (
    ("seed", int, *_at_least(0)),
    *((f"fl.{key}", int, *_at_least(1)) for key in _FL_COUNTS),
    (
        "fl.clients_per_round",
        int,
        lambda v, c: 1 <= v <= c.fl.num_clients,
        "in [1, fl.num_clients={c.fl.num_clients}]",
    ),
    ("fault.fail_fraction", float, *_FRACTION),
    ("fault.nan_fraction", float, *_FRACTION),
    ("fault.on_error", Literal["stop", "drop"], *_ANY),
    ("export", bool, *_ANY),
    ("resume", str, *_ANY),  # auto | never | the path of a last.ckpt
    ("optimized_metric", str, *_ANY),
    *((f"data.{key}", int, *_at_least(1)) for key in ("image_size", "channels", "num_classes")),
    ("data.max_length", int, *_at_least(8)),  # tokens
    ("partitioner.alpha", float, *_above(0)),  # also refuses nan
    ("partitioner.test_fraction", float, lambda v, c: 0 < v < 1, "in (0, 1)"),
    ("alg.lora.r", int, *_at_least(1)),
    ("alg.lora.alpha", float, *_above(0)),
    ("optim.lr", float, *_above(0)),
    ("optim.momentum", float, *_BELOW_ONE),
    ("optim.weight_decay", float, *_at_least(0)),
    (
        "optim.betas",
        tuple[float, float],
        lambda v, c: all(0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    ),
    ("optim.eps", float, *_above(0)),
    ("trainer.threads", Literal["auto"] | int, *_AUTO_OR_COUNT),
    ("trainer.processes", Literal["auto"] | int, *_AUTO_OR_COUNT),
    ("fl.parallel_clients", Literal["auto"] | int, *_AUTO_OR_COUNT),
    ("fl.sampling", Literal["uniform", "by_samples"], *_ANY),
    ("fl.client_state_memory_gb", float, *_finite(lambda v: v > 0, "> 0 (finite)")),
    (
        "fl.eval_clients",
        Literal["all"] | int,
        lambda v, c: v == "all" or 1 <= v <= c.fl.num_clients,
        "all or in [1, fl.num_clients={c.fl.num_clients}]",
    ),
    ("data.loader.noise", float, *_at_least(0)),  # data=synthetic's pixel noise std
    *_MODEL_RULES,
    *_PRIVACY_RULES,
)
WHY = {
    "partitioner.test_fraction": "0 leaves the clients without a local test split, on which "
    "val/personal_acc is measured",
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_rules(cfg: DictConfig) -> None:
    """The type and range of every key in RULES that the config has."""
    for key, kind, test, allowed in RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        check_value(key, value, kind)
        if test is not None and not test(value, cfg):
            why = f"; {WHY[key]}" if key in WHY else ""
            raise ConfigError(f"{key} must be {allowed.format(c=cfg)}, got {show(value)}{why}")


def check_optimizer(cfg: DictConfig) -> None:
    """Build the client optimizer once on a dummy parameter: torch's own checks of its settings."""
    build = instantiate(cfg.optim)
    try:
        build([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"{option(cfg, 'optim')}: {cfg.optim._target_} refuses these settings: "
            + (str(error).splitlines() or [type(error).__name__])[0]
        ) from error


# trainer.precision: what works with per-client optimizers and float32 LoRA factors
PRECISIONS = ("32-true", "32", "bf16-mixed")
FP16_SCALER = (
    "fp16 needs a loss scaler, and Lightning's GradScaler does not reach the per-client "
    "optimizers fedsweep creates; use bf16-mixed"
)
PRECISION_WHY = {
    "16-mixed": FP16_SCALER,
    "16": FP16_SCALER,
    "bf16-true": "it casts every parameter, the trained LoRA factors included, to bf16; use "
    "bf16-mixed, or model.dtype=bf16 for Qwen (its LoRA factors stay float32)",
}
PRECISION_WHY["16-true"] = PRECISION_WHY["bf16-true"].replace("bf16", "fp16", 1)
PRECISION_WHY["bf16"] = PRECISION_WHY["bf16-true"]


def check_precision(cfg: DictConfig) -> None:
    value = OmegaConf.select(cfg, "trainer.precision", default=None)
    if value is None or str(value) in PRECISIONS:
        return
    why = PRECISION_WHY.get(str(value), "the others are not supported")
    raise ConfigError(f"trainer.precision must be 32-true or bf16-mixed, got {value}: {why}")


def check_processes(cfg: DictConfig) -> None:
    """trainer.processes=N > 1 forks N one-thread processes on the CPU (src/engine/layout.py); the
    trainer's own multi-process settings (trainer=ddp, trainer.devices) are the other way."""
    trainer = cfg.trainer
    processes = trainer.get("processes", "auto")
    if processes == "auto" or processes == 1:
        return
    given = f"trainer.processes={processes}"
    _require(
        trainer.get("strategy") is None and trainer.get("devices") == 1,
        f"{given} with trainer.devices={trainer.get('devices')} / trainer=ddp: use one of them "
        "(trainer.processes forks CPU processes itself)",
    )
    _require(
        trainer.get("accelerator") == "cpu"
        or (trainer.get("accelerator") == "auto" and not torch.cuda.is_available()),
        f"{given} is for the CPU, but trainer.accelerator={trainer.get('accelerator')} "
        "(on GPUs: trainer=ddp)",
    )
    _require(
        trainer.get("threads", "auto") in ("auto", 1),
        f"{given} with trainer.threads={trainer.threads}: forked processes run one thread each "
        "(a process forked after OpenMP threads ran hangs in GNU OpenMP); use trainer.threads=1 "
        "or trainer.processes=1",
    )


def check_privacy(cfg: DictConfig) -> None:
    """privacy=dp_fedavg: the sampling and weighting its noise is calibrated for (the algorithm
    and aggregator it needs: their declarations, src/engine/compatibility.py)."""
    node = cfg.get("privacy")
    if node is None:
        return
    name = node.get("name")
    if name == "none":
        extra = [key for key in node if key != "name"]
        _require(
            not extra,
            f"privacy.{extra[0] if extra else ''} is not an option of privacy=none; "
            "use privacy=dp_fedavg",
        )
        return
    option = f"privacy={name}"
    sampling = OmegaConf.select(cfg, "fl.sampling", default="uniform")
    _require(
        sampling == "uniform",
        f"fl.sampling={sampling} with {option}: the accountant's sampling rate q = m / N holds "
        "for uniform sampling only; use fl.sampling=uniform",
    )
    weighting = OmegaConf.select(cfg, "alg.weighting", default="samples")
    _require(
        weighting == "uniform",
        f"alg.weighting={weighting} with {option}: every clipped update must weigh 1/m "
        "(m = fl.clients_per_round); use alg.weighting=uniform, which privacy=dp_fedavg sets",
    )
    _require(
        not OmegaConf.select(cfg, "alg.cluster.enabled", default=False),
        f"alg.cluster.enabled=true with {option}: the cluster means are made of un-noised "
        "uploads and sent to the clients; use alg.cluster.enabled=false",
    )
    groups = OmegaConf.select(cfg, "alg.groups", default="none")
    _require(
        groups == "none",
        f"alg.groups={groups} with {option}: a group's mean weighs a client by one over its "
        "group's sampled members, not 1/m, so the noise would not cover it; use alg.groups=none",
    )


def validate_config(cfg: DictConfig) -> None:
    text_data, language_model = "tokenizer" in cfg.data.loader, "tokenizer" in cfg.model
    _require(
        text_data == language_model,
        f"data={cfg.data.name} needs "
        + ("a language model (model=qwen or qwen_tiny)" if text_data else "an image model (vit)")
        + f", got model={cfg.model.name}",
    )
    check_rules(cfg)
    check_precision(cfg)
    check_processes(cfg)
    check_targets(cfg)
    check_privacy(cfg)
    check_optimizer(cfg)


def check_dataset_matches(cfg: DictConfig, dataset) -> None:
    """Right after `dataset = instantiate(cfg.data.loader)`: the loaded images agree with
    data.channels, data.image_size and data.num_classes, from which the model is built."""
    from src.data.datasets import ImageDataset

    if not isinstance(dataset, ImageDataset):
        return
    data = cfg.data
    for split in (dataset.train, dataset.test):
        _, channels, height, width = split.images.shape  # uint8 [N, C, H, W]
        _require(
            channels == data.channels,
            f"data.channels={data.channels} but data={data.name} has {channels}-channel images",
        )
        _require(
            height == width == data.image_size,
            f"data.image_size={data.image_size} but data={data.name} has {height}x{width} images",
        )
        top = int(split.labels.max()) if len(split) else -1
        _require(
            top < data.num_classes,
            f"data.num_classes={data.num_classes} but data={data.name} has label {top}; "
            f"it needs data.num_classes >= {top + 1}",
        )
        # the model's own keys default to the data's (${data.image_size}), but can be set apart
        for key, value in (("img_size", height), ("in_chans", channels)):
            given = cfg.model.get(key)
            _require(
                given is None or given == value,
                f"model.{key}={given} but data={data.name} has "
                + (
                    f"{height}x{width} images"
                    if key == "img_size"
                    else f"{channels}-channel images"
                )
                + f"; use model.{key}={value} (or leave it to follow data.*)",
            )
        classes = cfg.model.get("num_classes")
        _require(
            classes is None or classes > top,
            f"model.num_classes={classes} but data={data.name} has label {top}; "
            f"it needs model.num_classes >= {top + 1}",
        )
