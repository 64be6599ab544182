"""How a CPU run uses its cores (`trainer.processes=auto`, the default): one process with every
core as a thread, or one process per core each training its share of the clients
(`src/engine/distributed.py`, client sharding), chosen by timing both on this run's model and
batches before the first round (docs/performance.md, "Layout").

The timing is what a round does: full training steps (forward, loss, backward, the run's own
optimizer) over one client's real batch mix, every layout timed several times in alternation,
medians compared. The layout with P processes is timed with P processes running at once (the
others forked for the probe), so memory bandwidth and turbo limits count. Processes win only by a
clear margin (`MARGIN`) and when the run is long enough for the gain to repay starting them.

Forked processes share the parent's memory (the imported libraries, the data, the model) until
they write to it, so a second process costs far less than a second run. A process forked from one
that has used OpenMP threads must stay on one thread (GNU OpenMP hangs otherwise): hence P x 1
or 1 x P, never P x T.
"""

from __future__ import annotations

import os
import select
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from src.contract.objective import attention_kernels, mean_loss
from src.engine.sampling import sample_clients
from src.errors import ConfigError

MARGIN = 1.10  # processes must train >= 10 % more samples per second than threads
STARTUP_S = 3.0  # forking the processes and joining their process group, measured ~1-2 s
REPEATS = 3  # timings of each layout, alternated; medians compared
STEPS = 2  # full batches per timing, and the client's last (smaller) one


@dataclass
class Layout:
    """Processes x threads each, why, and the probe's samples per second of each layout (kept to
    check the choice against the first real round: `check_after_round`)."""

    processes: int
    threads: int
    why: str
    threads_rate: float = 0.0  # samples/s, one process with `cores` threads
    processes_rate: float = 0.0  # samples/s of all processes together, one thread each
    cores: int = 1

    @property
    def probed(self) -> bool:
        """Chosen by the probe (so checked after the first round), not given by a key."""
        return self.threads_rate > 0

    def describe(self) -> str:
        return (
            f"{self.processes} process{'es' if self.processes > 1 else ''} x "
            f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        )


def layout_for(trainer_cfg, threads: int, parallel_clients, rounds: int, module) -> Layout | None:
    """The layout `trainer.processes` asks for (None: the trainer config decides alone: a GPU,
    trainer=ddp, trainer.devices). `threads` is what `trainer.threads` gave (src/threads.py)."""
    setting = trainer_cfg.get("processes", "auto")
    accelerator = trainer_cfg.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    several = trainer_cfg.get("strategy") is not None or trainer_cfg.get("devices") != 1
    memory = module.transforms.client_memory  # TopK's error feedback, FedBuff's queue
    if memory and (several or (setting != "auto" and int(setting) > 1)):
        raise ConfigError(
            f"{memory} keeps per-client state (error feedback, or the clients in flight and "
            "their model versions) in one process, and several processes train different "
            "clients each round; use trainer.processes=1 (one device)"
        )
    if not on_cpu or several:
        return None
    if memory and setting == "auto":
        why = f"{memory} keeps per-client state in this process"
        return Layout(1, threads, why, cores=threads)
    if setting != "auto":
        processes = int(setting)
        why = "trainer.processes"
        return Layout(processes, 1 if processes > 1 else threads, why, cores=threads)
    if trainer_cfg.get("threads", "auto") != "auto":
        return Layout(1, threads, "trainer.threads given", cores=threads)
    if parallel_clients != 1:
        return Layout(1, threads, "fl.parallel_clients trains clients together", cores=threads)
    bf16 = str(trainer_cfg.get("precision", "32-true")) == "bf16-mixed"
    return choose_layout(module, threads, rounds, bf16=bf16)


