"""Upload transforms: one ordered chain of small objects between a client and the aggregator.

Each is configured by its own group (fault, attack, ...) and may act at three points of a
client's round: before it trains (`before_training`, e.g. an injected crash), on its batches
(`batches`, e.g. flipped labels) and on what it sends (`apply`, e.g. a reversed update). `apply`
receives the upload's origin (what the client would have sent without training) only when the
transform says it `needs_origin` for that client, so honest clients cost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from src.contract.sharing import Needs

TensorDict = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class InjectedFault(RuntimeError):
    """A failure injected on purpose (fault.fail_fraction): dropped and counted, never a bug."""


class UploadTransform:
    name = "transform"

    @property
    def needs(self) -> Needs:
        return Needs()

    def begin_round(self, sampled: list[int], seed: int, round_idx: int) -> None:
        """A round starts with these sampled clients (the same on every DDP rank)."""

    def before_training(self, client_id: int) -> None:
        """Called after the client loaded its state, before it trains."""

    def batches(
        self, client_id: int, batches: Iterator[Batch], num_classes: int
    ) -> Iterator[Batch]:
        return batches

    def needs_origin(self, client_id: int) -> bool:
        return False

    def apply(
        self,
        client_id: int,
        upload: TensorDict,
        origin: TensorDict | None,
        generator: torch.Generator,
    ) -> TensorDict:
        """What the client sends instead of `upload` (new tensors; never the model's own)."""
        return upload

    def encoded_nbytes(self, upload: TensorDict) -> int | None:
        """Bytes of what is actually sent for `upload` when this transform encodes it (a
        compressor), else None: the tensors as they are."""
        return None

    @property
    def client_memory(self) -> str:
        """What it is, for messages, when it keeps per-client state between rounds in this
        process (TopK's error feedback, FedBuff's clients in flight), so that every client must
        train in this one process; '' when it keeps none."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TransformChain:
    """The configured transforms, applied in order."""

    def __init__(self, transforms: list[UploadTransform]):
        self.transforms = list(transforms)

    def begin_round(self, sampled: list[int], seed: int, round_idx: int) -> None:
        for t in self.transforms:
            t.begin_round(sampled, seed, round_idx)

    def before_training(self, client_id: int) -> None:
        for t in self.transforms:
            t.before_training(client_id)

    def batches(self, client_id: int, batches, num_classes: int):
        for t in self.transforms:
            batches = t.batches(client_id, batches, num_classes)
        return batches

    def needs_origin(self, client_id: int) -> bool:
        return any(t.needs_origin(client_id) for t in self.transforms)

    def apply(self, client_id: int, upload, origin, generator) -> TensorDict:
        for t in self.transforms:
            upload = t.apply(client_id, upload, origin, generator)
        return upload

    def encoded_nbytes(self, upload: TensorDict) -> int | None:
        """The bytes the last encoding transform sends (a later one, DP clipping, only scales
        the decoded update: the same encoding), or None when nothing encodes."""
        for t in reversed(self.transforms):
            size = t.encoded_nbytes(upload)
            if size is not None:
                return size
        return None

    @property
    def client_memory(self) -> str:
        """The first transform that keeps per-client state in this process ('' if none)."""
        return next((t.client_memory for t in self.transforms if t.client_memory), "")

    def state_dict(self) -> dict:
        return {t.name: t.state_dict() for t in self.transforms}

    def load_state_dict(self, state: dict) -> None:
        for t in self.transforms:
            if t.name in state:
                t.load_state_dict(state[t.name])
