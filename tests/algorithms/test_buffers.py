"""Non-parameter buffers (BatchNorm statistics): aggregated like the shared parameters by default,
kept per client with alg.local_buffers=true (FedBN); never leaked from one client to the next
through the resident model."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from src.aggregators import MeanAggregator
from src.algorithms import FedAvg
from src.algorithms.fedprox import FedProx
from src.algorithms.scaffold import CONTROL, Scaffold
from src.engine.server import Server
from src.errors import ConfigError
from tests.algorithms.harness import client_run, run_client

STATS = ("norm.running_mean", "norm.running_var")


class BatchNormNet(nn.Module):
    def __init__(self, momentum: float | None = 0.1):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5, momentum=momentum)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def _model(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return BatchNormNet(momentum).double()


def _batches(client_id: int):
    """Each client's inputs have their own offset, so their BatchNorm statistics differ."""
    gen = torch.Generator().manual_seed(client_id)
    return [
        (
            torch.randn(8, 4, generator=gen, dtype=torch.float64) + 3.0 * client_id,
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(3)
    ]


def _round(alg, model, server, store, clients):
    """One round of `clients` (equal weights); returns each client's upload and private state."""
    server.begin(0)
    uploads = {}
    for cid in clients:
        run = client_run(_batches(cid), lr=0.05, client_id=cid)
        uploads[cid], store[cid] = run_client(
            alg, model, server.payload(cid), store.get(cid, {}), run
        )
        server.add(uploads[cid], 1.0, cid)
    server.finish()
    return uploads


def _setup(alg):
    model = alg.prepare_model(_model())
    server = Server(alg, MeanAggregator("mean"))
    server.setup(model, alg.shared_spec(model, clients_per_round=2))
    return model, server


def test_buffers_are_aggregated_like_parameters_by_default():
    alg = FedAvg("fedavg")
    model, server = _setup(alg)
    assert set(STATS) <= set(alg.shared_names(model))
    assert "norm.num_batches_tracked" not in alg.shared_names(model)  # a counter, never sent
    assert not alg.personalized
    uploads = _round(alg, model, server, {}, [0, 1])
    for name in STATS:
        assert not torch.equal(uploads[0][name], uploads[1][name])  # the clients' own statistics
        mean = (uploads[0][name] + uploads[1][name]) / 2
        torch.testing.assert_close(server.state[name], mean, rtol=0, atol=1e-12)


def test_a_client_starts_from_the_servers_statistics_not_the_previous_clients():
    alg = FedAvg("fedavg")
    model, server = _setup(alg)
    initial = {n: server.state[n].clone() for n in STATS}
    server.begin(0)
    state = alg.download(model, server.payload(0), {}, 0)
    alg.local_update(model, state, client_run(_batches(0), lr=0.05, client_id=0))
    assert not torch.equal(model.norm.running_mean, initial["norm.running_mean"])
    alg.download(model, server.payload(1), {}, 1)  # the next client of the same round
    for name in STATS:
        torch.testing.assert_close(alg.tensors(model)[name], initial[name], rtol=0, atol=0)


def test_local_buffers_keep_each_clients_statistics_and_never_send_them():
    alg = FedProx("fedprox", mu=0.0, local_buffers=True)
    model, server = _setup(alg)
    assert alg.personalized
    assert not set(STATS) & set(alg.shared_names(model))
    assert set(STATS) <= set(alg.private_names(model))
    store = {}
    uploads = _round(alg, model, server, store, [0, 1])
    assert not set(STATS) & set(uploads[0])
    assert not torch.equal(store[0]["norm.running_mean"], store[1]["norm.running_mean"])
    alg.deploy(model, server.payload(1), store[1], 1)  # client 1 deploys its own statistics
    torch.testing.assert_close(model.norm.running_mean, store[1]["norm.running_mean"])


def test_scaffold_controls_parameters_and_averages_buffers():
    alg = Scaffold("scaffold")
    model = alg.prepare_model(_model())
    alg.configure(SimpleNamespace(num_clients=2), None, 0)
    server = Server(alg, MeanAggregator("mean"))
    server.setup(model, alg.shared_spec(model, clients_per_round=2))
    assert {CONTROL + n for n in STATS}.isdisjoint(server.state)
    before = {n: server.state[n].clone() for n in STATS}
    store = {cid: alg.initial_private_state(model) for cid in (0, 1)}
    uploads = _round(alg, model, server, store, [0, 1])
    for name in STATS:  # uploads are differences; x <- x + mean(dy)
        mean = (uploads[0][name] + uploads[1][name]) / 2
        torch.testing.assert_close(server.state[name], before[name] + mean, rtol=0, atol=1e-12)


def test_refusals():
    with pytest.raises(ConfigError, match="alg.local_buffers=true"):
        FedAvg("fedavg", local_buffers=True).prepare_model(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="momentum=None"):
        FedAvg("fedavg").prepare_model(_model(momentum=None))
