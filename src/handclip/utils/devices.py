"""Which device to compute on, and how many CPU cores this process may use."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from handclip.errors import HandCLIPError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that need it: prepare and synth use usable_cpus and answer --help and
# mistakes without loading it.


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - not Linux


def _cpuinfo(field: str) -> str | None:
    """The first processor's ``field`` in ``/proc/cpuinfo``; None where the OS does not list it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The instruction-set flags of the CPU (``/proc/cpuinfo``: avx2, avx512_vnni, avx512_bf16, amx_bf16...);
    empty where the OS does not list them."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string where the OS does not list it."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX-512 BF16 or AMX): only then does bf16 autocast pay."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; ``setting`` names the option in errors."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise HandCLIPError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HandCLIPError(f"{setting}={name} but CUDA is not available; use {setting}=cpu or auto")
    return device


def launched_as_rank_zero() -> bool:
    """False in the other processes of a multi-process run, before any process group exists.

    Lightning's own early rank (``rank_zero_only.rank``, from ``RANK``, ``LOCAL_RANK`` or ``SLURM_PROCID``)
    and ``NODE_RANK`` for the nodes of a run that Lightning's launcher starts on each node.
    """
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0


def _gpu_requested(accelerator: str) -> bool | None:
    """True for a CUDA accelerator, False for the CPU, None for others (Lightning checks those)."""
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "cpu":
        return False
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return None


def check_trainer_devices(accelerator: str, devices, setting: str = "trainer") -> None:
    """Refuse ``trainer.devices`` beyond what this machine has (GPUs, or CPU cores for CPU processes).

    ``devices`` is what Lightning takes: a count, ``-1``/``"auto"`` (all), or GPU indices (a list or
    ``"0,2"``). Under SLURM (or any launcher that starts the processes itself) CPU processes are not
    counted against this process's cores.
    """
    import torch

    gpu = _gpu_requested(str(accelerator).lower())
    if gpu is None or devices in (-1, "-1", "auto", None):
        return
    if gpu and not torch.cuda.is_available():
        raise HandCLIPError(f"{setting}.accelerator={accelerator} but no CUDA GPU is available here; "
                            f"use {setting}.accelerator=cpu (or auto)")
    indices: list[int] | None = None
    if isinstance(devices, str) and "," in devices:
        indices = [int(d) for d in devices.split(",") if d.strip()]
    elif not isinstance(devices, (int, str)):  # a list (or OmegaConf ListConfig) of GPU indices
        indices = [int(d) for d in devices]
    if gpu:
        count = torch.cuda.device_count()
        if indices is not None:
            missing = [i for i in indices if not 0 <= i < count]
            if missing:
                raise HandCLIPError(f"{setting}.devices={list(indices)} names GPU(s) {missing}, but this machine "
                                    f"has {count} GPU(s) (indices 0..{count - 1})")
        elif int(devices) > count:
            raise HandCLIPError(f"{setting}.devices={devices} but this machine has {count} GPU(s); "
                                f"use {setting}.devices={count} or fewer")
        return
    if indices is not None or int(devices) < 1:
        raise HandCLIPError(f"{setting}.devices={devices}: on the CPU, devices is a number of processes (>= 1)")
    external = any(k in os.environ for k in ("SLURM_NTASKS", "RANK", "LOCAL_RANK"))
    if not external and int(devices) > usable_cpus():
        raise HandCLIPError(
            f"{setting}.devices={devices} asks for {devices} training processes on the CPU, but this machine has "
            f"{usable_cpus()} usable core(s); use {setting}.devices={usable_cpus()} or fewer"
        )
