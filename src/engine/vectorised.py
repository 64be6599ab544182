"""Clients trained together (`fl.parallel_clients=K`): the local updates of up to K clients of a
round in one batched computation on the one resident model.

Each client's trained tensors (what it received, its private state, as `Algorithm.download` left
them in the model) are stacked along a leading client dimension; frozen tensors (a LoRA backbone)
stay the model's own, shared by all. `torch.func.vmap` over `torch.func.functional_call` runs the
real model code (timm, peft) once per step for all clients, each on its own batch. The loss is the
sum of the clients' own mean losses, so each client's gradient is exactly its own, and an
element-wise optimizer (SGD with momentum, Adam, AdamW) over the stacked tensors is K independent
optimizers. Same results as one client after the other, up to float summation order:
- clients have different numbers of batches: a client's result is taken the moment it has no
  batch left, and its rows then stop computing. Momentum, Adam and weight decay still move those
  rows with a zero gradient, but nothing reads them again: each client's update is element-wise
  in its own rows, and the round's optimizer (its state included) is discarded afterwards;
- a short batch is padded and masked (padding targets are ignored by the loss);
- each client draws its batches from its own (seed, round, client) generator, as sequentially;
- the algorithm's step rules (`Algorithm.adjust_gradients`, `after_step`) are the ones the
  sequential loop runs, given the stacked tensors and each client's `ClientState.work` stacked;
  after training each client's result goes back into the model for `Algorithm.finish`.
What differs: dropout draws (one global stream for the group instead of one per client), so runs
with dropout are equal in distribution, not number for number.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.data.text import IGNORE_INDEX
from src.engine.layout import MARGIN

if TYPE_CHECKING:
    from src.algorithms.base import Algorithm

TensorDict = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
MATH = [SDPBackend.MATH]


@dataclass
class ClientStart:
    """One client of a group, ready to train: its trained tensors after `download`."""

    client_id: int
    start: TensorDict  # the trained tensors it starts from (copies)
    batches: Iterator[Batch]  # its local batches, drawn from its own generator
    work: TensorDict = field(default_factory=dict)  # its `ClientState.work` (copies)


@dataclass
class ClientResult:
    trained: TensorDict  # its trained tensors after local training (rows of the stacked tensors)
    work: TensorDict  # its work tensors as the step rules left them
    loss_sum: float  # sum of per-target losses
    seen: int  # targets trained on
    steps: int  # optimizer steps taken
    lr: float  # the optimizer's learning rate


def _stack_batches(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, B, ...] inputs and [K, B] targets; a short batch is padded, its padding targets
    IGNORE_INDEX (the loss leaves them out)."""
    width = max(len(b[0]) for b in batches)
    if all(len(b[0]) == width for b in batches):
        return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    sample_shape, dtype, device = batches[0][0].shape[1:], batches[0][0].dtype, batches[0][0].device
    inputs = torch.zeros((len(batches), width, *sample_shape), dtype=dtype, device=device)
    targets = torch.full((len(batches), width), IGNORE_INDEX, dtype=torch.long, device=device)
    for k, (batch_inputs, batch_targets) in enumerate(batches):
        inputs[k, : len(batch_inputs)] = batch_inputs
        targets[k, : len(batch_targets)] = batch_targets
    return inputs, targets


def _stack(dicts: list[TensorDict]) -> TensorDict:
    return {n: torch.stack([d[n] for d in dicts]) for n in dicts[0]}


def _row(tensors: TensorDict, k: int) -> TensorDict:
    return {n: t.detach()[k].clone() for n, t in tensors.items()}


