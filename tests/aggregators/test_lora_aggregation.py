"""Heterogeneous-rank LoRA aggregation: exact identities on random float64 factors."""

import math
import random

import pytest
import torch
from torch import nn

from src.aggregators import (
    ExactAggregator,
    MeanAggregator,
    RankAwareMeanAggregator,
    StackAggregator,
    SvdAggregator,
    ZeroPadAggregator,
)
from src.aggregators.lora_math import stack_factors, svd_factors, weighted_delta
from src.algorithms import FedLoRA, FFALoRA
from src.engine.compatibility import check_aggregator
from src.engine.server_opt import ServerOptimizer
from src.errors import ConfigError

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
D_IN, D_OUT, ALPHA = 96, 80, 16.0


def _factors(ranks, seed=0, d_in=D_IN, d_out=D_OUT):
    gen = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=gen, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=gen, dtype=torch.float64) for r in ranks]
    weights = torch.rand(len(ranks), generator=gen, dtype=torch.float64).add(0.1).tolist()
    return As, Bs, weights


def _explicit_delta(As, Bs, weights, ranks):
    total = sum(weights)
    return sum(
        (w / total) * (ALPHA / r) * B @ A for A, B, w, r in zip(As, Bs, weights, ranks, strict=True)
    )


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT)
        self.head = nn.Linear(D_OUT, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def _setup(aggregator, model, alg, clients_per_round, optimizer=None):
    """What the run does before training: check the combination (with the server optimiser), then
    set the aggregator up from the algorithm's SharedSpec, initial server state and base weights."""
    spec = alg.shared_spec(model, clients_per_round)
    check_aggregator(spec, aggregator, optimizer or ServerOptimizer())
    aggregator.setup(spec, alg.server_state(model), alg.base_weights(model))


def _federated(ranks, aggregator, seed=0, optimizer=None):
    """A float64 TinyNet with LoRA on `proj`, ranks cycled over clients, aggregator set up (and
    checked with the server optimiser `optimizer`; None: sgd with lr 1)."""
    torch.manual_seed(seed)
    alg = FedLoRA(
        "fedlora",
        {"r": max(ranks), "alpha": ALPHA, "target_modules": ["proj"]},
        ["head"],
        list(ranks),
    )
    model = alg.prepare_model(TinyNet().double())
    _setup(aggregator, model, alg, len(ranks), optimizer)
    return model, alg


def _uploads(alg, ranks, seed=0):
    As, Bs, weights = _factors(ranks, seed)
    pair = alg.pairs[0]
    gen = torch.Generator().manual_seed(seed + 1)
    uploads = [
        {
            pair.a: A,
            pair.b: B,
            "head.weight": torch.randn(3, D_OUT, generator=gen, dtype=torch.float64),
            "head.bias": torch.randn(3, generator=gen, dtype=torch.float64),
        }
        for A, B in zip(As, Bs, strict=True)
    ]
    return uploads, weights, As, Bs


def _round(aggregator, uploads, weights, client_ids, optimizer=None):
    """One round of the aggregator alone, as the server's step runs it: the aggregate, the server
    optimiser's step (`optimizer`; None: sgd with lr 1), then what follows the step."""
    optimizer = optimizer or ServerOptimizer()
    aggregator.begin()
    for upload, w, cid in zip(uploads, weights, client_ids, strict=True):
        aggregator.add(upload, w, cid)
    aggregate = aggregator.aggregate()
    optimizer.step(aggregator.state, aggregate)
    aggregator.after_step(aggregate, optimizer.lr)


# ---------------------------------------------------------------------------- stack (FLoRA)


def test_stacked_product_equals_the_weighted_sum_of_client_products():
    As, Bs, weights = _factors(RANKS)
    scales = [ALPHA / r for r in RANKS]
    A_s, B_s = stack_factors(As, Bs, weights, scales)
    assert A_s.shape == (sum(RANKS), D_IN) and B_s.shape == (D_OUT, sum(RANKS))
    expected = _explicit_delta(As, Bs, weights, RANKS)
    assert (B_s @ A_s - expected).abs().max() < 1e-10


def test_stacking_does_not_depend_on_client_order():
    As, Bs, weights = _factors(RANKS)
    order = list(range(len(RANKS)))
    random.Random(0).shuffle(order)
    scales = [ALPHA / r for r in RANKS]
    first = weighted_delta(As, Bs, weights, scales)
    second = weighted_delta(
        [As[i] for i in order],
        [Bs[i] for i in order],
        [weights[i] for i in order],
        [scales[i] for i in order],
    )
    assert (first - second).abs().max() < 1e-10


def test_one_client_reduces_to_an_ordinary_lora_merge():
    As, Bs, _ = _factors([8])
    delta = weighted_delta(As, Bs, [5.0], [ALPHA / 8])
    torch.testing.assert_close(delta, (ALPHA / 8) * Bs[0] @ As[0], rtol=0, atol=1e-12)


def test_stack_merges_into_the_base_and_the_forward_is_base_plus_weighted_updates():
    stack = StackAggregator("stack")
    model, alg = _federated(RANKS, stack)
    pair = alg.pairs[0]
    params = dict(model.named_parameters())
    W0 = params[pair.base].detach().clone()
    uploads, weights, As, Bs = _uploads(alg, RANKS)
    _round(stack, uploads, weights, range(len(RANKS)))

    delta = _explicit_delta(As, Bs, weights, RANKS)
    assert torch.equal(params[pair.base], W0)  # the aggregator never writes into the model
    alg.download(model, stack.broadcast(0), {}, 0)  # a client loads the merged base weight
    assert (params[pair.base] - (W0 + delta)).abs().max() < 1e-10
    x = torch.randn(7, D_IN, dtype=torch.float64)
    # the global model: LoRA re-initialised, B = 0, so the layer is the merged base
    alg.deploy(model, stack.global_payload(), {}, None)
    out = model.proj(x)
    bias = params["proj.base_layer.bias"]
    assert (out - (x @ W0.T + bias + x @ delta.T)).abs().max() < 1e-10
    # the broadcast costs sum_k r_k (d_in + d_out) numbers per layer + the head
    payload = stack.broadcast(0)
    head = sum(t.numel() for name, t in payload.items() if name.startswith("head"))
    assert stack.download_bytes(0, payload) == 8 * (sum(RANKS) * (D_IN + D_OUT) + head)


def test_stack_with_partial_participation_stacks_only_the_sampled_clients():
    stack = StackAggregator("stack")
    model, alg = _federated(RANKS, stack)
    pair = alg.pairs[0]
    W0 = dict(model.named_parameters())[pair.base].detach().clone()
    uploads, weights, As, Bs = _uploads(alg, RANKS)
    sampled = [1, 4, 7]
    _round(stack, [uploads[i] for i in sampled], [weights[i] for i in sampled], sampled)
    delta = _explicit_delta(
        [As[i] for i in sampled],
        [Bs[i] for i in sampled],
        [weights[i] for i in sampled],
        [RANKS[i] for i in sampled],
    )
    assert (stack.state[pair.base] - (W0 + delta)).abs().max() < 1e-10
    assert stack.stacked[pair.name][0].shape[0] == sum(RANKS[i] for i in sampled)


# ---------------------------------------------------------------------------- mean (FedIT)


def test_fedit_gap_identity():
    ranks = [8] * 5
    As, Bs, weights = _factors(ranks)
    mean = MeanAggregator("mean")
    mean.state = {"A": torch.zeros_like(As[0]), "B": torch.zeros_like(Bs[0])}
    _round(mean, [{"A": A, "B": B} for A, B in zip(As, Bs, strict=True)], weights, range(5))
    A_bar, B_bar = mean.state["A"], mean.state["B"]
    p = [w / sum(weights) for w in weights]
    lhs = sum(pk * B @ A for pk, A, B in zip(p, As, Bs, strict=True)) - B_bar @ A_bar
    rhs = sum(pk * (B - B_bar) @ (A - A_bar) for pk, A, B in zip(p, As, Bs, strict=True))
    assert (lhs - rhs).abs().max() < 1e-10
    assert lhs.abs().max() > 1e-3  # the gap is real in general

    same_A = [As[0]] * 5  # all A_k equal: averaging is exact
    _round(mean, [{"A": A, "B": B} for A, B in zip(same_A, Bs, strict=True)], weights, range(5))
    gap = (
        sum(pk * B @ A for pk, A, B in zip(p, same_A, Bs, strict=True))
        - mean.state["B"] @ mean.state["A"]
    )
    assert gap.abs().max() < 1e-10


def test_mean_refuses_heterogeneous_ranks():
    with pytest.raises(ConfigError, match="client_ranks"):
        _federated([2, 4], MeanAggregator("mean"))  # refused by check_aggregator


# ---------------------------------------------------------------------------- svd (FlexLoRA)


def test_svd_is_exact_when_the_rank_covers_the_update():
    As, Bs, weights = _factors([3, 5])
    delta = _explicit_delta(As, Bs, weights, [3, 5])  # rank <= 8
    A, B = svd_factors(delta, rank=8, scale=ALPHA / 8)
    assert ((ALPHA / 8) * B @ A - delta).abs().max() < 1e-10


@pytest.mark.parametrize("rank", [1, 4, 16, 40])
def test_svd_error_is_the_discarded_singular_values(rank):
    As, Bs, weights = _factors(RANKS)
    delta = _explicit_delta(As, Bs, weights, RANKS)
    sigma = torch.linalg.svdvals(delta)
    A, B = svd_factors(delta, rank=rank, scale=ALPHA / rank)
    error = torch.linalg.matrix_norm((ALPHA / rank) * B @ A - delta)
    assert math.isclose(error.item(), sigma[rank:].square().sum().sqrt().item(), rel_tol=1e-9)


def test_svd_aggregator_sends_each_client_its_rank_of_the_global_update():
    ranks = [2, 4, 8]
    svd = SvdAggregator("svd")
    model, alg = _federated(ranks, svd)
    pair = alg.pairs[0]
    assert pair.a not in svd.broadcast(0)  # dW = 0 at first: clients start from a fresh LoRA init
    uploads, weights, As, Bs = _uploads(alg, ranks)
    _round(svd, uploads, weights, range(3))
    delta = _explicit_delta(As, Bs, weights, ranks)
    sigma = torch.linalg.svdvals(delta)
    for cid, r in enumerate(ranks):
        payload = svd.broadcast(cid)
        assert payload[pair.a].shape == (r, D_IN) and payload[pair.b].shape == (D_OUT, r)
        approx = (ALPHA / r) * payload[pair.b] @ payload[pair.a]
        error = torch.linalg.matrix_norm(approx - delta).item()
        assert math.isclose(error, sigma[r:].square().sum().sqrt().item(), rel_tol=1e-9)
        head = sum(t.numel() for n, t in payload.items() if n.startswith("head"))
        assert svd.download_bytes(cid, payload) == 8 * (r * (D_IN + D_OUT) + head)
    x = torch.randn(5, D_IN, dtype=torch.float64)
    W0 = dict(model.named_parameters())[pair.base].detach().clone()
    alg.deploy(model, svd.global_payload(), {}, None)  # the global model is base + dW, exactly
    out = model.proj(x)
    assert (out - (x @ (W0 + delta).T + model.proj.base_layer.bias)).abs().max() < 1e-10
    alg.download(model, svd.broadcast(0), {}, 0)  # a client receives the original base again
    assert torch.equal(model.proj.base_layer.weight, W0)  # restored afterwards


# ---------------------------------------------------------------------------- zeropad (HetLoRA-style zero-padding)


def test_zeropad_with_equal_ranks_and_weights_is_the_mean():
    ranks = [8] * 4
    results = []
    for agg in (ZeroPadAggregator("zeropad"), MeanAggregator("mean")):
        model, alg = _federated(ranks, agg)
        uploads, _, _, _ = _uploads(alg, ranks)
        _round(agg, uploads, [1.0] * 4, range(4))
        results.append(agg.state)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-14)


