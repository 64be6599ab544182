"""Rank study: what each way of combining LoRA factors of different ranks does, on explicit
random matrices (A_k in R^{r_k x k}, B_k in R^{d x r_k}, weights 1/K, scale 1).

    python -m src.rank_study d=10 k=10 client_ranks=[20,25,30] global_rank=100

Every number comes from the aggregator code the federated runs use (src/aggregators).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from src.aggregators import RankAwareMeanAggregator, ZeroPadAggregator
from src.aggregators.lora_math import stack_factors, svd_factors
from src.engine.server_opt import ServerOptimizer


def _fro(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x).item()


def stacking(As, Bs, weights, scales) -> torch.Tensor:
    A_s, B_s = stack_factors(As, Bs, weights, scales)
    delta = sum(w * s * B @ A for A, B, w, s in zip(As, Bs, weights, scales, strict=True))
    print("(a) stacking (FLoRA)")
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        print(f"    client {i}: A {tuple(A.shape)}, B {tuple(B.shape)}")
    print(
        f"    stacked A_s {tuple(A_s.shape)}, B_s {tuple(B_s.shape)}: global stacked rank {A_s.shape[0]}"
    )
    print(
        f"    rank(B_s A_s) = {torch.linalg.matrix_rank(B_s @ A_s).item()} (at most min(d, k) = {min(delta.shape)})"
    )
    print(f"    ||B_s A_s - sum_k w_k B_k A_k||_F = {_fro(B_s @ A_s - delta):.3e}")
    return B_s @ A_s


def reconstruction(delta: torch.Tensor, ranks: list[int]) -> None:
    full = min(delta.shape)
    sigma = torch.linalg.svdvals(delta)
    print("(b) truncated SVD of the aggregated dW (FlexLoRA)")
    print(f"    singular values: {', '.join(f'{s:.3g}' for s in sigma.tolist())}")
    print(f"    {'r':>6} {'effective r':>12} {'||dW - U_r S_r V_r^T||_F':>26} {'relative':>10}")
    for r in sorted({1, min(ranks), max(ranks), full}):
        A, B = svd_factors(delta, r, scale=1.0)
        error = _fro(delta - B @ A)
        note = f"{min(r, full)}" + (" (capped)" if r > full else "")
        print(f"    {r:>6} {note:>12} {error:>26.3e} {error / _fro(delta):>10.3e}")
    print(f"    the effective rank is capped at min(d, k) = {full}: a rank above it adds nothing")


def dilution(As, weights, cfg: DictConfig) -> None:
    """Global A (global_rank rows) starts at c; the clients send back their slice unchanged."""
    K = len(As)
    print(f"(c) dilution: global A = {cfg.c} everywhere, clients send back their first r_k rows,")
    print(f"    server step global <- {1 - cfg.mix:g} * global + {cfg.mix:g} * aggregate")
    start = torch.full((cfg.global_rank, cfg.k), float(cfg.c), dtype=torch.float64)
    uploads = [{"A": start[: A.shape[0]].clone()} for A in As]
    results = {}
    for agg in (
        ZeroPadAggregator("zeropad"),
        RankAwareMeanAggregator("rank_aware"),
    ):
        agg.state = {"A": start.clone()}
        agg.begin()
        for i, (upload, w) in enumerate(zip(uploads, weights, strict=True)):
            agg.add(upload, w, i)
        ServerOptimizer(lr=cfg.mix).step(agg.state, agg.aggregate())
        results[agg.name] = agg.state["A"]
    bounds = sorted({0, cfg.global_rank, *[min(A.shape[0], cfg.global_rank) for A in As]})
    print(f"    {'rows':>10} {'owners':>7} {'zeropad':>10} {'rank_aware':>11}")
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        owners = sum(A.shape[0] > lo for A in As)
        z, r = results["zeropad"][lo:hi].mean().item(), results["rank_aware"][lo:hi].mean().item()
        print(f"    {f'{lo}-{hi - 1}':>10} {f'{owners}/{K}':>7} {z:>10.4f} {r:>11.4f}")
    unowned = results["zeropad"][max(A.shape[0] for A in As) :]
    if unowned.numel():
        print(
            f"    rows nobody owns: zeropad {unowned.mean().item() / cfg.c:.0%} of c "
            f"({1 - unowned.mean().item() / cfg.c:.0%} dilution), rank_aware keeps 100%"
        )


def truncation_waste(delta: torch.Tensor, global_rank: int) -> None:
    A, B = svd_factors(delta, global_rank, scale=1.0)
    zero = int((A.abs().sum(dim=1) == 0).logical_and(B.abs().sum(dim=0) == 0).sum())
    print("(d) truncation waste of SVD re-factorisation to the global rank")
    print(
        f"    global rank {global_rank}, min(d, k) = {min(delta.shape)}: {zero} of {global_rank} "
        f"dimensions stay zero"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="rank_study")
def main(cfg: DictConfig) -> None:
    ranks = list(cfg.client_ranks)
    gen = torch.Generator().manual_seed(cfg.seed)
    As = [torch.randn(r, cfg.k, generator=gen, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(cfg.d, r, generator=gen, dtype=torch.float64) for r in ranks]
    weights = [1.0 / len(ranks)] * len(ranks)
    print(
        f"rank study: d={cfg.d}, k={cfg.k}, client ranks {ranks}, global rank {cfg.global_rank}\n"
    )
    delta = stacking(As, Bs, weights, [1.0] * len(ranks))
    print()
    reconstruction(delta, ranks)
    print()
    dilution(As, weights, cfg)
    print()
    truncation_waste(delta, cfg.global_rank)


if __name__ == "__main__":
    main()
