"""The server half of a round: hold the global state, send it, reduce the uploads, step.

An aggregator is a small object with one job (like a Flower strategy). It sees tensors and the
algorithm's `SharedSpec` only, never the model or the algorithm. It keeps the server's tensors
(`state`), decides what each client receives (`broadcast`), sees the uploads one at a time (`add`,
so a mean needs one running sum, not every upload) and turns them into the next state (`finish`:
the aggregate, then the server optimiser step). What it requires of the sharing is its `needs`,
checked before training (src/federated/compatibility.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from src.aggregators.server_opt import ServerOptimizer
from src.errors import ConfigError
from src.federated.contract import Needs, SharedSpec, nbytes

TensorDict = dict[str, torch.Tensor]
# (server state, aggregate, server optimiser step) -> None: moves the state in place
ServerUpdate = Callable[[TensorDict, TensorDict, Callable[[TensorDict, TensorDict], None]], None]


# samples: client k weighs n_k (its train samples; FedAvg); uniform: every upload weighs 1
WEIGHTINGS = ("samples", "uniform")


class AggregatePostprocessor(Protocol):
    """Changes the round's aggregate in place before the server step (e.g. adds DP noise)."""

    def postprocess(
        self, aggregate: TensorDict, state: TensorDict, num_uploads: int, round_idx: int
    ) -> None: ...


LOW_PRECISION = (torch.bfloat16, torch.float16)


def master_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The server's copy of a model tensor: float32 for a bf16/fp16 one, so that the weighted sums
    of uploads and the server steps never accumulate in low precision (mixed-precision practice:
    fp32 master weights)."""
    copy = tensor.detach().clone()
    return copy.float() if copy.dtype in LOW_PRECISION else copy


def default_update(state: TensorDict, aggregate: TensorDict, step) -> None:
    step(state, aggregate)


class Aggregator:
    # True: a round's uploads are folded into sums, which DDP ranks combine with `all_reduce`;
    # otherwise every rank is given every upload (src/federated/distributed.py)
    sums_uploads = False
    robust = False  # withstands a minority of arbitrary uploads (median, trimmed mean, krum)
    mean_of_uploads = False  # the aggregate is each coordinate's weighted mean over the uploads
    privacy = False  # privacy=dp_fedavg's noise is calibrated to this rule
    checkpointed: tuple[str, ...] = ()  # attributes kept in checkpoints besides state and server

    def __init__(
        self,
        name: str,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_opt: str = "sgd",
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_eps: float = 1e-3,
        server_bias_correction: bool = False,
        weighting: str = "samples",
    ):
        self.name = name
        self.server = ServerOptimizer(
            server_lr, server_momentum, server_opt, server_betas, server_eps, server_bias_correction
        )
        if weighting not in WEIGHTINGS:
            raise ConfigError(
                f"aggregator.weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}"
            )
        self.weighting = weighting
        # applied to the aggregate before the server step, in order (e.g. central DP noise)
        self.postprocessors: list[AggregatePostprocessor] = []
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
        """One client's upload with its sample count `weight` (weighting=uniform: 1 each)."""
        self.num_added += 1
        self._add(upload, 1.0 if self.weighting == "uniform" else weight, client_id)

    def finish(self, update: ServerUpdate = default_update) -> None:
        """Aggregate and let `update` (the algorithm's server rule; by default the server
        optimiser on every tensor) move the state; a round without uploads changes nothing."""
        if self.num_added:
            aggregate = self._result()
            for postprocessor in self.postprocessors:
                postprocessor.postprocess(aggregate, self.state, self.num_added, self.round_idx)
            update(self.state, aggregate, self.server.step)
            self._after_step(aggregate)

    def all_reduce(self, ranks) -> None:
        """Under DDP, between the last `add` and `finish`: sum the ranks' partial sums in place
        (aggregators with `sums_uploads` only)."""
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round metrics for the loggers."""
        return {}

    def _after_step(self, aggregate: TensorDict) -> None:
        """Hook for what follows the server step (e.g. folding a residual into the base weights)."""

    def _begin(self) -> None:
        raise NotImplementedError

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        raise NotImplementedError

    def _result(self) -> TensorDict:
        """The aggregate, with the same names and shapes as `state`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        extra = {name: getattr(self, name) for name in self.checkpointed}
        return {
            "state": self.state,
            "bases": self.bases,
            "server": self.server.state_dict(),
            **extra,
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
        self.bases = state.get("bases", {})
        self.server.load_state_dict(state["server"])
        for name in self.checkpointed:
            setattr(self, name, state[name])
