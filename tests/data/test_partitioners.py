"""Client partitioners: coverage, sizes, determinism, label skew, validation. Synthetic labels only."""

import json
import time

import numpy as np
import pytest
import torch

from src.data import (
    ClientSplit,
    DirichletPartitioner,
    IidPartitioner,
    ShardPartitioner,
    label_entropy,
    partition_summary,
)

# digits-sized: 1437 training samples over 10 near-balanced classes
LABELS = np.random.default_rng(0).permutation(np.arange(1437) % 10)


def _all_indices(clients):
    return np.concatenate([np.concatenate([c.train.numpy(), c.test.numpy()]) for c in clients])


def _same(a, b):
    return all(
        torch.equal(x.train, y.train) and torch.equal(x.test, y.test)
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_uses_every_index_exactly_once():
    clients = DirichletPartitioner(alpha=0.5)(LABELS, num_clients=10, seed=0)
    assert len(clients) == 10
    assert all(isinstance(c, ClientSplit) and c.train.dtype == torch.int64 for c in clients)
    assert np.array_equal(np.sort(_all_indices(clients)), np.arange(len(LABELS)))


@pytest.mark.parametrize(
    "alpha, num_clients, min_size", [(0.1, 10, 10), (0.5, 20, 20), (0.1, 50, 2)]
)
def test_dirichlet_every_client_has_min_partition_size(alpha, num_clients, min_size):
    part = DirichletPartitioner(alpha=alpha, min_partition_size=min_size)
    for seed in range(3):
        clients = part(LABELS, num_clients, seed=seed)
        assert min(len(c) for c in clients) >= min_size


def test_dirichlet_same_seed_same_partition_different_seed_different():
    part = DirichletPartitioner(alpha=0.5)
    assert _same(part(LABELS, 10, seed=1), part(LABELS, 10, seed=1))
    assert not _same(part(LABELS, 10, seed=1), part(LABELS, 10, seed=2))


def test_dirichlet_smaller_alpha_means_more_label_skew():
    skewed = DirichletPartitioner(alpha=0.1)(LABELS, 10, seed=0)
    near_iid = DirichletPartitioner(alpha=100.0)(LABELS, 10, seed=0)
    h_skewed = label_entropy(LABELS, skewed, 10).mean()
    h_iid = label_entropy(LABELS, near_iid, 10).mean()
    assert h_skewed < h_iid - 0.5
    assert h_iid > 0.95 * np.log(10)  # alpha=100 is close to uniform labels per client


def test_dirichlet_impossible_min_size_raises_up_front():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="min_partition_size"):
        DirichletPartitioner(alpha=0.5, min_partition_size=200)(LABELS, 10, seed=0)
    assert time.perf_counter() - start < 0.5


def test_dirichlet_exhausted_attempts_raise_quickly_not_hang():
    # Feasible on paper (50 x 25 <= 1437) but alpha=0.01 almost never gives every client 25 samples.
    part = DirichletPartitioner(alpha=0.01, min_partition_size=25, max_attempts=20)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="larger partitioner.alpha"):
        part(LABELS, 50, seed=0)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_alpha_not_positive_raises(alpha):
    with pytest.raises(ValueError, match="partitioner.alpha"):
        DirichletPartitioner(alpha=alpha)


# --------------------------------------------------------------------------- iid and shards


