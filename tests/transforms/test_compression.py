"""Compressed uploads (src/transforms/compression.py): TopK with error feedback, QSGD, LoRAQuant.
Everything in float64 unless a test is about another dtype, so that identities hold exactly."""

import io
import math

import pytest
import torch

from src.errors import ConfigError
from src.transforms.compression import QSGD, LoRAQuant, TopK

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _deltas(seed: int) -> dict[str, torch.Tensor]:
    """A client's update: a matrix, a vector, and a tensor of one entry."""
    gen = _gen(seed)
    return {
        "w": torch.randn(6, 5, generator=gen, dtype=F64),
        "b": torch.randn(7, generator=gen, dtype=F64),
        "s": torch.randn(1, generator=gen, dtype=F64),
    }


def _float32_up(x: float) -> float:
    """The smallest float32 number >= x: what QSGD sends as a bucket's norm."""
    y = torch.tensor(x, dtype=torch.float32)
    if y.item() < x:
        y = torch.nextafter(y, torch.tensor(math.inf))
    return y.item()


# ---------------------------------------------------------------------------------------- TopK


def test_topk_residual_identity_holds_exactly_every_round():
    """sent_t + e_{t+1} == e_t + delta_t, bit for bit, over several rounds."""
    topk = TopK(0.2)
    residual = {n: torch.zeros_like(t) for n, t in _deltas(0).items()}  # e_0 = 0
    for round_idx in range(5):
        delta = _deltas(round_idx)
        sent = topk.compress(1, delta)
        after = topk.residuals[1]
        for name in delta:
            assert torch.equal(sent[name] + after[name], residual[name] + delta[name])
        residual = after


def test_topk_sum_of_sent_equals_sum_of_deltas_minus_final_residual():
    topk = TopK(0.1)
    total_sent = {n: torch.zeros_like(t) for n, t in _deltas(0).items()}
    total_delta = {n: torch.zeros_like(t) for n, t in _deltas(0).items()}
    for round_idx in range(8):
        delta = _deltas(round_idx)
        sent = topk.compress(1, delta)
        for name in delta:
            total_sent[name] += sent[name]
            total_delta[name] += delta[name]
    final = topk.residuals[1]
    for name in total_sent:  # the identity telescopes; only float64 summation order differs
        torch.testing.assert_close(
            total_sent[name], total_delta[name] - final[name], rtol=0, atol=1e-12
        )


def test_topk_sends_k_nonzero_entries_per_tensor_the_largest():
    topk = TopK(0.1)
    gen = _gen(3)
    delta = {
        "thirty": torch.randn(30, generator=gen, dtype=F64),  # 0.1 * 30 = 3
        "seven": torch.randn(7, generator=gen, dtype=F64),  # ceil(0.7) = 1
        "matrix": torch.randn(4, 5, generator=gen, dtype=F64),  # 0.1 * 20 = 2
        "empty": torch.zeros(0, dtype=F64),  # nothing to send
    }
    sent = topk.compress(1, delta)
    expected = {"thirty": 3, "seven": 1, "matrix": 2, "empty": 0}
    for name, k in expected.items():
        assert topk.k(delta[name].numel()) == k
        assert int(torch.count_nonzero(sent[name])) == k
        assert sent[name].shape == delta[name].shape
        if k:
            kept = sent[name] != 0
            assert torch.equal(sent[name][kept], delta[name][kept])  # first round: e = 0
            assert delta[name][kept].abs().min() >= delta[name][~kept].abs().max()
    # ceil on the decimal as written: 0.07 * 100 is 7, where floats give 7.000000000000001
    assert TopK(0.07).k(100) == 7 and TopK(0.07).k(101) == 8


def test_topk_fraction_one_sends_the_delta_exactly():
    topk = TopK(1.0)
    for round_idx in range(3):
        delta = _deltas(round_idx)
        sent = topk.compress(1, delta)
        for name in delta:
            assert torch.equal(sent[name], delta[name])
            assert torch.count_nonzero(topk.residuals[1][name]) == 0


