"""Injected client faults (`fault.fail_fraction`, `fault.nan_fraction`), to test that a round
survives clients that crash or send garbage.

Each round, round(fraction x sampled) of the sampled clients are picked from (seed, round): the
first group raises `InjectedFault` before local training, the second uploads NaN. The orchestrator
drops both and counts them (`clients/dropped`, `clients/nonfinite`). Any other exception raised
while a client trains is a bug and stops the run, unless `fault.on_error=drop`.
"""

from __future__ import annotations

import numpy as np
import torch

from src.errors import ConfigError
from src.transforms.chain import InjectedFault, UploadTransform

_FAULT_STREAM = 0xFA1
ON_ERROR = ("stop", "drop")


class ClientFaults(UploadTransform):
    name = "fault"

    def __init__(
        self, fail_fraction: float = 0.0, nan_fraction: float = 0.0, on_error: str = "stop"
    ):
        if on_error not in ON_ERROR:
            raise ConfigError(f"fault.on_error must be one of stop, drop; got {on_error!r}")
        self.fail_fraction, self.nan_fraction = float(fail_fraction), float(nan_fraction)
        if self.fail_fraction + self.nan_fraction > 1:
            raise ConfigError(
                f"fault.fail_fraction={fail_fraction} plus fault.nan_fraction={nan_fraction} is "
                "more than every sampled client; use fractions that sum to at most 1"
            )
        self.on_error = on_error
        self.failing: set[int] = set()
        self.poisoned: set[int] = set()

    def begin_round(self, sampled: list[int], seed: int, round_idx: int) -> None:
        """Pick this round's faulty clients (the same on every DDP rank)."""
        if not (self.fail_fraction or self.nan_fraction):
            return
        order = np.random.default_rng([seed, round_idx, _FAULT_STREAM]).permutation(sampled)
        fail = round(self.fail_fraction * len(sampled))
        # rounding both up can ask for one more than there are (0.5 + 0.5 of 3 clients): the NaN
        # group gets the rest
        nan = min(round(self.nan_fraction * len(sampled)), len(sampled) - fail)
        self.failing = {int(c) for c in order[:fail]}
        self.poisoned = {int(c) for c in order[fail : fail + nan]}

    def before_training(self, client_id: int) -> None:
        if client_id in self.failing:
            raise InjectedFault("injected failure (fault.fail_fraction)")

    def apply(self, client_id, upload, origin, generator):
        if client_id in self.poisoned:
            return {name: torch.full_like(t, float("nan")) for name, t in upload.items()}
        return upload