def test_iid_near_equal_sizes_and_full_coverage():
    clients = IidPartitioner()(LABELS, 7, seed=0)
    sizes = [len(c) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(_all_indices(clients)), np.arange(len(LABELS)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_each_client_has_at_most_classes_per_client(k):
    clients = ShardPartitioner(classes_per_client=k)(LABELS, 20, seed=0)
    hist = np.array(partition_summary(LABELS, clients, 10)["label_histogram"])
    assert ((hist > 0).sum(axis=1) <= k).all()
    assert np.array_equal(np.sort(_all_indices(clients)), np.arange(len(LABELS)))  # all assigned


def test_shards_uneven_classes_still_at_most_k_classes():
    labels = np.repeat(np.arange(10), [50, 300, 7, 90, 120, 60, 33, 200, 11, 129])
    clients = ShardPartitioner(classes_per_client=2)(labels, 15, seed=0)
    hist = np.array(partition_summary(labels, clients, 10)["label_histogram"])
    assert ((hist > 0).sum(axis=1) <= 2).all() and hist.sum() == len(labels)


def test_shards_too_few_shards_for_classes_raises():
    with pytest.raises(ValueError, match="classes_per_client"):
        ShardPartitioner(classes_per_client=2)(LABELS, 3, seed=0)  # 6 shards < 10 classes


# --------------------------------------------------------------------------- local test split


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_local_test_split_size_follows_test_fraction(fraction):
    clients = IidPartitioner(test_fraction=fraction)(LABELS, 10, seed=0)
    for c in clients:
        assert abs(len(c.test) - fraction * len(c)) <= 0.5 + 1e-9
        assert len(np.intersect1d(c.train.numpy(), c.test.numpy())) == 0


def test_local_split_keeps_a_train_sample_and_test_nonempty_from_two():
    labels = np.arange(6) % 2
    clients = IidPartitioner(test_fraction=0.9, min_partition_size=1)(labels, 3, seed=0)  # 2 each
    assert all(len(c.train) == 1 and len(c.test) == 1 for c in clients)
    singles = IidPartitioner(test_fraction=0.2, min_partition_size=1)(labels, 6, seed=0)
    assert all(len(c.train) == 1 and len(c.test) == 0 for c in singles)
    none = IidPartitioner(test_fraction=0.0)(labels, 3, seed=0)
    assert all(len(c.test) == 0 for c in none)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, num_clients, key",
    [
        (IidPartitioner, 0, "fl.num_clients"),
        (IidPartitioner, 1438, "fl.num_clients=1438 exceeds the 1437"),
        (lambda: IidPartitioner(test_fraction=1.0), 10, "partitioner.test_fraction"),
        (lambda: IidPartitioner(test_fraction=-0.1), 10, "partitioner.test_fraction"),
        (lambda: ShardPartitioner(min_partition_size=0), 10, "partitioner.min_partition_size"),
        (lambda: IidPartitioner(min_partition_size=2), 800, "min_partition_size"),
    ],
)
def test_bad_config_raises_one_line_naming_the_key(make, num_clients, key):
    with pytest.raises(ValueError, match=key) as err:
        make()(LABELS, num_clients, seed=0)
    assert "\n" not in str(err.value)


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="alpah"):
        DirichletPartitioner(alpah=0.1)


def test_accepts_torch_labels():
    a = DirichletPartitioner()(torch.as_tensor(LABELS), 5, seed=0)
    assert _same(a, DirichletPartitioner()(LABELS, 5, seed=0))


# --------------------------------------------------------------------------- summary


def test_partition_summary_is_json_and_consistent():
    clients = DirichletPartitioner(alpha=0.3)(LABELS, 8, seed=0)
    s = json.loads(json.dumps(partition_summary(LABELS, clients, 10)))
    assert s["num_clients"] == 8
    per_client = np.add(s["train_samples"], s["test_samples"]).tolist()
    assert per_client == s["samples_per_client"]
    assert [sum(h) for h in s["label_histogram"]] == s["samples_per_client"]
    assert sum(s["samples_per_client"]) == len(LABELS)
    assert s["mean_label_entropy"] == pytest.approx(label_entropy(LABELS, clients, 10).mean())


def test_label_entropy_extremes():
    labels = np.array([0, 0, 0, 0, 1, 2, 3, 4])
    h = label_entropy(labels, [np.arange(4), np.arange(4, 8), np.array([], dtype=np.int64)], 5)
    assert h == pytest.approx([0.0, np.log(4), 0.0])
