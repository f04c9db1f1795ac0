"""Quantization-aware training (QAT): train through the rounding so the weights learn to live with it.

- Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", arXiv:1712.05877, section 3: simulated ("fake") quantization in the forward pass,
  weights quantized before they are used, activations at the points where integer inference
  would quantize them, ranges of activations tracked by an exponential moving average.
- Bengio, Leonard & Courville, arXiv:1308.3432: the straight-through estimator (STE). Rounding has
  a zero gradient almost everywhere; the STE passes the gradient through unchanged where the value
  lies inside the quantization range and blocks it where the value was clipped.
- Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A whitepaper",
  arXiv:1806.08342, section 3.2: batch norm folded into the convolution before QAT.
- Zhou et al., "Incremental Network Quantization", arXiv:1702.03044: quantize part of the network,
  retrain the rest to compensate, repeat: the idea behind :func:`progressive_`.

Phases: :func:`fold_batchnorm_` (optional), :func:`prepare_` (swap Linear/Conv2d for
:class:`QATLinear`/:class:`QATConv2d`), :func:`calibrate_` (that much alone is static PTQ), train (:func:`fine_tune`, with :func:`lessons_lib.training.warmup_step_decay`),
then :func:`convert` to :class:`IntLinear`/:class:`IntConv2d`, which store integer weights and
compute with integers.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import quantize, training
from lessons_lib.quantize import QuantConfig


def weight_config(bits: int = 4, narrow_range: bool = False) -> QuantConfig:
    """Weights: signed symmetric, one scale per output channel, min-max of the current weights.

    All 2^bits codes by default; ``narrow_range=True`` drops the most negative one (at 2 bits:
    codes {-1, 0, 1} only), see :class:`lessons_lib.quantize.QuantConfig`."""
    return QuantConfig(bits=bits, symmetric=True, granularity="per_channel", axis=0, observer="minmax",
                       narrow_range=narrow_range)


def activation_config(bits: int = 8, averaging_constant: float = 0.01) -> QuantConfig:
    """Activations: unsigned asymmetric, one scale per tensor, a moving average of batch ranges."""
    return QuantConfig(bits=bits, symmetric=False, granularity="per_tensor", observer="moving_average",
                       averaging_constant=averaging_constant)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, the identity in the backward pass (the bare STE)."""
    return x + (torch.round(x) - x).detach()


