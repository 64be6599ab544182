"""median, trimmed_mean, krum on hand-made uploads with outliers: the textbook answers."""

import pytest
import torch
from torch import nn

from src.aggregators import KrumAggregator, MedianAggregator, TrimmedMeanAggregator
from src.algorithms import Algorithm, FedLoRA
from src.errors import ConfigError
from src.federated.compatibility import check_aggregator


def _setup(aggregator, model, alg, clients_per_round):
    """Set the aggregator up as the run does: from the algorithm's SharedSpec and server state."""
    spec = alg.shared_spec(model, clients_per_round)
    aggregator.setup(spec, alg.server_state(model), alg.base_weights(model))


def _run(aggregator, values, weights=None):
    """Uploads whose every coordinate is one of `values` (float64 Linear(2, 1): 3 numbers)."""
    model = nn.Linear(2, 1).double()
    _setup(aggregator, model, Algorithm("plain"), len(values))
    aggregator.begin()
    for i, value in enumerate(values):
        upload = {n: torch.full_like(p, value) for n, p in model.named_parameters()}
        aggregator.add(upload, 1.0 if weights is None else weights[i], i)
    aggregator.finish()
    return aggregator.state


def _value(state) -> float:
    values = torch.cat([t.flatten() for t in state.values()]).unique()
    assert len(values) == 1, state
    return values.item()


def test_median_of_an_odd_count_ignores_the_outlier():
    assert _value(_run(MedianAggregator("median"), [3.0, 1.0, 1e6])) == 3.0


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert _value(_run(MedianAggregator("median"), [1.0, 100.0, 2.0, 3.0])) == 2.5


def test_median_is_coordinate_wise():
    model = nn.Linear(2, 1).double()
    median = MedianAggregator("median")
    _setup(median, model, Algorithm("plain"), 3)
    median.begin()
    rows = [[1.0, 9.0], [2.0, -5.0], [50.0, 0.0]]
    for i, row in enumerate(rows):
        median.add({"weight": torch.tensor([row]), "bias": torch.tensor([float(i)])}, 1.0, i)
    median.finish()
    assert median.state["weight"].tolist() == [[2.0, 0.0]]
    assert median.state["bias"].tolist() == [1.0]


def test_trimmed_mean_cuts_the_fraction_at_each_end():
    values = [2.0, -1e6, 3.0, 4.0, 1e6]  # trim 0.2 of 5: one from each end
    assert _value(_run(TrimmedMeanAggregator("trimmed_mean", trim=0.2), values)) == 3.0
    plain = _value(_run(TrimmedMeanAggregator("trimmed_mean", trim=0.0), [1.0, 2.0, 6.0]))
    assert plain == 3.0  # trim 0 is the unweighted mean


def test_krum_picks_the_upload_closest_to_its_neighbours():
    values = [0.0, 0.1, -0.1, 0.05, 100.0]
    krum = KrumAggregator("krum", num_byzantine=1, m=1)
    assert _value(_run(krum, values)) == 0.05
    assert krum.selected == [3]
    # scores by hand: K - f - 2 = 2 nearest neighbours, 3 coordinates each
    expected = [3 * s for s in (0.0125, 0.0125, 0.0325, 0.005)]
    assert krum.scores()[:4].tolist() == pytest.approx(expected)


def test_multi_krum_averages_the_m_best_uniformly_as_blanchard_et_al():
    values = [0.0, 0.1, -0.1, 0.05, 100.0]
    krum = KrumAggregator("krum", num_byzantine=1, m=3)  # the paper's rule: weighting=uniform
    state = _run(krum, values, weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert sorted(krum.selected) == [0, 1, 3]
    assert _value(state) == pytest.approx((0.0 + 0.1 + 0.05) / 3, rel=1e-12)


def test_multi_krum_with_weighting_samples_averages_by_sample_counts():
    values = [0.0, 0.1, -0.1, 0.05, 100.0]
    krum = KrumAggregator("krum", num_byzantine=1, m=3, weighting="samples")
    state = _run(krum, values, weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert sorted(krum.selected) == [0, 1, 3]
    assert _value(state) == pytest.approx((1 * 0.0 + 2 * 0.1 + 4 * 0.05) / 7, rel=1e-12)


def test_trimmed_mean_default_trim_is_the_configs_0_2():
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    configured = instantiate(compose_config(["aggregator=trimmed_mean"]).aggregator)
    assert configured.trim == TrimmedMeanAggregator("trimmed_mean").trim == 0.2


def test_coordinate_wise_rules_refuse_sample_weighting():
    with pytest.raises(ConfigError, match="aggregator.weighting=samples: aggregator=median"):
        MedianAggregator("median", weighting="samples")


def test_robust_aggregators_refuse_mixed_ranks():
    alg = FedLoRA("fedlora", {"r": 4, "alpha": 8, "target_modules": ["0"]}, [], [2, 4])
    model = alg.prepare_model(nn.Sequential(nn.Linear(8, 8)))
    spec = alg.shared_spec(model, 10)  # enough uploads: the ranks are what is refused
    with pytest.raises(ConfigError, match="equal shapes"):
        check_aggregator(spec, MedianAggregator("median"))


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: TrimmedMeanAggregator("trimmed_mean", trim=0.5), "aggregator.trim"),
        (lambda: KrumAggregator("krum", num_byzantine=-1), "aggregator.num_byzantine"),
        (lambda: KrumAggregator("krum", m=0), "aggregator.m"),
    ],
)
def test_bad_robust_options_name_the_key(build, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()