def test_zeropad_pads_averages_and_truncates_per_client():
    ranks = [2, 4, 8]
    zeropad = ZeroPadAggregator("zeropad")
    model, alg = _federated(ranks, zeropad)
    pair = alg.pairs[0]
    uploads, weights, As, _ = _uploads(alg, ranks)
    _round(zeropad, uploads, weights, range(3))
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    A = zeropad.state[pair.a]
    torch.testing.assert_close(A[6:], p[2] * As[2][6:])  # owned by one client: diluted by the zeros
    torch.testing.assert_close(A[:2], sum(p[k] * As[k][:2] for k in range(3)))
    assert zeropad.broadcast(0)[pair.a].shape == (2, D_IN)
    assert zeropad.broadcast(2)[pair.b].shape == (D_OUT, 8)


# ---------------------------------------------------------------------------- clients of rank r_k


def test_client_download_sets_rank_and_scale_alpha_over_rk():
    zeropad = ZeroPadAggregator("zeropad")
    model, alg = _federated([2, 4, 8], zeropad)
    pair = alg.pairs[0]
    gen = torch.Generator().manual_seed(3)
    payload = {
        pair.a: torch.randn(8, D_IN, generator=gen, dtype=torch.float64),
        pair.b: torch.randn(D_OUT, 8, generator=gen, dtype=torch.float64),
    }
    x = torch.randn(4, D_IN, dtype=torch.float64)
    for cid, r in enumerate([2, 4, 8]):
        alg.download(model, {n: alg.client_view(n, t, cid) for n, t in payload.items()}, {}, cid)
        assert model.proj.scaling["default"] == ALPHA / r
        A_k, B_k = payload[pair.a][:r], payload[pair.b][:, :r]
        expected = model.proj.base_layer(x) + (ALPHA / r) * x @ A_k.T @ B_k.T
        assert (model.proj(x) - expected).abs().max() < 1e-12
        upload = alg.shared_views(model, cid)
        assert upload[pair.a].shape == (r, D_IN) and upload[pair.b].shape == (D_OUT, r)


