"""What the hardware runs natively: bf16 matrix products are fast on a GPU and on CPUs with Intel AMX
or AVX512-BF16, and emulated (far slower than float32) on other CPUs."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: an accelerator (a GPU), or a CPU whose flags
    (``cpuinfo``, Linux's) name Intel AMX or AVX512-BF16; on other CPUs bf16 is emulated, slower than float32."""
    if device.type != "cpu":
        return True
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None
