"""Compressed uploads: upload transforms that send a client's update in fewer bytes.

Every compressor encodes the client's update Delta = upload - origin (origin: what it received
this round, so `needs_origin` is true for every client) and sends origin + decode(encode(Delta)),
in the upload's dtype. The arithmetic runs in float32, or float64 for a float64 upload (bf16
uploads are widened first). `encoded_nbytes(upload)` is the exact size of the encoding described
in each class's docstring: it depends on the names, shapes and dtypes only, never on the values.
An empty tensor sends nothing (0 bytes) and comes back empty.

- TopK (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018): per tensor, the
  k = max(1, ceil(fraction * numel)) entries of largest magnitude of e + Delta are sent, and with
  error feedback (their memory) the rest is kept for the client's next round:
  sent = top_k(e + Delta), e' = e + Delta - sent, e = 0 at the start.
- QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", NeurIPS 2017): per bucket v of the flattened tensor,
  Q_s(v_i) = ||v||_2 sign(v_i) xi_i, xi_i = (l + 1) / s with probability |v_i| s / ||v|| - l, else
  l / s, where l = floor(|v_i| s / ||v||): unbiased, E[Q_s(v)] = v, with
  E||Q_s(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2 (their Lemma 3.1, n = bucket length).
- LoRAQuant: deterministic uniform min/max (affine) quantisation of each tensor to b-bit codes,
  round to nearest: the usual asymmetric integer quantiser (as Jacob et al., CVPR 2018), meant for
  LoRA factors but usable on any tensor. Biased, error at most scale / 2 per entry.

Differences from the papers, all deliberate:
- TopK: k is chosen per tensor, not over the whole model vector, so every layer keeps its share;
  the compressed quantity is a client's round update, not one SGD step, and a client's memory only
  moves in the rounds it is sampled. k is ceil(fraction * numel) on the fraction as written in
  decimal (0.07 of 100 entries is 7, where float arithmetic gives 7.000000000000001 and 8). The
  values travel in the upload's dtype; the memory keeps what that rounding lost (bf16, fp16).
- QSGD: the paper's Elias coding is variable-length; this counts a fixed-width code, which is
  what a simple implementation sends. `bits` is the width of the level code l in {0, ..., s}, so
  s = 2^bits - 1, plus one sign bit per entry: bits=1 is the paper's s = 1 (ternary) case. The
  norm travels as float32, rounded *up* to the next float32, and the probabilities use that
  rounded norm, so Q stays exactly unbiased and |v_i| / norm never exceeds 1. Buckets are cut per
  tensor (the last one may be shorter); bucket_size=None is one bucket per tensor.
- LoRAQuant: one (min, scale) pair per tensor, not per row: a LoRA B factor has rows of r entries
  (r = 8: 4 bytes of 4-bit codes), where a per-row pair would add 8 bytes to each. min travels as
  float32 rounded down and scale as float32 rounded up, so that every entry lies in the coded
  range [min, min + (2^b - 1) scale]. Zero is not forced onto the grid: a zero entry of a
  non-constant tensor comes back within scale / 2 of zero. No error feedback.

A non-finite update (NaN, inf) cannot be encoded: it is sent as it is (copied) and the client
loop drops it; a TopK memory is left untouched by it. Randomness (QSGD only) comes from the
client's generator, seeded per (client, round) by the engine: reproducible.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple

import torch

from src.contract.sharing import all_finite
from src.errors import ConfigError
from src.transforms.chain import UploadTransform

TensorDict = dict[str, torch.Tensor]
INDEX_BYTES = 4  # a TopK index: int32 (tensors of up to 2^31 - 1 entries)
NORM_BYTES = 4  # a QSGD bucket norm: float32
RANGE_BYTES = 8  # LoRAQuant's (min, scale): two float32


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bits(bits, key: str) -> int:
    if not _is_int(bits) or not 1 <= bits <= 16:
        raise ConfigError(f"{key} must be an integer in [1, 16], got {bits!r}")
    return int(bits)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 upload: bf16 and fp16 are widened for the arithmetic."""
    return torch.promote_types(dtype, torch.float32)


