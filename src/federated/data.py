"""The federation's data: one image tensor for all clients, each client an index tensor.

Images stay uint8 and live on the training device; a batch is a gather by index followed by
normalisation on the device, so no DataLoader or per-client copy is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from src.data import ClientSplit, ImageDataset, ImageSplit


class DeviceImages:
    """An `ImageSplit` held on one device, served as normalised float batches."""

    def __init__(self, split: ImageSplit, mean, std):
        self.images = split.images
        self.labels = split.labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> DeviceImages:
        for key in ("images", "labels", "mean", "std"):
            setattr(self, key, getattr(self, key).to(device, non_blocking=True))
        return self

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index].float().div_(255.0)
        return (images - self.mean) / self.std, self.labels[index]

    def batches(
        self, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over `index`, shuffled with `generator` when one is given."""
        if generator is not None:
            order = torch.randperm(len(index), generator=generator, device=generator.device)
            index = index[order.to(index.device)]
        for chunk in index.split(batch_size):
            yield self.batch(chunk)


@dataclass
class Federation:
    """Everything the orchestrator needs to know about the data."""

    train: DeviceImages  # the pool the clients' indices point into
    test: DeviceImages  # the global test set
    clients: list[ClientSplit]  # per client: train and local-test indices into `train`
    num_classes: int
    summary: dict  # the partition summary (goes into summary.json)

    @classmethod
    def build(cls, dataset: ImageDataset, partitioner, num_clients: int, seed: int) -> Federation:
        from src.data import partition_summary

        clients = partitioner(dataset.train.labels.numpy(), num_clients, seed)
        return cls(
            train=DeviceImages(dataset.train, dataset.mean, dataset.std),
            test=DeviceImages(dataset.test, dataset.mean, dataset.std),
            clients=clients,
            num_classes=dataset.num_classes,
            summary=partition_summary(dataset.train.labels.numpy(), clients, dataset.num_classes),
        )

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def groups(self) -> list[int] | None:
        """Each client's group (partitioner.groups=G or a dataset's own grouping), else None."""
        if self.clients[0].group is None:
            return None
        return [c.group for c in self.clients]

    def to(self, device: torch.device) -> Federation:
        if self.train.device != device:
            self.train.to(device)
            self.test.to(device)
            self.clients = [
                ClientSplit(c.train.to(device), c.test.to(device), c.group) for c in self.clients
            ]
        return self
