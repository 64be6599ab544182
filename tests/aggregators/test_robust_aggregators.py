"""median, trimmed_mean, krum on hand-made uploads with outliers: the textbook answers."""

import pytest
import torch
from torch import nn

from src.aggregators import KrumAggregator, MedianAggregator, TrimmedMeanAggregator
from src.algorithms import Algorithm, FedLoRA
from src.engine.compatibility import check_aggregator
from src.engine.server import Server
from src.errors import ConfigError


def _server(aggregator, model, alg, clients_per_round):
    """The server around the aggregator, set up as the run does: from the algorithm's SharedSpec
    and server state."""
    server = Server(alg, aggregator)
    server.setup(model, alg.shared_spec(model, clients_per_round))
    return server


def _run(aggregator, values, samples=None):
    """Uploads whose every coordinate is one of `values` (float64 Linear(2, 1): 3 numbers), one
    round on the server; `samples`: each client's n_k, which alg.weighting=samples (the default)
    gives the aggregator as the uploads' weights."""
    model = nn.Linear(2, 1).double()
    server = _server(aggregator, model, Algorithm("plain"), len(values))
    assert server.spec.weighting == "samples"
    server.begin(0)
    for i, value in enumerate(values):
        upload = {n: torch.full_like(p, value) for n, p in model.named_parameters()}
        server.add(upload, 1.0 if samples is None else samples[i], i)
    server.finish()
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
    server = _server(median, model, Algorithm("plain"), 3)
    server.begin(0)
    rows = [[1.0, 9.0], [2.0, -5.0], [50.0, 0.0]]
    for i, row in enumerate(rows):
        server.add({"weight": torch.tensor([row]), "bias": torch.tensor([float(i)])}, 1.0, i)
    server.finish()
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
    """The paper's uniform mean of the selected, also under alg.weighting=samples (the default):
    the sample counts the server weighs the uploads by do not enter krum's average."""
    values = [0.0, 0.1, -0.1, 0.05, 100.0]
    krum = KrumAggregator("krum", num_byzantine=1, m=3)
    state = _run(krum, values, samples=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert sorted(krum.selected) == [0, 1, 3]
    assert _value(state) == pytest.approx((0.0 + 0.1 + 0.05) / 3, rel=1e-12)


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum"])
def test_the_removed_aggregator_weighting_key_is_refused(aggregator):
    """aggregator.weighting is gone (the weighting is alg.weighting, and these three rules treat
    uploads alike): Hydra refuses the key, naming it, before anything is built."""
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose_config

    with pytest.raises(
        ConfigCompositionException, match=r"Could not override 'aggregator\.weighting'"
    ):
        compose_config([f"aggregator={aggregator}", "aggregator.weighting=samples"])


def test_coordinate_wise_rules_ignore_the_sample_counts():
    """alg.weighting=samples hands them each client's n_k as its weight; median and trimmed_mean
    treat the uploads alike, as the textbook rules (they used to refuse the samples weighting)."""
    median = MedianAggregator("median")
    assert _value(_run(median, [3.0, 1.0, 1e6], samples=[1.0, 1.0, 100.0])) == 3.0
    trimmed = TrimmedMeanAggregator("trimmed_mean", trim=0.2)
    values, samples = [2.0, -1e6, 3.0, 4.0, 1e6], [1.0, 50.0, 1.0, 7.0, 9.0]
    assert _value(_run(trimmed, values, samples=samples)) == 3.0


def test_trimmed_mean_default_trim_is_the_configs_0_2():
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    configured = instantiate(compose_config(["aggregator=trimmed_mean"]).aggregator)
    assert configured.trim == TrimmedMeanAggregator("trimmed_mean").trim == 0.2


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