def _float32_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float32 number >= x (float64 in, float64 out)."""
    y = x.to(torch.float32)
    y = torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)
    return y.double()


def _float32_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float32 number <= x (float64 in, float64 out)."""
    y = x.to(torch.float32)
    y = torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)
    return y.double()


def _packed_bytes(numel: int, bits_per_entry: int) -> int:
    """numel codes of bits_per_entry bits, packed, rounded up to whole bytes (per tensor)."""
    return -(-numel * bits_per_entry // 8)


class Compressor(UploadTransform):
    """What every compressor shares: the update against origin, the casts, the non-finite case.
    A subclass implements `compress` (the update the server decodes) and `encoded_nbytes`."""

    name = "compression"
    sparse = False  # most of each sent update is zero (a coordinate-wise rule then sees zeros)

    def needs_origin(self, client_id: int) -> bool:
        return True

    def apply(self, client_id, upload, origin, generator) -> TensorDict:
        """origin + decode(encode(upload - origin)), in the upload's dtypes (new tensors)."""
        with torch.no_grad():
            if not all_finite(list(upload.values())):
                return {n: t.clone() for n, t in upload.items()}
            delta = {
                n: t.to(_work_dtype(t.dtype)) - origin[n].to(_work_dtype(t.dtype))
                for n, t in upload.items()
            }
            wire = {n: t.dtype for n, t in upload.items()}
            decoded = self.compress(client_id, delta, generator, wire)
            return {
                n: (origin[n].to(decoded[n].dtype) + decoded[n]).to(t.dtype)
                for n, t in upload.items()
            }

    def compress(
        self,
        client_id: int,
        delta: TensorDict,
        generator: torch.Generator | None = None,
        wire: dict[str, torch.dtype] | None = None,
    ) -> TensorDict:
        """The update the server decodes from what client_id sends for `delta` (new tensors, in
        delta's dtypes); `wire`: the upload's dtypes where they differ (values sent as such)."""
        raise NotImplementedError

    def encoded_nbytes(self, upload: TensorDict) -> int:
        """Bytes of the encoding sent for `upload` (its shapes and dtypes)."""
        raise NotImplementedError


class TopK(Compressor):
    """Top-k sparsification with error feedback (Stich et al.'s memory), per tensor.

    Encoding of a tensor of n > 0 entries, element size v bytes (the upload's dtype):
    k = min(n, max(1, ceil(fraction * n))), sent either sparse, k values + k int32 indices, or
    dense, all n values (the zeros included), whichever is smaller; the receiver knows n, k and
    the dtype, so it knows which, without a flag:
        bytes = min(k * (v + 4), n * v)
    (float32: sparse while k < n / 2; bf16: k < n / 3; float64: k < 2n / 3).
    """

    name = "topk"
    sparse = True

    def __init__(self, fraction: float, error_feedback: bool = True):
        if (
            not isinstance(fraction, numbers.Real)
            or isinstance(fraction, bool)
            or not 0 < fraction <= 1
        ):
            raise ConfigError(f"compression.fraction must be a number in (0, 1], got {fraction!r}")
        if not isinstance(error_feedback, bool):
            raise ConfigError(
                f"compression.error_feedback must be true or false, got {error_feedback!r}"
            )
        self.fraction = float(fraction)
        self._exact_fraction = Fraction(str(self.fraction))  # the decimal as written
        self.error_feedback = error_feedback
        # client -> name -> e, in float32 (float64 for a float64 upload) on the upload's device
        self.residuals: dict[int, TensorDict] = {}

    @property
    def client_memory(self) -> str:
        return self.name if self.error_feedback else ""

    def k(self, numel: int) -> int:
        """Entries kept of a tensor of `numel` entries."""
        return min(numel, max(1, math.ceil(self._exact_fraction * numel)))

    def compress(self, client_id, delta, generator=None, wire=None) -> TensorDict:
        """top_k(e + Delta) per tensor; e <- e + Delta - sent (with error feedback)."""
        wire = wire or {}
        previous = self.residuals.get(client_id, {}) if self.error_feedback else {}
        sent, residual = {}, {}
        for name, d in delta.items():
            e = previous.get(name)
            acc = d.clone() if e is None else e.to(device=d.device, dtype=d.dtype) + d
            flat = acc.flatten()
            out = torch.zeros_like(flat)
            k = self.k(flat.numel())
            if k:
                index = flat.abs().topk(k, sorted=False).indices
                # the values travel in the upload's dtype: widen back what the server reads
                out[index] = flat[index].to(wire.get(name, flat.dtype)).to(flat.dtype)
            out = out.view_as(acc)
            sent[name] = out
            residual[name] = acc - out
        if self.error_feedback:
            self.residuals[client_id] = residual
        return sent

    def encoded_nbytes(self, upload: TensorDict) -> int:
        total = 0
        for t in upload.values():
            n, v = t.numel(), t.element_size()
            total += min(self.k(n) * (v + INDEX_BYTES), n * v)
        return total

    def state_dict(self) -> dict:
        return {
            "residuals": {
                client: {n: e.detach().clone() for n, e in tensors.items()}
                for client, tensors in self.residuals.items()
            }
        }

    def load_state_dict(self, state: dict) -> None:
        # moved to the upload's device and dtype at the client's next round
        self.residuals = {
            int(client): {n: e.clone() for n, e in tensors.items()}
            for client, tensors in state.get("residuals", {}).items()
        }


class QSGDCode(NamedTuple):
    """One tensor's QSGD encoding: a norm per bucket and a signed level sign(v_i) l_i per entry."""

    norms: torch.Tensor  # float64 values of float32 numbers, one per bucket
    levels: torch.Tensor  # int32, in [-s, s], the tensor's shape
    bucket: int  # bucket length (the last bucket may be shorter)


class QSGD(Compressor):
    """QSGD stochastic quantisation (Alistarh et al.), s = 2^bits - 1 levels, per bucket.

    Encoding of a tensor of n > 0 entries cut into m buckets (m = ceil(n / bucket_size), or 1
    with bucket_size=None): one float32 norm per bucket, and per entry one sign bit and a
    `bits`-bit level l in {0, ..., s}, packed over the tensor:
        bytes = ceil(n * (bits + 1) / 8) + 4 * m
    """

    name = "qsgd"

    def __init__(self, bits: int, bucket_size: int | None = None):
        self.bits = _check_bits(bits, "compression.bits")
        if bucket_size is not None and (not _is_int(bucket_size) or bucket_size < 1):
            raise ConfigError(
                f"compression.bucket_size must be a positive integer or null, got {bucket_size!r}"
            )
        self.bucket_size = None if bucket_size is None else int(bucket_size)
        self.levels = 2**self.bits - 1  # s

    def _bucket(self, numel: int) -> int:
        return min(self.bucket_size or numel, numel)

    def buckets(self, numel: int) -> int:
        """Buckets (norms sent) of a tensor of `numel` entries."""
        return -(-numel // self._bucket(numel)) if numel else 0

    def encode(self, v: torch.Tensor, generator: torch.Generator) -> QSGDCode:
        """Draw Q_s of each bucket of `v` (float32 or float64) from `generator`."""
        s, numel = self.levels, v.numel()
        bucket = self._bucket(numel)
        if numel == 0:
            return QSGDCode(
                v.new_zeros(0, dtype=torch.float64), v.new_zeros(v.shape, dtype=torch.int32), bucket
            )
        rows = self.buckets(numel)
        flat = torch.nn.functional.pad(v.flatten(), (0, rows * bucket - numel)).view(rows, bucket)
        norms = _float32_up(torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64))
        # |v_i| <= norm: the ratio is in [0, s]; a zero bucket is divided by 1 (its entries are 0)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms)).to(v.dtype)
        ratio = flat.abs() / scale[:, None] * s
        low = ratio.floor()
        uniform = torch.rand(numel, generator=generator, device=generator.device, dtype=v.dtype)
        uniform = torch.nn.functional.pad(uniform.to(v.device), (0, rows * bucket - numel))
        level = (low + (uniform.view(rows, bucket) < ratio - low).to(v.dtype)).clamp_(max=s)
        signed = (level * flat.sign()).to(torch.int32).flatten()[:numel].view(v.shape)
        return QSGDCode(norms, signed, bucket)

    def decode(self, code: QSGDCode, dtype: torch.dtype) -> torch.Tensor:
        """||v|| sign(v_i) l_i / s, in `dtype`."""
        numel = code.levels.numel()
        if numel == 0:
            return code.levels.to(dtype)
        rows = code.norms.numel()
        flat = torch.nn.functional.pad(
            code.levels.flatten().to(dtype), (0, rows * code.bucket - numel)
        )
        step = (code.norms / self.levels).to(dtype)
        return (
            (flat.view(rows, code.bucket) * step[:, None]).flatten()[:numel].view(code.levels.shape)
        )

    def compress(self, client_id, delta, generator=None, wire=None) -> TensorDict:
        if generator is None:
            raise ValueError("QSGD draws its rounding from the client's generator; pass one")
        return {n: self.decode(self.encode(d, generator), d.dtype) for n, d in delta.items()}

    def encoded_nbytes(self, upload: TensorDict) -> int:
        return sum(
            _packed_bytes(t.numel(), self.bits + 1) + NORM_BYTES * self.buckets(t.numel())
            for t in upload.values()
        )


class LoRAQuantCode(NamedTuple):
    """One tensor's LoRAQuant encoding: codes in [0, 2^b - 1] and the float32 (min, scale)."""

    codes: torch.Tensor  # int32, the tensor's shape
    low: torch.Tensor  # float64 value of a float32 number, shape ()
    scale: torch.Tensor  # float64 value of a float32 number, shape ()


class LoRAQuant(Compressor):
    """Deterministic b-bit uniform quantisation per tensor: x ~ min + scale * round((x - min) /
    scale), scale = (max - min) / (2^b - 1); |error| <= scale / 2 per entry.

    Encoding of a tensor of n > 0 entries: b-bit codes packed over the tensor, min and scale as
    two float32:
        bytes = ceil(n * b / 8) + 8
    """

    name = "lora_quant"

    def __init__(self, bits: int):
        self.bits = _check_bits(bits, "compression.bits")
        self.steps = 2**self.bits - 1  # the largest code

    def encode(self, x: torch.Tensor) -> LoRAQuantCode:
        if x.numel() == 0:
            zero = x.new_zeros((), dtype=torch.float64)
            return LoRAQuantCode(x.new_zeros(x.shape, dtype=torch.int32), zero, zero)
        low = _float32_down(x.min().double())
        # rounded up, so that low + steps * scale >= max: every entry is in the coded range
        scale = _float32_up((x.max().double() - low) / self.steps)
        # a constant tensor (scale 0) is all code 0; dividing by 1 keeps it so
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).to(x.dtype)
        codes = ((x - low.to(x.dtype)) / divisor).round_().clamp_(0, self.steps)
        return LoRAQuantCode(codes.to(torch.int32), low, scale)

    def decode(self, code: LoRAQuantCode, dtype: torch.dtype) -> torch.Tensor:
        return code.low.to(dtype) + code.codes.to(dtype) * code.scale.to(dtype)

    def compress(self, client_id, delta, generator=None, wire=None) -> TensorDict:
        return {n: self.decode(self.encode(d), d.dtype) for n, d in delta.items()}

    def encoded_nbytes(self, upload: TensorDict) -> int:
        return sum(
            _packed_bytes(t.numel(), self.bits) + RANGE_BYTES for t in upload.values() if t.numel()
        )


COMPRESSORS = {kind.name: kind for kind in (TopK, QSGD, LoRAQuant)}
