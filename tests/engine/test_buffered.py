"""system.policy=async: FedBuff's event queue in simulated time, its staleness-weighted server
step (float64, against Algorithm 1 written out), resume and the combinations it refuses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from src.aggregators import MeanAggregator
from src.algorithms.fedavg import FedAvg
from src.engine.buffered import AsyncQueue, StalenessWeight
from src.engine.server import Server
from src.engine.system import ClientTime, SystemModel
from src.run import train
from tests.algorithms.harness import params_of, tiny_model
from tests.conftest import refusal

ASYNC = ["system=heavy_tail", "system.policy=async", "system.concurrency=4"]


def _system(num_clients: int) -> SystemModel:
    system = SystemModel(
        "heavy_tail",
        speed={"distribution": "lognormal", "median": 1.0, "sigma": 0.0},
        bandwidth={"distribution": "lognormal", "median": 1.0, "sigma": 0.0},
        policy="async",
        concurrency=3,
    )
    system.configure(num_clients, seed=0)
    return system


def test_arrivals_come_in_simulated_time_order_and_free_their_slot():
    duration = {k: float(k + 1) for k in range(8)}  # client k takes k + 1 simulated seconds
    queue = AsyncQueue(_system(8), concurrency=3, seed=0)
    predict = lambda k: ClientTime(0.0, duration[k], 0.0)  # noqa: E731
    snapshots = iter(range(100))
    snapshot = lambda: {"x": torch.tensor([float(next(snapshots))])}  # noqa: E731
    first = queue.take(2, predict, snapshot)
    assert [f.finish_s for f in first] == sorted(f.finish_s for f in first)
    assert all(f.version == 0 for f in first) and queue.clock_s == first[-1].finish_s
    # every arrival was replaced at its own time by a client that downloaded version 0
    assert len(queue.flights) == 3 and len({f.client for f in queue.flights}) == 3
    for arrival in first:
        started = [f for f in queue.flights if f.finish_s == arrival.finish_s + duration[f.client]]
        assert started, "a slot freed at an arrival is refilled at that time"
    queue.advance()
    second = queue.take(2, predict, snapshot)
    assert {f.version for f in second} <= {0, 1}
    assert queue.clock_s >= first[-1].finish_s
    queue.advance()
    assert set(queue.snapshots) == {f.version for f in queue.flights}  # only versions in use


def test_the_server_step_is_fedbuffs_staleness_weighted_mean():
    """x <- x + (1/K) sum_i s(tau_i) (y_i - x_{v_i}), s(tau) = (1 + tau)^-1/2 (uniform
    weights: alg.weighting=uniform, the paper's 1/K)."""
    alg = FedAvg("fedavg", weighting="uniform")
    model = alg.prepare_model(tiny_model())
    server = Server(alg, MeanAggregator("mean"))
    server.setup(model, alg.shared_spec(model, clients_per_round=3))
    x = params_of(model)
    gen = torch.Generator().manual_seed(0)
    bases = {c: {n: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in x.items()} for c in range(3)}  # fmt: skip
    uploads = {c: {n: t + torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in bases[c].items()} for c in range(3)}  # fmt: skip
    tau = {0: 0, 1: 1, 2: 3}
    staleness = StalenessWeight(server, exponent=0.5)
    staleness.base, staleness.staleness = bases, tau
    server.begin(0)
    for c in range(3):
        server.add(staleness.apply(c, uploads[c], None, gen), 1.0, c)
    server.finish()
    for n in x:
        step = sum((1 + tau[c]) ** -0.5 * (uploads[c][n] - bases[c][n]) for c in range(3)) / 3
        torch.testing.assert_close(server.state[n], x[n] + step, rtol=0, atol=1e-12)


def _metrics(path) -> list[dict]:
    with (Path(path) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_run_logs_staleness_and_simulated_time_and_resumes_exactly(make_digits_config, tmp_path):
    args = (*ASYNC, "fl.eval_every=1")
    whole = make_digits_config(*args, "fl.rounds=3")
    train(whole)
    expected = _metrics(whole.paths.output_dir)
    assert [float(r["clients/sampled"]) for r in expected] == [whole.fl.clients_per_round] * 3
    assert max(float(r["clients/staleness_max"]) for r in expected) >= 1  # stale updates came
    clocks = [float(r["time/sim_total_s"]) for r in expected]
    assert clocks == sorted(clocks) and clocks[0] > 0
    resumed = f"paths.output_dir={tmp_path / 'resumed'}"
    train(make_digits_config(*args, "fl.rounds=2", resumed))
    train(make_digits_config(*args, "fl.rounds=3", "resume=auto", resumed))
    got = _metrics(tmp_path / "resumed")
    keys = [k for k in expected[0] if not k.startswith("time/") or k.startswith("time/sim")]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expected]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["alg=scaffold"], "a server rule of its own"),
        (["alg=ditto"], "personal models"),
        (["aggregator=median"], "is not a mean"),
        (["fl.sampling=by_samples"], "fl.sampling=by_samples"),
        (["trainer.processes=2"], "system.policy=async keeps per-client state"),
        (["system.concurrency=0"], "system.concurrency=0"),
        (["system.policy=wait_all"], "only system.policy=async has clients training"),
    ],
)
def test_what_fedbuff_cannot_serve_is_refused(make_digits_config, overrides, named):
    cfg = make_digits_config(*ASYNC, *overrides)
    assert named in refusal(cfg, cfg.paths.output_dir)
