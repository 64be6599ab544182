"""The mean aggregator and the server optimiser, exactly (float64)."""

import pytest
import torch

from src.aggregators import MeanAggregator
from src.algorithms import Algorithm
from src.contract.sharing import Role, SharedSpec
from src.engine.server import Server
from src.engine.server_opt import ServerOptimizer
from src.errors import ConfigError


def _random_uploads(num_clients: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 3), "b": (7,)}
    return [
        {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
        for _ in range(num_clients)
    ]


def aggregate(agg, state, uploads, samples, optimizer=None, weighting="samples"):
    """Run one round of `agg` on the server from `state` over `uploads` (`samples`: each client's
    n_k, weighted by `weighting` as alg.weighting does), then the server optimiser's step
    (`optimizer`; None: sgd with lr 1); returns the new state."""
    server = Server(Algorithm("plain", weighting=weighting), agg, optimizer)
    roles = {n: Role.OTHER for n in state}
    server.spec = SharedSpec(roles=roles, uploads_per_round=len(uploads), weighting=weighting)
    agg.state = {n: t.clone() for n, t in state.items()}
    server.begin(0)
    for client_id, (upload, n_k) in enumerate(zip(uploads, samples, strict=True)):
        server.add(upload, n_k, client_id)
    server.finish()
    return agg.state


def test_mean_equals_sample_weighted_mean_float64():
    uploads = _random_uploads(4)
    weights = [3.0, 10.0, 1.0, 6.0]
    result = aggregate(MeanAggregator(name="mean"), uploads[0], uploads, weights)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for name in uploads[0]:
        expected = sum(p[k] * uploads[k][name] for k in range(4))
        torch.testing.assert_close(result[name], expected, rtol=1e-14, atol=1e-14)
        assert result[name].dtype == torch.float64


def test_server_opt_lr_moves_a_fraction_of_the_way():
    old, a, b = _random_uploads(3, seed=1)
    server_opt = ServerOptimizer(lr=0.25)
    result = aggregate(MeanAggregator(name="mean"), old, [a, b], [1.0, 3.0], server_opt)
    for name in old:
        mean = 0.25 * a[name] + 0.75 * b[name]
        expected = old[name] + 0.25 * (mean - old[name])
        torch.testing.assert_close(result[name], expected, rtol=1e-14, atol=1e-14)


def test_no_uploads_keeps_the_global_state():
    state = {"w": torch.ones(3, dtype=torch.float64)}
    agg = MeanAggregator(name="mean")
    assert torch.equal(aggregate(agg, state, [], [])["w"], state["w"])


def test_fedavgm_momentum_accumulates_pseudo_gradients():
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    theta = {"w": torch.zeros(4, dtype=torch.float64)}
    targets = [
        torch.full((4,), 1.0, dtype=torch.float64),
        torch.full((4,), 3.0, dtype=torch.float64),
    ]
    opt.step(theta, {"w": targets[0]})  # m = 1, theta = 0.5
    opt.step(theta, {"w": targets[1]})  # m = 0.9 * 1 + (3 - 0.5) = 3.4, theta = 0.5 + 1.7
    torch.testing.assert_close(theta["w"], torch.full((4,), 2.2, dtype=torch.float64))


def test_fedadam_step_matches_the_formula():
    opt = ServerOptimizer(name="adam", lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    theta = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    target = torch.tensor([3.0, -2.5], dtype=torch.float64)
    delta = target - theta["w"]
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = theta["w"] + 0.1 * m / (v.sqrt() + 1e-3)
    opt.step(theta, {"w": target})
    torch.testing.assert_close(theta["w"], expected, rtol=1e-14, atol=1e-14)


def _reddi_algorithm_2(opt, deltas, lr, b1, b2, tau, bias_correction=False):
    """Reddi et al. (2021), Algorithm 2, written out for a sequence of pseudo-gradients
    (m, v start at 0); returns the total movement of theta."""
    m = v = torch.zeros_like(deltas[0])
    theta = torch.zeros_like(deltas[0])
    for t, delta in enumerate(deltas, start=1):
        m = b1 * m + (1 - b1) * delta
        if opt == "adagrad":
            v = v + delta**2
        elif opt == "yogi":
            v = v - (1 - b2) * delta**2 * torch.sign(v - delta**2)
        else:
            v = b2 * v + (1 - b2) * delta**2
        m_hat, v_hat = m, v
        if bias_correction:
            m_hat = m / (1 - b1**t)
            v_hat = v if opt == "adagrad" else v / (1 - b2**t)
        theta = theta + lr * m_hat / (v_hat.sqrt() + tau)
    return theta


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_adaptive_server_optimisers_follow_reddi_et_al(opt, bias_correction):
    gen = torch.Generator().manual_seed(7)
    lr, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3
    server = ServerOptimizer(opt, lr, 0.0, (b1, b2), tau, bias_correction)
    theta = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}
    start = theta["w"].clone()
    deltas = []
    for _ in range(4):  # the pseudo-gradient is aggregate - theta at each step
        aggregate = theta["w"] + torch.randn(6, generator=gen, dtype=torch.float64)
        deltas.append(aggregate - theta["w"])
        server.step(theta, {"w": aggregate})
    expected = start + _reddi_algorithm_2(opt, deltas, lr, b1, b2, tau, bias_correction)
    torch.testing.assert_close(theta["w"], expected, rtol=1e-13, atol=1e-13)


def test_yogi_and_adagrad_differ_from_adam():
    """The three second-moment rules give different steps on the same deltas."""
    moved = {}
    for opt in ("adam", "yogi", "adagrad"):
        theta = {"w": torch.zeros(3, dtype=torch.float64)}
        server = ServerOptimizer(opt, 0.1, 0.0)
        for target in (1.0, -2.0, 0.5):
            server.step(theta, {"w": torch.full((3,), target, dtype=torch.float64)})
        moved[opt] = theta["w"][0].item()
    assert len({round(v, 12) for v in moved.values()}) == 3


def test_server_optimiser_refusals_name_the_key():
    with pytest.raises(ConfigError, match="server_opt must be one of sgd, adam, yogi"):
        ServerOptimizer(name="rmsprop")
    with pytest.raises(ConfigError, match="server_opt.momentum=0.9 is for server_opt=sgd"):
        ServerOptimizer(name="yogi", momentum=0.9)
    with pytest.raises(ConfigError, match="server_opt.bias_correction=true"):
        ServerOptimizer(bias_correction=True)


def test_uniform_weighting_ignores_sample_counts():
    uploads = _random_uploads(3, seed=4)
    mean = MeanAggregator("mean")
    result = aggregate(mean, uploads[0], uploads, [1, 50, 7], weighting="uniform")
    for name in uploads[0]:
        expected = (uploads[0][name] + uploads[1][name] + uploads[2][name]) / 3
        torch.testing.assert_close(result[name], expected, rtol=1e-14, atol=1e-14)
    with pytest.raises(ConfigError, match="alg.weighting must be one of samples, uniform"):
        Algorithm("plain", weighting="equal")


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["alg=fedavg"], "samples"),  # McMahan et al.: p_k = n_k / n
        (["alg=scaffold"], "uniform"),  # Karimireddy et al.: mean over S
        (["alg=perfed"], "uniform"),  # the lp-proj reference's simpleaverage
        (["alg=perfed", "aggregator=krum"], "uniform"),
        (["alg=fedavg", "alg.weighting=uniform"], "uniform"),
    ],
)
def test_each_papers_weighting_is_the_configured_default(overrides, expected):
    """alg.weighting reaches the algorithm, whose SharedSpec the server weighs uploads by (krum
    averages its selection uniformly whatever it is: tests/aggregators/test_robust_aggregators.py)."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(overrides)
    assert instantiate(cfg.alg).weighting == expected


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi", "adagrad"])
def test_each_server_opt_option_builds_its_optimizer(name):
    """server_opt=<name> picks the rule and server_opt.lr its learning rate."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config([f"server_opt={name}", "server_opt.lr=0.1"])
    optimizer = instantiate(cfg.server_opt, _convert_="all")
    assert isinstance(optimizer, ServerOptimizer)
    assert (optimizer.opt, optimizer.lr) == (name, 0.1)


