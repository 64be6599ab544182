"""A float64 two-layer net, batches and one client's run, for the update-rule tests of the
algorithms (each rule is then written out independently in its test)."""

from __future__ import annotations

import torch
from torch import nn

from src.algorithms.base import ClientRun
from src.contract.objective import mean_loss


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet().double()


def tiny_batches(seed: int, count: int = 3, size: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(count)
    ]


def client_run(batches, lr: float, client_id: int = 0) -> ClientRun:
    """One pass over `batches` per epoch, plain SGD with `lr`."""
    return ClientRun(
        client_id=client_id,
        round_idx=0,
        epochs=1,
        make_optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        backward=lambda loss: loss.backward(),
        passes=lambda: iter(batches),
    )


def loss_grad(model: nn.Module, params: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
    """grad of the training loss of `batch` at `params` (a functional call: the model's own
    parameters are not touched)."""
    inputs, labels = batch
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    out = torch.func.functional_call(model, leaves, (inputs,))
    loss, _ = mean_loss(out, labels)  # the project's objective (cross-entropy in float32)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_client(alg, model, received, private, run):
    """One client's round as the client loop runs it (download, local_update, finish); returns
    (upload, private state kept), as copies."""
    state = alg.download(model, received, private, run.client_id)
    alg.local_update(model, state, run)
    upload, kept = alg.finish(model, state)
    return clone_tensors(upload), clone_tensors(kept)


def assert_together_equals_alone(
    alg, model, start, run, client_ids, make_optimizer, private=None
) -> None:
    """Every client of `client_ids` trained from `start` by `run(client_id)` (a ClientRun), with
    its private state `private[client_id]` (none by default): the uploads and new private states
    of clients trained together (src/engine/vectorised.py, with their stacked `work` and
    `finish`, as the client loop runs them) equal those of the clients trained one after the
    other (float64, 1e-12), and nothing blocks the batched path."""
    from src.algorithms.base import batching_blocker
    from src.engine.vectorised import ClientStart, train_together

    private = private or {}
    alone = {
        client_id: run_client(alg, model, start, private.get(client_id, {}), run(client_id))
        for client_id in client_ids
    }
    starts, states = [], []
    for client_id in client_ids:
        state = alg.download(model, start, private.get(client_id, {}), client_id)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        work = clone_tensors(state.work)
        batches = alg.client_run(run(client_id)).batches()
        starts.append(ClientStart(client_id, trained, batches, work))
        states.append(state)
    trained_together = train_together(
        model, starts, make_optimizer, lambda loss: loss.backward(), alg
    )
    params = dict(model.named_parameters())
    for client_id, state, result in zip(client_ids, states, trained_together, strict=True):
        with torch.no_grad():
            for n, tensor in result.trained.items():
                params[n].copy_(tensor)
        state.work, state.steps, state.lr = result.work, result.steps, result.lr
        for together, expected in zip(alg.finish(model, state), alone[client_id], strict=True):
            assert together.keys() == expected.keys()
            for n, tensor in expected.items():
                torch.testing.assert_close(together[n], tensor, rtol=0, atol=1e-12)
    assert batching_blocker(alg, model) == ""


def clone_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}
