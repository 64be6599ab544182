"""The mean aggregator and the server optimiser, exactly (float64)."""

import torch

from src.aggregators import MeanAggregator, ServerOptimizer


def _random_uploads(num_clients: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 3), "b": (7,)}
    return [
        {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
        for _ in range(num_clients)
    ]


def aggregate(agg, state, uploads, weights):
    """Run one round of `agg` from `state` over `uploads`; returns the new state."""
    agg.state = {n: t.clone() for n, t in state.items()}
    agg.begin()
    for client_id, (upload, w) in enumerate(zip(uploads, weights, strict=True)):
        agg.add(upload, w, client_id)
    agg.finish()
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


def test_server_lr_moves_a_fraction_of_the_way():
    old, a, b = _random_uploads(3, seed=1)
    result = aggregate(MeanAggregator(name="mean", server_lr=0.25), old, [a, b], [1.0, 3.0])
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
    opt = ServerOptimizer(lr=0.1, opt="adam", betas=(0.9, 0.99), eps=1e-3)
    theta = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    target = torch.tensor([3.0, -2.5], dtype=torch.float64)
    delta = target - theta["w"]
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = theta["w"] + 0.1 * m / (v.sqrt() + 1e-3)
    opt.step(theta, {"w": target})
    torch.testing.assert_close(theta["w"], expected, rtol=1e-14, atol=1e-14)
