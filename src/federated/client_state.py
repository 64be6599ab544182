"""The client state store: what each client keeps between rounds.

Only the private tensors of clients that have trained are stored, each at its client's own size
(e.g. a rank-r_k LoRA B), on the CPU (pinned when a GPU is used, so copies back are fast). A client
that has never trained holds the initial private tensors, which are stored once for everyone.
Memory therefore grows with clients x private parameters, never clients x model.
"""

from __future__ import annotations

import torch

TensorDict = dict[str, torch.Tensor]


class ClientStateStore:
    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory
        self.initial: TensorDict = {}
        self.saved: dict[int, TensorDict] = {}

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
        if client_id in self.saved:  # reuse the client's buffers: no new allocation per round
            for name, tensor in tensors.items():
                self.saved[client_id][name].copy_(tensor.detach())
        else:
            self.saved[client_id] = self._copy(tensors)

    def load(self, client_id: int) -> TensorDict:
        """The client's private tensors as last saved, or the initial ones."""
        return self.saved.get(client_id, self.initial)

    def __len__(self) -> int:
        return len(self.saved)

    def state_dict(self) -> dict:
        return {"initial": self.initial, "saved": self.saved}

    def load_state_dict(self, state: dict) -> None:
        self.initial = dict(state["initial"])
        self.saved = {int(k): dict(v) for k, v in state["saved"].items()}
