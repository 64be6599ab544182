"""The aggregation rule: how the server reduces a round's uploads to one aggregate.

An aggregator sees tensors and the algorithm's `SharedSpec` only, never the model or the
algorithm. It keeps the server's tensors (`state`) in the layout its rule needs and decides what
each client receives (`broadcast`); in a round it sees the uploads one at a time (`add`, with the
weight the server gives each: a mean needs one running sum, not every upload) and returns their
reduction (`aggregate`). The server (src/engine/server.py) then post-processes the aggregate,
lets the algorithm's server rule and the server optimiser move `state`, and calls `after_step`.
What the rule requires of the sharing is its `needs`, checked before training
(src/engine/compatibility.py).
"""

from __future__ import annotations

import torch

from src.contract.sharing import Needs, SharedSpec, nbytes

TensorDict = dict[str, torch.Tensor]


LOW_PRECISION = (torch.bfloat16, torch.float16)


def master_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The server's copy of a model tensor: float32 for a bf16/fp16 one, so that the weighted sums
    of uploads and the server steps never accumulate in low precision (mixed-precision practice:
    fp32 master weights)."""
    copy = tensor.detach().clone()
    return copy.float() if copy.dtype in LOW_PRECISION else copy


class Aggregator:
    # True: a round's uploads are folded into sums, which DDP ranks combine with `all_reduce`;
    # otherwise every rank is given every upload (src/engine/distributed.py)
    sums_uploads = False
    robust = False  # withstands a minority of arbitrary uploads (median, trimmed mean, krum)
    coordinatewise = False  # each coordinate is ranked over the uploads (median, trimmed mean)
    mean_of_uploads = False  # the aggregate is each coordinate's weighted mean over the uploads
    privacy = False  # privacy=dp_fedavg's noise is calibrated to this rule
    plain_step = ""  # why the rule needs server_opt=sgd without momentum ('' if any serves)
    checkpointed: tuple[str, ...] = ()  # attributes kept in checkpoints besides state

    def __init__(self, name: str):
        self.name = name
        self.state: TensorDict | None = None
        self.bases: TensorDict = {}  # frozen base weights the server may change (LoRA layers)
        self.wire: dict[str, torch.dtype] = {}  # the model's dtype of each tensor sent
        self.num_added = 0
        self.round_idx = 0

    @property
    def needs(self) -> Needs:
        """What this rule requires of the sharing (see Needs)."""
        return Needs()

    # ------------------------------------------------------------------ set-up and sending
    def setup(self, spec: SharedSpec, shared: TensorDict, bases: TensorDict | None = None) -> None:
        """The initial server state: copies of the `shared` tensors (and of the LoRA layers'
        frozen `bases`, for rules that change them)."""
        self.spec = spec
        self.state = {name: master_copy(t) for name, t in shared.items()}
        self.wire = {n: t.dtype for n, t in (shared | (bases or {})).items()}

    def broadcast(self, client_id: int | None) -> TensorDict:
        """What client `client_id` receives at the start of a round (None: the global model)."""
        return self.spec.views(self.state, client_id)

    def global_payload(self) -> TensorDict:
        """The tensors of the global model (for evaluation)."""
        return self.broadcast(None)

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        """Bytes actually sent to the client: the payload without the base weights, which every
        client computes itself from what it received."""
        return nbytes({n: t for n, t in payload.items() if n not in self.bases}, self.wire)

    # ------------------------------------------------------------------ aggregation
    def begin(self, round_idx: int = 0) -> None:
        """A new round (0-based `round_idx`) starts; uploads follow through `add`."""
        self.num_added = 0
        self.round_idx = round_idx
        self._begin()

    def add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        """One client's upload with its weight (SharedSpec.weighting: n_k, or 1 each)."""
        self.num_added += 1
        self._add(upload, weight, client_id)

    def all_reduce(self, ranks) -> None:
        """Under DDP, between the last `add` and `finish`: sum the ranks' partial sums in place
        (aggregators with `sums_uploads` only)."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics for the loggers."""
        return {}

    def after_step(self, aggregate: TensorDict, server_lr: float) -> None:
        """What follows the server step (e.g. folding a residual into the base weights)."""

    def _begin(self) -> None:
        raise NotImplementedError

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        raise NotImplementedError

    def aggregate(self) -> TensorDict:
        """The reduction of the round's uploads (at least one), with `state`'s names and shapes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        extra = {name: getattr(self, name) for name in self.checkpointed}
        return {"state": self.state, "bases": self.bases, **extra}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
        self.bases = state.get("bases", {})
        for name in self.checkpointed:
            setattr(self, name, state[name])
