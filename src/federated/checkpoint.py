"""Save `checkpoints/last.ckpt` after every round (Lightning's checkpoint format).

Lightning's ModelCheckpoint keys its saves on optimizer steps, which manual federated
optimisation does not make, so a round-based callback is used instead.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class LastRoundCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | Path, every_n_rounds: int = 1):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_rounds = every_n_rounds

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.every_n_rounds == 0 or done == trainer.max_epochs:
            trainer.save_checkpoint(self.path, weights_only=False)
