"""Short run names: a sweep job's folder and its W&B run name hold only the overrides that vary
across the sweep, without the keys that do not change the experiment (trainer.*, logger.*,
paths.*, hydra.*, experiment, resume). The full override list stays in `.hydra/overrides.yaml`
and in the W&B config. A one-off run keeps its time-stamped folder."""

from __future__ import annotations

import os

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

# first parts of the keys that choose where and how a run executes, not what it computes
NOISE_KEYS = ("trainer", "logger", "paths", "hydra", "experiment", "resume")
# the keys a running sweep varies, set by src.sweep_report.SweepProgress for its jobs
SWEEP_KEYS_ENV = "FEDSWEEP_SWEEP_KEYS"


def override_key(override: str) -> str:
    """`+alg.mu=0.1` -> `alg.mu`."""
    return override.split("=", 1)[0].lstrip("+~")


def run_name(overrides: list[str], varying: set[str] | None = None) -> str:
    """The overrides that name a run: without noise keys and, in a sweep (`varying`), only the
    keys the sweep varies; sorted, comma-joined; 'default' when none is left."""
    kept = [
        o
        for o in overrides
        if override_key(o).split(".")[0] not in NOISE_KEYS
        and (varying is None or override_key(o) in varying)
    ]
    return ",".join(sorted(kept)) or "default"


def sweep_keys() -> set[str] | None:
    """The keys the running sweep varies (None outside a sweep, or when unknown)."""
    keys = os.environ.get(SWEEP_KEYS_ENV)
    return set(keys.split(",")) - {""} if keys is not None else None


def current_run_name() -> str:
    """This Hydra job's run name (the `fedsweep_run_name` resolver of conf/config.yaml)."""
    return run_name(list(HydraConfig.get().overrides.task), sweep_keys())


def register_resolver() -> None:
    if not OmegaConf.has_resolver("fedsweep_run_name"):
        OmegaConf.register_new_resolver("fedsweep_run_name", current_run_name)
