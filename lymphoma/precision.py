"""Which precision runs: bf16 only where the hardware computes it. On a CPU without bf16 units (avx512_bf16 or AMX)
PyTorch emulates bf16, and a model runs several times slower than in float32 (the reduced DenseNet's tile 9.3x, its
training step 8.2x on a 2-core AMD EPYC with AVX2 only; bench/results/predict-reinhard-image-tasks2-avx2.json)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BF16_UNITS = "avx512_bf16 or AMX"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (avx512_bf16 or AMX): bf16 autocast pays there, elsewhere
    PyTorch emulates it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def emulated_bf16(device: torch.device) -> bool:
    """Whether bf16 on ``device`` would be emulated: a CPU without bf16 units."""
    return device.type == "cpu" and not cpu_has_bf16()


def runnable_precision(precision: str, device: torch.device) -> str:
    """``precision`` (predict.precision, for torch and compile) where the device runs it at hardware speed; bf16 on
    a CPU without bf16 units is fp32, with a warning (the same outputs as fp32, at fp32's speed, where emulation
    would take several times as long)."""
    if precision == "bf16" and emulated_bf16(device):
        log.warning(f"predict.precision=bf16: this CPU has no bf16 units ({BF16_UNITS}), where PyTorch emulates "
                    "bf16 several times slower than fp32 (9x for the reduced DenseNet on an AVX2 CPU): running fp32")
        return "fp32"
    return precision
