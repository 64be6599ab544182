"""Loading files users point fedsweep at (weights, checkpoints) without running code from them.

A `torch.load` with `weights_only=False` unpickles whatever the file names, which can call any
function (`os.system`): a shared backbone or checkpoint would be code execution by file. fedsweep
only ever loads with `weights_only=True` (tensors, plain containers, numbers, strings) and writes
its own checkpoints so that they load that way (docs/outputs.md, Checkpoints).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from src.errors import ConfigError


class UnsafeFileError(ConfigError):
    """A file would need full unpickling (it names functions or classes) to load."""


def first_line(error: BaseException, empty: str = "empty or truncated") -> str:
    """The first line of an error's message, for a one-line refusal."""
    return (str(error).strip().splitlines() or [empty])[0]


def load_tensors_only(path: str | Path, key: str, hint: str, **load_kw):
    """`torch.load(path, weights_only=True)`; a file that names anything else (a class, a
    function) is refused with one line naming `key`, the file and what it holds, plus `hint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **load_kw)
    except pickle.UnpicklingError as refused:
        raise UnsafeFileError(
            f"{key}: {path} holds {_named_globals(path, refused)}, which only full unpickling "
            f"(running code from the file) would load; fedsweep loads tensors and plain "
            f"containers only. {hint}"
        ) from None


def _named_globals(path: str | Path, refused: Exception) -> str:
    try:  # every name a zip checkpoint would import
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError):  # a bare pickle: the first name the loader met
        names = re.findall(r"GLOBAL ([\w.]+)", str(refused))[:1]
    if not names:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(refused))
        return "what torch's weights-only loader refuses" + (f" ({detail[1]})" if detail else "")
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"the Python object(s) {shown}"
