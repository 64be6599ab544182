"""Seeds and client sampling that depend only on (seed, round, client), never on run order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_SAMPLING_STREAM = 0x5A3
_CLIENT_STREAM = 0xC11


def sample_clients(
    num_clients: int,
    per_round: int,
    seed: int,
    round_idx: int,
    weights: Sequence[float] | None = None,
    among: Sequence[int] | None = None,
) -> list[int]:
    """`per_round` distinct client ids, sorted: uniformly at random, or (`weights`, e.g. the
    clients' train samples) drawn one after the other with probability proportional to the
    weights of those not yet drawn (numpy's `choice(replace=False, p=...)`); `among`: only
    from these ids (the available clients, system=...), else from all `num_clients`."""
    rng = np.random.default_rng([seed, round_idx, _SAMPLING_STREAM])
    ids = np.arange(num_clients) if among is None else np.asarray(among, dtype=np.int64)
    p = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)[ids]
        p = w / w.sum()
    if among is None:  # the same draw as before `among` existed: seeds keep their runs
        return sorted(rng.choice(num_clients, size=per_round, replace=False, p=p).tolist())
    return sorted(ids[rng.choice(len(ids), size=per_round, replace=False, p=p)].tolist())


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """The seed of one client's work in one round (batch order, dropout, augmentation)."""
    state = np.random.SeedSequence([seed, round_idx, client_id, _CLIENT_STREAM]).generate_state(1)
    return int(state[0])


def client_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device`, seeded; also re-seeds torch's global RNG (dropout) to `seed`."""
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)
