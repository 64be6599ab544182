"""Owner-weighted means of tensors whose uploads may fill only a leading block (a rank-r_k client
sends the first r_k rows of an A): the sums and means the mean aggregators and fedsa-flora's
groups share. Pure functions."""

from __future__ import annotations

from collections import defaultdict

import torch

TensorDict = dict[str, torch.Tensor]


def leading_block(shape: torch.Size) -> tuple[slice, ...]:
    """Index of the leading block of a tensor that a (smaller) upload of `shape` fills."""
    return tuple(slice(0, n) for n in shape)


def add_to_sums(
    sums: TensorDict,
    weight_by_shape: dict[str, dict[torch.Size, float]],
    upload: TensorDict,
    weight: float,
) -> None:
    """Add `weight` x `upload` into the leading blocks of the full-size `sums`, and `weight` to
    the shape each tensor had (a rank-r client fills the first r rows of an A)."""
    for name, acc in sums.items():
        tensor = upload[name]
        acc[leading_block(tensor.shape)].add_(tensor.to(acc.dtype), alpha=weight)
        weight_by_shape[name][tensor.shape] += weight


def owner_mean(
    acc: torch.Tensor,
    by_shape: dict[torch.Size, float],
    total_weight: float,
    current: torch.Tensor,
) -> torch.Tensor:
    """The weighted mean of one tensor from its sum `acc`: each entry divided by the weight of
    the uploads that held it; an entry none held stays `current`."""
    if set(by_shape) == {acc.shape}:  # everyone sent the whole tensor
        return acc / total_weight
    owned = torch.zeros_like(acc)
    for shape, weight in by_shape.items():
        owned[leading_block(shape)] += weight
    return torch.where(owned > 0, acc / torch.where(owned > 0, owned, 1.0), current)


def owner_weighted_mean(
    uploads: list[TensorDict], weights: list[float], fallback: TensorDict
) -> TensorDict:
    """The rank-aware mean of a list of uploads, as full-size tensors: each entry is averaged over
    the uploads that hold it; an entry none holds is taken from `fallback` (a pure function)."""
    sums = {name: torch.zeros_like(t) for name, t in fallback.items()}
    by_shape = {name: defaultdict(float) for name in fallback}
    total = 0.0
    for upload, weight in zip(uploads, weights, strict=True):
        add_to_sums(sums, by_shape, upload, weight)
        total += weight
    return {name: owner_mean(sums[name], by_shape[name], total, fallback[name]) for name in sums}
