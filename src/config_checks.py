"""Config checks that run before anything is built: one clear line naming the key."""

from __future__ import annotations

from omegaconf import DictConfig

from src.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    text_data, language_model = "tokenizer" in cfg.data.loader, "tokenizer" in cfg.model
    _require(
        text_data == language_model,
        f"data={cfg.data.name} needs "
        + ("a language model (model=qwen or qwen_tiny)" if text_data else "an image model (vit)")
        + f", got model={cfg.model.name}",
    )
    fl = cfg.fl
    _require(fl.rounds >= 1, f"fl.rounds must be >= 1, got {fl.rounds}")
    _require(fl.num_clients >= 1, f"fl.num_clients must be >= 1, got {fl.num_clients}")
    _require(
        1 <= fl.clients_per_round <= fl.num_clients,
        f"fl.clients_per_round must be in [1, fl.num_clients={fl.num_clients}], got {fl.clients_per_round}",
    )
    _require(fl.local_epochs >= 1, f"fl.local_epochs must be >= 1, got {fl.local_epochs}")
    _require(fl.batch_size >= 1, f"fl.batch_size must be >= 1, got {fl.batch_size}")
    _require(fl.eval_every >= 1, f"fl.eval_every must be >= 1, got {fl.eval_every}")
    _require(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    if "alpha" in cfg.partitioner:
        _require(
            cfg.partitioner.alpha > 0, f"partitioner.alpha must be > 0, got {cfg.partitioner.alpha}"
        )
    _require(
        0 <= cfg.partitioner.test_fraction < 1,
        f"partitioner.test_fraction must be in [0, 1), got {cfg.partitioner.test_fraction}",
    )
    if cfg.aggregator.name == "krum":  # Krum's guarantee needs K > 2f + 2
        f = cfg.aggregator.num_byzantine
        _require(
            fl.clients_per_round > 2 * f + 2,
            f"aggregator=krum with aggregator.num_byzantine={f} needs fl.clients_per_round > "
            f"2 * {f} + 2 = {2 * f + 2}, got {fl.clients_per_round}; sample more clients or "
            "lower num_byzantine",
        )
    fault = cfg.get("fault", {})
    for key in ("fail_fraction", "nan_fraction"):
        value = fault.get(key, 0.0)
        _require(0 <= value <= 1, f"fault.{key} must be in [0, 1], got {value}")
    lora = cfg.alg.get("lora")
    if lora is not None:
        _require(lora.r >= 1, f"alg.lora.r must be >= 1, got {lora.r}")
        _require(lora.alpha > 0, f"alg.lora.alpha must be > 0, got {lora.alpha}")