class FakeQuantize(nn.Module):
    """quantize -> dequantize in the forward pass, straight-through gradient in the backward pass.

    Weights (``track=False``): the scale comes from the tensor itself at every call. Activations
    (``track=True``): in training mode each batch's range updates a moving average (the first
    batch sets it); in eval mode the range is frozen, as it will be in the integer model. The
    range lives in buffers, so it moves with ``.to(device)`` and is saved in the state dict.
    ``enabled = False`` passes values through (observing continues), for stage-by-stage QAT.
    """

    def __init__(self, config: QuantConfig, track: bool) -> None:
        super().__init__()
        if track and config.granularity != "per_tensor":
            raise ValueError(f"tracked (activation) ranges are per tensor here, got granularity={config.granularity!r}")
        self.config, self.track, self.enabled = config, track, True
        self._calibrating = False  # set by calibrate_: running min-max instead of the moving average
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point): of ``x`` for weights; of the tracked range for activations."""
        if not self.track:
            if x is None:
                raise ValueError("a weight fake-quantizer needs the weight to compute its qparams")
            return quantize.compute_qparams(x.detach(), self.config)
        if int(self.seen) == 0:
            raise RuntimeError("this activation quantizer has seen no data: run a forward pass in train mode first")
        return quantize.qparams_from_range(self.lo, self.hi, self.config)

    def observe(self, x: torch.Tensor, running_minmax: bool = False) -> None:
        """Update the tracked range with one batch: a moving average (c = ``averaging_constant``),
        or, with ``running_minmax``, the running min and max (how :func:`calibrate_` uses it)."""
        lo, hi = quantize.batch_range(x.detach(), self.config)  # shape () per tensor
        lo, hi = lo.to(self.lo), hi.to(self.hi)
        if int(self.seen) == 0:
            self.lo.copy_(lo), self.hi.copy_(hi)
        elif running_minmax:
            torch.minimum(self.lo, lo, out=self.lo), torch.maximum(self.hi, hi, out=self.hi)
        else:
            c = self.config.averaging_constant
            self.lo.add_(c * (lo - self.lo)), self.hi.add_(c * (hi - self.hi))
        self.seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track and self.training:
            self.observe(x, running_minmax=self._calibrating)
        if not self.enabled:
            return x
        scale, zero = self.qparams(x)
        return quantize.fake_quantize(x, self.config, scale.to(x.device), zero.to(x.device))

    def extra_repr(self) -> str:
        kind = "activation (tracked)" if self.track else "weight"
        return f"{kind}, bits={self.config.bits}, {self.config.granularity}, enabled={self.enabled}"


class _QATMixin:
    """Shared by QATLinear and QATConv2d: fake-quantize the input (if ``act``) and the weight."""

    weight_fq: FakeQuantize
    input_fq: FakeQuantize | None

    def _setup(self, w_config: QuantConfig, a_config: QuantConfig | None) -> None:
        self.weight_fq = FakeQuantize(w_config, track=False)
        self.input_fq = FakeQuantize(a_config, track=True) if a_config is not None else None

    def set_quantization(self, enabled: bool) -> None:
        """Turn fake quantization on or off (the activation range is still tracked when off)."""
        self.weight_fq.enabled = enabled
        if self.input_fq is not None:
            self.input_fq.enabled = enabled

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_fq(x) if self.input_fq is not None else x
        return x, self.weight_fq(self.weight)  # type: ignore[attr-defined]


class QATLinear(_QATMixin, nn.Linear):
    """nn.Linear that trains on fake-quantized inputs and weights (the float weight is what learns)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_config: QuantConfig, a_config: QuantConfig | None) -> "QATLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.load_state_dict(linear.state_dict())
        new._setup(w_config, a_config)
        return new.to(linear.weight.device).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    """nn.Conv2d that trains on fake-quantized inputs and weights (fold batch norm first)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_config: QuantConfig, a_config: QuantConfig | None) -> "QATConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        new._setup(w_config, a_config)
        return new.to(conv.weight.device).train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized(x)
        return self._conv_forward(x, w, self.bias)


QAT_TYPES = (QATLinear, QATConv2d)


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into that
    conv (its running statistics become the conv's scale and bias), in place; the BN becomes an
    Identity. Integer inference has no batch norm: folding first means QAT sees the real weights.
    Returns the names of the folded convs."""
    folded = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (n1, conv), (n2, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
                setattr(seq, n1, fused.train(model.training))
                setattr(seq, n2, nn.Identity())
                folded.append(f"{name}.{n1}" if name else n1)
    return folded


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the nn.Linear / nn.Conv2d layers (already prepared ones included), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def prepare_(model: nn.Module, w_config: QuantConfig, a_config: QuantConfig | None = None,
             layers: Sequence[str] | None = None) -> list[str]:
    """Swap Linear/Conv2d layers of ``model`` for their QAT versions, in place, weights kept.

    Args:
        model: any module; fold batch norms first (:func:`fold_batchnorm_`) for a conv net.
        w_config: weight quantizer (e.g. :func:`weight_config` (4)).
        a_config: input-activation quantizer (e.g. :func:`activation_config` (8)); None = weights only.
        layers: names to prepare (default: every Linear and Conv2d, see :func:`quantizable_layers`).
    Returns: the names prepared now (layers already prepared are skipped).
    """
    if not w_config.symmetric:
        raise ValueError("weights must be quantized symmetrically (zero point 0, as integer kernels expect): "
                         "use qat.weight_config(bits)")
    modules = dict(model.named_modules())
    names = quantizable_layers(model) if layers is None else list(layers)
    bad = [n for n in names if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d))]
    if bad:
        raise ValueError(f"not Linear/Conv2d layers of the model: {bad}; choose from {quantizable_layers(model)}")
    done = []
    for n in names:
        m = modules[n]
        if isinstance(m, QAT_TYPES):
            continue
        qat = (QATLinear if isinstance(m, nn.Linear) else QATConv2d).from_float(m, w_config, a_config)
        model.set_submodule(n, qat)
        done.append(n)
    return done


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Post-training calibration: run input batches with only the activation quantizers observing.

    Each activation range becomes the running min and max over all calibration batches (as
    torch.ao's ``MinMaxObserver``), replacing whatever range it had: every batch counts the same,
    whatever its position. (QAT training then moves the ranges by the moving average of
    :class:`FakeQuantize`.) Everything else stays in eval mode (no dropout inflating the ranges,
    batch-norm statistics untouched). Returns the model in eval mode, ranges set: static PTQ.
    """
    trackers = [m for m in model.modules() if isinstance(m, FakeQuantize) and m.track]
    if not trackers:
        raise ValueError("the model has no activation quantizers: prepare_(model, w_config, a_config) first")
    model.eval()
    saved = [(m.lo.clone(), m.hi.clone(), m.seen.clone()) for m in trackers]
    for m in trackers:
        m.seen.zero_()
        m.train()
        m._calibrating = True
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for m in trackers:
            m._calibrating = False
        model.eval()
    if seen == 0:
        for m, (lo, hi, n) in zip(trackers, saved):  # nothing observed: leave the ranges as they were
            m.lo.copy_(lo), m.hi.copy_(hi), m.seen.copy_(n)
        raise ValueError("calibration needs at least one batch of inputs")
    return model


# ----------------------------------------------------------------------------- the integer model
class _IntMixin:
    """Integer weights (int8 storage, ``bits`` wide), per-channel scales, frozen input qparams.

    Forward: the input is quantized with the frozen activation qparams to integers q_x; the
    accumulator sum (q_x - z_x) * q_w is computed exactly (int8 x int4 products summed over a few
    thousand terms stay far below 2^24, so float32 holds them exactly: checked in the tests), then
    rescaled by s_x * s_w per output channel, plus the float bias. That is what an integer kernel
    computes, emulated on hardware that has no such kernel for these bit widths.
    """

    qweight: torch.Tensor
    w_scale: torch.Tensor
    in_scale: torch.Tensor | None
    in_zero_point: torch.Tensor | None

    def _store(self, qat: _QATMixin, weight: torch.Tensor) -> None:
        self.w_config = qat.weight_fq.config
        scale, zero = qat.weight_fq.qparams(weight)
        self.register_buffer("qweight", quantize.quantize(weight.detach(), scale, zero, self.w_config))  # type: ignore[attr-defined]
        self.register_buffer("w_scale", scale.float().reshape(-1))  # type: ignore[attr-defined]  (out,)
        self.a_config = qat.input_fq.config if qat.input_fq is not None else None
        if qat.input_fq is not None:
            s, z = qat.input_fq.qparams()
            self.register_buffer("in_scale", s.reshape(()).float())  # type: ignore[attr-defined]
            self.register_buffer("in_zero_point", z.reshape(()).float())  # type: ignore[attr-defined]
        else:
            self.in_scale = self.in_zero_point = None

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.w_scale.reshape(-1, *([1] * (self.qweight.dim() - 1)))

    def _integer_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_x - z_x) as float holding integers, and the per-channel output scale (out,)."""
        if self.a_config is None:  # weights only: the input stays float
            return x, self.w_scale
        q = quantize.quantize(x, self.in_scale.reshape(1), self.in_zero_point.reshape(1).int(), self.a_config)
        return q.float() - self.in_zero_point, self.in_scale * self.w_scale


class IntLinear(_IntMixin, nn.Module):
    """The converted :class:`QATLinear`: integer weights, integer accumulation (see _IntMixin)."""

    def __init__(self, qat: QATLinear) -> None:
        super().__init__()
        self._store(qat, qat.weight)
        self.bias = None if qat.bias is None else nn.Parameter(qat.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi, out_scale = self._integer_input(x)
        acc = F.linear(xi, self.qweight.float())  # (..., out): integers when the input is quantized
        y = acc * out_scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        a = f"A{self.a_config.bits}" if self.a_config else "A-float"
        return f"in={self.qweight.shape[1]}, out={self.qweight.shape[0]}, W{self.w_config.bits}{a}"


class IntConv2d(_IntMixin, nn.Module):
    """The converted :class:`QATConv2d`: integer weights, integer accumulation (see _IntMixin)."""

    def __init__(self, qat: QATConv2d) -> None:
        super().__init__()
        self._store(qat, qat.weight)
        self.bias = None if qat.bias is None else nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = qat.stride, qat.padding, qat.dilation, qat.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi, out_scale = self._integer_input(x)  # zero padding of (q - z) is the padding of the real value 0
        acc = F.conv2d(xi, self.qweight.float(), None, self.stride, self.padding, self.dilation, self.groups)
        y = acc * out_scale.reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        a = f"A{self.a_config.bits}" if self.a_config else "A-float"
        return f"{tuple(self.qweight.shape)}, W{self.w_config.bits}{a}"


def convert(model: nn.Module) -> nn.Module:
    """A copy of a prepared (and trained) model, in eval mode, with every QAT layer replaced by its
    integer version (:class:`IntLinear` / :class:`IntConv2d`). The original is left untouched."""
    model = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, QAT_TYPES)]
    if not names:
        raise ValueError("the model has no QAT layers: call prepare_(model, ...) and train it first")
    for n in names:
        m = model.get_submodule(n)
        model.set_submodule(n, IntLinear(m) if isinstance(m, QATLinear) else IntConv2d(m))
    return model


