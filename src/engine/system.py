"""`system=...`: the clients' devices, when they are available, and the round's simulated time
(docs/system.md). `system=none` (the default) has none of this: every sampled client finishes
at once, and a run is exactly what it was without this module.

Each client k has a compute speed v_k (training samples per second) and a network bandwidth b_k
(bytes per second, both ways), drawn once from the configured distributions with the run's seed,
or read from a trace file. In a round a client that trains `steps` batches of fl.batch_size costs

    t_k = down_bytes_k / b_k + steps * batch_size / v_k + up_bytes_k / b_k      (simulated s)

with the bytes it actually received and sent (comm/down_bytes, comm/up_bytes). The round's
simulated time is set by the clients the server waits for (`policy`):
- wait_all: the slowest trained client;
- deadline: clients with t_k > deadline_s are dropped (clients/late) and the round lasts until
  the deadline when one was late, else until the last arrival;
  With partial_work (FedProx's setting), a straggler instead trains only the batches that fit
  before the deadline, after its download and an upload as large as it (samples_within_deadline).
- over_select: ceil(over_selection * fl.clients_per_round) clients are sampled and the first
  fl.clients_per_round to finish are kept (Bonawitz et al., "Towards Federated Learning at
  Scale", MLSys 2019); the others are dropped before training. Which ones finish first is decided
  from the predicted t_k (fl.local_epochs passes over the client's data, the upload as large as
  the download); the round's time then uses the kept clients' actual bytes and steps.
- async: FedBuff's buffered asynchronous aggregation (src/engine/buffered.py): `concurrency`
  clients train at once from the version they downloaded, and the server steps after every
  fl.clients_per_round arrivals, weighing each update by (1 + staleness)^-staleness_exponent.
A client can be sampled only while it is available: in a round with probability `availability`
(seeded by seed, round and client), or, from a trace, when the round starts (simulated clock)
inside one of its windows.

Trace file (CSV, header `client,speed,bandwidth,availability`): one row per client id 0..N-1;
speed and bandwidth positive numbers; availability empty (always) or windows `start-end` in
simulated seconds separated by `;`, e.g. `0-600;1200-1800`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.errors import ConfigError

POLICIES = ("wait_all", "deadline", "over_select", "async")
DISTRIBUTIONS = {  # name -> its shape parameter (each also takes `median`)
    "lognormal": "sigma",  # exp(N(log median, sigma^2)); sigma = 0: every client alike
    "pareto": "shape",  # Pareto with tail index `shape` (heavier for smaller), scaled to `median`
}
_DEVICE_STREAM = 0x5E5  # keeps the device draws apart from the other seeded streams
_AVAILABILITY_STREAM = 0xA7A


def draw(spec: dict, count: int, rng: np.random.Generator, key: str) -> np.ndarray:
    """`count` positive values from `spec`: {distribution, median, sigma, shape}, where the
    distribution's own shape parameter is set and the other one is null."""
    name = spec.get("distribution")
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{key}.distribution={name!r}: must be one of {', '.join(DISTRIBUTIONS)}")
    unknown = set(spec) - {"distribution", "median", *DISTRIBUTIONS.values()}
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)}")
    own = DISTRIBUTIONS[name]
    for other in DISTRIBUTIONS.values():
        if other != own and spec.get(other) is not None:
            raise ConfigError(
                f"{key}.{other}={spec[other]}: distribution {name} does not use it (its shape is "
                f"{key}.{own}); set {key}.{other}=null"
            )
    median, shape = spec.get("median"), spec.get(own)
    if not _positive(median):
        raise ConfigError(f"{key}.median={median!r}: must be a number > 0")
    if name == "lognormal":
        if not (_number(shape) and shape >= 0):
            raise ConfigError(f"{key}.sigma={shape!r}: must be a number >= 0")
        return median * np.exp(shape * rng.standard_normal(count))
    if not _positive(shape):
        raise ConfigError(f"{key}.shape={shape!r}: must be a number > 0")
    # Pareto(x_m, a) has median x_m 2^(1/a): x_m is chosen so that the median is `median`
    return median * 2.0 ** (-1.0 / shape) * (1.0 + rng.pareto(shape, count))


@dataclass(frozen=True)
class Device:
    speed: float  # training samples per second
    bandwidth: float  # bytes per second, each way
    windows: tuple[tuple[float, float], ...] = ()  # available [start, end) (trace); () = always