def test_the_servers_checkpoint_keeps_the_server_optimisers_moments():
    """Server.state_dict: the aggregator's, the server optimiser's and the algorithm's state; a
    checkpoint from before the server owned the optimiser (its state under the aggregator's
    "server") loads too."""
    uploads = _random_uploads(3, seed=5)
    adam = ServerOptimizer(name="adam", lr=0.1)
    mean = MeanAggregator("mean")
    aggregate(mean, uploads[0], uploads[1:], [2.0, 3.0], adam)
    server = Server(Algorithm("plain"), mean, adam)
    saved = server.state_dict()
    assert set(saved) == {"aggregator", "server_opt", "algorithm"}
    assert "server" not in saved["aggregator"]
    moments = saved["server_opt"]
    assert moments["steps"] == 1 and set(moments["buffers"]["m"]) == {"w", "b"}
    for old in (False, True):
        state = dict(saved)
        if old:
            state["aggregator"] = saved["aggregator"] | {"server": state.pop("server_opt")}
        restored = Server(Algorithm("plain"), MeanAggregator("mean"), ServerOptimizer("adam"))
        restored.load_state_dict(state)
        assert restored.optimizer.steps == 1
        for name in ("m", "v"):
            for n, t in adam.buffers[name].items():
                assert torch.equal(restored.optimizer.buffers[name][n], t)
        assert all(torch.equal(restored.state[n], t) for n, t in mean.state.items())
