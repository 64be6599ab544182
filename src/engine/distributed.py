"""Client sharding over DDP processes: each rank trains its share of the sampled
clients; the uploads are then combined so that every rank holds the same server state.

Lightning's DDP would wrap the module in DistributedDataParallel and average every gradient over
the ranks; here clients on different ranks train independently, so `ClientShardingStrategy` keeps
Lightning's process group, launcher and rank bookkeeping but skips the wrapper.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from src.contract.ranks import Ranks


class ClientShardingStrategy(DDPStrategy):
    """`trainer=ddp`: one process per device, no DistributedDataParallel wrapper (the orchestrator
    shards clients over the ranks and combines their uploads itself). `fork=True` (the automatic
    CPU layout, src/engine/layout.py): the other ranks are forked from this process when fitting starts,
    so they share its memory (libraries, data, model) instead of building everything again."""

    def __init__(self, *args, fork: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fork = fork

    def configure_ddp(self) -> None:
        pass  # keep the plain module: gradients must stay with the client that computed them

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self.fork and not self.cluster_environment.creates_processes_externally:
            self._launcher = _ForkLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
        elif isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def teardown(self) -> None:
        super().teardown()
        if isinstance(self._launcher, _HydraJobLauncher):  # _ForkLauncher too
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
        self._export_ddp_env()
        self.procs = [
            subprocess.Popen(
                _job_command(HydraConfig.get()),
                env=os.environ | {"LOCAL_RANK": str(local_rank)},
                cwd=HydraConfig.get().runtime.cwd,
            )
            for local_rank in range(1, self.num_processes)
        ]

    def _export_ddp_env(self) -> None:
        """This job's process-group variables (rank 0's), which the other ranks inherit; kept to
        be undone at teardown."""
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

    def restore_environment(self) -> None:
        """Undo the DDP variables set for this job: with LOCAL_RANK left set, the next job of a
        sweep would take itself for a child process and wait for a rank 0 that never comes."""
        for name, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}


JOIN_GRACE_S = 10.0  # after rank 0 failed, how long the forked ranks get to stop by themselves


class _ForkLauncher(_HydraJobLauncher):
    """Ranks 1..P-1 are forked from rank 0 at the start of fitting and run the same fit; each ends
    its process when the fit returns (it must never go back into the caller, e.g. the next job of
    a sweep). They run on one thread: a process forked after OpenMP threads were used hangs in its
    next parallel region (GNU OpenMP), so the automatic layout only forks for P x 1."""

    def launch(self, function, *args, trainer=None, **kwargs):
        self._export_ddp_env()
        self.procs = []
        # The collector writes to every object it scans, which would copy each page of Python
        # objects fork made shared into each rank (~130-360 MB a rank, measured): the objects that
        # exist now are left out of collection until the fit ends.
        gc.freeze()
        for local_rank in range(1, self.num_processes):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_forked_rank(local_rank, function, args, kwargs)
            self.procs.append(_ForkedRank(pid))
        try:
            result = function(*args, **kwargs)
        except BaseException:
            self.join(grace_s=JOIN_GRACE_S)  # they stop too (signal) or are stopped
            raise
        finally:
            gc.unfreeze()  # collected again (e.g. between the jobs of a sweep)
        self.join()
        return result

    def join(self, grace_s: float | None = None) -> None:
        """Wait for the forked ranks, which end with the fit. After a failure here (`grace_s`
        given) a rank still running after `grace_s` seconds waits for a collective that will
        never come: it is killed. Without one, a rank that failed is an error here."""
        deadline = None if grace_s is None else time.monotonic() + grace_s
        for proc in self.procs:
            while deadline is not None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if deadline is not None and proc.poll() is None:
                proc.kill()
            proc.wait()
        failed = [proc for proc in self.procs if proc.returncode != 0]
        self.procs = []
        if failed and grace_s is None:
            codes = ", ".join(f"pid {p.pid}: exit code {p.returncode}" for p in failed)
            raise RuntimeError(f"a forked rank failed ({codes}); its error is printed above")


def _run_forked_rank(local_rank: int, function, args, kwargs) -> None:
    """The body of a forked rank: fit as rank `local_rank` on one thread, then end the process."""
    import logging
    import traceback

    code = 0
    try:
        os.environ["LOCAL_RANK"] = str(local_rank)
        torch.set_num_threads(1)
        logging.disable(logging.INFO)  # rank 0 logs the run; the others warnings and errors only
        function(*args, **kwargs)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:  # noqa: BLE001  printed, then the exit code says it failed
        from src.errors import RunInterrupted

        code = error.exit_code if isinstance(error, RunInterrupted) else 1
        if code == 1:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _ForkedRank:
    """A forked rank with the part of `subprocess.Popen` the launcher uses (Lightning's `kill`
    calls `send_signal`)."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


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
