"""Central differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with optional
quantile-based adaptive clipping (Andrew et al., NeurIPS 2021). `privacy=dp_fedavg`; the keys,
what is noised and the accountant are described in README.md ("Privacy") and
docs/architecture.md.

One object plays two parts:

- an upload transform (`apply`, the last of the chain): client k's update
  Delta_k = upload - origin (origin: what it received, `needs_origin`) is clipped to L2 norm C
  over all its uploaded tensors together, Delta_k * min(1, C / ||Delta_k||); an update already
  inside the ball is sent unchanged. With adaptive clipping it also records the client's bit
  b_k = [||Delta_k|| <= C], centred as b_k - 1/2 (sensitivity 1/2, as tensorflow_privacy's
  QuantileEstimatorQuery).
- an aggregate postprocessor (`postprocess`, run by the aggregator before the server step): the
  aggregate (the uniform mean of the clipped uploads) gets N(0, (z C / m)^2) on every coordinate,
  m = fl.clients_per_round (the expected cohort), and with adaptive clipping
  C <- C exp(-eta (b_bar - gamma)) with b_bar = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2.

Fixed denominator: the server update is sum_k clip(Delta_k) / m (McMahan et al.'s fixed-
denominator estimator, as TFF's NormalizedQuery), so one client moves it by at most C / m whatever
the others do. When fewer than m uploads arrive (a client raised or sent non-finite values and was
dropped: fault.*), the mean aggregator's (1/n) sum is rescaled by n / m; a non-finite upload is
passed on unclipped (it cannot be clipped) and the client loop drops it before aggregation.

Noise multipliers: with fixed clipping z = sigma (privacy.noise_multiplier). With adaptive clipping
sigma is the total noise multiplier of the two Gaussian mechanisms (the update, sensitivity C, and
the clipped count, sensitivity 1/2), split as Andrew et al.: z = (sigma^-2 - (2 sigma_b)^-2)^-1/2,
sigma_b = privacy.clipped_count_stddev (default m / 20); sigma_b <= sigma / 2 is refused.

Accounting: opacus' RDPAccountant, one step per round with sampling rate q = m / N
(fl.clients_per_round / fl.num_clients) and noise multiplier sigma; `privacy/epsilon` is epsilon at
privacy.delta after the rounds so far. The accountant assumes Poisson sampling of clients with
rate q, while fedsweep samples exactly m clients without replacement (src/engine/sampling.py):
the usual practice (TFF does the same), but the reported epsilon is then an approximation, not a
proof, for this sampling scheme.

Noise comes from generators seeded by (seed, round) only, so a run is reproducible, a resumed run
adds the same noise, and every DDP rank adds the same noise (their clipped counts are summed
across ranks first). The current C and the accountant's history are checkpointed.
"""

from __future__ import annotations

import logging
import math
from importlib.metadata import version

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from src.contract.ranks import Ranks
from src.contract.sharing import Role, SharedSpec
from src.errors import ConfigError
from src.transforms.chain import UploadTransform

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]
_UPDATE_NOISE_STREAM = 0xD9F1  # keeps these draws apart from the other seeded streams
_COUNT_NOISE_STREAM = 0xD9F2
# What the accountant's sampling assumption is, for the log and summary.json
SAMPLING_NOTE = (
    "accounted as Poisson sampling with rate q = fl.clients_per_round / fl.num_clients; fedsweep "
    "samples exactly fl.clients_per_round clients without replacement (the usual practice, as TFF)"
)


def update_norm(upload: TensorDict, origin: TensorDict) -> float:
    """||upload - origin|| over all tensors together, summed in float64."""
    squares = [
        torch.linalg.vector_norm(upload[n] - origin[n], dtype=torch.float64) ** 2 for n in upload
    ]
    return math.sqrt(torch.stack(squares).sum().item())


def round_seed(seed: int, round_idx: int, stream: int) -> int:
    """The seed of one round's server-side noise: (seed, round) only, the same on every rank."""
    return int(np.random.SeedSequence([seed, round_idx, stream]).generate_state(1)[0])