def test_topk_without_error_feedback_sends_topk_of_each_delta_and_keeps_no_residual():
    plain, fresh = TopK(0.2, error_feedback=False), TopK(0.2, error_feedback=False)
    for round_idx in range(3):
        delta = _deltas(round_idx)
        sent = plain.compress(1, delta)
        alone = fresh.compress(1, delta)
        assert all(torch.equal(sent[n], alone[n]) for n in delta)
        assert plain.residuals == {}


def test_topk_residuals_survive_state_dict_into_a_fresh_object():
    topk = TopK(0.2)
    for round_idx in range(3):
        topk.compress(1, _deltas(round_idx))
        topk.compress(2, _deltas(10 + round_idx))
    buffer = io.BytesIO()  # through a checkpoint file, loaded as fedsweep loads them
    torch.save(topk.state_dict(), buffer)
    buffer.seek(0)
    resumed = TopK(0.2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for client in (1, 2):
        for name, e in topk.residuals[client].items():
            assert torch.equal(resumed.residuals[client][name], e)
        delta = _deltas(20 + client)
        sent, sent_resumed = topk.compress(client, delta), resumed.compress(client, delta)
        assert all(torch.equal(sent[n], sent_resumed[n]) for n in delta)


def test_topk_residuals_are_per_client():
    topk, alone = TopK(0.2), TopK(0.2)
    topk.compress(1, _deltas(0))
    kept = {n: e.clone() for n, e in topk.residuals[1].items()}
    assert any(torch.count_nonzero(e) for e in kept.values())
    delta = _deltas(1)
    sent = topk.compress(2, delta)  # client 2's first round: as if client 1 did not exist
    reference = alone.compress(2, delta)
    assert all(torch.equal(sent[n], reference[n]) for n in delta)
    assert all(torch.equal(topk.residuals[2][n], alone.residuals[2][n]) for n in delta)
    assert all(torch.equal(topk.residuals[1][n], kept[n]) for n in kept)  # untouched


def test_topk_non_finite_upload_is_passed_on_and_leaves_the_residual():
    topk = TopK(0.2)
    origin = {n: torch.zeros_like(t) for n, t in _deltas(0).items()}
    topk.apply(1, _deltas(0), origin, _gen(0))
    kept = {n: e.clone() for n, e in topk.residuals[1].items()}
    bad = _deltas(1)
    bad["w"][0, 0] = math.nan
    sent = topk.apply(1, bad, origin, _gen(1))
    assert torch.isnan(sent["w"][0, 0]) and sent["w"].data_ptr() != bad["w"].data_ptr()
    assert all(torch.equal(topk.residuals[1][n], kept[n]) for n in kept)


# ---------------------------------------------------------------------------------------- QSGD


def _qsgd_draws(bits: int, v: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    """`draws` independent Q_s(v) in one call: `draws` copies of v, one bucket each."""
    qsgd = QSGD(bits, bucket_size=v.numel())
    copies = v.repeat(draws, 1)
    return qsgd.compress(1, {"v": copies}, _gen(seed))["v"]


_V = torch.tensor(
    [3.0, -1.5, 0.0, 0.25, -0.05, 2.0, 1e-3, -4.0, 0.7, 0.7, -0.7, 1.1, 0.0, 5.0, -2.2, 0.01],
    dtype=F64,
)


@pytest.mark.parametrize("bits", [1, 3])
def test_qsgd_mean_of_20000_draws_is_within_5_standard_errors_of_the_delta(bits):
    """Unbiased: E[Q_s(v)] = v. Lemma 3.1 bounds the total variance E||Q_s(v) - v||^2 by
    B = min(n / s^2, sqrt(n) / s) ||v||^2, so one coordinate's variance is at most B too and
    the mean of N draws has a standard error of at most sqrt(B / N) per coordinate; every
    coordinate must be within 5 of those (a Gaussian 5-sigma event: p < 6e-7 each)."""
    s, n, draws = 2**bits - 1, _V.numel(), 20000
    bound = min(n / s**2, math.sqrt(n) / s) * _float32_up(torch.linalg.vector_norm(_V).item()) ** 2
    mean = _qsgd_draws(bits, _V, draws).mean(dim=0)
    assert (mean - _V).abs().max() <= 5 * math.sqrt(bound / draws)


@pytest.mark.parametrize("bits", [1, 3])
def test_qsgd_mean_squared_error_is_within_the_lemma_3_1_bound(bits):
    s, n = 2**bits - 1, _V.numel()
    bound = min(n / s**2, math.sqrt(n) / s) * _float32_up(torch.linalg.vector_norm(_V).item()) ** 2
    squared = ((_qsgd_draws(bits, _V, 20000) - _V) ** 2).sum(dim=1)
    assert squared.mean() <= bound


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_qsgd_coordinates_lie_in_zero_or_plus_minus_norm_times_l_over_s(bits):
    """Q(v)_i in {0, +-||v|| l / s : l = 1..s}, with ||v|| the norm as sent: rounded up to the
    next float32 (within 2^-23 relatively of the float64 norm)."""
    s = 2**bits - 1
    v = torch.randn(50, generator=_gen(bits), dtype=F64)
    exact = torch.linalg.vector_norm(v).item()
    norm = _float32_up(exact)
    assert exact <= norm <= exact * (1 + 2**-23)
    q = QSGD(bits).compress(1, {"v": v}, _gen(0))["v"]
    levels = q * s / norm
    assert torch.allclose(levels, levels.round(), rtol=0, atol=1e-9)
    assert levels.abs().max() <= s + 1e-9
    assert torch.all((q == 0) | (q.sign() == v.sign()))  # a level keeps the entry's sign


def test_qsgd_same_generator_seed_gives_identical_output():
    qsgd = QSGD(2, bucket_size=4)
    delta = _deltas(0)
    first, again = qsgd.compress(1, delta, _gen(7)), qsgd.compress(1, delta, _gen(7))
    other = qsgd.compress(1, delta, _gen(8))
    assert all(torch.equal(first[n], again[n]) for n in delta)
    assert any(not torch.equal(first[n], other[n]) for n in delta)


@pytest.mark.parametrize("bucket_size", [None, 3])
def test_qsgd_all_zero_delta_gives_zeros(bucket_size):
    qsgd = QSGD(4, bucket_size=bucket_size)
    zeros = {"w": torch.zeros(4, 5, dtype=F64), "e": torch.zeros(0, dtype=F64)}
    sent = qsgd.compress(1, zeros, _gen(0))
    assert torch.equal(sent["w"], zeros["w"]) and sent["e"].shape == (0,)
    origin = {n: torch.ones_like(t) for n, t in zeros.items()}
    upload = {n: t.clone() for n, t in origin.items()}  # no training: upload == origin
    assert torch.equal(qsgd.apply(1, upload, origin, _gen(0))["w"], origin["w"])


def test_qsgd_buckets_use_their_own_norms():
    """Buckets of norms ~1e3, ~1e-3 and ~1: each is coded on its own norm's levels, so the tiny
    bucket keeps its scale; one norm for the whole tensor would code it on levels of ~1e3 / s."""
    gen = _gen(5)
    big, tiny, tail = (torch.randn(4, generator=gen, dtype=F64) for _ in range(3))
    v = torch.cat([1e3 * big, 1e-3 * tiny, tail[:2]])  # 10 entries: buckets of 4, 4 and 2
    qsgd, bits = QSGD(3, bucket_size=4), 3
    s = 2**bits - 1
    code = qsgd.encode(v, _gen(0))
    buckets = [v[0:4], v[4:8], v[8:10]]
    assert code.norms.tolist() == [_float32_up(torch.linalg.vector_norm(b).item()) for b in buckets]
    q = qsgd.decode(code, F64)
    parts = (q[0:4], q[4:8], q[8:10])
    for bucket, norm, part in zip(buckets, code.norms.tolist(), parts, strict=True):
        levels = part * s / norm
        assert torch.allclose(levels, levels.round(), rtol=0, atol=1e-9)
        assert torch.all((part == 0) | (part.sign() == bucket.sign()))
        assert part.abs().max() <= norm and torch.count_nonzero(part) > 0
    whole = QSGD(3).compress(1, {"v": v}, _gen(0))["v"][4:8]  # one norm, ~1e3
    nonzero = whole[whole != 0]
    assert torch.all(nonzero.abs() >= torch.linalg.vector_norm(v) / s * (1 - 1e-9))


# ----------------------------------------------------------------------------------- LoRAQuant


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lora_quant_error_is_at_most_half_a_scale(bits):
    x = torch.randn(8, 16, generator=_gen(bits), dtype=F64)
    quant = LoRAQuant(bits)
    code = quant.encode(x)
    low, scale = code.low.item(), code.scale.item()
    span = (x.max() - x.min()).item()
    # min rounded down and scale rounded up to float32, which covers [min, max]
    assert low <= x.min().item() and low + (2**bits - 1) * scale >= x.max().item()
    assert span / (2**bits - 1) <= scale <= span / (2**bits - 1) * (1 + 2**-22)
    error = (quant.compress(1, {"x": x})["x"] - x).abs().max().item()
    assert error <= scale / 2 + 1e-12 * span


def test_lora_quant_16_bits_is_nearly_exact():
    x = torch.randn(64, 32, generator=_gen(16), dtype=F64)
    span = (x.max() - x.min()).item()
    error = (LoRAQuant(16).compress(1, {"x": x})["x"] - x).abs().max().item()
    assert error <= span / (2 * 65535) * (1 + 1e-6)  # half of one of 65535 steps: 7.6e-6 span


@pytest.mark.parametrize("value", [0.0, 0.375, -2.5])
def test_lora_quant_constant_tensor_is_exact(value):
    """A constant that is a float32 number (what min travels as) comes back exactly."""
    x = torch.full((3, 4), value, dtype=F64)
    for bits in (1, 4, 16):
        assert torch.equal(LoRAQuant(bits).compress(1, {"x": x})["x"], x)


# --------------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("make", [lambda: TopK(0.3), lambda: QSGD(4, 8), lambda: LoRAQuant(8)])
def test_apply_returns_new_tensors_in_the_upload_dtype_and_leaves_the_inputs(make, dtype):
    compressor = make()
    gen = _gen(9)
    origin = {
        "w": torch.randn(5, 6, generator=gen).to(dtype),
        "e": torch.zeros(0, dtype=dtype),
    }
    upload = {n: t + 0.1 * torch.randn(t.shape, generator=gen).to(dtype) for n, t in origin.items()}
    before = {n: t.clone() for n, t in upload.items()}, {n: t.clone() for n, t in origin.items()}
    assert compressor.needs_origin(0) and compressor.needs_origin(123)
    sent = compressor.apply(0, upload, origin, _gen(0))
    assert sent.keys() == upload.keys()
    for name, t in sent.items():
        assert t.dtype == dtype and t.shape == upload[name].shape
        if t.numel():
            assert t.data_ptr() not in (upload[name].data_ptr(), origin[name].data_ptr())
            assert (t.double() - upload[name].double()).abs().max() < 0.5  # near the upload
    assert all(torch.equal(upload[n], before[0][n]) for n in upload)
    assert all(torch.equal(origin[n], before[1][n]) for n in origin)


def _upload_for_bytes() -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(4, 5),  # 20 float32 entries
        "b": torch.zeros(3),  # 3 float32 entries
        "h": torch.zeros(30, dtype=torch.bfloat16),  # 30 bf16 entries
        "d": torch.zeros(10, dtype=F64),  # 10 float64 entries
        "e": torch.zeros(0),  # empty: sends nothing
    }


def test_topk_encoded_nbytes_by_hand():
    upload = _upload_for_bytes()
    # per tensor min(k * (element size + 4-byte index), numel * element size)
    # fraction 0.1: w k=2: min(2*8, 20*4) = 16; b k=1: min(1*8, 3*4) = 8;
    #               h k=3: min(3*6, 30*2) = 18; d k=1: min(1*12, 10*8) = 12; e: 0
    assert TopK(0.1).encoded_nbytes(upload) == 16 + 8 + 18 + 12 + 0
    # fraction 0.6: w k=12: min(96, 80) = 80; b k=2: min(16, 12) = 12;
    #               h k=18: min(108, 60) = 60; d k=6: min(72, 80) = 72; e: 0
    assert TopK(0.6).encoded_nbytes(upload) == 80 + 12 + 60 + 72 + 0
    # fraction 1: everything dense
    assert TopK(1.0).encoded_nbytes(upload) == 80 + 12 + 60 + 80 + 0


def test_qsgd_encoded_nbytes_by_hand():
    upload = _upload_for_bytes()
    # bits=2: 3 bits an entry (sign + 2-bit level), packed per tensor, + 4 bytes a bucket norm
    # bucket 8: w ceil(60/8)=8 + 3 buckets*4 = 20; b ceil(9/8)=2 + 1*4 = 6;
    #           h ceil(90/8)=12 + 4*4 = 28; d ceil(30/8)=4 + 2*4 = 12; e 0
    assert QSGD(2, bucket_size=8).encoded_nbytes(upload) == 20 + 6 + 28 + 12 + 0
    # one bucket a tensor: w 8+4 = 12; b 2+4 = 6; h 12+4 = 16; d 4+4 = 8; e 0
    assert QSGD(2).encoded_nbytes(upload) == 12 + 6 + 16 + 8 + 0
    # bits=8: 9 bits an entry: w ceil(180/8)=23+4 = 27; b ceil(27/8)=4+4 = 8;
    #         h ceil(270/8)=34+4 = 38; d ceil(90/8)=12+4 = 16; e 0
    assert QSGD(8).encoded_nbytes(upload) == 27 + 8 + 38 + 16 + 0
    code = QSGD(2, bucket_size=8).encode(torch.randn(20, dtype=F64), _gen(0))
    assert code.norms.numel() == 3  # the buckets counted are the norms sent


def test_lora_quant_encoded_nbytes_by_hand():
    upload = _upload_for_bytes()
    # bits=4: codes packed per tensor + 8 bytes (float32 min, float32 scale) per non-empty tensor
    # w ceil(80/8)=10+8 = 18; b ceil(12/8)=2+8 = 10; h ceil(120/8)=15+8 = 23; d 5+8 = 13; e 0
    assert LoRAQuant(4).encoded_nbytes(upload) == 18 + 10 + 23 + 13 + 0
    # bits=3: w ceil(60/8)=8+8 = 16; b ceil(9/8)=2+8 = 10; h ceil(90/8)=12+8 = 20;
    #         d ceil(30/8)=4+8 = 12; e 0
    assert LoRAQuant(3).encoded_nbytes(upload) == 16 + 10 + 20 + 12 + 0


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: TopK(0), "compression.fraction"),
        (lambda: TopK(1.5), "compression.fraction"),
        (lambda: TopK(-0.1), "compression.fraction"),
        (lambda: TopK(math.nan), "compression.fraction"),
        (lambda: TopK("0.1"), "compression.fraction"),
        (lambda: TopK(True), "compression.fraction"),
        (lambda: TopK(0.1, error_feedback="yes"), "compression.error_feedback"),
        (lambda: QSGD(0), "compression.bits"),
        (lambda: QSGD(17), "compression.bits"),
        (lambda: QSGD(2.5), "compression.bits"),
        (lambda: QSGD(True), "compression.bits"),
        (lambda: QSGD(4, bucket_size=0), "compression.bucket_size"),
        (lambda: QSGD(4, bucket_size=-8), "compression.bucket_size"),
        (lambda: QSGD(4, bucket_size=8.0), "compression.bucket_size"),
        (lambda: LoRAQuant(0), "compression.bits"),
        (lambda: LoRAQuant(17), "compression.bits"),
    ],
)
def test_bad_arguments_raise_a_one_line_config_error_naming_the_key(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as raised:
        make()
    assert "\n" not in str(raised.value)