@dataclass(frozen=True)
class ClientTime:
    down_s: float
    compute_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


class SystemModel:
    """The devices and the server's waiting policy; `configure` draws the devices."""

    def __init__(
        self,
        name: str,
        speed: dict | None = None,
        bandwidth: dict | None = None,
        availability: float = 1.0,
        trace: str | None = None,
        policy: str = "wait_all",
        deadline_s: float | None = None,
        over_selection: float = 1.0,
        partial_work: bool = False,
        concurrency: int | None = None,
        staleness_exponent: float = 0.5,
    ):
        self.name = name
        if policy not in POLICIES:
            raise ConfigError(f"system.policy={policy!r}: must be one of {', '.join(POLICIES)}")
        if policy == "deadline" and not _positive(deadline_s):
            raise ConfigError(
                f"system.deadline_s={deadline_s!r}: system.policy=deadline needs a number > 0"
            )
        if policy != "deadline" and deadline_s is not None:
            raise ConfigError(
                f"system.deadline_s={deadline_s}: only system.policy=deadline has a deadline "
                f"(policy is {policy})"
            )
        if policy == "over_select" and not (_number(over_selection) and over_selection > 1):
            raise ConfigError(
                f"system.over_selection={over_selection!r}: system.policy=over_select samples "
                "more clients than it keeps: a number > 1"
            )
        if policy != "over_select" and over_selection != 1.0:
            raise ConfigError(
                f"system.over_selection={over_selection}: only system.policy=over_select "
                f"over-selects (policy is {policy})"
            )
        if policy == "async" and not (isinstance(concurrency, int) and concurrency >= 1):
            raise ConfigError(
                f"system.concurrency={concurrency!r}: system.policy=async needs the number of "
                "clients training at once, an integer >= 1"
            )
        if policy != "async" and concurrency is not None:
            raise ConfigError(
                f"system.concurrency={concurrency}: only system.policy=async has clients "
                f"training concurrently (policy is {policy})"
            )
        if not (_number(staleness_exponent) and staleness_exponent >= 0):
            raise ConfigError(
                f"system.staleness_exponent={staleness_exponent!r}: must be a number >= 0"
            )
        if policy != "async" and staleness_exponent != 0.5:
            raise ConfigError(
                f"system.staleness_exponent={staleness_exponent}: only system.policy=async "
                f"weighs stale updates (policy is {policy})"
            )
        if not isinstance(partial_work, bool):
            raise ConfigError(f"system.partial_work={partial_work!r}: must be true or false")
        if partial_work and policy != "deadline":
            raise ConfigError(
                f"system.partial_work=true: a straggler does the local work that fits before the "
                f"deadline, so it needs system.policy=deadline (policy is {policy})"
            )
        if not (_number(availability) and 0 < availability <= 1):
            raise ConfigError(f"system.availability={availability!r}: must be in (0, 1]")
        if trace is None and (speed is None or bandwidth is None):
            raise ConfigError("system: give system.speed and system.bandwidth, or system.trace")
        if trace is not None and (speed is not None or bandwidth is not None):
            raise ConfigError(
                f"system.trace={trace}: the trace gives speed and bandwidth; set "
                "system.speed=null and system.bandwidth=null"
            )
        if trace is not None and availability != 1.0:
            raise ConfigError(
                f"system.availability={availability}: with system.trace the trace's windows "
                "say when a client is available"
            )
        self.speed, self.bandwidth, self.availability = speed, bandwidth, float(availability)
        self.trace = trace
        self.policy, self.deadline_s = policy, deadline_s
        self.over_selection = float(over_selection)
        self.partial_work = partial_work
        self.concurrency, self.staleness_exponent = concurrency, float(staleness_exponent)
        self.devices: list[Device] = []
        self.seed = 0

    def configure(self, num_clients: int, seed: int) -> None:
        """Draw (or read) every client's device, from the seed alone."""
        self.seed = seed
        if self.trace is not None:
            self.devices = read_trace(Path(self.trace), num_clients)
            return
        rng = np.random.default_rng([seed, _DEVICE_STREAM])
        speeds = draw(self.speed, num_clients, rng, "system.speed")
        bandwidths = draw(self.bandwidth, num_clients, rng, "system.bandwidth")
        self.devices = [Device(float(s), float(b)) for s, b in zip(speeds, bandwidths, strict=True)]

    # ------------------------------------------------------------------ one round
    def per_round(self, clients_per_round: int) -> int:
        """How many clients a round samples."""
        return math.ceil(self.over_selection * clients_per_round)

    def available(self, round_idx: int, clock_s: float) -> list[int]:
        """The clients that can be sampled in round `round_idx`, which starts at `clock_s`."""
        if self.trace is not None:
            return [
                k
                for k, d in enumerate(self.devices)
                if not d.windows or any(a <= clock_s < b for a, b in d.windows)
            ]
        if self.availability == 1.0:
            return list(range(len(self.devices)))
        rng = np.random.default_rng([self.seed, round_idx, _AVAILABILITY_STREAM])
        return np.flatnonzero(rng.random(len(self.devices)) < self.availability).tolist()

    def client_time(self, client_id: int, down_bytes: int, samples: int, up_bytes: int):
        device = self.devices[client_id]
        return ClientTime(
            down_bytes / device.bandwidth, samples / device.speed, up_bytes / device.bandwidth
        )

    def samples_within_deadline(self, client_id: int, down_bytes: int) -> int:
        """partial_work: the training samples that fit before the deadline after the download
        and an upload as large as it: floor((deadline - 2 down / b_k) v_k), at least 0."""
        device = self.devices[client_id]
        left = self.deadline_s - 2 * down_bytes / device.bandwidth
        return max(0, math.floor(left * device.speed))

    def late(self, time: ClientTime) -> bool:
        return self.policy == "deadline" and time.total_s > self.deadline_s

    def keep_first(
        self, clients: Sequence[int], keep: int, predicted: dict[int, ClientTime]
    ) -> list[int]:
        """over_select: the `keep` clients predicted to finish first (ties: lower id)."""
        return sorted(sorted(clients, key=lambda k: (predicted[k].total_s, k))[:keep])

    def round_time(self, arrived: Sequence[float], any_late: bool) -> float:
        """The round's simulated seconds: until the deadline when a client was late, else
        until the last arrival (0 when nobody trained)."""
        if any_late:
            return float(self.deadline_s)
        return max(arrived, default=0.0)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