def split_noise_multiplier(sigma: float, count_stddev: float) -> float:
    """Andrew et al.: the update's noise multiplier z such that the update (sensitivity C, noise
    z C) and the clipped count (sensitivity 1/2, noise sigma_b) together are one Gaussian mechanism
    of noise multiplier sigma: sigma^-2 = z^-2 + (2 sigma_b)^-2. sigma_b = 0 (fixed clipping,
    nothing to count): z = sigma; sigma = 0: no noise at all."""
    if sigma == 0 or count_stddev == 0:
        return sigma
    return (sigma**-2 - (2 * count_stddev) ** -2) ** -0.5


class DPFedAvg(UploadTransform):
    """DP-FedAvg's clipping (an upload transform) and noise (an aggregate postprocessor)."""

    def __init__(
        self,
        name: str = "dp_fedavg",
        clip: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        adaptive_clip: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ):
        # ranges are checked before anything is built (src/config_checks.py, RULES)
        self.name = name
        self.initial_clip = self.clip = float(clip)
        self.configured_sigma = float(noise_multiplier)
        self.delta = float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.adaptive_clip = bool(adaptive_clip)
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.configured_count_stddev = clipped_count_stddev
        self.accountant = RDPAccountant()
        self.round_clip = self.clip  # the C clients were clipped to in the last round
        self.below_estimate: float | None = None  # the last round's noised unclipped fraction
        self._bits = 0.0  # this rank's sum of (b_k - 1/2) in the running round
        self._counted = 0  # this rank's clipped (finite) updates in the running round
        self.planned = False
        self._epsilon: tuple[tuple, float] = ((), 0.0)  # (accountant history, its epsilon)

    # ------------------------------------------------------------------ set-up
    def plan(
        self, seed: int, num_clients: int, clients_per_round: int, rounds: int, spec: SharedSpec
    ) -> None:
        """Fix sigma (from privacy.target_epsilon if set), its split and the sampling rate for
        this run; refuse a split that cannot reach sigma; log what will be clipped and the
        epsilon the run will reach."""
        self.seed = seed
        self.cohort = clients_per_round  # m, the expected number of clients per round
        self.sample_rate = clients_per_round / num_clients  # q
        self.sigma = self.configured_sigma
        if self.target_epsilon is not None:
            try:
                self.sigma = get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.delta,
                    sample_rate=self.sample_rate,
                    steps=rounds,
                    accountant="rdp",
                )
            except ValueError as error:  # opacus: "The privacy budget is too low."
                raise ConfigError(
                    f"privacy.target_epsilon={self.target_epsilon} cannot be reached at "
                    f"privacy.delta={self.delta} in fl.rounds={rounds} with q={self.sample_rate:g} "
                    f"(opacus: {error}); raise privacy.target_epsilon or lower fl.rounds"
                ) from error
            log.info(
                "privacy.target_epsilon=%g: noise multiplier %.4f for %d rounds "
                "(replaces privacy.noise_multiplier=%g)",
                self.target_epsilon,
                self.sigma,
                rounds,
                self.configured_sigma,
            )
        self.count_stddev = 0.0
        if self.adaptive_clip and self.sigma > 0:
            given = self.configured_count_stddev
            self.count_stddev = clients_per_round / 20 if given is None else float(given)
            if self.sigma >= 2 * self.count_stddev:
                what = (
                    f"privacy.clipped_count_stddev={given}"
                    if given is not None
                    else f"the default privacy.clipped_count_stddev = fl.clients_per_round / 20 "
                    f"= {self.count_stddev:g}"
                )
                raise ConfigError(
                    f"{what} is too small for noise multiplier {self.sigma:g}: adaptive clipping "
                    f"needs clipped_count_stddev > sigma / 2 = {self.sigma / 2:g} (Andrew et al.'s "
                    "split of sigma between the update and the clipped count); raise it, or lower "
                    "privacy.noise_multiplier"
                )
        elif self.configured_count_stddev is not None:
            why = "privacy.adaptive_clip=false" if not self.adaptive_clip else "no noise (sigma=0)"
            raise ConfigError(
                f"privacy.clipped_count_stddev={self.configured_count_stddev} has no use with "
                f"{why}; leave it null"
            )
        self.update_multiplier = split_noise_multiplier(self.sigma, self.count_stddev)
        self.planned = True
        self._describe(spec, rounds)

    def _describe(self, spec: SharedSpec, rounds: int) -> None:
        roles = set(spec.roles.values())
        if roles == {Role.LORA_A}:
            log.info(
                "privacy=%s: only the LoRA A factors are uploaded (%s), so only they are clipped "
                "and noised; B and the head never leave the clients and are outside the guarantee "
                "(each client's deployed model is its own)",
                self.name,
                spec.options or "fedsa-flora",
            )
        if self.sigma == 0:
            log.warning(
                "privacy.noise_multiplier=0: updates are clipped but not noised; there is no "
                "privacy guarantee (privacy/epsilon = inf)"
            )
        clip = f"adaptive from C={self.clip:g}" if self.adaptive_clip else f"C={self.clip:g}"
        split = (
            f", update noise multiplier {self.update_multiplier:.4f} and clipped-count stddev "
            f"{self.count_stddev:g} (quantile {self.target_quantile:g}, lr {self.clip_lr:g})"
            if self.adaptive_clip and self.sigma > 0
            else ""
        )
        log.info(
            "privacy=%s: clip %s, noise multiplier %g%s, noise stddev z*C/%d per coordinate; "
            "epsilon %.4g at delta=%g after %d rounds (opacus RDP, q=%g; %s)",
            self.name,
            clip,
            self.sigma,
            split,
            self.cohort,
            self.epsilon_after(rounds),
            self.delta,
            rounds,
            self.sample_rate,
            SAMPLING_NOTE,
        )
        if self.update_multiplier >= 2 * self.sigma > 0:
            log.warning(
                "adaptive clipping adds %.2fx the noise of sigma=%g to the update; raise "
                "privacy.clipped_count_stddev or fl.clients_per_round",
                self.update_multiplier / self.sigma,
                self.sigma,
            )

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at privacy.delta after `rounds` rounds of this run's mechanism."""
        if self.sigma == 0:
            return math.inf
        accountant = RDPAccountant()
        accountant.history = [(self.sigma, self.sample_rate, rounds)]
        return accountant.get_epsilon(self.delta)

    # ------------------------------------------------------------------ client side
    def begin_round(self, sampled: list[int], seed: int, round_idx: int) -> None:
        self._bits, self._counted = 0.0, 0
        self.round_clip = self.clip

    def needs_origin(self, client_id: int) -> bool:
        return True

    def apply(self, client_id, upload, origin, generator) -> TensorDict:
        """origin + Delta * min(1, C / ||Delta||); an update inside the ball is sent unchanged. A
        non-finite upload cannot be clipped: it is passed on, and the client loop drops it."""
        norm = update_norm(upload, origin)
        if not math.isfinite(norm):
            return upload
        self._counted += 1
        self._bits += (1.0 if norm <= self.clip else 0.0) - 0.5
        if norm <= self.clip:
            return upload
        scale = self.clip / norm
        return {n: (t - origin[n]).mul_(scale).add_(origin[n]) for n, t in upload.items()}

    # ------------------------------------------------------------------ server side
    def postprocess(
        self, aggregate: TensorDict, state: TensorDict, num_uploads: int, round_idx: int
    ) -> None:
        """Fixed denominator, Gaussian noise, then the adaptive clip's update (in place)."""
        m = self.cohort
        device = next(iter(aggregate.values())).device  # NCCL sums tensors on the GPU only
        counts = torch.tensor(
            [self._bits, float(self._counted)], dtype=torch.float64, device=device
        )
        bits, counted = Ranks().sum_(counts).tolist()  # every rank's clients
        if int(counted) != num_uploads:
            raise RuntimeError(
                f"round {round_idx + 1}: {num_uploads} uploads were aggregated but {int(counted)} "
                "were clipped; privacy=dp_fedavg needs every aggregated upload to pass its clipping"
            )
        if num_uploads > m:
            raise RuntimeError(
                f"round {round_idx + 1}: {num_uploads} uploads for a cohort of "
                f"fl.clients_per_round={m}; the noise would be too small"
            )
        # (1/n) sum -> (1/m) sum: dropped clients count as zero updates. The updates are relative
        # to `state`: every client started from the server state (fedavg, fedlora, fedsa-flora
        # without clusters, equal ranks: what src/config_checks.py lets through).
        if num_uploads < m:
            factor = num_uploads / m
            for name, tensor in aggregate.items():
                tensor.sub_(state[name]).mul_(factor).add_(state[name])
        stddev = self.update_multiplier * self.round_clip / m
        if stddev > 0:
            generators: dict[torch.device, torch.Generator] = {}
            seed = round_seed(self.seed, round_idx, _UPDATE_NOISE_STREAM)
            for tensor in aggregate.values():
                if tensor.device not in generators:
                    generators[tensor.device] = torch.Generator(tensor.device).manual_seed(seed)
                noise = torch.randn(
                    tensor.shape,
                    generator=generators[tensor.device],
                    device=tensor.device,
                    dtype=tensor.dtype,
                )
                tensor.add_(noise.mul_(stddev))
        if self.adaptive_clip:
            noise = 0.0
            if self.count_stddev > 0:
                generator = torch.Generator().manual_seed(
                    round_seed(self.seed, round_idx, _COUNT_NOISE_STREAM)
                )
                noise = self.count_stddev * torch.randn((), generator=generator).item()
            self.below_estimate = (bits + noise) / m + 0.5
            self.clip = self.clip * math.exp(
                -self.clip_lr * (self.below_estimate - self.target_quantile)
            )
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)

    @property
    def rounds_accounted(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    @property
    def epsilon(self) -> float:
        """Epsilon at privacy.delta after the rounds so far (inf without noise); about 0.2 s of
        opacus' RDP conversion, so kept until the next round."""
        history = tuple(self.accountant.history)
        if self._epsilon[0] != history:
            if any(sigma == 0 for sigma, _, _ in history):
                self._epsilon = (history, math.inf)
            else:
                self._epsilon = (history, self.accountant.get_epsilon(self.delta))
        return self._epsilon[1]

    def round_metrics(self) -> dict[str, float]:
        metrics = {"privacy/epsilon": self.epsilon, "privacy/clip": self.round_clip}
        if self.below_estimate is not None:
            metrics["privacy/unclipped_fraction"] = self.below_estimate  # noised: private
        return metrics

    def summary(self) -> dict:
        """For summary.json: the guarantee reached and how it was computed."""
        return {
            "mechanism": self.name,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "rounds": self.rounds_accounted,
            "noise_multiplier": self.sigma,
            "update_noise_multiplier": self.update_multiplier,
            "clipped_count_stddev": self.count_stddev,
            "sample_rate": self.sample_rate,
            "clients_per_round": self.cohort,
            "adaptive_clip": self.adaptive_clip,
            "initial_clip": self.initial_clip,
            "final_clip": self.clip,
            "accountant": f"opacus {version('opacus')} RDPAccountant",
            "sampling": SAMPLING_NOTE,
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "clip": self.clip,
            "round_clip": self.round_clip,
            "below_estimate": self.below_estimate,
            "history": list(self.accountant.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.clip = state["clip"]
        self.round_clip = state["round_clip"]
        self.below_estimate = state["below_estimate"]
        self.accountant.history = list(state["history"])
        earlier = {sigma for sigma, _, _ in self.accountant.history}
        if self.planned and earlier - {self.sigma}:
            log.warning(
                "privacy: the resumed rounds used noise multiplier %s, this run uses %g "
                "(privacy.target_epsilon with another fl.rounds); epsilon composes both",
                sorted(earlier),
                self.sigma,
            )
