"""Simulated attacks, to test robust aggregators: an upload transform.

A fraction `attack.fraction` of the clients, chosen once per run from the seed, are malicious:
  sign_flip:  sends  origin + c (upload - origin)  with one c = -|N(0, 10^2)| per upload: its
              update, reversed and rescaled (origin: what it would have sent without training,
              e.g. the received model, or a fresh LoRA init where the rule sends no factors);
  gaussian:   sends N(0, 100^2) noise in place of every tensor;
  same_value: sets every coordinate to one N(0, 100^2) number;
  label_flip: trains on its data with labels mapped by a random permutation of the classes.
gaussian and same_value break any non-robust rule (the mean of such uploads is noise of scale
100, after which honest clients diverge too), so they are refused with one (src/engine/
compatibility.py). All noise comes from the client's generator (seeded by seed, round, client):
reproducible. Honest clients alone are evaluated for val/personal_acc; summary.json lists the
malicious ones. One class per attack; `ATTACKS` maps each config option's name to its class.
"""

from __future__ import annotations

import numpy as np
import torch

from src.contract.sharing import Needs
from src.errors import ConfigError
from src.transforms.chain import UploadTransform

TensorDict = dict[str, torch.Tensor]
_STREAM = 0xA77AC  # keeps these draws apart from the other seeded streams


class Attack(UploadTransform):
    """The malicious clients, shared by every attack: a fraction of the federation chosen once
    from the seed. A subclass says what they do (`forge`: what a malicious client sends,
    `batches`) and declares what it needs: `breaks_the_mean` (its uploads turn any non-robust
    rule into noise), `needs_labels`."""

    name = "none"
    breaks_the_mean = False
    needs_labels = False

    def __init__(self, fraction: float = 0.0):
        if not 0.0 <= fraction < 1.0:  # a federation of attackers only has nothing to protect
            raise ConfigError(f"attack.fraction must be in [0, 1), got {fraction}")
        self.fraction = float(fraction)
        self.malicious: set[int] = set()
        self.seed = 0

    @property
    def needs(self) -> Needs:
        return Needs(robust_aggregator=self.breaks_the_mean)

    def count(self, num_clients: int) -> int:
        """How many of `num_clients` clients are malicious."""
        return int(round(self.fraction * num_clients))

    def choose(self, num_clients: int, seed: int) -> None:
        """Pick the malicious clients once for the run: round(fraction * num_clients) of them."""
        self.seed = seed
        rng = np.random.default_rng([seed, _STREAM])
        chosen = rng.choice(num_clients, size=self.count(num_clients), replace=False)
        self.malicious = {int(c) for c in chosen}

    def apply(self, client_id, upload, origin, generator) -> TensorDict:
        """An honest client's upload as it is; a malicious one's `forge`d."""
        if client_id not in self.malicious:
            return upload
        return self.forge(upload, origin, generator)

    def forge(self, upload: TensorDict, origin, generator) -> TensorDict:
        """What a malicious client sends instead of `upload` (new tensors; the model untouched):
        the upload itself where the attack acts elsewhere (label_flip's batches)."""
        return upload

    def state_dict(self) -> dict:
        return {"malicious": sorted(self.malicious), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.malicious = set(state["malicious"])
        self.seed = state.get("seed", self.seed)


class NoAttack(Attack):
    """attack=none: every client is honest."""

    def count(self, num_clients: int) -> int:
        return 0


class SignFlip(Attack):
    name = "sign_flip"

    def needs_origin(self, client_id: int) -> bool:
        return client_id in self.malicious

    def forge(self, upload, origin, generator) -> TensorDict:
        """origin + c (upload - origin), one c = -|N(0, 10^2)| per upload."""
        factor = -_normal(generator, (), next(iter(upload.values()))).abs() * 10
        return {n: origin[n] + factor * (t - origin[n]) for n, t in upload.items()}


class GaussianNoise(Attack):
    name = "gaussian"
    breaks_the_mean = True

    def forge(self, upload, origin, generator) -> TensorDict:
        """N(0, 100^2) noise in place of every tensor."""
        return {n: _normal(generator, t.shape, t) * 100 for n, t in upload.items()}


class SameValue(Attack):
    name = "same_value"
    breaks_the_mean = True

    def forge(self, upload, origin, generator) -> TensorDict:
        """Every coordinate set to one N(0, 100^2) number."""
        value = _normal(generator, (), next(iter(upload.values()))) * 100
        return {n: torch.full_like(t, value.item()) for n, t in upload.items()}


class LabelFlip(Attack):
    name = "label_flip"
    needs_labels = True

    def label_map(self, client_id: int, num_classes: int) -> torch.Tensor | None:
        """The client's fixed permutation of the classes (None: an honest client's labels)."""
        if client_id not in self.malicious:
            return None
        rng = np.random.default_rng([self.seed, client_id, _STREAM])
        return torch.from_numpy(rng.permutation(num_classes))

    def batches(self, client_id, batches, num_classes: int):
        label_map = self.label_map(client_id, num_classes)
        if label_map is None:
            return batches
        return ((inputs, label_map.to(labels.device)[labels]) for inputs, labels in batches)


ATTACKS = {kind.name: kind for kind in (NoAttack, SignFlip, GaussianNoise, SameValue, LabelFlip)}


def _normal(generator: torch.Generator, shape, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) of `shape` from the client's generator, on `like`'s device and dtype."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device=like.device, dtype=like.dtype)
