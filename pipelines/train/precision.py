"""Mixed precision: what `precision: auto` means on a device, and the autocast context + GradScaler of
each precision. Torch only (no Ray), so the GPU check and tests use it without starting anything."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def auto_precision(cuda_capability: tuple[int, int] | None) -> str:
    """The precision "auto" means on a CUDA device of this compute capability (None: no GPU): bf16 from
    Ampere (8.0) on, whose tensor cores run it natively (no loss scaling needed); fp16 + GradScaler on
    older GPUs (V100 7.0, T4 7.5), where bf16 would only be emulated, many times slower; fp32 on CPU."""
    if cuda_capability is None:
        return "fp32"
    return "bf16" if tuple(cuda_capability) >= (8, 0) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return auto_precision(None)
    if torch.version.hip:  # ROCm GPUs run bf16 natively
        return "bf16"
    # Not torch.cuda.is_bf16_supported(): it says True on V100/T4 too (bf16 emulation counts by default).
    return auto_precision(torch.cuda.get_device_capability(device))


def amp_settings(precision: str, device: torch.device):
    """(autocast factory, GradScaler). fp16 autocast + loss scaling on CUDA; bf16 anywhere; fp16 requested
    on CPU falls back to fp32 (CPU fp16 matmuls are slow and unscaled gradients underflow)."""
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), torch.amp.GradScaler(
            enabled=False
        )
    if precision == "fp16" and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    if precision == "fp16":
        log.warning("precision fp16 needs a GPU; training in fp32 on %s", device)
    return contextlib.nullcontext, torch.amp.GradScaler(enabled=False)
