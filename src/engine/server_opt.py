"""The server optimiser (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2),
the config group `server_opt` (conf/server_opt/: sgd, adam, yogi, adagrad). The server owns it
(src/engine/server.py); the algorithm's server rule decides what it steps.

The server treats delta = aggregate - theta as a pseudo-gradient and applies
  sgd:     theta <- theta + lr * m,  m = momentum * m + delta   (momentum 0: plain; > 0: FedAvgM)
  adam:    m = b1 m + (1 - b1) delta,  v = b2 v + (1 - b2) delta^2                 (FedAdam)
  yogi:    m as adam,  v = v - (1 - b2) delta^2 sign(v - delta^2)                   (FedYogi)
  adagrad: m as adam,  v = v + delta^2                                              (FedAdagrad)
           and then theta <- theta + lr * m / (sqrt(v) + eps)   (eps is the paper's tau).
m and v start at 0 (as Flower's strategies; the paper allows any v_{-1} >= tau^2, a difference of
at most tau^2 = 1e-6 in v). The paper has no bias correction; `bias_correction=True` divides m by
1 - b1^t and v by 1 - b2^t (adam, yogi; adagrad's v is a plain sum), as Adam / Yogi do.
lr = 1 with sgd and no momentum makes theta the aggregate itself (copied exactly).
"""

from __future__ import annotations

import torch

from src.errors import ConfigError

TensorDict = dict[str, torch.Tensor]
OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")


class ServerOptimizer:
    def __init__(
        self,
        name: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        bias_correction: bool = False,
    ):
        if name not in OPTIMIZERS:
            raise ConfigError(f"server_opt must be one of {', '.join(OPTIMIZERS)}; got {name}")
        if lr <= 0:
            raise ConfigError(f"server_opt.lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"server_opt.momentum must be in [0, 1), got {momentum}")
        if name != "sgd" and momentum:
            raise ConfigError(
                f"server_opt.momentum={momentum} is for server_opt=sgd (FedAvgM); "
                f"server_opt={name} uses server_opt.betas"
            )
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"server_opt.betas must be two numbers in [0, 1), got {betas}")
        if eps <= 0:
            raise ConfigError(f"server_opt.eps must be > 0, got {eps}")
        if bias_correction and name == "sgd":
            raise ConfigError(
                "server_opt.bias_correction=true is for server_opt=adam, yogi or adagrad; "
                "server_opt=sgd has no moment estimates to correct"
            )
        self.lr, self.momentum, self.opt = lr, momentum, name
        self.betas, self.eps = tuple(float(b) for b in betas), eps
        self.bias_correction = bool(bias_correction)
        self.buffers: dict[str, TensorDict] = {"m": {}, "v": {}}
        self.steps = 0  # server steps taken (t of the bias correction)

    @property
    def plain(self) -> bool:
        return self.opt == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    @torch.no_grad()
    def step(self, state: TensorDict, aggregate: TensorDict) -> None:
        """Move every tensor of `state` (in place) towards `aggregate`."""
        self.steps += 1
        for name, theta in state.items():
            if self.plain:
                theta.copy_(aggregate[name])
                continue
            delta = aggregate[name].to(theta.dtype) - theta
            m = self.buffers["m"].setdefault(name, torch.zeros_like(theta))
            if self.opt == "sgd":
                m.mul_(self.momentum).add_(delta)
                theta.add_(m, alpha=self.lr)
                continue
            b1, b2 = self.betas
            v = self.buffers["v"].setdefault(name, torch.zeros_like(theta))
            m.mul_(b1).add_(delta, alpha=1 - b1)
            square = delta * delta
            if self.opt == "adam":
                v.mul_(b2).add_(square, alpha=1 - b2)
            elif self.opt == "yogi":
                v.sub_((1 - b2) * square * torch.sign(v - square))
            else:  # adagrad
                v.add_(square)
            lr, v_hat = self.lr, v
            if self.bias_correction:
                lr = lr / (1 - b1**self.steps)
                if self.opt != "adagrad":
                    v_hat = v / (1 - b2**self.steps)
            theta.addcdiv_(m, v_hat.sqrt().add_(self.eps), value=lr)

    def state_dict(self) -> dict:
        return {"buffers": self.buffers, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = state["buffers"]
        self.steps = state.get("steps", 0)
