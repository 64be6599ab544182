"""Client sharding over DDP processes: each rank trains its share of the sampled
clients; the uploads are then combined so that every rank holds the same server state.

Lightning's DDP would wrap the module in DistributedDataParallel and average every gradient over
the ranks; here clients on different ranks train independently, so `ClientShardingStrategy` keeps
Lightning's process group, launcher and rank bookkeeping but skips the wrapper.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


class Ranks:
    """The processes of a run (one, outside DDP) and the collectives the orchestrator needs."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0

    def shard(self, clients: list[int], sizes: list[int]) -> list[int]:
        """This rank's clients, in the order given: the largest client goes to the least loaded
        rank first, so ranks get about the same number of samples to train on."""
        if self.size == 1:
            return list(clients)
        load = [0] * self.size
        owner = {}
        for size, client in sorted(zip(sizes, clients, strict=True), key=lambda sc: -sc[0]):
            owner[client] = min(range(self.size), key=load.__getitem__)
            load[owner[client]] += size
        return [c for c in clients if owner[c] == self.rank]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, items: list) -> list:
        """Every rank's `items` (picklable; tensors on the CPU), concatenated in rank order."""
        if not self.distributed:
            return list(items)
        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]


class ClientShardingStrategy(DDPStrategy):
    """`trainer=ddp`: one process per device, no DistributedDataParallel wrapper (the orchestrator
    shards clients over the ranks and combines their uploads itself)."""

    def configure_ddp(self) -> None:
        pass  # keep the plain module: gradients must stay with the client that computed them

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def teardown(self) -> None:
        super().teardown()
        if isinstance(self._launcher, _HydraJobLauncher):
            self._launcher.restore_environment()


class _HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts the other local ranks as `python -m src.run <this job's overrides>` writing into this
    job's folder. Lightning's own launcher repeats the whole command line, which inside a Hydra
    multirun would start the whole sweep again in every child."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # not started through Hydra: Lightning's way
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        env = self.cluster_environment
        ddp_env = dict(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        self._saved_env = {name: os.environ.get(name) for name in ddp_env}
        os.environ.update(ddp_env)
        self.procs = [
            subprocess.Popen(
                _job_command(HydraConfig.get()),
                env=os.environ | {"LOCAL_RANK": str(local_rank)},
                cwd=HydraConfig.get().runtime.cwd,
            )
            for local_rank in range(1, self.num_processes)
        ]

    def restore_environment(self) -> None:
        """Undo the DDP variables set for this job: with LOCAL_RANK left set, the next job of a
        sweep would take itself for a child process and wait for a rank 0 that never comes."""
        for name, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}


def _job_command(hydra_config) -> list[str]:
    """This Hydra job alone, as a single run in the same output folder; the children write neither
    `.hydra/` nor a log file (rank 0 does both) and print only warnings and errors."""
    import __main__

    entry = __main__.__spec__.name if getattr(__main__, "__spec__", None) else "src.run"
    output_dir = hydra_config.runtime.output_dir.replace("'", r"\'")
    return [
        sys.executable,
        "-m",
        entry,
        f"--config-name={hydra_config.job.config_name}",
        *hydra_config.overrides.task,
        f"hydra.run.dir='{output_dir}'",
        "hydra.mode=RUN",  # one run even when a preset asks for a sweep (hparams_search)
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
    ]


class RoundExchange:
    """Where a round's client results go. In one process: straight into the server and the
    client state store. Under DDP, after every rank has run its clients: sums are combined by
    `all_reduce` (mean aggregators); servers that need the uploads themselves (stack, svd,
    median, krum, clustering) get every rank's uploads by `all_gather`, added in sampled order on
    every rank; the private states are gathered too, so every rank's store holds every client."""

    def __init__(self, server, store, ranks: Ranks, device: torch.device, sampled: list[int]):
        self.server, self.store, self.ranks, self.device = server, store, ranks, device
        self.sampled = set(sampled)  # the clients whose uploads are aggregated
        self.gather_uploads = ranks.distributed and not server.sums_uploads
        self.uploads: list[tuple[int, float, dict]] = []
        self.private: list[tuple[int, dict]] = []

    def takes_upload(self, client_id: int) -> bool:
        """False for a client that trained without being sampled (Algorithm.trains_unsampled):
        it keeps its private state and sends nothing."""
        return client_id in self.sampled

    def add(self, client_id: int, upload: dict, weight: float, private: dict | None) -> None:
        if self.takes_upload(client_id):
            if self.gather_uploads:  # the upload views the resident model: copy it out now
                self.uploads.append((client_id, weight, _to_cpu(upload)))
            else:
                self.server.add(upload, weight, client_id)
        if private is None:
            return
        if self.ranks.distributed:
            self.private.append((client_id, _to_cpu(private)))
        else:
            self.store.save(client_id, private)

    def finish(self, sampled: list[int]) -> None:
        """Combine the ranks' results, then the server step (identical on every rank)."""
        if self.ranks.distributed:
            if self.gather_uploads:
                position = {client: i for i, client in enumerate(sampled)}
                for client_id, weight, upload in sorted(
                    self.ranks.gather(self.uploads), key=lambda item: position[item[0]]
                ):
                    on_device = {n: t.to(self.device) for n, t in upload.items()}
                    self.server.add(on_device, weight, client_id)
            else:
                self.server.all_reduce(self.ranks)
            for client_id, private in self.ranks.gather(self.private):
                self.store.save(client_id, private)
        self.server.finish()


def _to_cpu(tensors: dict) -> dict:
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def end_process_group() -> None:
    """Close the DDP process group, if any (each job of a sweep starts its own)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