# ---------------------------------------------------------------------------- exact (FedEx-LoRA), ffa-lora


def test_exact_folds_the_residual_so_the_global_model_is_the_exact_average():
    ranks = [8] * 4
    exact = ExactAggregator("exact")
    model, alg = _federated(ranks, exact)
    pair = alg.pairs[0]
    W0 = dict(model.named_parameters())[pair.base].detach().clone()
    uploads, weights, As, Bs = _uploads(alg, ranks)
    _round(exact, uploads, weights, range(4))
    W = dict(model.named_parameters())[pair.base]
    assert torch.equal(W, W0)  # the aggregator never writes into the model
    alg.deploy(model, exact.global_payload(), {}, None)  # the base weight with R folded in
    s = ALPHA / 8
    merged = W + s * exact.state[pair.b] @ exact.state[pair.a]
    assert (merged - (W0 + _explicit_delta(As, Bs, weights, ranks))).abs().max() < 1e-10
    payload = exact.broadcast(0)
    # bytes: A_bar, B_bar, the head, and R (d_out x d_in); the base weight itself in the payload
    # is not sent, every client folds R into its own
    sent = {n: t for n, t in payload.items() if n != pair.base}
    assert set(payload) == set(sent) | {pair.base}
    residual = D_OUT * D_IN * 8
    assert exact.download_bytes(0, payload) == sum(t.numel() * 8 for t in sent.values()) + residual


