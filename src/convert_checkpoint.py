"""Convert a checkpoint of an older fedsweep so that it loads as weights only.

    python -m src.convert_checkpoint outputs/runs/<run>/checkpoints/last.ckpt

Before 2026-12 a checkpoint held numpy's RNG state as a numpy array, which `torch.load` restores
only by importing numpy's array constructor. This reads the file with that constructor (and the
dtype and array classes) added to torch's weights-only allow-list, nothing else, so it still runs
no code from the file, and rewrites the state as a tensor. The original is kept as `<path>.old`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from src.engine.checkpoint import portable_numpy_state
from src.errors import ConfigError
from src.safe_load import load_tensors_only

# how numpy 1.x and 2.x name the array constructor in a pickle
_ARRAY_GLOBALS = [
    (np.dtype, "numpy.dtype"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtypes.UInt32DType, "numpy.dtypes.UInt32DType"),
    *(
        (np.array([0]).__reduce__()[0], f"numpy{core}.multiarray._reconstruct")
        for core in ("._core", ".core")
    ),
]


def convert(path: Path) -> bool:
    """Rewrite `path` in the current format; False when it already is."""
    hint = "it is not a checkpoint of an older fedsweep"
    with torch.serialization.safe_globals(_ARRAY_GLOBALS):
        checkpoint = load_tensors_only(path, f"convert {path}", hint)
    rng = checkpoint.get("fedsweep", {}).get("rng", {})
    keys = rng.get("numpy", [None, None])[1]
    if not isinstance(keys, np.ndarray):
        return False
    rng["numpy"] = portable_numpy_state(rng["numpy"])
    os.replace(path, path.with_name(path.name + ".old"))
    torch.save(checkpoint, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="+")
    for path in parser.parse_args(argv).checkpoint:
        if not path.is_file():
            print(f"convert_checkpoint: {path}: no such file", file=sys.stderr)
            return 2
        try:
            changed = convert(path)
        except ConfigError as refused:
            print(f"convert_checkpoint: {refused}", file=sys.stderr)
            return 2
        print(
            f"{path}: {'converted (original in ' + path.name + '.old)' if changed else 'already current'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
