"""Is this combination of algorithm, aggregator and upload transforms sound? Decided before
training from the algorithm's `SharedSpec` and the others' `Needs`; a mismatch is one line
naming the options involved and what to use instead (a ConfigError: exit code 2)."""

from __future__ import annotations

from src.algorithms.base import Algorithm
from src.contract.sharing import Needs, SharedSpec
from src.engine.evaluation import evaluable_clients
from src.errors import ConfigError
from src.transforms.attacks import NoAttack

ROBUST = "aggregator=median, trimmed_mean or krum"


def check_aggregator(spec: SharedSpec, aggregator, server_optimizer=None) -> None:
    agg, needs = f"aggregator={aggregator.name}", aggregator.needs
    if spec.mean_rule and not aggregator.mean_of_uploads:
        raise ConfigError(
            f"{agg} does not return the mean of the uploads, but {spec.options}'s server rule "
            f"needs it ({spec.mean_rule}); use aggregator=mean"
        )
    if spec.mean_rule and spec.uniform_mean and spec.weighting != "uniform":
        raise ConfigError(
            f"alg.weighting={spec.weighting} with {spec.options}: its server rule needs the "
            f"uniform mean of the uploads ({spec.mean_rule}); use alg.weighting=uniform"
        )
    if aggregator.plain_step and server_optimizer is not None:
        opt = server_optimizer
        if opt.opt != "sgd" or opt.momentum:
            raise ConfigError(
                f"{agg} takes server_opt=sgd without momentum ({aggregator.plain_step}); got "
                f"server_opt={opt.opt}" + (f" with momentum {opt.momentum}" if opt.momentum else "")
            )
    if needs.both_factors and not spec.layers:
        raise ConfigError(
            f"{agg} combines LoRA factors, but {spec.options} trains no LoRA adapters; use it "
            "with a LoRA algorithm (alg=fedlora), or aggregator=mean"
        )
    if needs.both_factors and spec.updates:
        raise ConfigError(
            f"{agg} multiplies the uploaded LoRA factors, but {spec.options} uploads differences "
            "(updates), whose product means nothing; use aggregator=mean, rank_aware or zeropad"
        )
    if needs.both_factors and spec.tensorwise:
        raise ConfigError(
            f"{agg} combines each upload's LoRA factors into products, but {spec.options} "
            f"{spec.tensorwise}; use aggregator=mean, rank_aware, zeropad, median, trimmed_mean "
            "or krum"
        )
    if needs.both_factors and not spec.both_factors:
        missing = sorted(
            {
                factor
                for layer in spec.layers
                for factor, name in (("lora_A", layer.a), ("lora_B", layer.b))
                if name not in spec.roles
            }
        )
        raise ConfigError(
            f"{agg} needs both LoRA factors, but {spec.options} does not upload "
            f"{' or '.join(missing)} (kept on the clients or frozen); use aggregator=mean, "
            "rank_aware or zeropad"
        )
    mixed = spec.heterogeneous and (
        needs.equal_shapes or (needs.equal_shapes_with_factors and spec.both_factors)
    )
    if mixed:
        instead = (
            "aggregator=stack, svd, zeropad or rank_aware"
            if spec.both_factors
            else ("aggregator=mean or rank_aware")
        )
        raise ConfigError(
            f"{agg} needs uploads of equal shapes, but {spec.options} mixes ranks; use equal "
            f"ranks or {instead}"
        )
    _check_uploads(spec, agg, needs)


def _check_uploads(spec: SharedSpec, agg: str, needs: Needs) -> None:
    if spec.uploads_per_round >= needs.min_uploads:
        return
    source = (
        f"{spec.uploads_per_round} group-level uploads ({spec.options})"
        if spec.upload_unit == "group"
        else f"{spec.uploads_per_round} (fl.clients_per_round)"
    )
    more = "more groups (partitioner.groups)" if spec.upload_unit == "group" else "more clients"
    raise ConfigError(
        f"{agg} needs at least {needs.min_uploads} uploads per round ({needs.min_uploads_why}), "
        f"but receives {source}; use {more} per round or aggregator=mean"
    )


def check_attack(attack, aggregator, num_clients: int, text: bool) -> None:
    """An attack must have attackers, leave honest clients, and be survivable by the rule."""
    if isinstance(attack, NoAttack):
        return
    name = f"attack={attack.name}"
    count = attack.count(num_clients)
    if count == 0:
        raise ConfigError(
            f"{name} with attack.fraction={attack.fraction} and fl.num_clients={num_clients} "
            f"makes round({attack.fraction * num_clients:g}) = 0 clients malicious; use "
            f"attack.fraction >= {1 / num_clients:.3g} or attack=none"
        )
    if count >= num_clients:
        raise ConfigError(
            f"{name} with attack.fraction={attack.fraction} makes all {num_clients} clients "
            "malicious: no honest client is left to evaluate; lower attack.fraction"
        )
    if attack.needs_labels and text:
        raise ConfigError(f"{name} permutes class labels; text data has none")
    if attack.needs.robust_aggregator and not aggregator.robust:
        raise ConfigError(
            f"{name} replaces uploads by noise of scale 100, which aggregator={aggregator.name} "
            f"averages into the global model (the honest clients then diverge too); use {ROBUST}, "
            "or attack=sign_flip / label_flip to show a non-robust rule failing"
        )


