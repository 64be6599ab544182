"""Seeds and client sampling that depend only on (seed, round, client), never on run order."""

from __future__ import annotations

import numpy as np
import torch

_SAMPLING_STREAM = 0x5A3
_CLIENT_STREAM = 0xC11


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """`per_round` distinct client ids, uniformly at random, sorted."""
    rng = np.random.default_rng([seed, round_idx, _SAMPLING_STREAM])
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's work in one round (batch order, dropout, augmentation)."""
    state = np.random.SeedSequence([seed, round_idx, client_id, _CLIENT_STREAM]).generate_state(1)
    return int(state[0])


def client_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device`, seeded; also re-seeds torch's global RNG (dropout) to `seed`."""
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)