def train_together(
    model: nn.Module,
    clients: list[ClientStart],
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    backward: Callable[[torch.Tensor], None],
    algorithm: Algorithm | None = None,
) -> list[ClientResult]:
    """Train `clients` together (see the module docstring); the model's own trained tensors are
    left as they were. `algorithm`'s step rules (`adjust_gradients`, `after_step`) run around
    each optimizer step on the stacked tensors."""
    stacked = {n: t.requires_grad_(True) for n, t in _stack([c.start for c in clients]).items()}
    work = _stack([c.work for c in clients]) if clients[0].work else {}
    optimizer = make_optimizer(list(stacked.values()))
    lr = float(optimizer.param_groups[0]["lr"])

    batched_forward = torch.func.vmap(partial(_call, model), randomness="different")
    model.train()
    count = len(clients)
    device = next(iter(stacked.values())).device
    loss_sums = torch.zeros(count, dtype=torch.float64, device=device)  # read once, at the end
    seen = torch.zeros(count, dtype=torch.long, device=device)
    steps = [0] * count
    finals: dict[int, tuple[TensorDict, TensorDict]] = {}  # trained, work: taken at the end
    step = 0
    while True:
        batches = [None if k in finals else next(c.batches, None) for k, c in enumerate(clients)]
        for k, batch in enumerate(batches):
            if batch is None and k not in finals:
                finals[k] = (_row(stacked, k), _row(work, k))
        rows = [k for k in range(count) if k not in finals]
        if not rows:
            break
        step += 1
        inputs, targets = _stack_batches([batches[k] for k in rows])
        # only the clients still training compute (clients of uneven sizes finish at different
        # steps); the others' rows get a zero gradient and are never read again
        params = stacked
        if len(rows) < count:
            index = torch.tensor(rows, device=device)
            params = {n: t.index_select(0, index) for n, t in stacked.items()}
        with sdpa_kernel(MATH):  # the fused attention kernels have no batching rule
            logits = batched_forward(params, inputs)
        per_target = F.cross_entropy(
            logits.flatten(0, -2).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(len(rows), -1)
        counts = torch.zeros(count, dtype=torch.long, device=device)
        counts[rows] = (targets != IGNORE_INDEX).view(len(rows), -1).sum(1)
        losses = torch.zeros(count, dtype=per_target.dtype, device=device)
        losses[rows] = per_target.sum(1) / counts[rows]  # each client's own mean loss
        optimizer.zero_grad(set_to_none=True)
        backward(losses.sum())
        if algorithm is not None:
            with torch.no_grad():
                algorithm.adjust_gradients(stacked, work)
        optimizer.step()
        if algorithm is not None:
            with torch.no_grad():
                algorithm.after_step(stacked, work, step)
        loss_sums += losses.detach().double() * counts
        seen += counts
        for k in rows:
            steps[k] += 1
    loss_sums, seen = loss_sums.tolist(), seen.tolist()
    return [ClientResult(*finals[k], loss_sums[k], seen[k], steps[k], lr) for k in range(count)]


# ---------------------------------------------------------------------- fl.parallel_clients=auto
def available_memory(device: torch.device) -> int:
    """Bytes the stacked clients may use: half the free device memory on a GPU, a quarter of the
    available RAM on the CPU (the rest is the model, the data and other processes' share)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def client_bytes(model: nn.Module, trained: TensorDict, inputs: torch.Tensor) -> int:
    """Memory one more client in a group costs: its trained tensors five times (values, start,
    gradient, two optimizer moments) and the activations one batch keeps for backward (counted
    with saved-tensor hooks on one forward)."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with (
        torch.random.fork_rng(devices=[]),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in trained.items()}
        _call(model, leaves, inputs)
    return 5 * sum(t.numel() * t.element_size() for t in trained.values()) + saved


def _step_seconds(model, trained: TensorDict, batch: Batch, together: int, repeats: int = 3):
    """Median time of one training step (forward, backward, SGD update) on copies of `trained`:
    of one client as the sequential path runs it (together=1), or of `together` clients batched."""
    inputs, targets = batch
    if together == 1:
        params = {n: t.detach().clone().requires_grad_(True) for n, t in trained.items()}
        forward, many, kernels = partial(_call, model), inputs, nullcontext()
    else:
        params = {
            n: t.detach().unsqueeze(0).repeat(together, *[1] * t.ndim).requires_grad_(True)
            for n, t in trained.items()
        }  # fmt: skip
        forward = torch.func.vmap(partial(_call, model), randomness="different")
        many, kernels = inputs.unsqueeze(0).expand(together, *inputs.shape), sdpa_kernel(MATH)
    times = []
    with torch.random.fork_rng(devices=[]), kernels:
        for _ in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            logits = forward(params, many)
            F.cross_entropy(logits.flatten(0, -2).float(), targets.repeat(together)).backward()
            with torch.no_grad():
                for t in params.values():
                    t.sub_(t.grad, alpha=1e-3)
                    t.grad = None
            if inputs.device.type == "cuda":
                torch.cuda.synchronize(inputs.device)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _call(model: nn.Module, params: TensorDict, inputs: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, params, (inputs,), strict=False)


def choose_group_size(
    model: nn.Module, trained: TensorDict, batch: Batch, clients: int
) -> tuple[int, str, float]:
    """`fl.parallel_clients=auto`: the largest group the memory allows, then the group size
    (1, 2, 4, ... up to that) whose timed step costs least per client; 1 unless batching beats
    one client after the other by `MARGIN` (timing noise). Returns (K, why, seconds of one
    client's step alone), the last for the check after the first round."""
    inputs = batch[0]
    per_client = client_bytes(model, trained, inputs)
    budget = available_memory(inputs.device)
    fits = max(1, min(clients, budget // max(per_client, 1)))
    memory = f"memory allows {fits} ({budget / 2**30:.1f} GiB / {per_client / 2**20:.0f} MiB)"
    if fits == 1:
        return 1, memory, math.nan  # not timed: nothing to check after the first round
    alone = _step_seconds(model, trained, batch, 1, repeats=5)
    sizes = sorted({k for k in (2, 4, 8, 16, 32, 64) if k < fits} | {fits})
    per_step = {k: _step_seconds(model, trained, batch, k, repeats=5) / k for k in sizes}
    best = min(per_step, key=per_step.get)
    timing = (
        f"one step per client: {alone * 1e3:.1f} ms alone, {per_step[best] * 1e3:.1f} ms "
        f"with {best} together"
    )
    if per_step[best] * MARGIN < alone:
        return best, f"{memory}; {timing}", alone
    return 1, f"{memory}; {timing}: no faster by {MARGIN - 1:.0%}", alone
