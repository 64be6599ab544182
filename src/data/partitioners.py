"""Split a labelled train pool over federated clients.

A partitioner maps the labels of ``dataset.train`` to one :class:`ClientSplit` per client: index
tensors for the client's local train and local test split. All randomness comes from
``np.random.default_rng(seed)``, so the same seed gives the same partition.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from src.errors import ConfigError


@dataclass
class ClientSplit:
    train: torch.Tensor  # int64 indices into dataset.train
    test: torch.Tensor  # int64 indices into dataset.train (the client's local test split)
    group: int | None = None  # the client's group with partitioner.groups=G

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return labels.astype(np.int64, copy=False)


class Partitioner:
    """Base class: subclasses implement :meth:`assign`; ``__call__`` validates and splits."""

    def __init__(
        self,
        name: str,
        test_fraction: float = 0.2,
        min_partition_size: int = 2,
        groups: int | None = None,
        **kw,
    ) -> None:
        if kw:  # a misspelt config key should fail loudly, not be ignored
            raise ConfigError(f"unknown partitioner option(s) {sorted(kw)} for partitioner={name}")
        self.name = name
        self.groups = groups
        self.test_fraction = float(test_fraction)
        self.min_partition_size = int(min_partition_size)

    def assign(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Disjoint index arrays, one per client."""
        raise NotImplementedError

    def validate(self, n: int, num_clients) -> None:
        """Raise ConfigError with one line naming the bad key; called before any work."""
        if (
            isinstance(num_clients, bool)
            or not isinstance(num_clients, numbers.Integral)
            or num_clients < 1
        ):
            raise ConfigError(f"fl.num_clients must be an integer >= 1, got {num_clients!r}")
        if num_clients > n:
            raise ConfigError(
                f"fl.num_clients={num_clients} exceeds the {n} training samples; use fewer clients"
            )
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(
                f"partitioner.test_fraction must be in [0, 1), got {self.test_fraction}"
            )
        if self.min_partition_size < 1:
            raise ConfigError(
                f"partitioner.min_partition_size must be >= 1, got {self.min_partition_size}"
            )
        if self.groups is not None and not 1 <= self.groups <= num_clients:
            raise ConfigError(
                f"partitioner.groups must be null or in [1, fl.num_clients={num_clients}], "
                f"got {self.groups}"
            )
        if num_clients * self.min_partition_size > n:
            raise ConfigError(
                f"fl.num_clients={num_clients} x partitioner.min_partition_size="
                f"{self.min_partition_size} exceeds the {n} training samples; "
                "use fewer clients or a smaller min_partition_size"
            )

    def __call__(self, labels, num_clients: int, seed: int) -> list[ClientSplit]:
        labels = _as_labels(labels)
        self.validate(len(labels), num_clients)
        rng = np.random.default_rng(seed)
        num_groups = self.num_groups(labels, int(num_clients))
        if num_groups is None:
            parts, groups = self.assign(labels, int(num_clients), rng), [None] * num_clients
        else:
            parts, groups = self._assign_grouped(labels, int(num_clients), num_groups, rng)
        sizes = [len(p) for p in parts]
        if min(sizes) < self.min_partition_size:  # guard for subclasses; dirichlet never gets here
            raise ConfigError(
                f"partitioner={self.name} gave a client {min(sizes)} samples < "
                f"partitioner.min_partition_size={self.min_partition_size}; use fewer fl.num_clients"
            )
        return [
            self._local_split(np.asarray(p, dtype=np.int64), group, rng)
            for p, group in zip(parts, groups, strict=True)
        ]

    def num_groups(self, labels: np.ndarray, num_clients: int) -> int | None:
        """How many client groups to form (`partitioner.groups`; None: no grouping)."""
        return self.groups

    def _assign_grouped(
        self, labels, num_clients: int, num_groups: int, rng
    ) -> tuple[list, list[int]]:
        """G groups: the partitioner's rule splits the data over the groups (e.g. label skew per
        group), then each group's data is split at random, near-equally, over its clients; so the
        clients of a group share a data distribution (like a company's departments)."""
        members = np.array_split(np.arange(num_clients), num_groups)
        parts, groups = [None] * num_clients, [0] * num_clients
        for group, (data, clients) in enumerate(
            zip(self.assign(labels, num_groups, rng), members, strict=True)
        ):
            shares = np.array_split(rng.permutation(data), len(clients))
            for client, part in zip(clients, shares, strict=True):
                parts[client], groups[client] = part, group
        return parts, groups

    def _local_split(self, idx: np.ndarray, group, rng: np.random.Generator) -> ClientSplit:
        n = len(idx)
        n_test = int(self.test_fraction * n + 0.5)  # round half up
        if self.test_fraction > 0:
            n_test = max(n_test, 1)
        n_test = min(n_test, n - 1)  # at least one train sample (test empty only when n == 1)
        idx = rng.permutation(idx)
        return ClientSplit(
            train=torch.from_numpy(np.sort(idx[n_test:])),
            test=torch.from_numpy(np.sort(idx[:n_test])),
            group=group,
        )


