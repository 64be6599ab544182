"""Algorithms: what is trained, what crosses the network, how a client trains, and the server's
own rule. The hooks a new algorithm overrides are listed on `Algorithm` (docs/architecture.md
walks through adding one). It states what it shares in a `SharedSpec` (`shared_spec`), which is
all aggregators and upload transforms learn about it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from src.contract.objective import mean_loss
from src.contract.sharing import Role, SharedSpec
from src.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
TensorDict = dict[str, torch.Tensor]
# samples: client k's upload weighs n_k, its train samples (FedAvg); uniform: every upload weighs 1
WEIGHTINGS = ("samples", "uniform")


@dataclass
class ClientRun:
    """One client's local work in one round, as the orchestrator hands it to `local_update`."""

    client_id: int
    round_idx: int
    epochs: int  # fl.local_epochs
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    backward: Callable[[torch.Tensor], None]
    passes: Callable[[], Iterator[Batch]]  # one shuffled pass over the client's train split
    steps: int | None = None  # exactly this many batches (cycling) instead of `epochs` passes
    max_samples: int | None = None  # a straggler's budget: stop before a batch that exceeds it
    on_batch: Callable[[int], None] | None = None  # told each batch's samples (simulated time)

    def batches(self) -> Iterator[Batch]:
        """`fl.local_epochs` passes over the data, or exactly `steps` batches (cycling); with
        `max_samples` (system.partial_work) only the batches that fit in it."""
        if self.steps is None:
            batches = (batch for _ in range(self.epochs) for batch in self.passes())
        else:
            cycling = (b for _ in itertools.count() for b in self.passes())
            batches = itertools.islice(cycling, self.steps)
        if self.max_samples is not None:
            batches = _within(batches, self.max_samples)
        return batches if self.on_batch is None else _told(batches, self.on_batch)


def _within(batches: Iterator[Batch], max_samples: int) -> Iterator[Batch]:
    """The batches, while their samples add up to at most `max_samples`."""
    total = 0
    for batch in batches:
        total += len(batch[0])
        if total > max_samples:
            return
        yield batch


def _told(batches: Iterator[Batch], on_batch: Callable[[int], None]) -> Iterator[Batch]:
    for batch in batches:
        on_batch(len(batch[0]))
        yield batch


@dataclass
class ClientState:
    """One client's round, from `download` to `finish`. It is passed to every client hook and
    never kept on the algorithm, so clients trained together each have their own."""

    client_id: int | None
    received: TensorDict  # what the server sent
    private: TensorDict  # the client's private state, as stored
    # per-client tensors the step rules read and may change in place (a control variate, the
    # model received); stacked along a leading client dimension when clients train together
    work: TensorDict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # anything else carried to `finish` (not stacked)
    steps: int = 0  # optimizer steps taken (set by the local loop)
    lr: float = 0.0  # the optimizer's learning rate


