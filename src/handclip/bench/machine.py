"""What the benchmark ran on: CPU model and cores, device names and the result file's slug."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from handclip.utils.devices import cpu_model_name, usable_cpus
from handclip.utils.files import slug


def slugify(text: str) -> str:
    """'Intel(R) Xeon(R) Processor (2 cores)' -> 'intel-xeon-processor-2-cores'."""
    return slug(re.sub(r"\((r|tm|c)\)", "", text.lower()), allowed="a-z0-9", sep="-", default="unknown")


def cpu_info() -> dict:
    """Model name (and, on Linux, family/model/vector extensions) of the CPU."""
    info: dict[str, Any] = {"model_name": cpu_model_name()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    for key in ("vendor_id", "cpu family", "model", "stepping"):
        if key in fields:
            info[key.replace(" ", "_")] = fields[key]
    flags = set(fields.get("flags", "").split())
    info["vector_extensions"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_info()['model_name']} ({usable_cpus()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name stem of a device: 'nvidia-h100-80gb-hbm3', 'cpu-intel-xeon-processor-2-cores'."""
    return slugify(device_name(device))