def choose_layout(
    module, cores: int, rounds: int, memory_free: int | None = None, bf16: bool = False
) -> Layout:
    """`trainer.processes=auto` on the CPU: `cores` threads in one process, or `cores` processes
    of one thread, whichever the probe finds faster by `MARGIN` on this run's work (`bf16`: under
    bf16 autocast, as trainer.precision=bf16-mixed trains)."""
    if cores < 2:
        return Layout(1, cores, "one core available", cores=cores)
    memory_free = available_ram() if memory_free is None else memory_free
    extra = (cores - 1) * process_bytes(module)
    if extra > memory_free // 2:
        why = (
            f"{cores} processes would need ~{extra / 2**30:.1f} GiB more, "
            f"{memory_free / 2**30:.1f} GiB available"
        )
        return Layout(1, cores, why, cores=cores)
    started = time.perf_counter()
    threads_rate, processes_rate = compare_rates(module, probe_batches(module), cores, bf16)
    layout = Layout(1, cores, "", threads_rate, processes_rate, cores)
    rates = (
        f"probe ({time.perf_counter() - started:.1f} s): {threads_rate:.0f} samples/s with "
        f"1 x {cores} threads, {processes_rate:.0f} with {cores} x 1"
    )
    round_samples = samples_per_round(module)
    saved = rounds * round_samples * (1 / threads_rate - 1 / processes_rate)
    if processes_rate < MARGIN * threads_rate:
        layout.why = f"{rates}: processes not faster by {MARGIN - 1:.0%}"
    elif saved < STARTUP_S:
        layout.why = f"{rates}: would save {saved:.1f} s in {rounds} rounds, not worth starting"
    else:
        layout.processes, layout.threads = cores, 1
        layout.why = f"{rates} (~{saved:.0f} s saved in {rounds} rounds)"
    return layout


def check_after_round(layout: Layout, round_s: float, busiest_loop_s: float, samples: int):
    """After the first round with processes, would one process with every core as a thread
    have been faster? Its estimate: the round's samples at the probe's threads rate, plus the
    round's time outside client training (the same in both layouts). Returns (fall back?, why)."""
    threads_estimate = samples / layout.threads_rate + (round_s - busiest_loop_s)
    why = (
        f"the first round with {layout.describe()} took {round_s:.1f} s; "
        f"1 x {layout.cores} threads, estimated: {threads_estimate:.1f} s"
    )
    return round_s > MARGIN * threads_estimate, why


