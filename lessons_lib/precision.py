"""Number formats and reduced precision: format facts, bit layouts, casting, overflow detection.

Every fact is computed from ``torch.finfo`` / ``torch.iinfo`` (or, for INT4, from the bit width),
never typed in. Float formats follow IEEE 754-2008 binary32/binary16; BF16 is the "brain float"
format of Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (arXiv:1905.12322);
mixed precision and loss scaling follow Micikevicius et al., "Mixed Precision Training"
(arXiv:1710.03740).

Example:
    >>> format_info("fp16").max
    65504.0
    >>> format_info("bf16").exponent_bits == format_info("fp32").exponent_bits  # FP32's range
    True
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def check_format(name: str, accepted: tuple[str, ...] = FORMATS) -> str:
    """Return ``name`` if it is one of ``accepted``, else raise a ValueError listing them."""
    if name not in accepted:
        raise ValueError(f"unknown format {name!r}; accepted: {', '.join(accepted)}")
    return name


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a float format ("fp32", "fp16", "bf16") or "int8"."""
    return _DTYPES[check_format(name, tuple(_DTYPES))]


@dataclass(frozen=True)
class FormatInfo:
    """What a number format can represent.

    For integers, ``smallest_normal``/``eps`` are the step between levels (1) and the exponent and
    mantissa widths are 0 and ``bits - 1``.
    """

    name: str
    bits: int
    is_float: bool
    max: float  # largest finite value
    min: float  # most negative finite value
    smallest_normal: float  # smallest positive normal value (floats); 1 for integers
    smallest_subnormal: float  # smallest positive value at all
    eps: float  # distance from 1.0 to the next representable value
    exponent_bits: int
    mantissa_bits: int  # stored fraction bits (floats) or magnitude bits (integers)
    levels: int = field(default=0)  # distinct finite values (integers only; 0 for floats)


def format_info(name: str) -> FormatInfo:
    """Facts about a format, computed from torch (``finfo``/``iinfo``) or the bit width (INT4).

    Args:
        name: one of ``FORMATS``.
    """
    check_format(name)
    if name in FLOAT_FORMATS:
        fi = torch.finfo(dtype_of(name))
        mantissa = round(-math.log2(fi.eps))  # eps = 2**-mantissa_bits
        return FormatInfo(name, fi.bits, True, fi.max, fi.min, fi.smallest_normal, fi.smallest_normal * fi.eps,
                          fi.eps, fi.bits - 1 - mantissa, mantissa)
    if name == "int8":
        ii = torch.iinfo(torch.int8)
        bits, lo, hi = ii.bits, ii.min, ii.max
    else:  # torch has no int4 arithmetic dtype: two's complement on 4 bits
        bits = 4
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return FormatInfo(name, bits, False, float(hi), float(lo), 1.0, 1.0, 1.0, 0, bits - 1, hi - lo + 1)


def float_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign, biased exponent and stored mantissa bits of every element of a float tensor.

    Args:
        x: a float32, float16 or bfloat16 tensor of any shape.
    Returns:
        (sign, exponent, mantissa) as int64 tensors of ``x``'s shape.
    """
    if x.dtype not in _INT_VIEW:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    fi = torch.finfo(x.dtype)
    mantissa_bits = round(-math.log2(fi.eps))
    exponent_bits = fi.bits - 1 - mantissa_bits
    raw = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64) & ((1 << fi.bits) - 1)  # unsigned pattern
    sign = raw >> (fi.bits - 1)
    exponent = (raw >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = raw & ((1 << mantissa_bits) - 1)
    return sign, exponent, mantissa


def bit_string(value: float, name: str) -> str:
    """The bits of ``value`` stored in a float format, as "sign exponent mantissa".

    >>> bit_string(1.0, "bf16")
    '0 01111111 0000000'
    """
    info = format_info(check_format(name, FLOAT_FORMATS))
    s, e, m = (int(t) for t in float_fields(torch.tensor([value], dtype=dtype_of(name))))
    return f"{s} {e:0{info.exponent_bits}b} {m:0{info.mantissa_bits}b}"


def round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` stored in a float format and read back as float32 (round to nearest even).

    Rounding, not truncation: BF16 has the layout of FP32's top 16 bits, but converting can round
    up, and a round-up can carry into the exponent (or, at FP32's very top, overflow to inf).

    >>> round_trip(torch.tensor([0.1, 65504.0]), "bf16").tolist()  # truncation: 0.099609375, 65280.0
    [0.10009765625, 65536.0]
    """
    return x.to(dtype_of(check_format(name, FLOAT_FORMATS))).float()


def step_size(x: torch.Tensor, name: str) -> torch.Tensor:
    """Distance from each stored value of ``x`` to the next larger one in the format (one ULP).

    Args:
        x: positive finite values (any shape), below the format's max.
    Returns:
        float32 tensor of ``x``'s shape.
    """
    dtype = dtype_of(check_format(name, FLOAT_FORMATS))
    stored = x.to(dtype).contiguous()
    following = (stored.view(_INT_VIEW[dtype]) + 1).view(dtype)  # next bit pattern = next value up
    return following.float() - stored.float()


