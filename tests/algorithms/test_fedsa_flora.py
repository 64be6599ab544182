"""fedsa-flora: A is shared and aggregated; B and the head stay with each client."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from src.aggregators import MeanAggregator
from src.algorithms import FedSAFLoRA
from src.algorithms.clustering import cluster_rows, elbow
from src.contract.sharing import Role, SharedSpec
from src.engine.server import Server
from src.engine.server_opt import ServerOptimizer
from src.errors import ConfigError, user_error
from src.run import build_module, build_trainer, train
from tests.conftest import ONE_BLOCK_VIT, RecordingMean, digits_config


class RecordingFedSA(FedSAFLoRA):
    """fedsa-flora, keeping a copy of each client's private tensors right after its training."""

    def finish(self, model, state):
        upload, private = super().finish(model, state)
        self.trained_private[state.client_id] = {n: t.clone() for n, t in private.items()}
        return upload, private


def _fit(cfg, module):
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    return module


@pytest.fixture(scope="module")  # one run, only read by the tests below
def one_round(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("one_round")
    cfg = digits_config(
        tmp_path, "alg=fedsa-flora", "fl.rounds=1", "alg.client_ranks=[4,8]", *ONE_BLOCK_VIT
    )
    module = build_module(cfg, tmp_path)
    module.algorithm.__class__ = RecordingFedSA
    module.algorithm.trained_private = {}
    module.aggregator = RecordingMean()
    return _fit(cfg, module)


def test_upload_holds_only_lora_a(one_round):
    uploads = one_round.aggregator.uploads
    assert len(uploads) == one_round.clients_per_round
    for upload in uploads:
        assert upload and all(".lora_A." in name for name in upload), sorted(upload)


def test_sampled_clients_deploy_the_aggregate_a_and_their_own_trained_b(one_round):
    module = one_round
    agg, alg = module.aggregator, module.algorithm
    # the aggregate: row j of A is the weighted mean over the clients that own row j
    expected = {}
    for name in agg.state:
        total = torch.zeros_like(agg.state[name], dtype=torch.float64)
        owned = torch.zeros_like(total)
        for upload, w in zip(agg.uploads, agg.weights, strict=True):
            rows = upload[name].shape[0]
            total[:rows] += w * upload[name].double()
            owned[:rows] += w
        expected[name] = total / owned
    for name, value in expected.items():
        torch.testing.assert_close(agg.state[name].double(), value, rtol=1e-6, atol=1e-7)

    sampled = agg.client_ids
    for cid in sampled:
        payload, private = module.deployed_state(cid)
        deployed = payload | private
        rank = alg.client_rank(cid)
        for name in agg.state:  # shared A: the aggregate, at the client's rank
            assert torch.equal(deployed[name], agg.state[name][:rank])
        trained = alg.trained_private[cid]
        assert set(trained) == set(alg.private_names(module.model))
        assert any("head" in n for n in trained) and any("lora_B" in n for n in trained)
        for name, tensor in trained.items():  # private: exactly what the client trained
            assert torch.equal(deployed[name].to(tensor.device), tensor), name
    # B differs between clients (not one B shared by all)
    b_name = next(n for n in alg.private_names(module.model) if "lora_B" in n)
    first, second = (module.store.load(c)[b_name] for c in sampled[:2])
    cols = min(first.shape[1], second.shape[1])
    assert not torch.allclose(first[:, :cols], second[:, :cols])


def test_unsampled_clients_keep_the_initial_private_state(one_round):
    module = one_round
    unsampled = set(range(module.federation.num_clients)) - set(module.aggregator.client_ids)
    assert unsampled and set(module.store.saved) == set(module.aggregator.client_ids)
    for cid in unsampled:
        assert module.store.load(cid) is module.store.initial
    assert all(
        torch.count_nonzero(t) == 0 for n, t in module.store.initial.items() if "lora_B" in n
    )


def test_up_bytes_are_the_a_matrices_only(make_digits_config, tmp_path):
    """Equal ranks: fedsa-flora sends half of fedlora's LoRA bytes, and no head."""
    sent = {}
    for alg in ("fedlora", "fedsa-flora"):
        cfg = make_digits_config(f"alg={alg}", "fl.rounds=1")
        module = _fit(cfg, build_module(cfg, tmp_path / alg))
        sent[alg] = module.recorder.rows[-1]["comm/up_bytes"]
        params = dict(module.model.named_parameters())
    a_bytes = sum(p.numel() * 4 for n, p in params.items() if "lora_A" in n)
    b_bytes = sum(p.numel() * 4 for n, p in params.items() if "lora_B" in n)
    head_bytes = sum(p.numel() * 4 for n, p in params.items() if n.startswith("head."))
    clients = cfg.fl.clients_per_round
    assert sent["fedsa-flora"] == clients * a_bytes
    assert sent["fedlora"] == clients * (a_bytes + b_bytes + head_bytes)


def test_server_opt_lr_reaches_the_servers_optimizer(make_digits_config, tmp_path):
    """The residual step on A (0.1: the original system's "FLoRA momentum") is server_opt.lr, which
    the run gives the server's optimiser; alg.server_lr, its old key, is refused by Hydra."""
    cfg = make_digits_config("alg=fedsa-flora", "server_opt.lr=0.1")
    assert build_module(cfg, tmp_path / "flora").server.optimizer.lr == 0.1
    plain = make_digits_config("alg=fedlora")
    assert build_module(plain, tmp_path / "fedlora").server.optimizer.lr == 1.0
    with pytest.raises(ConfigCompositionException, match="Could not override 'alg.server_lr'"):
        make_digits_config("alg=fedsa-flora", "alg.server_lr=0.1")


def test_the_server_step_on_a_is_server_opt_lr_of_the_way_to_the_mean():
    """A <- A + lr (A_bar - A) with lr = server_opt.lr (here 0.1), A_bar the weighted mean."""
    alg = FedSAFLoRA("fedsa-flora", {"r": 4, "alpha": 8, "target_modules": ["proj"]})
    alg.configure(SimpleNamespace(groups=None), None, seed=0)
    alg.spec = SharedSpec(roles={"A": Role.LORA_A}, uploads_per_round=2)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    uploads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    server = Server(alg, MeanAggregator("mean"), ServerOptimizer(lr=0.1))
    server.spec = alg.spec
    server.aggregator.setup(alg.spec, {"A": A.clone()})
    server.begin(0)
    for cid, (upload, n_k) in enumerate(zip(uploads, [1.0, 3.0], strict=True)):
        server.add({"A": upload}, n_k, cid)
    server.finish()
    A_bar = (1.0 * uploads[0] + 3.0 * uploads[1]) / 4
    torch.testing.assert_close(server.state["A"], A + 0.1 * (A_bar - A), rtol=0, atol=1e-14)


def test_personal_accuracy_covers_every_client(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedsa-flora", "fl.rounds=1")
    module = _fit(cfg, build_module(cfg, tmp_path))
    accs = module.per_client_acc
    assert len(accs) == module.federation.num_clients > cfg.fl.clients_per_round
    assert not any(np.isnan(accs))
    row = module.recorder.rows[-1]
    assert row["val/personal_acc_unweighted"] == pytest.approx(np.mean(accs))
    tests = [len(c.test) for c in module.federation.clients]
    assert row["val/personal_acc"] == pytest.approx(np.average(accs, weights=tests))


# ---------------------------------------------------------------------------- clustering


def _three_centres(n_per=6, dim=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 5
    truth = np.repeat(np.arange(3), n_per)
    return centres[truth] + rng.normal(scale=0.1, size=(len(truth), dim)), truth


def _same_partition(labels, truth) -> bool:
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}
    return len(pairs) == len(set(truth)) == len(set(labels))


def test_elbow_picks_three_well_separated_groups_and_recovers_them():
    rows, truth = _three_centres()
    found = cluster_rows(rows, k=None, min_k=2, max_k=5, seed=0)
    assert found.k == 3
    assert _same_partition(found.labels, truth)
    assert sorted(found.inertia) == [2, 3, 4, 5]
    assert np.allclose(np.diag(found.similarity), 1.0)


def test_elbow_of_a_curve_without_a_bend_is_the_smallest_k():
    assert elbow({2: 1.0, 3: 1.0, 4: 1.0}) == 2
    assert elbow({2: 10.0, 3: 1.0, 4: 0.9, 5: 0.8}) == 3


def test_clustered_server_writes_decisions_and_mixes_cluster_and_global(tmp_path):
    rows, truth = _three_centres(n_per=4, dim=12)
    alg = FedSAFLoRA(
        "fedsa-flora",
        {"r": 4, "alpha": 8, "target_modules": ["proj"]},
        cluster={"enabled": True, "k": None, "min_k": 2, "max_k": 5, "mix": 0.3},
    )
    alg.configure(SimpleNamespace(groups=None), tmp_path, seed=0)
    alg.spec = SharedSpec(roles={"weight": Role.OTHER}, uploads_per_round=len(rows))
    server = Server(alg, MeanAggregator("mean"))
    server.spec = alg.spec
    server.aggregator.setup(alg.spec, {"weight": torch.zeros(4, 3, dtype=torch.float64)})
    server.begin(0)
    for cid, row in enumerate(rows):
        server.add({"weight": torch.from_numpy(row).reshape(4, 3)}, 1.0, cid)
    server.finish()
    record = json.loads((tmp_path / "clusters" / "round_0001.json").read_text())
    assert record["k"] == 3 and server.round_metrics() == {"clusters/k": 3}
    labels = [record["assignment"][str(cid)] for cid in range(len(rows))]
    assert _same_partition(labels, truth)
    assert len(record["similarity"]) == len(rows)
    # client 0 receives 0.7 * (its cluster's mean) + 0.3 * (the global mean)
    glob = torch.from_numpy(rows.mean(0)).reshape(4, 3)
    mine = torch.from_numpy(rows[truth == truth[0]].mean(0)).reshape(4, 3)
    torch.testing.assert_close(server.payload(0)["weight"], 0.7 * mine + 0.3 * glob)
    torch.testing.assert_close(server.state["weight"], glob)
    # a client that was not clustered receives the global state
    torch.testing.assert_close(server.payload(99)["weight"], glob)


def test_clustering_run_writes_a_json_per_round(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedsa-flora", "alg.cluster.enabled=true", "fl.rounds=2")
    summary = train(cfg)
    files = sorted((tmp_path / "run" / "clusters").glob("round_*.json"))
    assert [f.name for f in files] == ["round_0001.json", "round_0002.json"]
    for f in files:
        record = json.loads(f.read_text())
        assert 2 <= record["k"] <= 5 and len(record["units"]) == cfg.fl.clients_per_round
    assert 2 <= summary["final"]["clusters/k"] <= 5


def test_natural_groups_aggregate_within_each_group_first(make_digits_config, tmp_path):
    cfg = make_digits_config(
        "alg=fedsa-flora",
        "alg.groups=natural",
        "alg.cluster.enabled=true",
        "alg.cluster.max_k=3",  # the elbow over k = 2..3: three groups to cluster
        "partitioner.groups=3",
        "fl.clients_per_round=10",
        "fl.rounds=1",
    )
    train(cfg)
    record = json.loads((tmp_path / "run" / "clusters" / "round_0001.json").read_text())
    assert record["unit"] == "group" and record["units"] == [0, 1, 2]
    assert sorted(c for members in record["members"].values() for c in members) == list(range(10))


def test_more_clusters_than_groups_is_refused_before_training(make_digits_config, tmp_path):
    cfg = make_digits_config(
        "alg=fedsa-flora", "alg.groups=natural", "alg.cluster.enabled=true",
        "alg.cluster.k=4", "partitioner.groups=3", "fl.clients_per_round=10",
    )  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        build_module(cfg, tmp_path)
    assert str(refused.value) == (
        "alg.cluster.k=4 but k-means sees at most 3 groups a round (the groups of "
        "alg.groups=natural); use alg.cluster.k <= 3"
    )


def test_natural_groups_need_a_grouping(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedsa-flora", "alg.groups=natural")
    with pytest.raises(ConfigError, match="partitioner.groups"):
        build_module(cfg, tmp_path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("alg.cluster.mix=1.5", "alg.cluster.mix"),
        ("alg.groups=departments", "alg.groups"),
        ("alg.private=[lora_A]", "alg.private"),
        ("alg.private=[nothing]", "alg.private"),
    ],
)
def test_bad_fedsa_options_name_the_key(make_digits_config, tmp_path, override, key):
    cfg = make_digits_config("alg=fedsa-flora", override)
    with pytest.raises(Exception) as raised:  # Hydra wraps errors raised while instantiating
        build_module(cfg, tmp_path)
    error = user_error(raised.value)
    assert isinstance(error, ConfigError) and key in str(error), raised.value


# ---------------------------------------------------------------------------- export, checkpoint


def test_checkpoint_restores_every_clients_private_state(make_digits_config, tmp_path):
    cfg = make_digits_config("alg=fedsa-flora", "fl.rounds=2", "alg.cluster.enabled=true")
    train(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    first = build_module(cfg, tmp_path / "a")
    first.on_load_checkpoint(checkpoint)
    first._ensure_setup()
    saved = checkpoint["fedsweep"]["clients"]["saved"]
    assert set(first.store.saved) == set(saved) and len(saved) > 0
    for cid, tensors in saved.items():
        for name, tensor in tensors.items():
            assert torch.equal(first.store.load(cid)[name], tensor)
    # and the clusters: every clustered client deploys the same A as before the restart
    clusters = checkpoint["fedsweep"]["server"]["algorithm"]["client_cluster"]
    assert first.algorithm.client_cluster == clusters
