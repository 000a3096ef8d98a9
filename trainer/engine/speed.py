"""Speed switches of a training run: backend flags, memory format, compilation, autocast, scaler.

Owns how `runtime.cudnn_benchmark`, `runtime.tf32`, `runtime.channels_last`,
`runtime.compile_backbone`, `optim.amp` and `data.pin_memory` take effect. Every switch keeps the
CPU path correct: the CUDA-only ones (cuDNN autotuning, TF32, the fp16 grad scaler, pinned memory
with non-blocking copies) do nothing on CPU and say so at debug level; channels_last, backbone
compilation and bf16 autocast mean the same on both devices.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from trainer.config import DataConfig, RuntimeConfig
from trainer.errors import TrainerError

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (process-wide)."""
    # The legacy flags on purpose: torch >= 2.9's `fp32_precision` setters leave the legacy
    # getters (still read by some libraries) raising "mix of legacy and new APIs", while the
    # legacy setters keep both views consistent, and exist on every torch this project supports.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_backend_flags(rt: RuntimeConfig, device: torch.device) -> None:
    """cuDNN autotuning and TF32 on CUDA; nothing on CPU (no such kernels there)."""
    if device.type != "cuda":
        logger.debug("runtime.cudnn_benchmark=%s and runtime.tf32=%s are CUDA-only: no-ops on %s",
                     rt.cudnn_benchmark, rt.tf32, device)
        return
    torch.backends.cudnn.benchmark = rt.cudnn_benchmark
    set_tf32(rt.tf32)
    logger.debug("cudnn.benchmark=%s, tf32=%s", rt.cudnn_benchmark, rt.tf32)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    # The model's transform batches images into a contiguous NCHW tensor; converting it once here
    # keeps every backbone convolution in NHWC instead of converting at the first one.
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def prepare_model(model: nn.Module, rt: RuntimeConfig) -> nn.Module:
    """channels_last weights and backbone input, then the backbone compiled in place.

    Both keep parameter names and values, so checkpoints load either way. `Module.compile` (not
    `torch.compile(module)`) keeps the state-dict keys free of an `_orig_mod.` prefix. Call before
    wrapping in DDP.
    """
    backbone = getattr(model, "backbone", None)
    if (rt.channels_last or rt.compile_backbone) and not isinstance(backbone, nn.Module):
        raise TrainerError("runtime.channels_last/compile_backbone need a model with a .backbone module")
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_to_channels_last)
        logger.debug("channels_last: weights and backbone input in NHWC")
    if rt.compile_backbone:
        # dynamic=None: the first input shape compiles static; a second shape recompiles with
        # dynamic sizes, so varying detection batches do not recompile every time.
        backbone.compile(dynamic=None)
        logger.info("backbone compiled with torch.compile (the first iterations pay for compilation)")
    return model


def autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """Autocast to bf16/fp16 for `optim.amp`, or nothing for "none"."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 on CUDA only (bf16 has fp32's exponent range)."""
    enabled = amp == "fp16" and device.type == "cuda"
    if amp == "fp16" and not enabled:
        logger.debug("optim.amp=fp16 on %s: the grad scaler is CUDA-only, fp16 autocast runs unscaled", device)
    return torch.amp.GradScaler("cuda", enabled=enabled)


def pin_memory(dc: DataConfig, device: torch.device) -> bool:
    """Whether the loader pins batches (and the step copies them with non_blocking=True)."""
    if dc.pin_memory and device.type != "cuda":
        logger.debug("data.pin_memory is CUDA-only: no-op on %s", device)
    return dc.pin_memory and device.type == "cuda"


def persistent_workers(dc: DataConfig) -> bool:
    """Persistent loader workers, when there are workers at all (DataLoader rejects it otherwise)."""
    if dc.persistent_workers and dc.num_workers == 0:
        logger.debug("data.persistent_workers with data.num_workers=0: no workers to keep")
    return dc.persistent_workers and dc.num_workers > 0
