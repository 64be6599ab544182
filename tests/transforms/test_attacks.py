"""Simulated attacks and what robust aggregation does against them."""

import pytest
import torch

from src.errors import ConfigError
from src.run import train
from src.transforms.attacks import ATTACKS, SignFlip
from tests.conftest import QUICKSTART_VIT


def _attack(name, fraction=0.2, num_clients=10, seed=0):
    attack = ATTACKS[name](fraction)
    attack.choose(num_clients, seed)
    return attack


def _upload_and_origin():
    gen = torch.Generator().manual_seed(0)
    # origin: what the client would send without training (for a plain model, what it received)
    origin = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    upload = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in origin.items()}
    return upload, origin


def test_malicious_clients_are_a_fixed_fraction_chosen_from_the_seed():
    first, again = _attack("sign_flip", num_clients=100), _attack("sign_flip", num_clients=100)
    other = _attack("sign_flip", num_clients=100, seed=1)
    assert len(first.malicious) == 20 and first.malicious == again.malicious
    assert first.malicious != other.malicious  # 20 of 100: a coincidence is out of the question
    assert len(_attack("sign_flip").malicious) == 2
    assert _attack("none", fraction=0.5).malicious == set()


def test_honest_clients_upload_unchanged():
    attack = _attack("gaussian")
    honest = next(c for c in range(10) if c not in attack.malicious)
    upload, origin = _upload_and_origin()
    assert attack.apply(honest, upload, origin, torch.Generator()) is upload


def test_sign_flip_reverses_and_rescales_the_update():
    attack = _attack("sign_flip")
    bad = min(attack.malicious)
    upload, origin = _upload_and_origin()
    sent = attack.apply(bad, upload, origin, torch.Generator().manual_seed(3))
    ratios = torch.cat([((sent[n] - origin[n]) / (upload[n] - origin[n])).flatten() for n in sent])
    assert torch.allclose(ratios, ratios[0]) and ratios[0] < 0  # one negative factor for all


def test_gaussian_and_same_value_replace_the_upload():
    upload, origin = _upload_and_origin()
    noise = _attack("gaussian")
    sent = noise.apply(min(noise.malicious), upload, origin, torch.Generator().manual_seed(0))
    values = torch.cat([t.flatten() for t in sent.values()])
    assert 20 < values.std() < 500  # N(0, 100^2), 15 numbers
    same = _attack("same_value")
    sent = same.apply(min(same.malicious), upload, origin, torch.Generator().manual_seed(0))
    assert len(torch.cat([t.flatten() for t in sent.values()]).unique()) == 1


def test_label_flip_permutes_the_classes_of_malicious_clients_only():
    attack = _attack("label_flip")
    bad = min(attack.malicious)
    honest = next(c for c in range(10) if c not in attack.malicious)
    mapping = attack.label_map(bad, 10)
    assert sorted(mapping.tolist()) == list(range(10)) and mapping.tolist() != list(range(10))
    assert torch.equal(mapping, attack.label_map(bad, 10))  # fixed for the run
    assert attack.label_map(honest, 10) is None


@pytest.mark.parametrize("name, fraction", [("sign_flip", 1.0), ("gaussian", 1.5)])
def test_bad_attack_options_name_the_key(name, fraction):
    with pytest.raises(ConfigError, match="attack.fraction must be in"):
        ATTACKS[name](fraction)


def test_every_attack_option_builds_its_own_class():
    """One class per attack: each conf/attack option's `_target_` is the class of its name."""
    from tests.compat_matrix import options
    from tests.conftest import compose_config

    for option in options("attack"):
        target = compose_config([f"attack={option}"]).attack._target_
        assert target.rsplit(".", 1)[1] == ATTACKS[option].__name__


# Ten iid clients, all sampled, two of them sign-flipping (their update times -|N(0, 10^2)|).
# Measured over seeds 0-2 x trainer.threads 1, 2 (2026-12-06, AMD EPYC, about 25 s each;
# benchmarks/learning_margins.py --slow): clean fedavg+mean 0.475-0.542; attacked mean 0.092-0.100
# (chance); attacked median 0.425-0.517, i.e. clean minus 0.117 to plus 0.022 (a bound of 0.10
# failed at seed 0 with 2 threads) and at least 0.328 above the attacked mean.
ATTACKED = [
    *QUICKSTART_VIT,
    "partitioner=iid",
    "fl.num_clients=10",
    "fl.clients_per_round=10",
    "fl.local_epochs=2",
    "fl.rounds=8",
    "fl.eval_every=8",
]


@pytest.mark.slow  # three runs, 75 s on 2 CPU cores; the robust rules' math is in make test
@pytest.mark.learning
def test_sign_flip_breaks_the_mean_but_not_the_median(make_digits_config):
    acc = {}
    for label, overrides in {
        "clean": ["aggregator=mean"],
        "mean": ["aggregator=mean", "attack=sign_flip"],
        "median": ["aggregator=median", "attack=sign_flip"],
    }.items():
        summary = train(make_digits_config("alg=fedavg", *ATTACKED, *overrides))
        acc[label] = summary["final"]["val/global_acc"]
        if label != "clean":
            assert len(summary["malicious_clients"]) == 2
    assert acc["clean"] >= 0.35, acc  # it learns: 3.5 times chance
    assert acc["mean"] <= acc["clean"] - 0.25, acc  # the attack clearly works on the mean
    assert acc["median"] >= acc["clean"] - 0.25, acc  # the median keeps most of it
    assert acc["median"] >= acc["mean"] + 0.2, acc  # and clearly beats the attacked mean


def test_an_attack_without_attackers_or_without_honest_clients_is_refused_up_front():
    from src.aggregators import MeanAggregator
    from src.engine.compatibility import check_attack

    with pytest.raises(
        ConfigError, match=r"attack.fraction=0.05 and fl.num_clients=6 .* 0 clients"
    ):
        check_attack(SignFlip(0.05), MeanAggregator("mean"), 6, text=False)
    with pytest.raises(ConfigError, match="all 10 clients malicious"):
        check_attack(SignFlip(0.99), MeanAggregator("mean"), 10, text=False)
    check_attack(SignFlip(0.2), MeanAggregator("mean"), 6, text=False)  # 1 attacker
