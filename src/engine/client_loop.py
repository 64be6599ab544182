"""One round's client work on the one resident model: for each client of this DDP rank, load what
the server sent and its private state (`Algorithm.download`), train (`Algorithm.local_update`),
take what it uploads and keeps (`Algorithm.finish`), pass the upload through the transform chain and hand it to the round's exchange. With
fl.parallel_clients=K, up to K clients train together instead (src/engine/vectorised.py):
each is loaded in turn and its trained tensors copied, they train in one batched computation,
then each one's result goes back into the model for its upload.

A client that raises an injected fault (or any error, with fault.on_error=drop) is dropped and
counted; any other error is a bug and stops the run (`ClientError`). A non-finite upload is
dropped and counted apart (`clients/nonfinite`): robustness, not a bug.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from src.algorithms import Algorithm
from src.algorithms.base import ClientRun, batching_blocker
from src.contract.sharing import all_finite, nbytes
from src.engine.client_state import ClientStateStore
from src.engine.data import Federation
from src.engine.distributed import RoundExchange
from src.engine.layout import MARGIN
from src.engine.sampling import client_generator, client_seed
from src.engine.server import Server
from src.engine.system import SystemModel
from src.engine.vectorised import ClientStart, choose_group_size, train_together
from src.errors import ClientError
from src.transforms.chain import InjectedFault, TransformChain

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


class NoStepFits(Exception):
    """system.partial_work: not one local batch fits before the deadline."""


@dataclass
class RoundTotals:
    """What one rank's clients did in a round (summed over the ranks by the orchestrator)."""

    loss_sum: float = 0.0  # sum of per-target training losses
    seen: int = 0  # targets trained on: samples, or response tokens for text
    failed: int = 0  # clients that raised and were dropped
    nonfinite: int = 0  # clients whose upload was not finite
    late: int = 0  # clients that missed system.deadline_s
    arrivals: list[float] = field(default_factory=list)  # simulated s of each kept client
    up_bytes: int = 0
    down_bytes: int = 0
    dropped: list[dict] = field(default_factory=list)  # round, client, reason
    skipped_ids: set[int] = field(default_factory=set)  # failed, or no step fitted: no upload

    def counts(self) -> list[float]:
        return [
            self.loss_sum,
            self.seen,
            self.failed,
            self.nonfinite,
            self.late,
            self.up_bytes,
            self.down_bytes,
        ]

    def drop(
        self,
        client_id: int,
        round_idx: int,
        reason: str,
        nonfinite: bool = False,
        late: bool = False,
    ) -> None:
        if nonfinite:
            self.nonfinite += 1
        elif late:
            self.late += 1
        else:
            self.failed += 1
            self.skipped_ids.add(client_id)
        self.dropped.append({"round": round_idx + 1, "client": client_id, "reason": reason})
        if not late:  # stragglers are expected under a deadline: counted in clients/late
            log.warning("round %d: client %d %s; dropped", round_idx + 1, client_id, reason)


