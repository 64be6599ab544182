"""The federation's data: one tensor for all clients, each client an index tensor.

Images stay uint8 and live on the training device; a batch is a gather by index followed by
normalisation on the device. Text is tokenised once into padded int64 tensors on the device; a
batch is a gather cut to its longest sequence. No DataLoader or per-client copy is involved.
A batch is (inputs, targets): class labels [B] for images, next-token targets [B, L] for text
(-100 where there is no loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from src.data import ClientSplit, ImageDataset, ImageSplit
from src.data.text import IGNORE_INDEX, TextDataset, TokenSplit


class DeviceSplit:
    """One split held on one device: `tensors` names the attributes that move with `to`; the
    first one is indexed by sample. Subclasses say what `batch(index)` returns."""

    tensors: tuple[str, ...] = ()
    served_tokens = 0  # real (unpadded) tokens handed out for training: text only
    served_samples = 0  # samples handed out in batches (the layout check's measure of work)

    def __len__(self) -> int:
        return len(getattr(self, self.tensors[0]))

    @property
    def device(self) -> torch.device:
        return getattr(self, self.tensors[0]).device

    def to(self, device: torch.device):
        for key in self.tensors:
            setattr(self, key, getattr(self, key).to(device, non_blocking=True))
        return self

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Batches drawn inside (a timing probe's) are not counted as the run's work."""
        counts = self.served_tokens, self.served_samples
        try:
            yield
        finally:
            self.served_tokens, self.served_samples = counts

    def batches(
        self, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over `index`, shuffled with `generator` when one is given."""
        for chunk in self.shuffled(index, generator).split(batch_size):
            self.served_samples += len(chunk)
            yield self.batch(chunk)

    @staticmethod
    def shuffled(index: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return index
        order = torch.randperm(len(index), generator=generator, device=generator.device)
        return index[order.to(index.device)]

    def eval_batch_size(self, requested: int) -> int:
        return requested


class DeviceImages(DeviceSplit):
    """An `ImageSplit` held on one device, served as normalised float batches."""

    tensors = ("images", "labels", "mean", "std")

    def __init__(self, split: ImageSplit, mean, std):
        self.images = split.images
        self.labels = split.labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index].float().div_(255.0)
        return (images - self.mean) / self.std, self.labels[index]


class DeviceTokens(DeviceSplit):
    """A `TokenSplit` held on one device, served as (input_ids, next-token targets) batches cut
    to the longest sequence in the batch. `served_tokens` counts the real tokens handed out."""

    tensors = ("input_ids", "targets", "lengths")

    def __init__(self, split: TokenSplit, eval_tokens: int = 16384):
        self.input_ids = split.input_ids
        # targets[t] = labels[t + 1]: the logits at position t predict token t + 1
        self.targets = torch.full_like(split.labels, IGNORE_INDEX)
        self.targets[:, :-1] = split.labels[:, 1:]
        self.lengths = split.lengths
        self.eval_tokens = eval_tokens
        self.served_tokens = 0

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.batches(index, len(index)))

    def batches(
        self, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.shuffled(index, generator)
        # the batch widths need the lengths on the host: read them once per pass, not per batch
        lengths = self.lengths[index].cpu()
        for chunk, chunk_lengths in zip(
            index.split(batch_size), lengths.split(batch_size), strict=True
        ):
            self.served_tokens += int(chunk_lengths.sum())
            self.served_samples += len(chunk)
            width = int(chunk_lengths.max())
            yield self.input_ids[chunk, :width], self.targets[chunk, :width]

    def eval_batch_size(self, requested: int) -> int:
        """At most `eval_tokens` padded tokens per evaluation batch (the logits are B x L x V)."""
        return max(1, min(requested, self.eval_tokens // self.input_ids.shape[1]))


def serve(dataset: ImageDataset | TextDataset, split) -> DeviceSplit:
    """The device-side server of one split of `dataset`."""
    if isinstance(dataset, TextDataset):
        return DeviceTokens(split)
    return DeviceImages(split, dataset.mean, dataset.std)


@dataclass
class Federation:
    """Everything the orchestrator needs to know about the data."""

    train: DeviceSplit  # the pool the clients' indices point into
    test: DeviceSplit  # the global test set
    clients: list[ClientSplit]  # per client: train and local-test indices into `train`
    num_classes: int
    summary: dict  # the partition summary (goes into summary.json)

    @classmethod
    def build(
        cls, dataset: ImageDataset | TextDataset, partitioner, num_clients: int, seed: int
    ) -> Federation:
        from src.data import partition_summary

        labels = dataset.train.partition_labels.numpy()  # classes, or text categories
        clients = partitioner(labels, num_clients, seed)
        return cls(
            train=serve(dataset, dataset.train),
            test=serve(dataset, dataset.test),
            clients=clients,
            num_classes=dataset.num_classes,
            summary=partition_summary(labels, clients, dataset.num_classes),
        )

    @property
    def is_text(self) -> bool:
        return isinstance(self.train, DeviceTokens)

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