def cast(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` with every floating parameter and buffer in a float format.

    The same as ``copy.deepcopy(model).half()`` for "fp16" or ``.bfloat16()`` for "bf16"; the
    original is left untouched so both can be compared.
    """
    return copy.deepcopy(model).to(dtype_of(check_format(name, FLOAT_FORMATS)))


def autocast(device: torch.device | str, name: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for "fp16" or "bf16" on ``device``'s type, with the format checked.

    Inside it, matmuls and convolutions run in the low-precision format while ops that need range
    or accuracy (softmax, norms, losses) run in float32; the weights stay float32.
    """
    check_format(name, ("fp16", "bf16"))
    return torch.autocast(torch.device(device).type, dtype=dtype_of(name))


@contextlib.contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """CUDA matmuls and convolutions on float32 tensors computed in TF32 (``enabled``: FP32's
    exponent, a 10-bit mantissa, on the tensor cores of Ampere and later GPUs) or in full FP32
    (``enabled=False``); the previous settings are restored on exit. On a GPU "FP32" is often
    really TF32 (cuDNN convolutions default to it), so a speed-up quoted "vs FP32" should say which.
    Nothing changes on a CPU.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


@dataclass(frozen=True)
class ModuleRange:
    """The largest |value| one module produced, against the format's range."""

    name: str
    max_abs: float  # over finite values; 0 if none
    fraction_of_max: float  # max_abs / format max
    nonfinite: bool  # inf or NaN in the output
    inputs_finite: bool


@dataclass(frozen=True)
class OverflowReport:
    """Per-module output ranges of one forward pass, in the order modules finished."""

    format: str
    modules: tuple[ModuleRange, ...]

    @property
    def first_nonfinite(self) -> str | None:
        """The first module whose output had inf/NaN although its inputs were finite ('' = root)."""
        for m in self.modules:
            if m.nonfinite and m.inputs_finite:
                return m.name
        return None

    def near_overflow(self, threshold: float = 0.5) -> list[str]:
        """Modules whose largest finite output exceeds ``threshold`` x the format's max."""
        return [m.name for m in self.modules if m.fraction_of_max > threshold]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict) or hasattr(obj, "values"):
        for o in obj.values():
            yield from _tensors(o)


def detect_overflow(model: nn.Module, run: Callable[[], Any], name: str) -> OverflowReport:
    """Run ``run()`` (a forward pass of ``model``) with hooks recording every module's output range.

    Args:
        model: the model, already in the format being checked (or under autocast inside ``run``).
        run: calls the model; its return value is ignored.
        name: the float format whose range to compare against.
    Returns:
        An :class:`OverflowReport`. Hooks are always removed, even if ``run`` raises.
    """
    fmax = format_info(check_format(name, FLOAT_FORMATS)).max
    rows: list[ModuleRange] = []

    def hook(module_name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            floats = [t for t in _tensors(output) if t.is_floating_point()]
            if not floats:
                return
            finite_max = max((float(t[torch.isfinite(t)].abs().max()) if torch.isfinite(t).any() else 0.0)
                             for t in floats)
            nonfinite = any(not bool(torch.isfinite(t).all()) for t in floats)
            inputs_ok = all(bool(torch.isfinite(t).all()) for t in _tensors(inputs) if t.is_floating_point())
            rows.append(ModuleRange(module_name, finite_max, finite_max / fmax, nonfinite, inputs_ok))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return OverflowReport(name, tuple(rows))


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Instruction-set extensions that give a CPU native arithmetic in a 16-bit float format.
NATIVE_16BIT_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def native_16bit_support(flags: set[str] | None = None) -> dict[str, list[str]]:
    """Which of the native FP16/BF16 instruction sets this CPU reports, per format."""
    flags = cpu_flags() if flags is None else flags
    return {fmt: [f for f in names if f in flags] for fmt, names in NATIVE_16BIT_FLAGS.items()}


def describe_value(value: float, name: str) -> dict[str, Any]:
    """What storing ``value`` in a format keeps: the stored value, its bits and the error.

    Floats round to nearest (ties to even) and overflow to inf; integers (scale 1) round to
    nearest and saturate at the range ends, as a quantizer's clamp does.

    >>> describe_value(0.1, "bf16")["stored"]
    0.10009765625
    """
    info = format_info(name)
    if info.is_float:
        stored = float(torch.tensor(value, dtype=torch.float64).to(dtype_of(name)))
        bits = bit_string(value, name)
    else:
        stored = float(min(max(round(value), info.min), info.max))
        bits = format(int(stored) & ((1 << info.bits) - 1), f"0{info.bits}b")
    error = stored - value
    relative = abs(error) / abs(value) if value != 0 and math.isfinite(error) else (0.0 if error == 0 else math.inf)
    return {"format": name, "value": value, "stored": stored, "bits": bits, "abs_error": abs(error),
            "rel_error": relative}