@dataclass
class ClientLoop:
    model: nn.Module
    algorithm: Algorithm
    server: Server
    federation: Federation
    store: ClientStateStore
    transforms: TransformChain
    make_optimizer: Callable[..., torch.optim.Optimizer]
    local_epochs: int
    batch_size: int
    seed: int
    drop_client_errors: bool  # fault.on_error=drop

    parallel_clients: int | str = 1  # fl.parallel_clients: up to this many train together, auto
    system: SystemModel | None = None  # system=...: each client's simulated time
    _blocker: str | None = None  # why they cannot (found once), '' when they can
    _alone_rate: float | None = None  # auto's probe: samples/s one client alone, until checked

    def train_round(
        self,
        clients: list[int],
        round_idx: int,
        exchange: RoundExchange,
        backward: Callable[[torch.Tensor], None],
        check_interrupt: Callable[[], None],
        downloads: dict[int, TensorDict] | None = None,
    ) -> RoundTotals:
        """Train `clients` (alone, or in groups trained together), handing each upload to
        `exchange`; `check_interrupt` runs before each client or group (it raises when a stop
        was asked for); `downloads`: what a client downloaded before this round (async: the
        version it trains from), instead of the server's current payload."""
        totals = RoundTotals()
        self._received, self._samples = {}, {}  # per client this round: bytes in, samples trained
        self._downloads = downloads or {}
        for group in self.groups(clients):
            check_interrupt()
            if len(group) == 1:
                self.train_alone(group[0], round_idx, exchange, backward, totals)
            else:
                self.train_group(group, round_idx, exchange, backward, totals)
        return totals

    def groups(self, clients: list[int]) -> list[list[int]]:
        """Clients trained together: up to `parallel_clients` of equal LoRA rank (one scale
        s_k = alpha / r_k per group), in the given order within a group; one by one when they cannot."""
        if self.parallel_clients == 1 or self.blocker():
            return [[c] for c in clients]
        if self.parallel_clients == "auto":
            self.parallel_clients, why, alone_s = self.choose_group_size(clients)
            log.info("fl.parallel_clients=auto: %d (%s)", self.parallel_clients, why)
            if self.parallel_clients == 1:
                return [[c] for c in clients]
            self._alone_rate = self.batch_size / alone_s  # checked after the first round
        by_key: dict[object, list[int]] = {}
        for client_id in clients:
            by_key.setdefault(self.server.spec.rank(client_id), []).append(client_id)
        k = self.parallel_clients
        return [ids[i : i + k] for ids in by_key.values() for i in range(0, len(ids), k)]

    def choose_group_size(self, clients: list[int]) -> tuple[int, str, float]:
        """auto: from memory and a short timing on the first client's first batch (a generator of
        its own: the clients' batches, the model and the RNG streams are left as they were)."""
        trained = self.trained_tensors()
        device = next(iter(trained.values())).device
        index = self.federation.clients[clients[0]].train
        generator = torch.Generator(device=device).manual_seed(0)
        with self.federation.train.uncounted():
            batch = next(self.federation.train.batches(index, self.batch_size, generator))
        return choose_group_size(self.model, trained, batch, len(clients))

    def check_group_size(self, loop_s: float, samples: int) -> None:
        """After the first round with the group size auto chose: back to one client after the
        other if the round took longer than its samples one by one at the probe's speed
        (plus `MARGIN`): the probe times one batch, the round is what counts."""
        if self._alone_rate is None:
            return
        alone_s, self._alone_rate = samples / self._alone_rate, None  # checked once
        lost = loop_s > MARGIN * alone_s
        log.info(
            "fl.parallel_clients=auto check: the first round's clients trained in %.1f s with "
            "%d together; one by one, estimated: %.1f s: %s", loop_s, self.parallel_clients,
            alone_s, "one after the other from round 2 on" if lost else "kept",
        )  # fmt: skip
        if lost:
            self.parallel_clients = 1

    def blocker(self) -> str:
        if self._blocker is None:
            self._blocker = batching_blocker(self.algorithm, self.model)
            if not self._blocker and self.federation.is_text:
                self._blocker = "text batches are not trained together yet"
            if self._blocker:
                log.info(
                    "fl.parallel_clients=%s: clients train one after the other (%s)",
                    self.parallel_clients,
                    self._blocker,
                )
                self.parallel_clients = 1
        return self._blocker

    # ------------------------------------------------------------------ one client
    def train_alone(self, client_id, round_idx, exchange, backward, totals: RoundTotals) -> None:
        payload = self.receive(client_id, totals)
        with self.client_errors(client_id, round_idx, totals):
            upload, private, loss_sum, seen = self.run_client(
                client_id, round_idx, payload, backward
            )
        if client_id in totals.skipped_ids:
            return
        self.hand_in(client_id, round_idx, upload, private, loss_sum, seen, exchange, totals)

    def run_client(
        self,
        client_id: int,
        round_idx: int,
        payload: TensorDict,
        backward: Callable[[torch.Tensor], None],
    ) -> tuple[TensorDict, TensorDict, float, int]:
        """Load the payload and private state into the resident model, train locally; returns
        (upload, private state kept, loss sum, targets seen). Both may hold views of the
        resident model: they are read (or copied) before the next client overwrites it."""
        generator, origin, run, state = self.start_client(client_id, round_idx, payload, backward)
        loss_sum, seen = self.algorithm.local_update(self.model, state, run)
        upload, private = self.algorithm.finish(self.model, state)
        upload = self.transforms.apply(client_id, upload, origin, generator)
        return upload, private, loss_sum, seen

    def start_client(self, client_id, round_idx, payload, backward):
        """(generator, origin, ClientRun, ClientState) of a client whose state is now in the
        resident model."""
        # Seeded first: everything random on the client (a fresh LoRA init, batch order, dropout)
        # depends only on (seed, round, client), not on which clients ran before.
        device = next(self.model.parameters()).device
        generator = client_generator(client_seed(self.seed, round_idx, client_id), device)
        state = self.algorithm.download(self.model, payload, self.store.load(client_id), client_id)
        origin = (
            self.algorithm.upload_origin(self.model, state)
            if self.transforms.needs_origin(client_id)
            else None
        )
        self.transforms.before_training(client_id)
        train_index = self.federation.clients[client_id].train

        def one_pass():
            batches = self.federation.train.batches(train_index, self.batch_size, generator)
            return self.transforms.batches(client_id, batches, self.federation.num_classes)

        run = ClientRun(
            client_id, round_idx, self.local_epochs, self.make_optimizer, backward, one_pass
        )
        if self.system is not None:  # the samples it trains on: its simulated compute
            self._samples[client_id] = 0
            run.on_batch = functools.partial(self._trained_on, client_id)
            if self.system.partial_work:
                run.max_samples = self.system.samples_within_deadline(
                    client_id, self._received[client_id]
                )
                if run.max_samples < min(self.batch_size, len(train_index)):
                    raise NoStepFits(
                        f"missed the deadline: not one batch fits before it "
                        f"({run.max_samples} samples after the transfers)"
                    )
        return generator, origin, run, state

    # ------------------------------------------------------------------ clients together
    def train_group(self, group, round_idx, exchange, backward, totals: RoundTotals) -> None:
        """Load each client's state in turn and keep a copy of its trained tensors, train them
        all together (src/engine/vectorised.py), then hand in each client's upload."""
        starts, started = [], []
        for client_id in group:
            payload = self.receive(client_id, totals)
            with self.client_errors(client_id, round_idx, totals):
                generator, origin, run, state = self.start_client(
                    client_id, round_idx, payload, backward
                )
            if client_id in totals.skipped_ids:
                continue
            trained = {n: t.detach().clone() for n, t in self.trained_tensors().items()}
            work = {n: t.clone() for n, t in state.work.items()}
            run = self.algorithm.client_run(run)  # its optimizer and batches
            starts.append(ClientStart(client_id, trained, run.batches(), work))
            started.append((client_id, generator, origin, run, state))
        if not starts:
            return
        try:
            results = train_together(
                self.model,
                starts,
                started[0][3].make_optimizer,  # the same for all
                backward,
                self.algorithm,
            )
        except Exception as error:  # a bug; which client's is unknown here
            raise ClientError(
                f"round {round_idx + 1}: clients {[s.client_id for s in starts]} trained together "
                f"raised {type(error).__name__}: {error} (fl.parallel_clients=1 trains them one "
                "by one)"
            ) from error
        params = dict(self.model.named_parameters())
        for (client_id, generator, origin, _, state), result in zip(started, results, strict=True):
            with self.client_errors(client_id, round_idx, totals):
                with torch.no_grad():
                    for name, tensor in result.trained.items():
                        params[name].copy_(tensor)
                state.work, state.steps, state.lr = result.work, result.steps, result.lr
                upload, private = self.algorithm.finish(self.model, state)
                upload = self.transforms.apply(client_id, upload, origin, generator)
            if client_id in totals.skipped_ids:
                continue
            self.hand_in(
                client_id,
                round_idx,
                upload,
                private,
                result.loss_sum,
                result.seen,
                exchange,
                totals,
            )

    # ------------------------------------------------------------------ shared
    def trained_tensors(self) -> TensorDict:
        """The resident model's trained parameters (what a batched group stacks)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def receive(self, client_id: int, totals: RoundTotals) -> TensorDict:
        """What the server sends the client, counted in the round's download bytes."""
        payload = self._downloads.get(client_id)  # async: the version it downloaded earlier
        if payload is None:
            payload = self.server.payload(client_id)
        received = self.server.download_bytes(client_id, payload)
        totals.down_bytes += received
        self._received[client_id] = received
        return payload

    def _trained_on(self, client_id: int, samples: int) -> None:
        self._samples[client_id] += samples

    def arrived(self, client_id, round_idx, sent: int, totals: RoundTotals) -> bool:
        """system=...: the client's simulated time with `sent` upload bytes; False when it
        missed the deadline (then it is dropped: the server never sees its upload)."""
        time = self.system.client_time(
            client_id, self._received[client_id], self._samples.get(client_id, 0), sent
        )
        if self.system.late(time):
            reason = f"missed the deadline: {time.total_s:.1f} s > {self.system.deadline_s} s"
            totals.drop(client_id, round_idx, reason, late=True)
            return False
        totals.arrivals.append(time.total_s)
        return True

    @contextmanager
    def client_errors(self, client_id: int, round_idx: int, totals: RoundTotals):
        """An injected fault (or any error, with fault.on_error=drop) drops the client; any other
        error stops the run."""
        try:
            yield
        except NoStepFits as late:  # a straggler with nothing to send: late, not failed
            totals.drop(client_id, round_idx, str(late), late=True)
            totals.skipped_ids.add(client_id)
        except InjectedFault as fault:
            totals.drop(client_id, round_idx, f"raised {fault}")
        except Exception as error:  # a bug: stop, unless the user asked for tolerance
            if not self.drop_client_errors:
                raise ClientError(
                    f"round {round_idx + 1}: client {client_id} raised "
                    f"{type(error).__name__}: {error} (fault.on_error=drop drops such "
                    "clients instead)"
                ) from error
            totals.drop(client_id, round_idx, f"raised {type(error).__name__}: {error}")

    def hand_in(
        self, client_id, round_idx, upload, private, loss_sum, seen, exchange, totals
    ) -> None:
        """A trained client's upload to the round's exchange, unless it is not finite."""
        sent = self.transforms.encoded_nbytes(upload)  # compressed, or the tensors as they are
        sent = nbytes(upload) if sent is None else sent
        if exchange.takes_upload(client_id):
            totals.up_bytes += sent  # sent, even if the server then rejects it
        if self.system is not None and not self.arrived(client_id, round_idx, sent, totals):
            return
        if not all_finite(list(upload.values())):
            totals.drop(client_id, round_idx, "uploaded non-finite values", nonfinite=True)
            return
        private = private or None
        weight = float(len(self.federation.clients[client_id].train))
        exchange.add(client_id, upload, weight, private)
        totals.loss_sum += loss_sum
        totals.seen += seen
