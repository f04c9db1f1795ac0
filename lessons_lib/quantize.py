"""Affine (uniform) integer quantization written out, and a weight-only quantized Linear.

A real value ``x`` is stored as an integer ``q`` with a scale ``s`` and a zero point ``z``:

    q = clamp(round(x / s) + z, q_min, q_max)        x_hat = s * (q - z)

(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", arXiv:1712.05877, eq. 1; Nagel et al., "A White Paper on Neural Network Quantization",
arXiv:2106.08295, sec. 2.2; Krishnamoorthi, "Quantizing deep convolutional networks for efficient
inference: A whitepaper", arXiv:1806.08342, sec. 2). Symmetric quantization fixes ``z = 0`` and
uses signed integers; asymmetric quantization uses unsigned integers with zero exactly
representable. A symmetric b-bit grid uses all 2^b codes [-2^(b-1), 2^(b-1) - 1] by default, with
step ``max|x| / (2^(b-1) - 1/2)`` (torch.ao's symmetric observers; GPTQ's reference quantizer);
``narrow_range=True`` keeps the older, restricted grid [-(2^(b-1) - 1), 2^(b-1) - 1] with step
``max|x| / (2^(b-1) - 1)``: symmetric around zero, which some int8 kernels require, but one code
short (at 2 bits only the three codes {-1, 0, 1} remain). One (s, z) pair covers the whole tensor ("per_tensor"), one slice along ``axis``
("per_channel"), or ``group_size`` consecutive values along the last dimension ("per_group").

Observers choose the clipping range [lo, hi] from data: min-max, a moving average of batch
min/max (as ``torch.ao``'s ``MovingAverageMinMaxObserver``), a percentile of the values, or the
range that minimises the mean squared quantization error (Nagel et al., sec. 3.1).

Integers are bit-exact with ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` (torch
2.13, x86) for the same scales and zero points: its per-tensor kernel computes ``x * (1/s) + z``
with one rounding (a fused multiply-add), its per-channel kernel rounds ``x * (1/s)`` to float32
first; we do the same. The two differ only within one float32 step of a rounding tie, and only
when ``z != 0``. Integers of fewer than 8 bits are stored one per byte here (packing: lesson 03).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib.checks import is_int, is_number, require

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
_EPS = torch.finfo(torch.float32).eps  # smallest scale, as torch.ao's observers


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a tensor. Invalid values raise ``ValueError`` naming what is accepted.

    Args:
        bits: integer width, 2..8. Symmetric: signed [-2^(b-1), 2^(b-1)-1] in int8; asymmetric:
            unsigned [0, 2^b - 1] in uint8.
        symmetric: zero point fixed at 0 (usual for weights) or chosen from the range (activations).
        granularity: "per_tensor", "per_channel" (one scale per slice along ``axis``) or
            "per_group" (one scale per ``group_size`` consecutive values of the last dimension).
        group_size: values per group; required for, and only for, "per_group".
        observer: "minmax", "moving_average", "percentile" or "mse" (see :class:`Observer`).
        axis: channel dimension for "per_channel" (0 = output channels of a Linear/Conv weight).
        percentile: for "percentile", the share (in %) of values kept inside the range, (0, 100].
        averaging_constant: for "moving_average", c in lo <- lo + c (batch_lo - lo), in (0, 1].
        mse_grid: for "mse", how many clipping ratios in (0, 1] of the min-max range to try.
        narrow_range: symmetric only. False (default): all 2^b codes, s = max|x| / ((qmax - qmin) / 2)
            (torch.ao's symmetric observers, GPTQ's reference quantizer). True: the restricted grid
            [-(2^(b-1) - 1), 2^(b-1) - 1], s = max|x| / qmax (zero in the middle of a range that is
            symmetric; TensorFlow's ``narrow_range``; what some int8 kernels expect).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    observer: str = "minmax"
    axis: int = 0
    percentile: float = 99.9
    averaging_constant: float = 0.01
    mse_grid: int = 100
    narrow_range: bool = False

    def __post_init__(self) -> None:


        require(is_int(self.bits) and 2 <= self.bits <= 8, f"bits must be an int in 2..8 (8 for INT8, 4 for INT4), got {self.bits!r}")
        require(isinstance(self.symmetric, bool), f"symmetric must be True or False, got {self.symmetric!r}")
        require(self.granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        require(self.observer in OBSERVERS, f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.granularity == "per_group":
            require(is_int(self.group_size) and self.group_size >= 1,
                  f"per_group needs a positive int group_size (e.g. 32, 128), got {self.group_size!r}")
        else:
            require(self.group_size is None, f"group_size is only used with granularity='per_group'; use None for {self.granularity!r}")
        require(is_number(self.percentile) and 0 < self.percentile <= 100, f"percentile must be in (0, 100], e.g. 99.9, got {self.percentile!r}")
        require(is_number(self.averaging_constant) and 0 < self.averaging_constant <= 1, f"averaging_constant must be in (0, 1], e.g. 0.01, got {self.averaging_constant!r}")
        require(is_int(self.mse_grid) and self.mse_grid >= 1, f"mse_grid must be a positive int, e.g. 100, got {self.mse_grid!r}")
        require(isinstance(self.narrow_range, bool), f"narrow_range must be True or False, got {self.narrow_range!r}")
        require(self.symmetric or not self.narrow_range,
              "narrow_range=True is for symmetric grids only; use narrow_range=False with symmetric=False")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the integers: int8 (symmetric) or uint8 (asymmetric)."""
        return torch.int8 if self.symmetric else torch.uint8


