"""Which device to run on, checked once for training and inference alike.

``resolve_device`` turns "auto", "cpu", "cuda" or "cuda:N" into a ``torch.device`` that exists on
this machine, or raises one ValueError naming the flag value (an unknown type such as "mps", CUDA
asked for where there is none, a GPU index past the last one). ``cuda_bf16_is_native`` says whether
a GPU computes in bfloat16 natively (Ampere and later), not by emulation.
"""
from __future__ import annotations

from typing import Union

import torch

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: Union[str, torch.device] = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is available, else cpu; "cuda" -> cuda:<local_rank>;
    "cpu" and "cuda:N" as given. ValueError for other device types or a GPU this machine lacks."""
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {str(name)!r} "
                         f"(device type {device.type!r} is not supported)")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {str(name)!r} requested but CUDA is not available on this machine (use cpu)")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ValueError(f"device: {device} requested but this machine has {count} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def cuda_bf16_is_native(device: Union[str, torch.device, None] = None) -> bool:
    """True when the CUDA GPU ``device`` (default: the current one) computes in bfloat16 natively:
    NVIDIA compute capability >= 8.0 (Ampere and later); on ROCm, what torch reports.

    Asked by capability, not by ``torch.cuda.is_bf16_supported()``, which by default also says
    True on V100/T4, where bf16 is emulated and slow (fp16 with loss scaling is the mixed
    precision to use there)."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8


def check_processes_fit(device: str, processes_per_machine: int) -> None:
    """ValueError when ``processes_per_machine`` training processes cannot each get a device:
    "cuda:N" names one GPU for all of them, or there are fewer GPUs than processes ("auto" or
    "cuda" with CUDA available). CPU processes (gloo) always fit."""
    if processes_per_machine <= 1:
        return
    if str(device).startswith("cuda:"):
        raise ValueError(f"device: {device!r} names one GPU, but {processes_per_machine} processes would share it; "
                         "use --device cuda (or auto): process k takes cuda:k")
    wants_cuda = str(device) == "cuda" or (str(device) == "auto" and torch.cuda.is_available())
    if wants_cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if processes_per_machine > count:
            raise ValueError(f"devices: {processes_per_machine} processes per machine need as many GPUs, "
                             f"this machine has {count}")