# ----------------------------------------------------------------------------- training


def fine_tune(model: nn.Module, batches: Iterable, steps: int, lr: float, schedule: Callable[[int], float] | None = None,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
              device: torch.device | str = "cpu", optimizer: str = "sgd", progress: bool = False,
              desc: str = "QAT") -> dict[str, list[float]]:
    """Train ``model`` (train mode) for ``steps`` optimiser steps on ``(x, y)`` batches.

    ``optimizer``: "sgd" (momentum 0.9, the usual choice for conv nets) or "adamw" (transformers).
    ``schedule(step)`` multiplies ``lr`` (default: constant). ``loss_fn(model(x), y)``. Returns the
    history: ``loss`` and ``lr`` per step. The model is left in eval mode (activation ranges frozen).
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")

    def objective(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        loss = loss_fn(model(x.to(device)), y.to(device))
        return loss, {"loss": float(loss.detach())}

    model.train()
    history = training.run(objective, batches, steps, lambda step: lr * (schedule(step) if schedule is not None else 1.0),
                           [p for p in model.parameters() if p.requires_grad], optimizer=optimizer, progress=progress, desc=desc)
    model.eval()
    return history


def progressive_(model: nn.Module, stages: Sequence[Sequence[str]], w_config: QuantConfig,
                 a_config: QuantConfig | None, train_stage: Callable[[nn.Module, int], object]) -> list:
    """Quantize layer groups one stage at a time, fine-tuning after each, in place.

    Stage k prepares the layers in ``stages[k]`` (the earlier stages stay quantized), then calls
    ``train_stage(model, k)``, which fine-tunes everything still float *and* the quantized layers'
    float shadows. Returns what each ``train_stage`` call returned.
    """
    stages = [list(s) for s in stages]
    if not stages or any(not s for s in stages):
        raise ValueError(f"stages must be a non-empty list of non-empty lists of layer names, e.g. "
                         f"[['features.0'], ['features.4', 'features.8'], ...], got {stages}")
    flat = [n for s in stages for n in s]
    if len(set(flat)) != len(flat):
        raise ValueError(f"a layer appears in two stages: {sorted({n for n in flat if flat.count(n) > 1})}")
    available = set(quantizable_layers(model))
    if missing := [n for n in flat if n not in available]:
        raise ValueError(f"not Linear/Conv2d layers of the model: {missing}; choose from {quantizable_layers(model)}")
    out = []
    for k, names in enumerate(stages):
        prepare_(model, w_config, a_config, layers=names)
        out.append(train_stage(model, k))
    return out