# ---------------------------------------------------------------------- the probe
def probe_batches(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the largest client of round 1 (fl.batch_size batches and its last, smaller
    one): the batch mix a round trains on."""
    fed = module.federation
    sampled = sample_clients(fed.num_clients, module.clients_per_round, module.seed, 0)
    largest = max(sampled, key=lambda c: len(fed.clients[c].train))
    generator = torch.Generator().manual_seed(module.seed)
    batch_size = module.client_loop.batch_size
    with fed.train.uncounted():
        batches = list(fed.train.batches(fed.clients[largest].train, batch_size, generator))
    if len(batches) > STEPS + 1:  # a few full batches and the last, smaller one
        batches = [*batches[:STEPS], batches[-1]]
    return batches


def compare_rates(module, batches, cores: int, bf16: bool = False) -> tuple[float, float]:
    """(samples/s with one process of `cores` threads, samples/s of `cores` one-thread processes
    running at once), medians of `REPEATS` alternated timings; the model is left as it was."""
    model = module.model
    trained = [p for p in model.parameters() if p.requires_grad]
    touched = trained + list(model.buffers())  # buffers: e.g. BatchNorm's running statistics
    saved = [t.detach().clone() for t in touched]
    optimizer = module.client_loop.make_optimizer(trained)
    samples = sum(len(targets) for _, targets in batches)
    threads_s, processes_s = [], []
    before = torch.get_num_threads()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
            attention_kernels(torch.device("cpu")),  # inside autocast: as training_step does
            _Neighbours(cores - 1, lambda: _steps(model, optimizer, batches[:1])) as neighbours,
        ):
            torch.set_num_threads(1)
            with neighbours.busy():  # warm-up: allocator, kernels, the pages fork made shared
                _steps(model, optimizer, batches)
            for _ in range(REPEATS):
                torch.set_num_threads(cores)  # this process is not forked: threads are safe
                threads_s.append(_timed(model, optimizer, batches))
                torch.set_num_threads(1)
                with neighbours.busy():
                    processes_s.append(_timed(model, optimizer, batches))
    finally:
        torch.set_num_threads(before)
        with torch.no_grad():
            for tensor, value in zip(touched, saved, strict=True):
                tensor.copy_(value)
                tensor.grad = None
    return samples / statistics.median(threads_s), cores * samples / statistics.median(processes_s)


def _steps(model, optimizer, batches) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = mean_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()


def _timed(model, optimizer, batches) -> float:
    started = time.perf_counter()
    _steps(model, optimizer, batches)
    return time.perf_counter() - started


class _Neighbours:
    """`count` forked copies of this process on one thread each (see the module's docstring),
    forked once: idle, or repeating `work` while `busy()` lasts, so that this process's timing
    inside `busy()` meets the contention of a layout with `count + 1` processes (and the pages
    fork made shared are copied in the warm-up, not in a timing)."""

    def __init__(self, count: int, work):
        self.count, self.work = count, work
        self.orders: list[int] = []  # to each neighbour: b"g" work, b"s" idle, closed: exit
        self.pids: list[int] = []

    def __enter__(self):
        self.ack_r, ack_w = os.pipe()  # a byte from each neighbour once it works, once idle
        for _ in range(self.count):
            order_r, order_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(self.ack_r)
                for other in self.orders:
                    os.close(other)
                os.close(order_w)
                self._neighbour(order_r, ack_w)
            os.close(order_r)
            self.orders.append(order_w)
            self.pids.append(pid)
        os.close(ack_w)
        return self

    def _neighbour(self, order_r: int, ack_w: int) -> None:
        code = 0
        try:
            torch.set_num_threads(1)
            while os.read(order_r, 1) == b"g":  # blocks while idle; end-of-file: exit
                self.work()
                os.write(ack_w, b"1")
                while not select.select([order_r], [], [], 0)[0]:  # until b"s" (or closed)
                    self.work()
                os.read(order_r, 1)
                os.write(ack_w, b"0")  # idle now
        except BaseException:  # noqa: BLE001  a neighbour must never return into the caller
            code = 1
        finally:
            os._exit(code)

    @contextmanager
    def busy(self):
        for order in self.orders:
            os.write(order, b"g")
        for _ in self.orders:  # every neighbour works before the timing starts
            if not os.read(self.ack_r, 1):
                raise RuntimeError("a probe process stopped (its error is printed above)")
        try:
            yield
        finally:
            for order in self.orders:
                os.write(order, b"s")
            for _ in self.orders:  # every neighbour has finished its step: the cores are free
                os.read(self.ack_r, 1)

    def __exit__(self, *exc):
        for order in self.orders:
            os.close(order)  # end-of-file: the neighbour exits
        os.close(self.ack_r)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in self.pids]
        if any(codes) and exc[0] is None:
            raise RuntimeError("a probe process failed (its error is printed above)")


# ---------------------------------------------------------------------- sizes
def samples_per_round(module) -> int:
    """Samples a round trains on (round 1's sampled clients, every local epoch)."""
    fed = module.federation
    sampled = sample_clients(fed.num_clients, module.clients_per_round, module.seed, 0)
    if module.algorithm.trains_unsampled:
        sampled = range(fed.num_clients)
    epochs = module.client_loop.local_epochs
    return epochs * sum(len(fed.clients[c].train) for c in sampled)


def process_bytes(module) -> int:
    """Memory one more forked process writes (and so stops sharing): its copy of the model's
    tensors, gradients and optimizer moments, and its activations (generous: 4 x the model)."""
    model_bytes = sum(t.numel() * t.element_size() for t in module.model.state_dict().values())
    return 4 * model_bytes + 256 * 2**20


def available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
