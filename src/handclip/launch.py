"""One training job on several processes (Lightning's DDP), also as a job of a Hydra sweep.

Lightning starts the other processes of a job on a machine by running the same command again
(``sys.argv``, with ``hydra.run.dir`` set to the job's folder: ``_hydra_subprocess_cmd``). Two things
make that command wrong inside a Hydra sweep, and this module deals with both:

* under ``-m`` (the basic launcher runs the jobs one after the other in this process) ``sys.argv`` is
  the whole sweep, so each new process would run every job of it: :func:`ddp_job` makes it this job's
  own command (its overrides, without ``-m``) while Lightning starts the processes, and closes the job's
  process group when it ends (the next job starts its own);
* under the submitit launchers the command is submitit's, not HandCLIP's: on SLURM the processes are
  SLURM's tasks (``tasks_per_node`` = devices, Lightning's SLURM environment) and nothing is re-run, but a
  ``submitit_local`` job runs one process, which cannot re-run itself: :func:`check_relaunch` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import pytorch_lightning as pl

from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

#: What Lightning's launcher sets in the environment of the process that starts the others.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
#: Hydra's command-line flags that take a value and describe the config (kept in a job's command line).
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _relaunches(trainer: pl.Trainer) -> bool:
    """True when Lightning will start this job's other processes by re-running the command line."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    launcher = trainer.strategy.launcher
    return (trainer.world_size > 1 and launcher is not None and not launcher.is_interactive_compatible
            and environment is not None and not environment.creates_processes_externally)


def check_relaunch(trainer: pl.Trainer) -> None:
    """Refuse a multi-process job whose command line is not HandCLIP's (a ``submitit_local`` job)."""
    import __main__

    main = getattr(getattr(__main__, "__spec__", None), "name", None)
    if _relaunches(trainer) and main is not None and not main.startswith("handclip"):
        raise HandCLIPError(
            f"trainer.devices={trainer.num_devices} needs {trainer.world_size} processes, which Lightning starts by "
            f"re-running the command, but this job runs under {main!r} (launcher=local runs one process per job). "
            "Run multi-device jobs without launcher=local (`python -m handclip.train -m ...` runs a sweep's jobs "
            "one after the other), or on SLURM with launcher=slurm (one task per device)."
        )


def job_argv(argv: list[str], overrides: list[str]) -> list[str]:
    """``argv`` reduced to its config flags (``-cn``, ``-cp``, ``-cd``), then ``overrides``: no ``-m``, no sweep."""
    kept, pending = [argv[0]], False
    for token in argv[1:]:
        if pending:
            kept.append(token)
            pending = False
        elif token in _CONFIG_FLAGS:
            kept.append(token)
            pending = True
        elif token.startswith(tuple(f"{flag}=" for flag in _CONFIG_FLAGS)):
            kept.append(token)
    return kept + list(overrides)


@contextlib.contextmanager
def ddp_job(trainer: pl.Trainer) -> Iterator[None]:
    """Around ``trainer.fit`` of one job: ``sys.argv`` is the job's own command line when it is a job of a
    ``-m`` sweep, and at the end the job's process group is closed and the launcher's environment variables
    are restored, so that the sweep's next job (run in this same process by the basic launcher) starts
    processes and a process group of its own."""
    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    check_relaunch(trainer)
    original, environment = sys.argv, {k: os.environ.get(k) for k in _LAUNCH_VARIABLES}
    if _relaunches(trainer) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sys.argv = job_argv(original, [str(o) for o in HydraConfig.get().overrides.task])
        log.info("DDP processes of this sweep job run: %s", " ".join(sys.argv[1:]))
    try:
        yield
    finally:
        sys.argv = original
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # Lightning's launcher leaves LOCAL_RANK etc. in this process's environment, where the next job
        # would take them for processes started by someone else: restore them.
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_scale(trainer: pl.Trainer, batch_size: int) -> str | None:
    """A line saying how many processes train and what the global batch is (None for one process)."""
    if trainer.world_size <= 1:
        return None
    return (f"{trainer.world_size} processes ({trainer.num_nodes} node(s) x {trainer.num_devices} device(s)) x "
            f"data.batch_size {batch_size} = global batch {trainer.world_size * batch_size} per step")
