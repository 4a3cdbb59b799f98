"""Where and how the model runs: device, numeric precision, memory layout."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .errors import UsageError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must be a device torch knows and can use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N. Received: device={name!r}.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name!r} was asked for but CUDA is not available here; use --device cpu.")
    return device


@functools.cache
def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Native bf16 matrix instructions (AVX512_BF16 or AMX): only then is bf16 faster than fp32 on a CPU.

    ``cpuinfo`` is the text of /proc/cpuinfo, read when not given.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name: str, device: torch.device) -> str:
    """Resolve ``auto`` to ``bf16`` where the hardware runs it natively, else ``fp32``."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UsageError("precision=fp16 needs a CUDA device; on CPU use bf16 or fp32.")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def training_memory_format(device: torch.device, precision: str, image_size: int) -> torch.memory_format:
    """The layout training keeps activations in: channels-last (NHWC) or PyTorch's default NCHW.

    Channels-last is faster wherever it was measured except fp32 training on a CPU at large sizes (224 px slower,
    32 px faster; benchmarks/RESULTS.md, "Design measurements"); only those two sizes were measured, so the switch
    sits between them. bf16, fp16 and CUDA stay channels-last (their fast kernels want it).
    """
    if device.type != "cpu" or precision != "fp32" or image_size < 128:
        return torch.channels_last
    return torch.contiguous_format


# What cuDNN, cuBLAS and the caching allocator say when a device runs out of memory: only some of them raise
# torch.cuda.OutOfMemoryError; the others are plain RuntimeErrors naming their status.
_MEMORY_MESSAGES = ("out of memory", "alloc_failed", "cublas_status_not_initialized", "failed to allocate")
# What a broken device or context says: nothing later on that device can be trusted, so these are never retried.
_DEVICE_MESSAGES = ("cuda error", "cudaerror", "device-side assert", "illegal memory access", "launch failure")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the device ran out of memory (whatever library raised it)."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MEMORY_MESSAGES)


def device_failure(error: BaseException) -> bool:
    """Whether ``error`` is the device's failure (out of memory, a CUDA error) rather than the input's."""
    return out_of_memory(error) or (isinstance(error, RuntimeError) and any(
        m in str(error).lower() for m in _DEVICE_MESSAGES))  # fmt: skip