def check_evaluable(federation, malicious: set[int], eval_clients: int | str = "all") -> None:
    """val/personal_acc needs at least one honest client with a local test split, and as many as
    fl.eval_clients asks to score."""
    honest = evaluable_clients(federation, malicious)
    if not honest:
        raise ConfigError(
            "no honest client has a local test split (partitioner.test_fraction, attack.fraction):"
            " val/personal_acc could not be measured; raise partitioner.test_fraction"
        )
    if eval_clients != "all" and int(eval_clients) > len(honest):
        raise ConfigError(
            f"fl.eval_clients={eval_clients} but only {len(honest)} clients are honest and have a "
            f"local test split (attack.fraction, partitioner.test_fraction); use fl.eval_clients "
            f"<= {len(honest)} or all"
        )


def check_client_optimizer(algorithm, optim) -> None:
    """An algorithm whose rule assumes plain SGD client steps says why in `plain_sgd`."""
    if not algorithm.plain_sgd:
        return
    momentum = optim.get("momentum", 0)
    sgd = optim._target_ == "torch.optim.SGD"
    if sgd and momentum == 0:
        return
    raise ConfigError(
        f"alg={algorithm.name} needs plain SGD clients ({algorithm.plain_sgd}), got "
        + (f"optim.momentum={momentum}" if sgd else optim._target_)
        + "; use optim=sgd optim.momentum=0"
    )


def check_privacy(spec: SharedSpec, privacy, algorithm, aggregator) -> None:
    """privacy=dp_fedavg calibrates its noise to a sum of clipped updates of equal shapes, one per
    sampled client, averaged by the plain mean: the algorithm and the aggregator declare whether
    they are that (`privacy`); the weighting and sampling are checked in src/config_checks.py."""
    if privacy is None:
        return
    name = f"privacy={privacy.name}"
    if not algorithm.privacy:
        raise ConfigError(
            f"{name}: alg={algorithm.name} does not declare it sound (`privacy = False` in its "
            "class: DP-FedAvg clips one upload of trained values per client); use alg=fedavg, "
            "fedlora or fedsa-flora"
        )
    if not aggregator.privacy:
        raise ConfigError(
            f"{name} works with aggregator=mean only (its noise is calibrated to the mean of "
            f"clipped updates), got aggregator={aggregator.name}"
        )
    if spec.heterogeneous:
        raise ConfigError(
            f"{name} needs uploads of equal shapes, but {spec.options} mixes ranks: a row of A "
            "owned by fewer clients is their mean, which one client moves by more than C/m; use "
            "equal ranks (alg.client_ranks=null)"
        )
    if spec.updates:
        raise ConfigError(
            f"{name} clips upload - received, but {spec.options} uploads differences; use "
            "alg=fedavg, fedlora or fedsa-flora"
        )
    if spec.upload_unit != "client":
        raise ConfigError(
            f"{name} needs one upload per client, but {spec.options} uploads per "
            f"{spec.upload_unit}; use alg.groups=none"
        )


def check_system(system, algorithm, privacy, spec=None, aggregator=None, sampling="uniform"):
    """system=... decides which sampled clients the server hears from: refused where that
    breaks what another part assumes."""
    if system is None:
        return
    name = f"system={system.name}"
    if system.policy == "async":
        _check_async(algorithm, spec, aggregator, sampling)
    if algorithm.trains_unsampled:
        raise ConfigError(
            f"{name}: alg={algorithm.name} trains every client every round "
            "(alg.train_all_clients=true), which no device schedule allows; set "
            "alg.train_all_clients=false"
        )
    if privacy is not None:
        raise ConfigError(
            f"{name} with privacy={privacy.name}: the accountant assumes fl.clients_per_round "
            "clients drawn from all of them every round, but availability, deadlines and "
            "over-selection change who contributes; use system=none"
        )


def check_compression(compression, aggregator, privacy) -> None:
    """compression=... sends each client's update encoded; refused where the aggregation rule
    cannot use what arrives."""
    if compression is None:
        return
    name = f"compression={compression.name}"
    if compression.sparse and aggregator.coordinatewise:
        raise ConfigError(
            f"{name} sends sparse updates, and aggregator={aggregator.name} ranks each "
            "coordinate over the uploads: where fewer than half the clients kept a coordinate it "
            "sees zeros and the model does not move; use aggregator=krum (distances) or mean, "
            "or compression=qsgd (dense, unbiased)"
        )


def _check_async(algorithm, spec: SharedSpec, aggregator, sampling: str) -> None:
    """FedBuff averages staleness-weighted updates of one global model: the algorithm's server
    half must be the plain mean of the uploads (no rule of its own) and every client must
    receive the same model."""
    name = "system.policy=async"
    own = [
        hook
        for hook in (
            "server_payload",
            "server_begin",
            "server_add",
            "server_finish",
            "server_update",
        )
        if getattr(type(algorithm), hook) is not getattr(Algorithm, hook)
    ]
    if own:
        raise ConfigError(
            f"{name} averages stale updates of one global model, but alg={algorithm.name} has "
            f"a server rule of its own ({', '.join(own)}); use alg=fedavg, fedprox, fedlora or "
            "ffa-lora"
        )
    if spec.personalized or spec.updates or spec.heterogeneous:
        why = (
            "personal models" if spec.personalized
            else "uploads that are differences" if spec.updates
            else "clients of different ranks"
        )  # fmt: skip
        raise ConfigError(
            f"{name} needs every client to train the same global model and upload its values, "
            f"but {spec.options} has {why}"
        )
    if not aggregator.mean_of_uploads:
        raise ConfigError(
            f"{name} (FedBuff) steps to the mean of the staleness-weighted updates; "
            f"aggregator={aggregator.name} is not a mean; use aggregator=mean"
        )
    if sampling != "uniform":
        raise ConfigError(
            f"fl.sampling={sampling}: {name} refills a free slot with a client drawn uniformly "
            "from the available ones; use fl.sampling=uniform"
        )
