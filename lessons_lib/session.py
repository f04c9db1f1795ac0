"""Explicit set-up for a lesson: seeding, device choice, known-noise filters, machine facts.

Nothing here runs at import time; a notebook calls these in its first code cell.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import warnings
from typing import Iterator

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")

# Messages that every lesson would otherwise print dozens of times. Each entry is a regex matched
# against the start of the warning text, with the reason it is safe to hide.
_KNOWN_NOISE = (
    # torch.ao.quantization is deprecated in favour of torchao; lessons say so once, in prose.
    (DeprecationWarning, r".*torch\.ao\.quantization"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r".*reduce_range will be deprecated"),
    (UserWarning, r"must run observer before calling calculate_qparams"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
)
# Loggers that report missing optional CUDA kernels when torchao is imported on a CPU machine.
_NOISY_LOGGERS = ("torchao", "torchao.kernel", "torchao.quantization")
# Log lines from torch itself, one per enum torchao registers on import (logger, message part).
_NOISY_LOG_LINES = (("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),)


class _DropMessages(logging.Filter):
    """Drop log records whose message contains a known text; keep every other record."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch.Generator seeded the same.

    Args:
        seed: a non-negative integer.
    Returns:
        A ``torch.Generator`` for code that prefers an explicit generator.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """Resolve the ``device`` parameter of a notebook.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda" (or "cuda:N").
    Returns:
        The ``torch.device`` to use.
    Raises:
        ValueError: for any other value, or "cuda" on a machine without a usable GPU.
    """
    if not isinstance(device, str) or not (
        device in DEVICE_CHOICES or device.startswith("cuda:")
    ):
        raise ValueError(f"device must be one of {DEVICE_CHOICES} (or 'cuda:N'), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for, but torch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Use device='auto' or device='cpu'."
        )
    return torch.device(device)


def silence_known_noise() -> None:
    """Hide the warnings and log lines this stack prints on every call, and nothing else.

    Hidden: torch.ao.quantization deprecation and observer warnings (one per observer),
    torchao's "Failed to load ... .so" messages about CUDA kernels on CPU machines, and one torch
    log line that importing torchao triggers. Any other warning still shows. Call once per notebook; it changes process-wide filters on purpose.
    """
    for category, pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, text in _NOISY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessages(text))


@contextlib.contextmanager
def known_noise_silenced() -> Iterator[None]:
    """Context-manager form of :func:`silence_known_noise` that restores the filters after."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    with warnings.catch_warnings():
        silence_known_noise()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def machine_info(device: torch.device | str = "cpu") -> dict[str, str | int | bool]:
    """Facts about the machine a lesson runs on, for the notebook to show and record.

    Returns:
        A flat dict: python, torch, platform, cpu count, torch threads, CPU capability as torch
        sees it (e.g. AVX512), and GPU name / memory when ``device`` is CUDA.
    """
    device = torch.device(device)
    info: dict[str, str | int | bool] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = str(torch.version.cuda)
    return info
