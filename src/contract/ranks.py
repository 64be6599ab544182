"""The processes of a run and the collectives the engine and the plug-ins need (an aggregator's
partial sums, privacy's counts): one process outside DDP, where every collective is a no-op."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def shard_clients(clients: list[int], sizes: list[int], ranks: int, rank: int) -> list[int]:
    """Rank `rank`'s share of `clients` (of `sizes` samples), in the order given: the largest
    client goes to the least loaded rank first, so ranks get about the same samples to train."""
    if ranks == 1:
        return list(clients)
    load = [0] * ranks
    owner = {}
    for size, client in sorted(zip(sizes, clients, strict=True), key=lambda sc: -sc[0]):
        owner[client] = min(range(ranks), key=load.__getitem__)
        load[owner[client]] += size
    return [c for c in clients if owner[c] == rank]


class Ranks:
    """The processes of a run (one, outside DDP) and the collectives the orchestrator needs."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.first_trains_all = False  # the layout check fell back to one training process

    def shard(self, clients: list[int], sizes: list[int]) -> list[int]:
        """This rank's clients, in the order given: the largest client goes to the least loaded
        rank first, so ranks get about the same number of samples to train on."""
        if self.first_trains_all:
            return list(clients) if self.rank == 0 else []
        return shard_clients(clients, sizes, self.size, self.rank)

    @property
    def working(self) -> int:
        """How many ranks do the work (1 after the layout check fell back to rank 0)."""
        return 1 if self.first_trains_all else self.size

    def part(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of `items` (work split evenly over the working ranks)."""
        if self.working == 1:
            return items if self.rank == 0 else items[:0]
        return items.tensor_split(self.size)[self.rank]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def sum_all(self, tensors: list[torch.Tensor]) -> None:
        """Sum each of `tensors` over the ranks, in place, in one collective per dtype (one
        call per tensor costs a round trip each: ~0.1 s a round for a model of 80 tensors)."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            for tensor, summed in zip(group, flat.split([t.numel() for t in group]), strict=True):
                tensor.copy_(summed.view_as(tensor))

    def gather(self, items: list) -> list:
        """Every rank's `items` (picklable; tensors on the CPU), concatenated in rank order."""
        if not self.distributed:
            return list(items)
        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]