# ----------------------------------------------------------------------------- layout
def _check_layout(x: torch.Tensor, config: QuantConfig) -> None:
    if config.granularity == "per_channel" and not -x.dim() <= config.axis < max(x.dim(), 1):
        raise ValueError(f"axis={config.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    if config.granularity == "per_group" and (x.dim() == 0 or x.shape[-1] % config.group_size):
        raise ValueError(f"group_size={config.group_size} must divide the last dimension of shape "
                         f"{tuple(x.shape)}; use a divisor of it, or per_channel")


def qparam_shape(x: torch.Tensor, config: QuantConfig) -> tuple[int, ...]:
    """Shape of the scale / zero point for ``x``: (), (C,) or (*x.shape[:-1], x.shape[-1] // group_size)."""
    _check_layout(x, config)
    if config.granularity == "per_tensor":
        return ()
    if config.granularity == "per_channel":
        return (x.shape[config.axis],)
    return (*x.shape[:-1], x.shape[-1] // config.group_size)


def _rows(x: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """View ``x`` as (n_slots, values per slot): one row per (scale, zero point) pair."""
    _check_layout(x, config)
    if config.granularity == "per_tensor":
        return x.reshape(1, -1)  # (1, N)
    if config.granularity == "per_channel":
        axis = config.axis % x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, N / C)
    return x.reshape(-1, config.group_size)  # (N / group_size, group_size)


def _unrows(rows: torch.Tensor, shape: torch.Size, config: QuantConfig) -> torch.Tensor:
    """Inverse of :func:`_rows` for a tensor of the original ``shape``."""
    if config.granularity != "per_channel":
        return rows.reshape(shape)
    axis = config.axis % len(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])  # channel axis first, as in _rows
    return rows.reshape(moved).movedim(0, axis)


# ----------------------------------------------------------------------------- ranges and qparams
def _kth(rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """Nearest-rank quantile of each row, (R, N) -> (R,); works on tensors too big for torch.quantile."""
    k = min(max(round(fraction * (rows.shape[1] - 1)) + 1, 1), rows.shape[1])
    return rows.kthvalue(k, dim=1).values


def _mse_range(rows: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the clipped min-max range alpha * [lo, hi] with the least squared error."""
    lo, hi = rows.amin(1), rows.amax(1)  # (R,), (R,)
    best_err, best_alpha = torch.full_like(lo, float("inf")), torch.ones_like(lo)
    for i in range(1, config.mse_grid + 1):
        alpha = i / config.mse_grid
        scale, zero = qparams_from_range(alpha * lo, alpha * hi, config)
        s, z = scale[:, None], zero[:, None].float()  # (R, 1); float32 rounding is fine for ranking ranges
        x_hat = (torch.round(rows / s + z).clamp_(config.qmin, config.qmax) - z) * s
        err = (x_hat - rows).pow_(2).mean(1)  # (R,)
        best_alpha = torch.where(err < best_err, alpha, best_alpha)
        best_err = torch.minimum(err, best_err)
    return best_alpha * lo, best_alpha * hi


def batch_range(x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range [lo, hi] one batch ``x`` gives under ``config.observer``.

    minmax / moving_average: min and max. percentile: symmetric, +-(the ``percentile``-th
    percentile of |x|); asymmetric, the (100 - p)-th and p-th percentiles (nearest rank). mse: the
    range alpha * [min, max], alpha on a grid in (0, 1], with the least mean squared error after
    quantization (Nagel et al. 2021, sec. 3.1).

    Returns:
        (lo, hi), each of shape :func:`qparam_shape`, float32.
    """
    rows = _rows(x.detach().float(), config)  # (R, N)
    if config.observer in ("minmax", "moving_average"):
        lo, hi = rows.amin(1), rows.amax(1)
    elif config.observer == "percentile":
        p = config.percentile / 100
        if config.symmetric:
            hi = _kth(rows.abs(), p)
            lo = -hi
        else:
            lo, hi = _kth(rows, 1 - p), _kth(rows, p)
    else:
        lo, hi = _mse_range(rows, config)
    shape = qparam_shape(x, config)
    return lo.reshape(shape), hi.reshape(shape)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the range [lo, hi] onto [qmin, qmax].

    Symmetric: s = max(|lo|, |hi|) / ((qmax - qmin) / 2), z = 0: at 8 bits 127.5, so the 256 codes
    cover [-max, max] (+max itself rounds to 128 and is clipped to 127 by half a step), as torch.ao's
    symmetric observers and GPTQ's reference quantizer; with ``narrow_range`` (qmin = -qmax) this is
    max / qmax and +-max map exactly to +-qmax. Asymmetric: the range is widened to
    contain 0, s = (hi - lo) / (qmax - qmin), z = qmin - round(lo / s) (as torch.ao's MinMaxObserver).

    Returns:
        (scale float32, zero_point int32), shaped like ``lo``.
    """
    lo, hi = lo.float(), hi.float()
    if config.symmetric:
        scale = (torch.maximum(-lo, hi) / ((config.qmax - config.qmin) / 2)).clamp_min(_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (config.qmax - config.qmin)).clamp_min(_EPS)
    zero = (config.qmin - torch.round(lo / scale)).clamp(config.qmin, config.qmax)
    return scale, zero.to(torch.int32)


class Observer:
    """Two phases: ``update(x)`` for each calibration batch, then ``qparams()``.

    How batches combine: minmax keeps the running min and max; moving_average updates
    lo <- lo + c (batch_lo - lo) after the first batch (torch.ao's MovingAverageMinMaxObserver);
    percentile and mse average the per-batch ranges (an approximation: exact for one batch).
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> "Observer":
        lo, hi = batch_range(x, self.config)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif lo.shape != self.lo.shape:
            raise ValueError(f"batch gives qparams of shape {tuple(lo.shape)}, earlier ones {tuple(self.lo.shape)}")
        elif self.config.observer == "minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            c = self.config.averaging_constant if self.config.observer == "moving_average" else 1 / (self.batches + 1)
            self.lo, self.hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)
        self.batches += 1
        return self

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("the observer has seen no data: call update(x) first")
        return qparams_from_range(self.lo, self.hi, self.config)


def compute_qparams(x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``x`` from one observation.

    Args:
        x: any float tensor, e.g. a weight (out, in) or (out, in, kh, kw).
    Returns:
        (scale float32, zero_point int32), both of shape :func:`qparam_shape`.
    """
    return Observer(config).update(x).qparams()


# ----------------------------------------------------------------------------- quantize / dequantize
def _round_rows(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """round(x / s + z) for rows (R, N) and qparams (R,), before clamping, as float32."""
    inv = (1.0 / scale.float()).reshape(-1, 1)  # (R, 1), float32 like torch's inv_scale
    zero = zero.reshape(-1, 1)  # (R, 1)
    if config.granularity == "per_tensor":  # one rounding, as torch's fused multiply-add kernel
        return torch.round((rows.double() * inv.double() + zero).float())
    return torch.round(rows.float() * inv + zero)  # x * (1/s) rounded to float32 first, as torch


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """q = clamp(round(x / s) + z, qmin, qmax), in ``config.dtype`` (Jacob et al. 2018, eq. 1).

    Args:
        x: float tensor of any shape.
        scale, zero_point: of shape :func:`qparam_shape` (from :func:`compute_qparams`).
    Returns:
        Integers of the shape of ``x``. Example (8-bit asymmetric, per tensor): x = [-1, 0, 0.5, 3]
        gives s = 4/255, z = 64 and q = [0, 64, 96, 255].
    """
    r = _round_rows(_rows(x, config), scale, zero_point, config)
    return _unrows(r.clamp(config.qmin, config.qmax).to(config.dtype), x.shape, config)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """x_hat = s * (q - z) in float32, of the shape of ``q``."""
    rows = _rows(q, config).float()  # (R, N)
    return _unrows((rows - zero_point.reshape(-1, 1)) * scale.float().reshape(-1, 1), q.shape, config)


def _fake_rows(r: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    return (r.clamp(config.qmin, config.qmax) - zero.reshape(-1, 1)) * scale.float().reshape(-1, 1)  # (R, N)


def fake_quantize(
    x: torch.Tensor, config: QuantConfig, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """dequantize(quantize(x)) in float, with a straight-through gradient (Bengio et al.,
    arXiv:1308.3432): 1 where x lies inside the quantization range, 0 where it is clipped, as
    ``torch.fake_quantize_per_channel_affine``. Qparams come from ``x`` unless both are given.
    """
    if scale is None or zero_point is None:
        scale, zero_point = compute_qparams(x, config)
    rows = _rows(x, config)  # (R, N)
    r = _round_rows(rows.detach(), scale, zero_point, config)
    x_hat = _fake_rows(r, scale, zero_point, config)
    inside = (r >= config.qmin) & (r <= config.qmax)
    out = torch.where(inside, rows + (x_hat - rows).detach(), x_hat)
    return _unrows(out, x.shape, config)


# ----------------------------------------------------------------------------- weight-only Linear
class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as integers plus scales, dequantized at every forward.

    The bytes are real: ``qweight`` is an int8/uint8 buffer (out, in), ``scale`` float32 of shape
    (out,) per channel, () per tensor or (out, in // group_size) per group; ``zero_point`` (same
    shape, integer dtype) is stored only when asymmetric. Activations stay in float, so this
    saves memory, not arithmetic. Build with :meth:`from_linear`.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None, config: QuantConfig) -> None:
        super().__init__()
        self.config = config
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", None if config.symmetric else zero_point.to(config.dtype))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "WeightOnlyLinear":
        if config.granularity == "per_channel" and config.axis not in (0, -2):
            raise ValueError(f"weight scales run along output features: use axis=0, got axis={config.axis}")
        W = linear.weight.detach().float()  # (out, in)
        scale, zero = compute_qparams(W, config)
        return cls(quantize(W, scale, zero, config), scale, zero, linear.bias, config)

    def dequantized_weight(self) -> torch.Tensor:
        zero = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale, dtype=torch.int32)
        return dequantize(self.qweight, self.scale, zero.int(), self.config)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        c = self.config
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={c.bits}, {c.granularity}, symmetric={c.symmetric}"


def quantize_linears_(
    model: nn.Module, config: QuantConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by a :class:`WeightOnlyLinear`.

    Args:
        model: any module, e.g. a Hugging Face ``BertModel``.
        config: weight quantization config (usually symmetric, per_channel, axis 0).
        filter_fn: ``filter_fn(module, name) -> bool`` picks which Linears to replace (all if
            None), as torchao's ``quantize_``.
    Returns:
        The qualified names of the replaced modules.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name))]
    for name, linear in targets:
        model.set_submodule(name, WeightOnlyLinear.from_linear(linear, config))
    return [name for name, _ in targets]


def fake_quantize_weights_(
    model: nn.Module, config: QuantConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> list[str]:
    """Replace, in place, the weight of every ``nn.Linear`` / ``nn.Conv2d`` by its fake-quantized
    values (:func:`fake_quantize`, float32 kept): the model computes as with quantized weights,
    at full size. For measuring what a weight format costs in accuracy, before storing it for real.

    Args:
        model: any module.
        config: the weight quantizer (e.g. symmetric, per_channel, axis 0).
        filter_fn: ``filter_fn(module, name) -> bool`` picks the layers (all Linear/Conv2d if None).
    Returns:
        The qualified names of the layers changed.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (filter_fn is None or filter_fn(m, name)):
            with torch.no_grad():
                m.weight.copy_(fake_quantize(m.weight.detach(), config))
            names.append(name)
    return names