def read_trace(path: Path, num_clients: int) -> list[Device]:
    """The devices of a trace file (module docstring); a malformed row is refused with one line
    naming its line number."""
    if not path.is_file():
        raise ConfigError(f"system.trace={path}: no such file")
    devices: dict[int, Device] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = ["client", "speed", "bandwidth", "availability"]
        if reader.fieldnames != header:
            raise ConfigError(
                f"system.trace={path}: the header must be {','.join(header)}, got "
                f"{','.join(reader.fieldnames or [])}"
            )
        for row in reader:
            where = f"system.trace={path} line {reader.line_num}"
            client = _trace_int(row["client"], where, "client")
            if not 0 <= client < num_clients:
                raise ConfigError(f"{where}: client {client} is not in [0, {num_clients})")
            if client in devices:
                raise ConfigError(f"{where}: client {client} appears twice")
            speed = _trace_positive(row["speed"], where, "speed")
            bandwidth = _trace_positive(row["bandwidth"], where, "bandwidth")
            devices[client] = Device(speed, bandwidth, _windows(row["availability"], where))
    missing = sorted(set(range(num_clients)) - set(devices))
    if missing:
        raise ConfigError(
            f"system.trace={path}: no row for clients {missing[:8]}"
            + (" ..." if len(missing) > 8 else "")
            + f" (fl.num_clients={num_clients})"
        )
    return [devices[k] for k in range(num_clients)]


def _trace_int(text, where: str, column: str) -> int:
    text = (text or "").strip()
    if not text.isdigit():
        raise ConfigError(f"{where}: {column} {text!r} is not a client id")
    return int(text)


def _trace_positive(text, where: str, column: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {column} {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where}: {column} {text!r} must be a number > 0")
    return value


def _windows(text, where: str) -> tuple[tuple[float, float], ...]:
    text = (text or "").strip()
    if not text:
        return ()
    windows = []
    for part in text.split(";"):
        start, sep, end = part.partition("-")
        try:
            window = (float(start), float(end))
        except ValueError:
            window = None
        if not sep or window is None or not (0 <= window[0] < window[1] < math.inf):
            raise ConfigError(
                f"{where}: availability window {part!r} must be start-end with "
                "0 <= start < end (simulated seconds)"
            )
        windows.append(window)
    return tuple(windows)