@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_exact_takes_the_server_step_on_the_effective_weights(lr):
    """W' + s B'A' = (1 - lr)(W + s B A) + lr (W + sum_k p_k s B_k A_k), round after round (the
    clients of a round all start from W + s B A); the head takes the same step."""
    ranks = [8] * 4
    exact, server_opt = ExactAggregator("exact"), ServerOptimizer(lr=lr)
    model, alg = _federated(ranks, exact, optimizer=server_opt)
    pair, s = alg.pairs[0], ALPHA / 8

    def effective(payload):
        return payload[pair.base] + s * payload[pair.b] @ payload[pair.a]

    for round_idx in range(3):  # round 0 starts from B = 0, the later ones from B A != 0
        before = {n: t.clone() for n, t in exact.global_payload().items()}
        uploads, weights, As, Bs = _uploads(alg, ranks, seed=round_idx)
        _round(exact, uploads, weights, range(4), server_opt)
        after = exact.global_payload()
        average = before[pair.base] + _explicit_delta(As, Bs, weights, ranks)
        expected = (1 - lr) * effective(before) + lr * average
        assert (effective(after) - expected).abs().max() < 1e-10
        p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        head = sum(p[k] * uploads[k]["head.bias"] for k in range(4))
        expected_head = before["head.bias"] + lr * (head - before["head.bias"])
        torch.testing.assert_close(after["head.bias"], expected_head, rtol=0, atol=1e-12)