class IidPartitioner(Partitioner):
    """A seeded random permutation cut into near-equal parts (sizes differ by at most 1)."""

    def __init__(
        self, name: str = "iid", test_fraction: float = 0.2, min_partition_size: int = 2, **kw
    ):
        super().__init__(name, test_fraction, min_partition_size, **kw)

    def assign(self, labels, num_clients, rng):
        return np.array_split(rng.permutation(len(labels)), num_clients)


class NaturalPartitioner(Partitioner):
    """The dataset's own grouping (text category, department): one group of clients per
    category, each group's data spread at random over its clients. With fewer clients than
    categories, client i gets categories i, i + N, i + 2N, ... (sorted)."""

    def __init__(
        self, name: str = "natural", test_fraction: float = 0.2, min_partition_size: int = 2
    ):
        super().__init__(name, test_fraction, min_partition_size)

    def num_groups(self, labels: np.ndarray, num_clients: int) -> int:
        return min(len(np.unique(labels)), num_clients)  # one group per category

    def assign(self, labels, num_clients, rng):
        categories = np.unique(labels)
        return [
            np.flatnonzero(np.isin(labels, categories[i::num_clients])) for i in range(num_clients)
        ]


class DirichletPartitioner(Partitioner):
    """Label skew: each class is spread over the clients by its own Dir(alpha) draw.

    As Flower's DirichletPartitioner (without self-balancing) / FedLab's hetero Dirichlet split.
    Small alpha => each client sees few classes; large alpha => close to iid. Draws are repeated
    (at most ``max_attempts`` times) until every client has ``min_partition_size`` samples.
    """

    def __init__(
        self,
        name: str = "dirichlet",
        alpha: float = 0.5,
        min_partition_size: int = 2,
        max_attempts: int = 100,
        test_fraction: float = 0.2,
        **kw,
    ):
        super().__init__(name, test_fraction, min_partition_size, **kw)
        self.alpha = float(alpha)
        self.max_attempts = int(max_attempts)
        if not self.alpha > 0:  # also rejects nan
            raise ConfigError(f"partitioner.alpha must be > 0, got {alpha}")
        if self.max_attempts < 1:
            raise ConfigError(f"partitioner.max_attempts must be >= 1, got {max_attempts}")

    def assign(self, labels, num_clients, rng):
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        class_sizes = np.array([len(idx) for idx in by_class])
        smallest = 0
        for _ in range(self.max_attempts):
            # one Dir(alpha) row per class -> cut points of that class's samples over the clients
            p = rng.dirichlet(np.full(num_clients, self.alpha), size=len(by_class))
            cuts = (np.cumsum(p, axis=1)[:, :-1] * class_sizes[:, None]).astype(np.int64)
            edges = np.hstack([np.zeros((len(by_class), 1), np.int64), cuts, class_sizes[:, None]])
            smallest = int(np.diff(edges, axis=1).sum(axis=0).min())
            if smallest >= self.min_partition_size:  # sizes first; build the index lists once
                chunks = [
                    np.split(rng.permutation(idx), cut)
                    for idx, cut in zip(by_class, cuts, strict=True)
                ]
                return [np.concatenate([c[k] for c in chunks]) for k in range(num_clients)]
        raise ConfigError(
            f"partitioner=dirichlet could not give all {num_clients} clients >= "
            f"partitioner.min_partition_size={self.min_partition_size} samples in "
            f"{self.max_attempts} draws (smallest got {smallest}); use a larger partitioner.alpha "
            f"(now {self.alpha}), a smaller min_partition_size or fewer fl.num_clients"
        )


