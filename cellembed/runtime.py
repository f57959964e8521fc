"""Where and how training runs: the torch device and the precision of the ETM encoder's first layer."""

from __future__ import annotations

from pathlib import Path

DEVICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name):
    """``name`` when it is a device's syntax (`resolve_device` checks that it exists); else ValueError."""
    if isinstance(name, str) and (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        return name
    raise ValueError(f"unknown device {name!r}; use {DEVICES}")


def resolve_device(name):
    """A torch.device from ``--device``; ValueError with the fix when unusable.

    Parameters
    ----------
    name : str
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but torch sees no CUDA GPU; use cpu or auto")
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name} does not exist ({torch.cuda.device_count()} GPU(s)); use cuda:0")
    return torch.device(name)


def native_bf16(device):
    """Whether ``device`` multiplies bfloat16 matrices in hardware (else bf16 is emulated, slow)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell cheaply, stay exact
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def use_bf16(precision, device):
    """Whether the ETM encoder's first layer computes in bfloat16 for ``--precision`` on ``device``.

    Parameters
    ----------
    precision : str
        ``auto`` (bf16 where `native_bf16`), ``bf16`` or ``fp32``.
    device : torch.device
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))
