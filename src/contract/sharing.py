"""The contract between the client half (an algorithm) and the server half (an aggregator) and the
upload transforms between them: what is shared, and what each component needs of it.

An algorithm states what crosses the network in a `SharedSpec` (every uploaded tensor with its
role, the LoRA layers, each client's rank, how many uploads the aggregation rule receives per
round). An aggregator or an upload transform states its `Needs`. `src.engine.compatibility`
compares the two before training; afterwards no component reads another's attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch

TensorDict = dict[str, torch.Tensor]


class Role(str, Enum):
    LORA_A = "lora_a"  # a LoRA down-projection A [r, d_in]
    LORA_B = "lora_b"  # a LoRA up-projection B [d_out, r]
    BASE = "base"  # a frozen base weight the server may change (merged LoRA products)
    OTHER = "other"  # any other tensor (full weights, a head, a projection x, a control variate)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: the parameter names of its factors and of its frozen base weight."""

    name: str  # module name, e.g. blocks.0.attn.proj
    a: str  # lora_A weight  [r_max, d_in]
    b: str  # lora_B weight  [d_out, r_max]
    base: str  # frozen base weight [d_out, d_in]


@dataclass(frozen=True, kw_only=True)
class LoraRanks:
    """Each client's LoRA rank r_k (`ranks` cycled over client ids; empty: no LoRA) and peft's
    scale s = alpha / r. The global model (client None) uses r_max."""

    ranks: tuple[int, ...] = ()
    alpha: float = 1.0

    @property
    def r_max(self) -> int:
        return max(self.ranks) if self.ranks else 0

    def rank(self, client_id: int | None) -> int:
        """r_k of client `client_id`; the global model (None) uses r_max; 0 without LoRA."""
        if client_id is None or not self.ranks:
            return self.r_max
        return self.ranks[client_id % len(self.ranks)]

    def scale(self, rank: int) -> float:
        """peft's LoRA scale s = alpha / r."""
        return self.alpha / rank

    @property
    def heterogeneous(self) -> bool:
        """Clients of different ranks, so uploads of different shapes."""
        return len(set(self.ranks)) > 1


@dataclass(frozen=True, kw_only=True)
class SharedSpec(LoraRanks):
    """What an algorithm shares with the server.

    `roles`: every tensor a client uploads, by name. `layers`: the LoRA layers of the model (also
    when only some of their factors are shared). `ranks` / `alpha` (from `LoraRanks`): a rank-r_k
    client sends the first r_k rows of an A and the first r_k columns of a B.
    `uploads_per_round`: how many uploads the aggregation rule receives in a round (the sampled
    clients, or the groups they form). `personalized`: each client deploys its own model.
    `updates`: the uploads are differences from what the client received, not tensor values.
    `tensorwise`: why the algorithm's server rule needs every uploaded tensor reduced on its own
    (e.g. it alternates or refines the means of A and B); '' when it does not.
    `mean_rule`: why the algorithm's server rule needs the aggregate to be the mean of the
    uploads, weighted by `weighting` (FedNova), or with `uniform_mean` the uniform mean (FedDyn);
    '' when any reduction serves it.
    `weighting`: how the server weighs each upload: samples (client k by n_k, its train samples)
    or uniform (every upload 1); a rule that treats uploads alike (median, krum) ignores it.
    """

    roles: Mapping[str, Role]
    uploads_per_round: int
    layers: tuple[LoraLayer, ...] = ()
    upload_unit: str = "client"  # what one upload of the rule stands for: a client or a group
    personalized: bool = False
    updates: bool = False  # uploads are differences (e.g. y - x), not values of the tensors
    tensorwise: str = ""  # why rules that combine A and B into products cannot serve it
    mean_rule: str = ""  # why the server rule needs the mean of the uploads ('' if not)
    uniform_mean: bool = False  # ... and the uniform mean, whatever alg.weighting says
    weighting: str = "samples"  # samples | uniform (alg.weighting)
    options: str = ""  # the config options that decide the sharing, for error messages

    @property
    def both_factors(self) -> bool:
        """Both factors of every LoRA layer are shared, so the server sees whole products B A."""
        return bool(self.layers) and all(
            layer.a in self.roles and layer.b in self.roles for layer in self.layers
        )

    def view(self, name: str, tensor: torch.Tensor, client_id: int | None) -> torch.Tensor:
        """The part of a full-size shared tensor that client `client_id` holds: the first r_k
        rows of an A, the first r_k columns of a B, else the whole tensor."""
        role = self.roles.get(name)
        if role is Role.LORA_A:
            return tensor[: self.rank(client_id)]
        if role is Role.LORA_B:
            return tensor[:, : self.rank(client_id)]
        return tensor

    def views(self, tensors: TensorDict, client_id: int | None) -> TensorDict:
        return {name: self.view(name, t, client_id) for name, t in tensors.items()}


@dataclass(frozen=True)
class Needs:
    """What an aggregator or an upload transform requires of the sharing (checked before training).

    both_factors: both LoRA factors of every layer in the uploads.
    equal_shapes: every client's upload has the server's shapes (no mixed ranks).
    equal_shapes_with_factors: equal shapes, but only when both factors are shared (FedIT's mean).
    min_uploads: the rule needs at least this many uploads per round to be what it claims.
    robust_aggregator: an attack whose uploads break any non-robust rule (the mean of N(0, 100^2)).
    """

    both_factors: bool = False
    equal_shapes: bool = False
    equal_shapes_with_factors: bool = False
    min_uploads: int = 1
    min_uploads_why: str = ""
    robust_aggregator: bool = False


def nbytes(tensors: TensorDict, wire: dict[str, torch.dtype] | None = None) -> int:
    """Bytes on the wire for a dict of tensors (numel x element size, of the `wire` dtype where
    given: the server's float32 master copy of a bf16 tensor is sent as bf16)."""
    wire = wire or {}
    return sum(
        t.numel() * (wire[n].itemsize if n in wire else t.element_size())
        for n, t in tensors.items()
    )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite. A non-finite element makes its tensor's
    norm non-finite, so one fused norm over all tensors answers the common case (10x faster
    than `isfinite` per tensor); only a non-finite norm, which a huge finite tensor can also
    give, is checked element by element."""
    floating = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floating or torch.stack(torch._foreach_norm(floating)).isfinite().all():
        return True
    return all(bool(torch.isfinite(t).all()) for t in floating)