class ShardPartitioner(Partitioner):
    """McMahan et al. (2017) shards: sort by label, cut into num_clients * classes_per_client
    shards, give each client classes_per_client shards at random; every sample is assigned.

    Shards are cut inside each class (never across a class boundary), with the number of shards
    per class proportional to its size, so a client holds at most ``classes_per_client`` classes.
    """

    def __init__(
        self,
        name: str = "shards",
        classes_per_client: int = 2,
        test_fraction: float = 0.2,
        min_partition_size: int = 2,
        **kw,
    ):
        super().__init__(name, test_fraction, min_partition_size, **kw)
        self.classes_per_client = int(classes_per_client)
        if self.classes_per_client < 1:
            raise ConfigError(
                f"partitioner.classes_per_client must be >= 1, got {classes_per_client}"
            )

    def assign(self, labels, num_clients, rng):
        num_shards = num_clients * self.classes_per_client
        classes, counts = np.unique(labels, return_counts=True)
        if not len(classes) <= num_shards <= len(labels):
            raise ConfigError(
                f"partitioner=shards needs {len(classes)} <= fl.num_clients x "
                f"partitioner.classes_per_client (= {num_shards}) <= {len(labels)} samples, so that "
                "every class gets a shard and no shard is empty"
            )
        # Shards per class: one each, then D'Hondt (next shard to the class whose shards are
        # currently largest), which makes all shard sizes near-equal.
        per_class = np.ones(len(classes), dtype=np.int64)
        for _ in range(num_shards - len(classes)):
            per_class[np.argmax(counts / per_class)] += 1
        shards = []
        for c, m in zip(classes, per_class, strict=True):
            # shuffle within the class so shard membership is random, as after a random-tie sort
            shards += np.array_split(rng.permutation(np.flatnonzero(labels == c)), m)
        order = rng.permutation(num_shards).reshape(num_clients, self.classes_per_client)
        return [np.concatenate([shards[s] for s in row]) for row in order]


# --------------------------------------------------------------------------- summaries


def _client_indices(client) -> np.ndarray:
    if isinstance(client, ClientSplit):
        return np.concatenate([client.train.numpy(), client.test.numpy()])
    return np.asarray(client, dtype=np.int64)


def _histograms(labels, clients, num_classes: int) -> np.ndarray:
    labels = _as_labels(labels)
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ConfigError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return np.stack(
        [np.bincount(labels[_client_indices(c)], minlength=num_classes) for c in clients]
    )


def _entropy(hist: np.ndarray) -> np.ndarray:
    total = hist.sum(axis=1, keepdims=True)
    p = hist / np.maximum(total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1)


def label_entropy(labels, clients, num_classes: int) -> np.ndarray:
    """Per-client entropy (nats) of the label distribution over train+test (or raw index arrays).

    0 for a single-class client, log(num_classes) for a perfectly balanced one.
    """
    return _entropy(_histograms(labels, clients, num_classes))


def partition_summary(labels, clients: list[ClientSplit], num_classes: int) -> dict:
    """JSON-serialisable description of a partition, for summary.json and W&B."""
    hist = _histograms(labels, clients, num_classes)
    return {
        "num_clients": len(clients),
        "train_samples": [len(c.train) for c in clients],
        "test_samples": [len(c.test) for c in clients],
        "samples_per_client": [int(s) for s in hist.sum(axis=1)],
        "label_histogram": hist.tolist(),
        "mean_label_entropy": float(_entropy(hist).mean()),
        **(
            {"groups": [c.group for c in clients]}
            if clients and clients[0].group is not None
            else {}
        ),
    }
