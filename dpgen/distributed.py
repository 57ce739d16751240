"""Which processes a run has, and which of them does what.

``trainer.strategy=ddp`` runs the DP-SGD stages on ``trainer.devices`` processes per node
(``trainer.num_nodes`` nodes). The processes come from one of two launch modes:

- **spawn** (one ``python -m dpgen`` process, the default): each DP-SGD stage starts its
  worker processes with ``torch.multiprocessing`` (start method ``spawn``), and rank 0's
  weights and ledger come back to the process that started them. Everything else (planning,
  public pretraining, sampling, evaluation, every file) happens once, in that one process.
  This works inside any Hydra launcher, ``-m`` included: a spawned worker imports
  ``dpgen.__main__`` without running it. Lightning's default DDP launch re-executes
  ``sys.argv`` once per extra rank, which under ``-m`` would start the whole sweep again in
  every rank, so it is never used.
- **external**: a cluster launcher already started one process per device (``srun`` under
  SLURM, which Lightning reads through its SLURM environment; ``torchrun``; submitit's local
  executor with ``tasks_per_node > 1``). Every process runs the pipeline, but rank 0 alone
  runs the stages that are not DP-SGD stages and writes every file; the other ranks wait
  for those stages to finish (``stages.json``), then join the DP-SGD stages.

Non-private stages (public pretraining, non-private training) always run in one process on
one device: they are cached or cheap next to DP-SGD, and one process keeps batch sizes and
the cache simple.
"""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig

from dpgen.checks import require_int
from dpgen.errors import ConfigError

STRATEGIES = ("single_device", "ddp")
ACCELERATORS = ("cpu", "gpu")


def is_ddp(trainer_cfg: DictConfig) -> bool:
    return trainer_cfg.get("strategy", "single_device") == "ddp"


def _slurm_tasks() -> int:
    """The tasks of this srun step, when SLURM started this process as one of several; else 0."""
    # srun sets the step's own task count; a batch script's single process sees only the job's.
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1"))
    if tasks <= 1:
        return 0  # decided without importing Lightning (seconds), as on every machine outside SLURM
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return tasks if SLURMEnvironment.detect() else 0


def external_world() -> tuple[int, int] | None:
    """``(rank, world size)`` when a launcher started this process as one of several ranks."""
    if tasks := _slurm_tasks():
        return int(os.environ["SLURM_PROCID"]), tasks
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def launch_id() -> str | None:
    """A name that every rank of this external launch shares and a later launch does not, fit
    for a file name; None when no launcher started several ranks. SLURM: job, step and requeue
    count. torchrun: its run id (a fresh one under ``--standalone``, "none" unless
    ``--rdzv-id`` is given), with the rendezvous address and the local submitit job. Plain
    torchrun relaunched at the same address gets the same name: see the README on its limits.
    (torchrun's restart count is left out: each node's agent counts its own.)"""
    if external_world() is None:
        return None
    env = os.environ
    if _slurm_tasks():
        parts = ["slurm", env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID"), env.get("SLURM_RESTART_COUNT", "0")]
    else:
        parts = ["torch", env.get("TORCHELASTIC_RUN_ID"), env.get("SUBMITIT_LOCAL_JOB_ID"),
                 env.get("MASTER_ADDR"), env.get("MASTER_PORT")]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(p or "" for p in parts))


def export_submitit_local_ranks() -> None:
    """submitit's local executor starts ``tasks_per_node`` processes but tells only submitit
    which rank each is; export torch.distributed's variables so that Lightning sees them too.
    (Under SLURM, Lightning reads SLURM's own variables.)"""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2:
        return
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    rank_zero_only.rank = env.rank


def process_rank() -> int:
    """This process's rank: 0 unless an external launcher started several."""
    world = external_world()
    return world[0] if world else 0


def is_rank_zero() -> bool:
    return process_rank() == 0


def validate_trainer_config(t: DictConfig) -> None:
    if t.accelerator not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", t.accelerator, "unknown accelerator",
                          f"use one of {', '.join(ACCELERATORS)} (trainer=cpu, gpu, ddp or ddp_cpu)")
    strategy = t.get("strategy", "single_device")
    if strategy not in STRATEGIES:
        raise ConfigError("trainer.strategy", strategy, "unknown strategy", f"use one of {', '.join(STRATEGIES)}")
    for key in ("devices", "num_nodes", "log_every_n_steps", "checkpoint_every_n_steps"):
        require_int(t, "trainer", key, minimum=1)
    world = external_world()
    if strategy != "ddp":
        if t.devices * t.num_nodes > 1:
            raise ConfigError("trainer.devices", t.devices, "several devices need trainer.strategy=ddp",
                              "use trainer=ddp (GPUs) or trainer=ddp_cpu, or trainer.devices=1")
        if world is not None:
            # Each process would run its own DP-SGD on the whole sensitive set, with its own noise,
            # and the ledger would count only one of them.
            raise ConfigError("trainer.strategy", strategy, f"the launcher started {world[1]} processes, and "
                              "without DDP each would train on the sensitive data uncounted",
                              f"use trainer=ddp (or ddp_cpu) with trainer.devices x trainer.num_nodes = {world[1]}, "
                              "or start one process (in a SLURM allocation of several tasks: srun -n 1)")
        return
    if world is None and t.num_nodes > 1:
        raise ConfigError("trainer.num_nodes", t.num_nodes, "several nodes need one process per device, "
                          "started by the cluster", "launch with hydra/launcher=slurm (or srun/torchrun)")
    if world is not None and world[1] != t.devices * t.num_nodes:
        raise ConfigError("trainer.devices", t.devices, f"the launcher started {world[1]} processes, but "
                          f"trainer.devices x trainer.num_nodes = {t.devices * t.num_nodes}",
                          "set hydra.launcher.tasks_per_node=trainer.devices and nodes=trainer.num_nodes")


def sampling_device(t: DictConfig) -> str:
    """Where a stage that runs outside Lightning (sampling, evaluation) puts its networks: the
    trainer's GPU when there is one."""
    import torch

    return "cuda" if t.accelerator == "gpu" and torch.cuda.is_available() else "cpu"


def check_devices_present(t: DictConfig) -> None:
    """This machine has the GPUs the config asks for. Not part of validating a config, which
    may be composed on one machine to run on another; checked where a run starts, before its
    privacy plan, instead of failing at its first GPU stage."""
    if t.accelerator != "gpu":
        return
    import torch

    present = torch.cuda.device_count()
    needed = 1 if external_world() is not None else t.devices  # a launched process uses one device
    if present < needed:
        raise ConfigError("trainer.accelerator", t.accelerator, f"{needed} CUDA device(s) asked for, this machine "
                          f"has {present}", "use trainer=cpu (or ddp_cpu), or run on a machine with GPUs")


def ddp_strategy_kwargs(t: DictConfig) -> dict[str, Any]:
    """Keyword arguments of Lightning's ``DDPStrategy`` for this launch mode."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    # trainer=cpu/gpu with trainer.strategy=ddp overridden carry no backend of their own.
    backend = t.get("process_group_backend") or ("nccl" if t.accelerator == "gpu" else "gloo")
    kwargs: dict[str, Any] = {"process_group_backend": backend}
    if external_world() is None:
        # Our own environment: under a one-task SLURM allocation Lightning would otherwise
        # read SLURM's (single) rank in every spawned worker.
        kwargs.update(start_method="spawn", cluster_environment=LightningEnvironment())
    else:
        kwargs.update(start_method="popen")  # processes exist already: Lightning launches none
    return kwargs
