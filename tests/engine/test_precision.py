"""Mixed precision: with a bf16 model the LoRA factors the optimizer updates and every server-side
sum stay float32; trainer.precision=bf16-mixed runs (16-mixed and the *-true casts are refused:
tests/test_validation.py). The tests marked `gpu` need a CUDA device (`make gpu-check` runs them);
elsewhere they are skipped with that reason."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from src.aggregators import MeanAggregator
from src.aggregators.robust import TrimmedMeanAggregator
from src.algorithms import Algorithm
from src.contract.objective import attention_kernels
from src.contract.sharing import Role, SharedSpec
from src.engine.server import Server
from src.models.lora import add_lora
from src.models.qwen import build_qwen_tiny
from src.models.tokenizers import ByteTokenizer
from src.run import build_module, build_trainer
from tests.conftest import RecordingMean, compose_config

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bf16_qwen_with_lora():
    model = build_qwen_tiny(ByteTokenizer(), dtype="bf16")
    return add_lora(model, 4, 8, 0.0, target_modules=["q_proj", "v_proj"], trainable=[])


def test_lora_factors_train_in_float32_on_a_bf16_base():
    model = _bf16_qwen_with_lora()
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    ids = torch.randint(0, 200, (2, 12))
    model(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


@pytest.mark.parametrize("rule", [MeanAggregator("mean"), TrimmedMeanAggregator("tm", trim=0.2)])
def test_the_server_sums_bf16_uploads_in_float32(rule):
    """The server keeps float32 master copies of bf16 tensors: the weighted mean of five bf16
    uploads equals the float64 mean of their values to float32 accuracy (a bf16 running sum is
    off by ~1e-3 relative), and what is sent is still counted at 2 bytes per number."""
    gen = torch.Generator().manual_seed(0)
    shape = (256,)
    start = {"w": torch.randn(shape, generator=gen).bfloat16()}
    uploads = [torch.randn(shape, generator=gen).bfloat16() for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    spec = SharedSpec(roles={"w": Role.OTHER}, uploads_per_round=5)
    rule.setup(spec, start)
    assert rule.state["w"].dtype == torch.float32
    server = Server(Algorithm("plain"), rule)  # alg.weighting=samples: the weights are the n_k
    server.spec = spec
    server.begin(0)
    for k, (upload, weight) in enumerate(zip(uploads, weights, strict=True)):
        server.add({"w": upload}, weight, k)
    server.finish()
    values = torch.stack([u.double() for u in uploads])
    if isinstance(rule, TrimmedMeanAggregator):  # one of five cut at each end, uniform
        expected = values.sort(0).values[1:4].mean(0)
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        expected = (w[:, None] * values).sum(0) / w.sum()
    assert rule.state["w"].dtype == torch.float32
    torch.testing.assert_close(rule.state["w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert (expected.bfloat16().double() - expected).abs().max() > 1e-3  # bf16 would not do
    assert rule.download_bytes(0, rule.broadcast(0)) == 256 * 2


TEXT = [
    "model=qwen_tiny",
    "data=departments",
    "data.max_length=128",  # the learning margins below were measured at 128 tokens
    "partitioner=natural",
    "alg=fedlora",
    "optim=adamw",
    "optim.lr=0.01",
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.batch_size=16",
    "fl.rounds=2",
    "fl.eval_every=1",
]
IMAGES = [
    "data=digits",
    "model=vit_small32",
    "alg=fedlora",
    "model.depth=1",
    "model.embed_dim=64",
    "model.num_heads=2",
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.rounds=2",
    "fl.eval_every=1",
]


def _fit(tmp_path, overrides, accelerator="cpu"):
    cfg = compose_config([*overrides, f"trainer.accelerator={accelerator}"], tmp_path)
    module = build_module(cfg, tmp_path)
    module.aggregator = RecordingMean()
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False)
    trainer.fit(module)
    return module


def _check_float32_and_finite(module):
    assert all(t.dtype == torch.float32 for u in module.aggregator.uploads for t in u.values())
    assert all(t.dtype == torch.float32 for t in module.aggregator.state.values())
    losses = [row["val/loss"] for row in module.recorder.rows]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def test_fedlora_on_a_bf16_qwen_uploads_and_aggregates_float32(tmp_path):
    _check_float32_and_finite(_fit(tmp_path, [*TEXT, "model.dtype=bf16"]))


@pytest.mark.parametrize("parallel_clients", [1, 4])
def test_bf16_mixed_runs_alone_and_with_clients_trained_together(tmp_path, parallel_clients):
    module = _fit(
        tmp_path,
        [*IMAGES, "trainer.precision=bf16-mixed", f"fl.parallel_clients={parallel_clients}"],
    )
    _check_float32_and_finite(module)


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@gpu
def test_fedlora_bf16_qwen_learns_on_the_gpu(tmp_path):
    losses = _check_float32_and_finite(
        _fit(tmp_path, [*TEXT, "model.dtype=bf16", "fl.rounds=2"], accelerator="gpu")
    )
    assert losses[-1] < losses[0], losses


@pytest.mark.gpu
@gpu
def test_clients_trained_together_on_the_gpu_match_one_after_the_other(tmp_path):
    """On the GPU (no TF32: torch's default for float32 matmuls), K=4 gives the losses of K=1 up
    to summation order."""
    rows = {}
    for k in (1, 4):
        module = _fit(tmp_path / f"k{k}", [*IMAGES, f"fl.parallel_clients={k}"], "gpu")
        rows[k] = [row["train/loss"] for row in module.recorder.rows]
    assert rows[4] == pytest.approx(rows[1], rel=1e-4)


@pytest.mark.gpu
@gpu
def test_bf16_mixed_trains_clients_together_on_the_gpu(tmp_path):
    module = _fit(
        tmp_path, [*IMAGES, "trainer.precision=bf16-mixed", "fl.parallel_clients=4"], "gpu"
    )
    _check_float32_and_finite(module)


def _flash_attention_ran(kernels) -> bool:
    """Whether PyTorch's fused CPU flash-attention kernel ran for one bf16-autocast attention."""
    q = torch.randn(2, 2, 8, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16), kernels():
            F.scaled_dot_product_attention(q, q, q)
    return any("flash_attention" in event.key for event in prof.key_averages())


def test_bf16_autocast_on_the_cpu_runs_attention_as_matrix_multiplies():
    """The fused CPU flash-attention kernel takes ~4x its float32 time in bf16
    (docs/performance.md): under CPU bf16 autocast, training and evaluation use the math backend;
    elsewhere PyTorch chooses."""
    cpu = torch.device("cpu")
    assert _flash_attention_ran(nullcontext)  # what PyTorch picks by itself
    assert not _flash_attention_ran(lambda: attention_kernels(cpu))
    assert isinstance(attention_kernels(cpu), nullcontext)  # no autocast: unchanged