def test_exact_refuses_server_optimisers_without_an_effective_weight_step():
    """Refused by check_aggregator, before training (its plain_step declaration)."""
    with pytest.raises(ConfigError, match="aggregator=exact takes server_opt=sgd") as refused:
        _federated([8] * 4, ExactAggregator("exact"), optimizer=ServerOptimizer(name="adam"))
    assert "got server_opt=adam" in str(refused.value)
    with pytest.raises(ConfigError, match="got server_opt=sgd with momentum 0.9"):
        _federated([8] * 4, ExactAggregator("exact"), optimizer=ServerOptimizer(momentum=0.9))
    _federated([8] * 4, ExactAggregator("exact"), optimizer=ServerOptimizer(lr=0.5))  # plain sgd


def test_ffa_lora_freezes_a_and_shares_only_b_and_the_head():
    torch.manual_seed(0)
    alg = FFALoRA("ffa-lora", {"r": 4, "alpha": ALPHA, "target_modules": ["proj"]}, ["head"])
    model = alg.prepare_model(TinyNet().double())
    pair = alg.pairs[0]
    A0 = dict(model.named_parameters())[pair.a].detach().clone()
    assert set(alg.shared_names(model)) == {pair.b, "head.weight", "head.bias"}
    mean = MeanAggregator("mean")
    _setup(mean, model, alg, 2)
    uploads, weights, _, Bs = _uploads(alg, [4, 4])
    _round(mean, [{k: v for k, v in u.items() if k != pair.a} for u in uploads], weights, range(2))
    alg.download(model, mean.broadcast(0), {}, 0)
    assert torch.equal(dict(model.named_parameters())[pair.a], A0)  # A never changes
    with pytest.raises(ConfigError, match="equal ranks"):
        FFALoRA(
            "ffa-lora", {"r": 4, "alpha": ALPHA, "target_modules": ["proj"]}, ["head"], [2, 4]
        ).prepare_model(TinyNet())


# ---------------------------------------------------------------------------- rank-aware mean


def test_rank_aware_mean_averages_each_row_over_its_owners_only():
    """Ranks [2, 4], known values: rows 0-1 are owned by both clients, rows 2-3 by client 1 only;
    a row nobody owns keeps the server's value. zeropad dilutes rows 2-3 by client 0's zeros."""
    pair_ranks = [2, 4]
    results = {}
    for agg in (RankAwareMeanAggregator("rank_aware"), ZeroPadAggregator("zeropad")):
        _, alg = _federated([2, 4, 6], agg)  # r_max = 6: rows 4-5 are owned by nobody below
        pair = alg.pairs[0]
        before = agg.state[pair.a].clone()
        uploads = [
            {pair.a: torch.full((r, D_IN), float(value), dtype=torch.float64)}
            for r, value in zip(pair_ranks, (1.0, 4.0), strict=True)
        ]
        agg.state = {pair.a: agg.state[pair.a]}  # an A-only federation (as fedsa-flora uploads)
        _round(agg, uploads, [1.0, 2.0], [0, 1])
        results[agg.name] = (agg.state[pair.a], before)
    rank_aware, before = results["rank_aware"]
    assert torch.all(rank_aware[:2] == (1 * 1.0 + 2 * 4.0) / 3)  # weighted mean of both owners
    assert torch.all(rank_aware[2:4] == 4.0)  # only client 1 owns them: its own value
    assert torch.equal(rank_aware[4:], before[4:])  # nobody owned them: unchanged
    zeropad, _ = results["zeropad"]
    assert torch.all(zeropad[2:4] == 2 * 4.0 / 3)  # diluted by client 0's zero padding
    assert torch.all(zeropad[4:] == 0)


def test_mean_is_rank_aware_when_only_a_is_shared():
    """fedsa-flora keeps B private, so aggregator=mean accepts mixed ranks (and is rank-aware)."""
    from src.algorithms import FedSAFLoRA

    alg = FedSAFLoRA(
        "fedsa-flora", {"r": 4, "alpha": ALPHA, "target_modules": ["proj"]}, ["head"], [2, 4]
    )
    model = alg.prepare_model(TinyNet().double())
    mean = MeanAggregator("mean")
    _setup(mean, model, alg, 2)  # no ConfigError
    assert set(mean.state) == {alg.pairs[0].a}
    with pytest.raises(ConfigError, match="needs both LoRA factors"):
        _setup(StackAggregator("stack"), model, alg, 2)
