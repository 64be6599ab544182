"""The client state store: what each client keeps between rounds.

Only the private tensors of clients that have trained are stored, each at its client's own size
(e.g. a rank-r_k LoRA B), on the CPU (pinned when a GPU is used, so copies back are fast). A client
that has never trained holds the initial private tensors, which are stored once for everyone.
Memory therefore grows with clients x private parameters, never clients x model.

Memory budget (`fl.client_state_memory_gb`): beyond it the least recently used clients' tensors
go to disk, one immutable safetensors file per client and version
(`<output_dir>/client_state/client_<id>_v<n>.safetensors`, n counting up over the run), and come
back when the client is loaded. Host memory stays within the budget plus one client's tensors.

Checkpoints: while the clients' tensors are few (at most `inline_bytes`, 64 MB, in memory and
none on disk), `state_dict` holds the tensors themselves: a small federation's checkpoint is
self-contained. Beyond that it writes the clients changed since the last checkpoint as new
versions (they stay in memory) and lists every client's file by name, so a checkpoint costs the
changed clients, not the federation nor the budget. A version is deleted once no checkpoint can refer to it:
the one that replaces it is referred to by the newest checkpoint, and the checkpoint before that
(the one on disk while the newest is written) has been replaced too. A resumed run (resume=auto)
finds the files in its own folder; one resumed from another run's checkpoint reads (and never
deletes) that run's files.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from src.errors import ConfigError

TensorDict = dict[str, torch.Tensor]

SUFFIX = ".safetensors"
_VERSION = re.compile(r"client_(\d+)_v(\d+)\.safetensors(\.partial)?")


def nbytes(tensors: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ClientStateStore:
    """`memory_gb`: host memory for the clients' tensors (None: no limit, nothing on disk);
    `folder`: where the tensors beyond it go (needed with a budget)."""

    inline_bytes = 64_000_000  # client tensors a checkpoint holds itself, when none are on disk

    def __init__(
        self,
        pin_memory: bool = False,
        memory_gb: float | None = None,
        folder: str | Path | None = None,
    ):
        if memory_gb is not None and folder is None:
            raise ValueError("a client state memory budget needs a folder to spill to")
        self.pin_memory = pin_memory
        self.budget = None if memory_gb is None else int(memory_gb * 1e9)
        self.folder = None if folder is None else Path(folder).resolve()
        self.initial: TensorDict = {}
        # in host memory, least recently used first; a client here without an entry in `files`
        # has changed since it was last written (or never was)
        self.saved: OrderedDict[int, TensorDict] = OrderedDict()
        self.files: dict[int, Path] = {}  # each client's newest version on disk, if any
        self.resident_bytes = 0
        self.version = 0  # the next file's version number
        self.written = 0  # files written (spills and checkpoints), for benchmarks and tests
        self._opened = False
        # versions the last state_dict referred to (its checkpoint is on disk), and those only
        # the one before referred to (deleted at the next state_dict, once it is replaced)
        self.checkpointed: set[Path] = set()
        self.pending: set[Path] = set()

    # ------------------------------------------------------------------ memory
    def _copy(self, tensors: TensorDict) -> TensorDict:
        out = {}
        for name, tensor in tensors.items():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin_memory)
            out[name] = host.copy_(tensor.detach())
        return out

    def set_initial(self, tensors: TensorDict) -> None:
        """What a client that has not trained yet holds (the freshly built model's tensors)."""
        self.initial = self._copy(tensors)

    def save(self, client_id: int, tensors: TensorDict) -> None:
        """Keep a copy of the client's private tensors (read from the resident model)."""
        if client_id in self.files:  # its file is now an old version
            self._retire(self.files.pop(client_id))
        if client_id in self.saved:  # reuse the client's buffers: no new allocation per round
            for name, tensor in tensors.items():
                self.saved[client_id][name].copy_(tensor.detach())
            self.saved.move_to_end(client_id)
        else:
            self._keep(client_id, self._copy(tensors))

    def load(self, client_id: int) -> TensorDict:
        """The client's private tensors as last saved (read back from disk if they were spilled),
        or the initial ones. Read only: the store keeps them."""
        if client_id in self.saved:
            self.saved.move_to_end(client_id)
            return self.saved[client_id]
        if client_id in self.files:
            tensors = self._read(self.files[client_id])
            self._keep(client_id, tensors)
            return tensors
        return self.initial

    def clients(self) -> set[int]:
        """Every client that holds a state of its own (in memory or on disk)."""
        return set(self.saved) | set(self.files)

    def __len__(self) -> int:
        return len(self.clients())

    def _keep(self, client_id: int, tensors: TensorDict) -> None:
        self.saved[client_id] = tensors
        self.resident_bytes += nbytes(tensors)
        self._evict(keep=client_id)

    def _evict(self, keep: int | None) -> None:
        """Least recently used first, until the rest fits the budget (`keep` stays)."""
        if self.budget is None:
            return
        while self.resident_bytes > self.budget:
            victim = next((c for c in self.saved if c != keep), None)
            if victim is None:  # `keep` alone is over the budget: it stays until the next one
                return
            if victim not in self.files:  # changed since it was last written
                self.files[victim] = self._write(victim, self.saved[victim])
            self.resident_bytes -= nbytes(self.saved.pop(victim))

    # ------------------------------------------------------------------ files
    def _open(self) -> None:
        """Create the folder once; versions found there (an earlier run's, or this run's since
        its checkpoint) may be referred to by the checkpoint on disk: count past them, and treat
        them as checkpointed (deleted after this run's second checkpoint if unused)."""
        if self._opened:
            return
        self._opened = True
        self.folder.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.folder):
            found = _VERSION.fullmatch(entry.name)
            if found is None or not entry.is_file():
                continue
            path = self.folder / entry.name
            if found.group(3):  # a write that was cut off: no checkpoint refers to it
                path.unlink()
                continue
            self.version = max(self.version, int(found.group(2)) + 1)
            self.checkpointed.add(path)

    def _write(self, client_id: int, tensors: TensorDict) -> Path:
        self._open()
        path = self.folder / f"client_{client_id}_v{self.version}{SUFFIX}"
        self.version += 1
        partial = path.with_name(path.name + ".partial")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(partial))
        os.replace(partial, path)  # a kill mid-write leaves no truncated version behind
        self.written += 1
        return path

    def _read(self, path: Path) -> TensorDict:
        # load_file's tensors map the file: copied out, so a version's file is never in use
        return self._copy(load_file(str(path)))

    def use_rank(self, rank: int) -> None:
        """Under DDP every rank keeps every client: the ranks besides 0 spill to a folder of their
        own (only rank 0's files are referred to by checkpoints)."""
        if rank > 0 and self.folder is not None:
            self.folder = self.folder / f"rank{rank}"

    def _own(self, path: Path) -> bool:
        return self.folder is not None and path.parent == self.folder

    def _retire(self, path: Path) -> None:
        """An old version: deleted now unless a checkpoint may refer to it (then at a later
        state_dict). Another run's files are never deleted."""
        if self._own(path) and path not in self.checkpointed and path not in self.pending:
            path.unlink()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """For the checkpoint about to be written (each call assumes the previous one's result
        was written). Beyond `inline_bytes` or once the store has spilled, the changed clients
        are written as new versions (they stay in memory) and every client is listed by name."""
        if self.files or (self.folder is not None and self.resident_bytes > self.inline_bytes):
            for client_id, tensors in self.saved.items():
                if client_id not in self.files:
                    self.files[client_id] = self._write(client_id, tensors)
        referred = set(self.files.values())
        for path in self.pending:  # the checkpoint that referred to them has been replaced
            path.unlink()
        self.pending = {p for p in self.checkpointed if p not in referred}
        self.checkpointed = {p for p in referred if self._own(p)}
        return {
            "initial": self.initial,
            "saved": {c: t for c, t in self.saved.items() if c not in self.files},
            "files": {c: self._name(p) for c, p in self.files.items()},
            "folder": "" if self.folder is None else str(self.folder),
            "next_version": self.version,
        }

    def _name(self, path: Path) -> str:
        """A version in this store's folder by name (the folder may move with its run)."""
        return path.name if self._own(path) else str(path)

    def load_state_dict(self, state: dict) -> None:
        self.initial = dict(state["initial"])
        self.saved, self.files, self.resident_bytes = OrderedDict(), {}, 0
        self.version = max(self.version, int(state.get("next_version", 0)))
        then = Path(state["folder"]) if state.get("folder") else None
        # names resolve in the folder they were written to; if that folder is gone (the run was
        # moved), in this store's folder
        base = then if then is not None and then.is_dir() else self.folder
        missing = []
        for client_id, name in state.get("files", {}).items():
            path = Path(name) if Path(name).is_absolute() else Path(base or ".") / name
            if not path.is_file():
                missing.append(str(path))
            self.files[int(client_id)] = path
        if missing:
            raise ConfigError(
                f"resume: the checkpoint's client states refer to {len(missing)} missing "
                f"file(s), e.g. {missing[0]}; a checkpoint needs the client_state/ folder it was "
                "written with (use resume=never to start over)"
            )
        if self.folder is not None and (self.files or self.folder.is_dir()):
            self._open()  # count past the versions there; delete the unused ones later
        self.checkpointed |= {p for p in self.files.values() if self._own(p)}
        for client_id, tensors in state["saved"].items():
            self.saved[int(client_id)] = dict(tensors)
            self.resident_bytes += nbytes(tensors)
        self._evict(keep=None)