def per_client(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client number (0-d for one client, [K] for K clients trained together) shaped to
    broadcast against `like` (a tensor with the same leading client dimension, if any)."""
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim())).to(like.dtype)


def batching_blocker(algorithm: Algorithm, model: nn.Module) -> str:
    """Why clients of `algorithm` cannot train together (fl.parallel_clients), or '' when they
    can: the base local loop (its optimizer and batches may be the algorithm's own) and a model
    without BatchNorm statistics."""
    if type(algorithm).local_update is not Algorithm.local_update:
        return f"alg={algorithm.name} has its own local update"
    if algorithm.buffer_names(model):
        return "the model has BatchNorm statistics (buffers), which one batched forward mixes"
    return ""


class Algorithm:
    """Both halves of one federated algorithm. The hooks (override what differs from FedAvg):

    set-up
      prepare_model(model)                  freeze / wrap the model the federation trains
      configure(federation, output_dir, seed)  learn the clients' sizes, groups, where to write
      shared_spec(model, clients_per_round)    what crosses the network (checked up front)
      server_state(model), initial_private_state(model)  the server's and every client's start
    client (one `ClientState` per client and round, passed in; nothing kept on `self`)
      download(model, received, private, id) -> ClientState  load the model, set `state.work`
      client_run(run) -> ClientRun          the client's optimizer and batches
      local_update(model, state, run)       the local loop (override only for a loop of its own)
      adjust_gradients(params, work), after_step(params, work, step)  the step rules, written
                                            once for one client and for clients trained together
      finish(model, state) -> (upload, private)  what the client sends and keeps
      upload_origin(model, state)           what it would send untrained (attacks reverse it)
      deploy(model, received, private, id)  the model a client (or the server: None) evaluates
    server (`server`: src/engine/server.py)
      server_payload(server, id)            what a client receives
      server_begin / server_add / server_finish(server, ...)  regroup uploads (rarely)
      server_update(state, aggregate, step) the server rule; `step` is the server optimiser
      server_metrics(), server_state_dict(), load_server_state_dict()
    Declarations (class attributes, checked before training): `privacy`, `plain_sgd`; properties
    `personalized`, `trains_unsampled`, `streams_uploads`. Helpers that say what is whose
    (`shared_names`, `private_names`, `load`, `shared_views`, `private_views`) are overridden only
    by bases such as `ModelOrAdapters` (src/algorithms/adapters.py).

    `private`: name patterns (substrings) of trained tensors that never leave the client; they
    persist per client across rounds (the client state store) and make the algorithm personalised:
    each client deploys (shared tensors from the server, its own private tensors).

    Buffers: the model's persistent floating-point buffers (BatchNorm's running statistics) change
    in local training without a gradient. By default they travel and are aggregated like the
    shared parameters; `local_buffers=True` keeps them per client instead (FedBN, Li et al. 2021),
    which makes the algorithm personalised. Integer buffers (BatchNorm's `num_batches_tracked`)
    are counters, not statistics: they are never sent (see `check_buffers`)."""

    # Declarations, checked before training (src/engine/compatibility.py):
    privacy = False  # privacy=dp_fedavg is sound: one upload of trained values per client
    plain_sgd = ""  # why the rule needs plain SGD client steps ('' if any optimizer serves)

    def __init__(
        self,
        name: str,
        private: Sequence[str] = (),
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        self.name = name
        if isinstance(private, str):
            raise ConfigError(f"alg.private must be a list of name patterns, got {private!r}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(
                f"alg.weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}"
            )
        self.weighting = weighting  # how the server weighs each upload (SharedSpec.weighting)
        self.private = list(private)
        self.local_buffers = bool(local_buffers)
        self._buffer_names: tuple[int, list[str]] = (0, [])  # (id of the model, its names)

    @property
    def personalized(self) -> bool:
        """True: each client deploys its own model, so evaluation runs client by client."""
        return bool(self.private) or self.local_buffers

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze / wrap the freshly built model; returns the model the federation trains."""
        self.check_private(model)
        return model

    def check_buffers(self, model: nn.Module) -> None:
        """A BatchNorm with momentum=None keeps a cumulative average weighted by its integer
        counter, which is not shared: refused rather than averaged wrongly."""
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
                raise ConfigError(
                    f"model layer {name}: BatchNorm with momentum=None (a cumulative average) "
                    "cannot be federated; give it a momentum"
                )
        if self.local_buffers and not self.buffer_names(model):
            raise ConfigError(
                "alg.local_buffers=true: the model has no floating-point buffers (BatchNorm "
                "statistics) to keep per client; set alg.local_buffers=false"
            )

    def configure(self, federation, output_dir, seed: int) -> None:
        """Learn what the server half needs of the run (groups of clients, where to write)."""

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        """What crosses the network (checked against the aggregator and transforms up front)."""
        return SharedSpec(
            roles={name: Role.OTHER for name in self.shared_names(model)},
            uploads_per_round=clients_per_round,
            personalized=self.personalized,
            weighting=self.weighting,
            options=f"alg={self.name}",
        )

    def check_private(self, model: nn.Module) -> None:
        """Every `alg.private` pattern names some trained tensor, and something is left to share."""
        trained = self.trained_names(model)
        for pattern in self.private:
            if not any(pattern in name for name in trained):
                raise ConfigError(
                    f"alg.private: '{pattern}' matches no trained parameter; trained are e.g. "
                    f"{trained[:4]}"
                )
        if not self.shared_names(model):
            raise ConfigError(f"alg.private={self.private} leaves nothing to share with the server")
        self.check_buffers(model)

    def trained_names(self, model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def buffer_names(self, model: nn.Module) -> list[str]:
        """The persistent floating-point buffers (running statistics), found once per model."""
        if self._buffer_names[0] != id(model):
            persistent = set(model.state_dict(keep_vars=True))
            names = [
                n for n, b in model.named_buffers() if n in persistent and b.is_floating_point()
            ]
            self._buffer_names = (id(model), names)
        return self._buffer_names[1]

    def is_private(self, name: str) -> bool:
        return any(pattern in name for pattern in self.private)

    def shared_names(self, model: nn.Module) -> list[str]:
        """Names of the tensors the server broadcasts and the clients upload."""
        names = [name for name in self.trained_names(model) if not self.is_private(name)]
        if not self.local_buffers:
            names += [name for name in self.buffer_names(model) if not self.is_private(name)]
        return names

    def private_names(self, model: nn.Module) -> list[str]:
        """Names of the tensors each client keeps to itself."""
        names = [name for name in self.trained_names(model) if self.is_private(name)]
        buffers = self.buffer_names(model)
        return names + [n for n in buffers if self.local_buffers or self.is_private(n)]

    @staticmethod
    def tensors(model: nn.Module) -> TensorDict:
        """Every parameter and buffer of the model by name (the model's own tensors)."""
        return dict(model.named_parameters()) | dict(model.named_buffers())

    def server_state(self, model: nn.Module) -> TensorDict:
        """The server's tensors at the start: the shared tensors (the aggregator copies them)."""
        tensors = self.tensors(model)
        return {name: tensors[name].detach() for name in self.shared_names(model)}

    def base_weights(self, model: nn.Module) -> TensorDict:
        """Frozen weights an aggregation rule may change (LoRA base weights); none by default."""
        return {}

    def initial_private_state(self, model: nn.Module) -> TensorDict:
        """What every client holds before it first trains (stored once for all)."""
        return self.private_views(model, None)

    # ------------------------------------------------------------------ client half
    @torch.no_grad()
    def load(self, model: nn.Module, tensors: TensorDict, client_id: int | None) -> None:
        """Copy `tensors` into the resident model's tensors of the same names, in place."""
        own = self.tensors(model)
        for name, tensor in tensors.items():
            own[name].copy_(tensor)

    def download(
        self, model: nn.Module, received: TensorDict, private: TensorDict, client_id: int
    ) -> ClientState:
        """Load what the server sent and the client's private state into the resident model;
        returns the client's state for its round (the tensors its step rules need in `work`)."""
        self.load(model, received | private, client_id)
        return ClientState(client_id, received, private)

    def client_run(self, run: ClientRun) -> ClientRun:
        """The client's optimizer and batches: the configured optimizer (optim.*) and
        fl.local_epochs passes over its data by default."""
        return run

    def local_update(
        self, model: nn.Module, state: ClientState, run: ClientRun
    ) -> tuple[float, int]:
        """Train on the client's batches with its optimizer; returns (sum of per-target losses,
        targets seen): samples for images, response tokens for text. An algorithm with its own
        local loop overrides this (its clients then train one after the other)."""
        run = self.client_run(run)
        optimizer = run.make_optimizer([p for p in model.parameters() if p.requires_grad])
        loss_sum, seen, state.steps = self.train(
            model, optimizer, run.batches(), run.backward, state.work
        )
        state.lr = optimizer.param_groups[0]["lr"]
        return loss_sum, seen

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches,
        backward: Callable[[torch.Tensor], None],
        work: TensorDict,
    ) -> tuple[float, int, int]:
        """The local loop: forward, backward, `adjust_gradients`, step, `after_step` (both with
        `work`). Returns (sum of per-target losses, targets seen, optimizer steps)."""
        model.train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loss_sum, seen, step = 0.0, 0, 0  # device tensors: read once per client, not per step
        for step, (inputs, targets) in enumerate(batches, start=1):
            loss, count = mean_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            with torch.no_grad():
                self.adjust_gradients(params, work)
            optimizer.step()
            with torch.no_grad():
                self.after_step(params, work, step)
            loss_sum = loss_sum + loss.detach() * count
            seen = seen + count
        return float(loss_sum), int(seen), step

    # The two step rules are written once for one client and for clients trained together
    # (fl.parallel_clients, src/engine/vectorised.py): `params` (each with its `.grad`, None
    # where no gradient reached it) and `work` then carry a leading client dimension. A rule
    # made of element-wise operations serves both as it is; `per_client` shapes a per-client
    # number to broadcast in either case.
    def adjust_gradients(self, params: TensorDict, work: TensorDict) -> None:
        """Between backward and the optimizer step: edit `params[n].grad` in place (e.g. a
        regulariser's gradient)."""

    def after_step(self, params: TensorDict, work: TensorDict, step: int) -> None:
        """After optimizer step number `step` (1-based); may change `work` in place."""

    def finish(self, model: nn.Module, state: ClientState) -> tuple[TensorDict, TensorDict]:
        """After the client's last step, its trained tensors in the resident model: (what it
        uploads, the private state it keeps). Views of the model by default: the server and the
        client state store read (or copy) them before the next client overwrites the model."""
        return self.shared_views(model, state.client_id), self.private_views(model, state.client_id)

    def upload_origin(self, model: nn.Module, state: ClientState) -> TensorDict:
        """What the client would upload had it not trained (called right after `download`):
        the point its update starts from, which e.g. a sign-flipping attacker reverses."""
        return {n: t.clone() for n, t in self.shared_views(model, state.client_id).items()}

    def deploy(
        self, model: nn.Module, received: TensorDict, private: TensorDict, client_id: int | None
    ) -> None:
        """Load the model client `client_id` deploys, for evaluation (None: the global model,
        no private state): by default the one it trains."""
        self.load(model, received | private, client_id)

    def shared_views(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """Views of the client's shared tensors in the resident model."""
        tensors = self.tensors(model)
        return {name: tensors[name].detach() for name in self.shared_names(model)}

    def private_views(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """Views of the client's private tensors in the resident model."""
        tensors = self.tensors(model)
        return {name: tensors[name].detach() for name in self.private_names(model)}

    # ------------------------------------------------------------------ server half
    def server_payload(self, server, client_id: int | None) -> TensorDict:
        """What client `client_id` receives (None: the global model)."""
        if client_id is None:
            return server.aggregator.global_payload()
        return server.aggregator.broadcast(client_id)

    @property
    def trains_unsampled(self) -> bool:
        """True: every client trains every round (its private state moves on) and only the
        sampled clients' uploads are aggregated (perfed's reference); False: only the sampled."""
        return False

    @property
    def streams_uploads(self) -> bool:
        """True: uploads go straight into the aggregator; False: the algorithm needs the whole
        round's uploads (under DDP they are then gathered, not summed)."""
        return True

    def server_begin(self, server, round_idx: int) -> None:
        """A round starts (`server`: src/engine/server.py)."""
        server.aggregator.begin(round_idx)

    def server_add(self, server, upload: TensorDict, weight: float, client_id: int) -> None:
        """One client's upload, weighted, on its way to the aggregator."""
        server.aggregator.add(upload, weight, client_id)

    def server_finish(self, server) -> None:
        """After the round's last upload: the server's step (aggregate, rule, optimiser)."""
        server.step()

    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        """Move the server state towards the aggregate: the server optimiser on every tensor."""
        step(state, aggregate)

    def server_metrics(self) -> dict[str, float]:
        """Extra per-round metrics of the server half (e.g. the number of clusters)."""
        return {}

    def server_state_dict(self) -> dict:
        return {}

    def load_server_state_dict(self, state: dict) -> None:
        pass
