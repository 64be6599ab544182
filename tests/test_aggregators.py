import torch

from src.aggregators import MeanAggregator


def _random_uploads(num_clients: int, generator: torch.Generator):
    shapes = {"w": (5, 3), "b": (7,)}
    return [
        {
            name: torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in shapes.items()
        }
        for _ in range(num_clients)
    ]


def test_mean_equals_sample_weighted_mean_float64():
    gen = torch.Generator().manual_seed(0)
    uploads = _random_uploads(4, gen)
    weights = [3.0, 10.0, 1.0, 6.0]
    agg = MeanAggregator(name="mean")
    agg.begin({k: torch.zeros_like(v) for k, v in uploads[0].items()})
    for upload, w in zip(uploads, weights, strict=True):
        agg.add(upload, w)
    result = agg.finish(uploads[0])
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for name in uploads[0]:
        expected = sum(p[k] * uploads[k][name] for k in range(4))
        torch.testing.assert_close(result[name], expected, rtol=1e-14, atol=1e-14)
        assert result[name].dtype == torch.float64


def test_server_lr_moves_a_fraction_of_the_way():
    gen = torch.Generator().manual_seed(1)
    old, a, b = _random_uploads(3, gen)
    agg = MeanAggregator(name="mean", server_lr=0.25)
    agg.begin(old)
    agg.add(a, 1.0)
    agg.add(b, 3.0)
    result = agg.finish(old)
    for name in old:
        mean = 0.25 * a[name] + 0.75 * b[name]
        torch.testing.assert_close(
            result[name], old[name] + 0.25 * (mean - old[name]), rtol=1e-14, atol=1e-14
        )


def test_no_uploads_keeps_the_global_state():
    state = {"w": torch.ones(3)}
    agg = MeanAggregator(name="mean")
    agg.begin(state)
    assert agg.finish(state) is state
