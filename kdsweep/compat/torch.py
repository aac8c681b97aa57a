"""Private parts of torch that kdsweep uses, each with why (see ``kdsweep.compat``). Where one is
missing, kdsweep takes the safe answer."""

from __future__ import annotations

import torch


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tile units for bf16 (Intel Xeon from Sapphire Rapids on), where
    oneDNN multiplies bf16 matrices several times faster than fp32 ones. Without them, bf16 is
    converted and multiplied in fp32: bf16 autocast trained a 40M-parameter student 7.7 times
    slower than fp32 on an AVX2 CPU (``benchmarks/precision.py``). torch answers through
    ``torch.cpu._is_amx_tile_supported`` (private; torch 2.13); a torch without it: False."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())
