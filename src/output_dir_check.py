"""An output folder that cannot be created stops the run with one line, before Hydra's traceback.

Registered as a Hydra callback (conf/config.yaml, `hydra.callbacks`). Hydra calls on_run_start
(on_multirun_start) before it creates hydra.run.dir (the launcher creates hydra.sweep.dir), and
would otherwise fail there with a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("fedsweep")


def check_writable(folder: str, key: str) -> None:
    """Create `folder` and write a probe file in it; on failure one ERROR line and exit code 2."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fedsweep-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        # Hydra turns an exception raised by a callback into a warning and goes on; its own
        # mkdir (or first write) then fails with the full traceback that HYDRA_FULL_ERROR asks for.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # Hydra's own log format has no level name at this point (the job's is set up later).
        log.error(
            "ERROR %s=%s cannot be created (%s); point %s at a folder you can write",
            key,
            folder,
            error.strerror or error,
            key,
        )
        sys.exit(2)


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(str(config.hydra.sweep.dir), "hydra.sweep.dir")
