"""`checkpoints/last.ckpt`: written every `fl.checkpoint_every` rounds, atomically; found again
by `resume=auto|never|PATH` and refused when it was made with a different config.

Lightning's ModelCheckpoint keys its saves on optimizer steps, which manual federated
optimisation does not make, so a round-based callback is used instead. What the checkpoint holds
besides Lightning's own (model weights, round counter) is added by the orchestrator's
`on_save_checkpoint`: server and client states, RNG states, history, config.

The model weights there are only those that change: the frozen ones (a LoRA run's base model,
nearly all of it) are rebuilt from config and seed at resume and checked against the fingerprint that
replaces them (`frozen_fingerprint`); a base weight that the server changes (aggregator=stack,
exact) is in the server state, which every client's download loads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states

from src.errors import ConfigError
from src.safe_load import first_line, load_tensors_only

# Keys that may change between a run and its resumption: where things go, how they are shown,
# how often checkpoints are written, and how many rounds to run in total.
RESUMABLE_CHANGES = ("resume", "paths.", "trainer.", "logger.", "fl.rounds", "fl.checkpoint_every")
RESUMABLE_CHANGES += ("fl.parallel_clients",)  # the same results up to float summation order
RESUMABLE_CHANGES += ("fl.client_state_memory_gb",)  # where client states are kept, not what
RESUMABLE_CHANGES += ("export",)  # what is written after the last round, not the run


class LastRoundCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | Path, every_n_rounds: int = 1):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_rounds = every_n_rounds
        self.saved_round = 0  # the rounds the last checkpoint written by this run holds

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        # a stop was asked for (SIGTERM): keep this round, whatever fl.checkpoint_every says
        # (every rank decides the same: under DDP one saving alone would wait for the others)
        stopping = pl_module.stop_asked()
        if done % self.every_n_rounds == 0 or done == trainer.max_epochs or stopping:
            save_atomically(trainer, self.path)
            self.saved_round = done


def save_atomically(trainer: pl.Trainer, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write leaves the previous checkpoint."""
    partial = path.with_name(path.name + ".partial")
    trainer.save_checkpoint(partial, weights_only=False)  # rank 0 writes, every rank waits
    if trainer.is_global_zero:
        os.replace(partial, path)


def resume_path(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: `auto` (this run folder's last.ckpt, if any), `never`, or
    a path."""
    if resume == "never":
        return None
    if resume == "auto":
        path = output_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(
            f"resume={resume}: no such checkpoint; use resume=auto, resume=never or the path of "
            "a checkpoints/last.ckpt"
        )
    return path


OLD_CHECKPOINT_HINT = (
    "A checkpoint of fedsweep before 2026-12 (numpy RNG state) converts with "
    "python -m src.convert_checkpoint PATH; anything else is not a fedsweep checkpoint"
)


def read_saved_run(path: Path) -> dict:
    """The fedsweep part of a checkpoint (config, rounds done, W&B id), without loading the
    tensors into memory. Loaded as weights only: a checkpoint must not run code."""
    try:
        checkpoint = load_tensors_only(path, f"resume={path}", OLD_CHECKPOINT_HINT, mmap=True)
    except (RuntimeError, EOFError, OSError) as error:  # truncated, not a torch zip file
        raise ConfigError(
            f"resume={path}: not a readable checkpoint ({first_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or "fedsweep" not in checkpoint:
        raise ConfigError(f"resume={path}: not a fedsweep checkpoint (no 'fedsweep' entry)")
    return checkpoint["fedsweep"]


def portable_rng_states() -> dict:
    """Every RNG state as tensors and plain values, so the checkpoint loads as weights only."""
    states = _collect_rng_states()
    states["numpy"] = portable_numpy_state(states["numpy"])
    return states


def portable_numpy_state(state) -> list:
    """numpy's RNG state with its key array as a tensor (the array would need full unpickling)."""
    name, keys, position, has_gauss, cached_gaussian = state
    return [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian]


def restore_rng_states(states: dict) -> None:
    """The inverse of `portable_rng_states`."""
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    keys = keys.numpy().astype(np.uint32)
    _set_rng_states({**states, "numpy": (name, keys, position, has_gauss, cached_gaussian)})


def check_same_config(saved: dict, current: dict, path: Path) -> None:
    """Refuse to continue a run with a different experiment: one line naming the keys."""
    before, now = _flatten(saved), _flatten(current)
    differ = [
        key
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if differ:
        shown = ", ".join(
            f"{key}={now.get(key, '<unset>')} (checkpoint: {before.get(key, '<unset>')})"
            for key in differ[:6]
        )
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ConfigError(
            f"resume: {path} was made with a different config: {shown}{more}; "
            "use the same overrides, or resume=never to start over"
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The config keys a model's initial weights come from besides its architecture and the seed.
WEIGHT_SOURCES = ("arch", "pretrained", "weights", "path", "config_path")


def frozen_source(config: dict) -> str:
    """What the frozen weights were built from, for the refusal of a checkpoint made with others."""
    model = config.get("model", {})
    parts = [f"model={model.get('name', '?')}", f"seed={config.get('seed', '?')}"]
    for key in WEIGHT_SOURCES:
        value = model.get(key)
        if value not in (None, False):
            parts.append(f"model.{key}={str(value).lower() if value is True else value}")
    return " ".join(parts)


def frozen_fingerprint(tensors: dict[str, torch.Tensor], source: str) -> dict:
    """What a checkpoint keeps of the frozen weights instead of the weights: names, shapes,
    dtypes and one blake2b over the bytes in name order (seconds for 0.5 B parameters: computed
    once per run). A tensor tied to an earlier one (an LM head sharing the embedding) is hashed
    as that tie, not twice."""
    digest = hashlib.blake2b(digest_size=32)
    names = sorted(tensors)
    first_name: dict[int, str] = {}
    for name in names:
        tensor = tensors[name]
        if id(tensor) in first_name:
            digest.update(f"{name}={first_name[id(tensor)]}".encode())
            continue
        first_name[id(tensor)] = name
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy())  # the bytes, whatever the dtype (bf16)
    return {
        "names": names,
        "shapes": [list(tensors[name].shape) for name in names],
        "dtypes": [str(tensors[name].dtype).removeprefix("torch.") for name in names],
        "blake2b": digest.hexdigest(),
        "built_from": source,
    }


def check_same_frozen(saved: dict, current: dict, path) -> None:
    """Refuse to resume onto frozen weights other than the checkpoint's: one line."""
    if any(saved.get(key) != current[key] for key in ("names", "shapes", "dtypes", "blake2b")):
        raise ConfigError(
            f"resume={path}: the frozen base weights differ from the ones the checkpoint was "
            f"made with ({saved.get('built_from', 'unknown')}); rebuild them the same way (same "
            "model config, weights file and seed) or resume=never"
        )
