"""Pruning: turning scores into masks, and keeping the masks while the model fine-tunes.

The course keeps three steps apart: a *criterion* gives a score per weight (here
:func:`magnitude_scores`, |w|, and for structured pruning the activation-based
:func:`contribution_scores` and ShortGPT's :func:`block_importance`; lesson 07's ``importance``
module adds more); *pruning* (this module) turns score tensors into masks; *surgery*
(``surgery.py``) turns structured masks into a physically smaller model. After surgery, recovery:
a closed-form least-squares refit (:func:`input_grams`, :func:`refit_readers_`), then training
with :func:`heal_` (causal LMs) or :func:`embedding_objective` (sentence encoders).

Conventions used everywhere below:

- Names are parameter names as ``model.named_parameters()`` spells them (``"features.0.weight"``).
- A mask is a ``bool`` tensor shaped like its weight (or, for channels, like its output dim):
  True = keep, as ``torch.nn.utils.prune``'s ``weight_mask`` (1 = keep).
- Counting rule: pruning a fraction ``s`` of ``n`` elements prunes exactly ``k = round(s * n)``,
  Python's ``round`` (half to even), the rule of ``torch.nn.utils.prune``.
- Tie rule: among equal scores the element with the lowest flat index is pruned first (for
  :func:`global_masks`, the index in the concatenation of the tensors in the order of ``scores``).
  ``torch.topk`` leaves the order of ties unspecified, so on tied scores torch may differ.

Sources: Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
Networks", arXiv:1506.02626 (magnitude pruning, then retraining with the masks kept); Zhu & Gupta,
"To prune, or not to prune", arXiv:1710.01878 (gradual pruning, eq. 1); Li et al., "Pruning
Filters for Efficient ConvNets", arXiv:1608.08710 (per-filter norms); Mishra et al.,
"Accelerating Sparse Deep Neural Networks", arXiv:2104.08378 (2:4 / N:M); the per-layer
sensitivity scan of MIT 6.5940 (TinyML and Efficient Deep Learning), lab 1; Kwon et al., "A Fast
Post-Training Pruning Framework for Transformers", arXiv:2204.09656 (least-squares refit); Men et
al., "ShortGPT", arXiv:2403.03853 (block influence).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import surgery, training
from lessons_lib.checks import is_int, is_number, require

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
RUN_OPTIONS = ("weight_decay", "decays", "betas", "grad_clip", "progress", "desc")
Scores = Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------- checks
def _check_fraction(value: object, arg: str) -> None:
    require(is_number(value) and 0 <= value < 1,
            f"{arg} must be a number in [0, 1) (the fraction pruned: 0 = none, 0.9 = nine in ten), got {value!r}")


def _check_names(given: Iterable[str], accepted: Sequence[str], arg: str) -> None:
    unknown = [n for n in given if n not in accepted]
    if unknown:
        hint = [f"{n}.weight" for n in unknown if f"{n}.weight" in accepted]
        raise ValueError(f"{arg}: unknown parameter names {unknown[:5]}; accepted are parameter names such as "
                         f"{list(accepted)[:5]} ({len(accepted)} in all)" + (f"; did you mean {hint[:5]}?" if hint else ""))


def _check_scores(scores: object, arg: str = "scores") -> dict[str, torch.Tensor]:
    require(isinstance(scores, Mapping) and len(scores) > 0,
            f"{arg} must be a non-empty dict name -> score tensor shaped like the weight, e.g. "
            f"magnitude_scores(model), got {type(scores).__name__}")
    for name, s in scores.items():
        require(isinstance(s, torch.Tensor) and s.numel() > 0 and s.dtype != torch.bool and not s.dtype.is_complex,
                f"{arg}[{name!r}] must be a non-empty real tensor of scores, got {getattr(s, 'dtype', type(s).__name__)}")
        require(bool(torch.isfinite(s).all()), f"{arg}[{name!r}] holds NaN or infinite scores: every score must be finite")
    return dict(scores)


def _ratios(sparsity: float | Mapping[str, float], names: Sequence[str], arg: str) -> dict[str, float]:
    if not isinstance(sparsity, Mapping):
        _check_fraction(sparsity, arg)
        return {n: sparsity for n in names}
    _check_names(sparsity, names, arg)
    missing = [n for n in names if n not in sparsity]
    require(not missing, f"{arg} has no ratio for {missing[:5]}: give one per tensor, or pass only the tensors to prune")
    for n in names:
        _check_fraction(sparsity[n], f"{arg}[{n!r}]")
    return {n: sparsity[n] for n in names}


# ----------------------------------------------------------------------------- weights and scores
def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORMS) or type(m).__name__.endswith("Norm")  # e.g. Hugging Face's LlamaRMSNorm


def prunable_weights(model: nn.Module, include_bias: bool = False, include_norms: bool = False,
                     include_embeddings: bool = False) -> dict[str, nn.Parameter]:
    """The weights pruning acts on, in module order: every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``
    weight; biases, normalisation weights (torch's BatchNorm/LayerNorm/GroupNorm/RMSNorm and any
    module whose class name ends in "Norm") and ``nn.Embedding`` weights only when asked. A Linear
    weight tied to an embedding (a language model's ``lm_head``) counts as an embedding. Each shared
    parameter appears once, under its ``named_parameters()`` name.

    Returns: name -> the Parameter itself (not a copy). Raises ValueError if there is none.
    """
    for arg, flag in (("include_bias", include_bias), ("include_norms", include_norms),
                      ("include_embeddings", include_embeddings)):
        require(isinstance(flag, bool), f"{arg} must be True or False, got {flag!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            picks = [m.weight] if include_embeddings or id(m.weight) not in tied else []
        elif (include_norms and _is_norm(m)) or (include_embeddings and isinstance(m, nn.Embedding)):
            picks = [getattr(m, "weight", None)]
        else:
            continue
        picks += [getattr(m, "bias", None)] if include_bias else []
        for p in picks:
            if isinstance(p, nn.Parameter) and id(p) in names:
                out.setdefault(names[id(p)], p)
    require(bool(out), f"model ({type(model).__name__}) has no Linear/Conv1d/Conv2d weight to prune (embeddings "
                       "and norms count only with include_embeddings=True / include_norms=True)")
    return out


def magnitude_scores(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """|w| for each weight in ``names`` (default: :func:`prunable_weights`), the criterion of Han et al.

    Returns: name -> a detached float tensor shaped like the weight (the model is not touched).
    """
    params = dict(model.named_parameters())
    names = list(prunable_weights(model) if names is None else names)
    _check_names(names, list(params), "names")
    return {n: params[n].detach().abs() for n in names}


def channel_norms(weight: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The p-norm of each output channel (row of a Linear, filter of a Conv): Li et al.'s filter score.

    Args: weight (out, in, ...); p > 0 or ``math.inf`` (``torch.nn.utils.prune.ln_structured``'s n).
    Returns: (out,) scores.
    """
    require(isinstance(weight, torch.Tensor) and weight.dim() >= 2,
            f"weight must be a tensor of 2 or more dims (out, in, ...), got {getattr(weight, 'shape', type(weight).__name__)}")
    require(is_number(p) and p > 0, f"p must be a number > 0 (1 = L1, 2 = L2, math.inf = max), got {p!r}")
    return torch.linalg.vector_norm(weight.detach().flatten(1).float(), ord=p, dim=1)  # (out, in*k) -> (out,)


# ----------------------------------------------------------------------------- masks
def _prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of (n,) scores with the k lowest pruned; ties at the threshold: lowest index first.
    ``kthvalue`` rather than ``torch.quantile``, which refuses tensors of more than 16M elements."""
    keep = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if k == 0:
        return keep
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    at = (flat == threshold).nonzero().flatten()  # ascending flat indices
    keep[below] = False
    keep[at[: k - int(below.sum())]] = False
    return keep


def global_masks(scores: Scores, sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: prune the ``round(sparsity * total)`` lowest scores of the
    concatenation (global magnitude pruning with magnitude scores; layers end up with different
    sparsities). Exact to the element (see the module's counting and tie rules).

    Args: scores: name -> score tensor shaped like its weight; sparsity in [0, 1).
    Returns: name -> bool keep-mask shaped like the scores.
    """
    scores = _check_scores(scores)
    _check_fraction(sparsity, "sparsity")
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in scores.values()))
    flat = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores.values()])  # (total,)
    keep = _prune_lowest(flat, round(sparsity * flat.numel()))
    parts = keep.split([s.numel() for s in scores.values()])
    return {n: part.reshape(s.shape) for (n, s), part in zip(scores.items(), parts)}


def layerwise_masks(scores: Scores, sparsity: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Each tensor pruned to its own sparsity: ``round(sparsity[name] * numel)`` lowest scores.

    Args: scores: name -> score tensor; sparsity: one fraction in [0, 1) for all, or name -> fraction
        for every tensor of ``scores`` (non-uniform ratios, e.g. from :func:`ratios_from_scan`).
    Returns: name -> bool keep-mask shaped like the scores.
    """
    scores = _check_scores(scores)
    ratios = _ratios(sparsity, list(scores), "sparsity")
    return {n: _prune_lowest(s.detach().reshape(-1), round(ratios[n] * s.numel())).reshape(s.shape)
            for n, s in scores.items()}


def nm_masks(scores: Scores, n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """N:M semi-structured masks: in every group of ``m`` consecutive inputs of an output row, keep
    the ``n`` highest scores (2:4 is what sparse tensor cores run; Mishra et al., arXiv:2104.08378).

    A Linear score (out, in) is grouped along ``in``; a Conv score (out, in, kh, kw) is flattened to
    (out, in*kh*kw) in memory order, so a group holds consecutive kernel taps (kw fastest), not ``m``
    channels at one tap. Ties: the lower index is pruned first.

    Returns: name -> bool keep-mask shaped like the scores, exactly ``n`` True in every group.
    """
    scores = _check_scores(scores)
    require(is_int(m) and m >= 1, f"m must be a positive int (the group size, 4 for 2:4), got {m!r}")
    require(is_int(n) and 1 <= n <= m, f"n must be an int in [1, m={m}] (weights kept per group, 2 for 2:4), got {n!r}")
    for name, s in scores.items():
        require(s.dim() >= 2, f"scores[{name!r}] has shape {tuple(s.shape)}: N:M needs (out, in, ...) weights")
        require(s[0].numel() % m == 0, f"m={m} must divide the input width of {name!r}, {s[0].numel()} "
                                       "(in*kh*kw for a conv); choose m among its divisors or leave this layer out")
    out = {}
    for name, s in scores.items():
        groups = s.detach().reshape(s.shape[0], -1, m)  # (out, in*kh*kw / m, m)
        order = groups.sort(dim=-1, stable=True).indices  # ascending; equal scores keep index order
        keep = torch.ones(groups.shape, dtype=torch.bool, device=s.device).scatter_(-1, order[..., : m - n], False)
        out[name] = keep.reshape(s.shape)
    return out


def channel_masks(channel_scores: Scores, ratio: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Structured masks: per layer, drop the ``round(ratio * channels)`` lowest-scoring output
    channels (ties: lower index first). Never removes every channel of a layer.

    Args: channel_scores: name -> (out,) scores, e.g. ``channel_norms(weight)``; ratio in [0, 1), one
        for all or name -> ratio. Returns: name -> (out,) bool keep-vector (for ``surgery``, or
        :func:`expand_channels` to mask the weight in place).
    """
    scores = _check_scores(channel_scores, "channel_scores")
    ratios = _ratios(ratio, list(scores), "ratio")
    for name, s in scores.items():
        require(s.dim() == 1, f"channel_scores[{name!r}] must be 1-D (out,), got shape {tuple(s.shape)}: use channel_norms")
        require(round(ratios[name] * s.numel()) < s.numel(),
                f"ratio {ratios[name]} would remove all {s.numel()} channels of {name!r}: use a smaller ratio")
    return {n: _prune_lowest(s.detach(), round(ratios[n] * s.numel())) for n, s in scores.items()}


def broadcast_channels(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An (out,) per-channel tensor repeated over the rest of ``weight`` (out, ...): shaped like it."""
    require(isinstance(values, torch.Tensor) and values.dim() == 1 and values.numel() == weight.shape[0],
            f"need (out,) = ({weight.shape[0]},) values for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(getattr(values, 'shape', ()))}")
    return values.reshape(-1, *[1] * (weight.dim() - 1)).expand(weight.shape).clone()


def expand_channels(keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An (out,) channel keep-vector as a bool mask shaped like ``weight`` (out, ...)."""
    return broadcast_channels(keep.bool(), weight)


# ----------------------------------------------------------------------------- reporting
@dataclass(frozen=True)
class SparsityReport:
    """Zero counts per tensor. ``zeros[name]`` of ``totals[name]`` elements are zero (or masked off)."""

    zeros: dict[str, int]
    totals: dict[str, int]

    @property
    def fractions(self) -> dict[str, float]:
        return {n: self.zeros[n] / self.totals[n] for n in self.zeros}

    @property
    def global_zeros(self) -> int:
        return sum(self.zeros.values())

    @property
    def global_total(self) -> int:
        return sum(self.totals.values())

    @property
    def global_fraction(self) -> float:
        return self.global_zeros / self.global_total

    def rows(self) -> list[dict[str, Any]]:
        """One dict per tensor (name, zeros, total, sparsity), then a ``"(global)"`` row: a table."""
        rows = [{"name": n, "zeros": self.zeros[n], "total": self.totals[n], "sparsity": f} for n, f in self.fractions.items()]
        return rows + [{"name": "(global)", "zeros": self.global_zeros, "total": self.global_total,
                        "sparsity": self.global_fraction}]


def sparsity(masks_or_model: nn.Module | Mapping[str, torch.Tensor]) -> SparsityReport:
    """Per-tensor and global sparsity of a model's :func:`prunable_weights` (counting exact zeros),
    or of a dict of tensors: bool masks count False (pruned), other tensors count zeros."""
    if isinstance(masks_or_model, nn.Module):
        tensors: Mapping[str, torch.Tensor] = prunable_weights(masks_or_model)
    else:
        require(isinstance(masks_or_model, Mapping) and len(masks_or_model) > 0
                and all(isinstance(t, torch.Tensor) for t in masks_or_model.values()),
                f"masks_or_model must be an nn.Module or a non-empty dict name -> tensor, got {type(masks_or_model).__name__}")
        tensors = masks_or_model
    return _report(tensors)


def _report(tensors: Mapping[str, torch.Tensor]) -> SparsityReport:
    zeros = {n: int((~t).sum()) if t.dtype == torch.bool else t.numel() - int(torch.count_nonzero(t))
             for n, t in tensors.items()}
    return SparsityReport(zeros, {n: t.numel() for n, t in tensors.items()})


# ----------------------------------------------------------------------------- keeping masks applied
def _resolve(model: nn.Module, masks: object) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Check ``masks`` against ``model``: name -> (parameter, bool mask on its device)."""
    params = dict(model.named_parameters())
    require(isinstance(masks, Mapping) and len(masks) > 0,
            f"masks must be a non-empty dict parameter name -> bool mask, got {type(masks).__name__}")
    _check_names(masks, list(params), "masks")
    for name, mask in masks.items():
        require(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == params[name].shape,
                f"masks[{name!r}] must be a bool tensor (True = keep) of shape {tuple(params[name].shape)}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return {n: (params[n], m.to(params[n].device)) for n, m in masks.items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-off weights (mask False) in place; other weights are untouched."""
    for p, mask in _resolve(model, masks).values():
        p.masked_fill_(~mask, 0)


class MaskKeeper:
    """Keeps masks applied while a model trains: zeroes the masked weights at once, zeroes their
    gradients with tensor hooks (so gradient clipping and optimiser moments see no masked entries),
    and re-applies the masks when called after each optimiser step, which is what keeps weights
    exactly zero even when AdamW or SGD momentum from before pruning would move them.

    Pass it as ``training.run(..., on_step=keeper)``; it chains ``on_step(step, loss)`` if given and
    returns its answer (True stops training). Call :meth:`remove` (or use ``with``) to drop the hooks.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor],
                 on_step: Callable[[int, float], bool | None] | None = None) -> None:
        require(on_step is None or callable(on_step), f"on_step must be None or callable(step, loss), got {on_step!r}")
        self._model, self._on_step = model, on_step
        resolved = _resolve(model, masks)
        self.masks = {n: m for n, (_, m) in resolved.items()}
        self._handles = [p.register_hook(functools.partial(self._zero_grad, n))
                         for n, (p, _) in resolved.items() if p.requires_grad]
        self.apply_()

    def _zero_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(~self.masks[name], 0)

    def apply_(self) -> None:
        """Zero the masked weights again."""
        apply_masks_(self._model, self.masks)

    def update_(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Switch to new masks for the same parameters (gradual pruning) and apply them."""
        require(isinstance(masks, Mapping) and set(masks) == set(self.masks),
                f"masks must cover the same parameters as before: {list(self.masks)[:5]}...")
        self.masks = {n: m for n, (_, m) in _resolve(self._model, masks).items()}
        self.apply_()

    def __call__(self, step: int, loss: float) -> bool | None:
        self.apply_()
        return self._on_step(step, loss) if self._on_step is not None else None

    def remove(self) -> None:
        """Remove the gradient hooks (the weights stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MaskKeeper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ----------------------------------------------------------------------------- training with masks
def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, start: int = 0, end: int, every: int = 1) -> float:
    """Zhu & Gupta's gradual schedule (arXiv:1710.01878, eq. 1), the sparsity in force at ``step``:

        s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt}

    with t0 = ``start``, dt = ``every``, t0 + n dt = ``end``. Between pruning steps the sparsity of
    the latest one holds (a staircase); before ``start`` the model is dense (0.0); from ``end`` on, ``final``.
    Example: final=0.8, start=0, end=100, every=1 gives 0.0, 0.8 * (1 - 0.5^3) = 0.7 at step 50, 0.8 at 100.
    """
    _check_schedule(final, initial, start, end, every)
    require(is_int(step) and step >= 0, f"step must be an int >= 0, got {step!r}")
    if step < start:
        return 0.0
    t = start + min(step - start, end - start) // every * every  # latest pruning step
    if t in (start, end):
        return float(initial if t == start else final)
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


def _check_schedule(final: float, initial: float, start: int, end: int, every: int) -> None:
    _check_fraction(final, "final")
    _check_fraction(initial, "initial")
    require(initial <= final, f"initial ({initial}) must be <= final ({final}): the schedule only adds pruning")
    require(is_int(start) and start >= 0, f"start must be an int >= 0 (the first pruning step), got {start!r}")
    require(is_int(end) and end > start, f"end must be an int > start={start} (the last pruning step), got {end!r}")
    require(is_int(every) and every >= 1 and (end - start) % every == 0,
            f"every must be a positive int dividing end - start = {end - start} (steps between pruning steps), got {every!r}")


def _check_training(model: nn.Module, objective: object, steps: object, optimizer: str, run_options: Mapping) -> None:
    require(callable(objective), f"objective must be callable batch -> (loss, parts), got {objective!r}")
    require(is_int(steps) and steps >= 1, f"steps must be an int >= 1, got {steps!r}")
    require(optimizer in training.OPTIMIZERS, f"optimizer must be one of {training.OPTIMIZERS}, got {optimizer!r}")
    _check_names(run_options, RUN_OPTIONS, "run_options (keyword arguments passed to training.run)")
    require(any(p.requires_grad for p in model.parameters()), "model has no parameter that requires grad")


def _train_masked(model: nn.Module, keeper: MaskKeeper, objective: Callable, batches: Iterable, steps: int,
                  lr_at: Callable[[int], float], optimizer: str, run_options: Mapping) -> dict[str, list[float]]:
    """``training.run`` with ``keeper`` as its on_step; removes the hooks and restores the mode after."""
    was_training = model.training
    model.train()
    try:
        return training.run(objective, batches, steps, lr_at, [p for p in model.parameters() if p.requires_grad],
                            optimizer=optimizer, on_step=keeper, **run_options)
    finally:
        keeper.remove()
        model.train(was_training)


def fine_tune_masked(model: nn.Module, masks: Mapping[str, torch.Tensor], objective: Callable, batches: Iterable,
                     steps: int, lr_at: Callable[[int], float], optimizer: str = "adamw",
                     on_step: Callable[[int, float], bool | None] | None = None, **run_options: Any) -> dict[str, list[float]]:
    """One-shot pruning's second half (Han et al.): apply ``masks`` and fine-tune with them kept.

    Args: objective: ``batch -> (loss, parts)`` calling ``model`` (as for :func:`training.run`);
        run_options: weight_decay, decays, betas, grad_clip, progress, desc, passed to ``training.run``.
    Returns: ``training.run``'s history. The model is left masked, in its former train/eval mode.
    """
    _check_training(model, objective, steps, optimizer, run_options)
    keeper = MaskKeeper(model, masks, on_step)
    return _train_masked(model, keeper, objective, batches, steps, lr_at, optimizer, run_options)


@dataclass(frozen=True)
class GradualResult:
    """``history``: ``training.run``'s, plus ``sparsity`` (the target in force at each step);
    ``masks``: the final name -> bool keep-masks."""

    history: dict[str, list[float]]
    masks: dict[str, torch.Tensor]


def gradual_prune(model: nn.Module, objective: Callable, batches: Iterable, steps: int, lr_at: Callable[[int], float],
                  final_sparsity: float, *, end: int, initial_sparsity: float = 0.0, start: int = 0, every: int = 1,
                  names: Sequence[str] | None = None, scores_fn: Callable[..., Scores] = magnitude_scores,
                  global_: bool = True, optimizer: str = "adamw", on_step: Callable[[int, float], bool | None] | None = None,
                  **run_options: Any) -> GradualResult:
    """Gradual pruning while training (Zhu & Gupta, arXiv:1710.01878), on ``training.run``.

    At each pruning step t of :func:`cubic_sparsity` the masks are recomputed from
    ``scores_fn(model, names)`` of the current (masked) weights, globally or per layer, to the
    sparsity s_t; between pruning steps, and after ``end``, they are kept with a :class:`MaskKeeper`.
    With magnitude scores a pruned weight (0) scores lowest, so the pruned set only grows.

    Args: steps: optimiser steps in all (> ``end``: the steps after ``end`` fine-tune at the final
        sparsity); names: weights to prune (default :func:`prunable_weights`); on_step: called after
        each step with the step's masks applied; others as :func:`fine_tune_masked`.
    Returns: a :class:`GradualResult`. The model is left masked at the final masks.
    """
    _check_schedule(final_sparsity, initial_sparsity, start, end, every)
    _check_training(model, objective, steps, optimizer, run_options)
    require(end < steps, f"end ({end}) must be < steps ({steps}) so that training reaches the final sparsity")
    require(callable(scores_fn) and (on_step is None or callable(on_step)), "scores_fn and on_step must be callables")
    require(isinstance(global_, bool), f"global_ must be True (one threshold) or False (per layer), got {global_!r}")
    names = list(prunable_weights(model) if names is None else names)
    _check_names(names, list(dict(model.named_parameters())), "names")
    target = functools.partial(cubic_sparsity, final=final_sparsity, initial=initial_sparsity, start=start, end=end, every=every)

    def masks_at(step: int) -> dict[str, torch.Tensor]:
        scores = scores_fn(model, names)
        return global_masks(scores, target(step)) if global_ else layerwise_masks(scores, target(step))

    in_force: list[float] = []

    def step_done(step: int, loss: float) -> bool | None:
        in_force.append(target(step))
        stop = on_step(step, loss) if on_step is not None else None
        nxt = step + 1
        if not stop and start <= nxt <= end and (nxt - start) % every == 0:
            keeper.update_(masks_at(nxt))
        return stop

    keeper = MaskKeeper(model, masks_at(0), step_done)
    history = _train_masked(model, keeper, objective, batches, steps, lr_at, optimizer, run_options)
    return GradualResult({**history, "sparsity": in_force}, keeper.masks)


# ----------------------------------------------------------------------------- sensitivity
def _check_sparsities(sparsities: object) -> list[float]:
    require(isinstance(sparsities, Sequence) and len(sparsities) > 0 and len(set(sparsities)) == len(sparsities),
            f"sparsities must be a non-empty list of distinct fractions in [0, 1), e.g. [0.0, 0.5, 0.9], got {sparsities!r}")
    for i, s in enumerate(sparsities):
        _check_fraction(s, f"sparsities[{i}]")
    return list(sparsities)


def sensitivity_scan(model: nn.Module, names: Sequence[str] | None, sparsities: Sequence[float],
                     evaluate: Callable[[nn.Module], float]) -> dict[str, list[float]]:
    """Prune one layer at a time by magnitude to each sparsity and evaluate (MIT 6.5940, lab 1).

    Each layer's weight is restored bit-exactly after its scan (also if ``evaluate`` raises).
    Args: names: weights to scan (None: :func:`prunable_weights`); evaluate: model -> metric.
    Returns: name -> [metric at each sparsity, in the order given].
    """
    params = dict(model.named_parameters())
    names = list(prunable_weights(model) if names is None else names)
    _check_names(names, list(params), "names")
    sparsities = _check_sparsities(sparsities)
    require(callable(evaluate), f"evaluate must be callable model -> float, got {evaluate!r}")
    scan = {}
    for name in names:
        p, saved = params[name], params[name].detach().clone()
        try:
            scan[name] = []
            for s in sparsities:
                mask = layerwise_masks({name: saved.abs()}, s)[name]
                with torch.no_grad():
                    p.copy_(saved.masked_fill(~mask, 0))
                scan[name].append(float(evaluate(model)))
        finally:
            with torch.no_grad():
                p.copy_(saved)
    return scan


def ratios_from_scan(scan: Mapping[str, Sequence[float]], sparsities: Sequence[float], max_drop: float, *,
                     dense: float | None = None, higher_is_better: bool = True) -> dict[str, float]:
    """Per-layer ratios from a :func:`sensitivity_scan`: for each layer, the largest scanned sparsity
    such that it and every smaller one stay within ``max_drop`` of the dense metric (the scan stops
    at the first one that falls further; 0.0 if none stays within).

    Args: max_drop >= 0, in the metric's units; dense: the dense metric (None: the layer's metric at
        sparsity 0, which must then be scanned); higher_is_better: False for a loss or perplexity.
    Returns: name -> sparsity, ready for :func:`layerwise_masks`.
    """
    sparsities = _check_sparsities(sparsities)
    require(is_number(max_drop) and max_drop >= 0, f"max_drop must be a number >= 0 (in the metric's units), got {max_drop!r}")
    require(dense is not None or 0 in sparsities, "sparsities must include 0.0 (the dense metric), or pass dense=")
    require(isinstance(scan, Mapping) and all(len(v) == len(sparsities) for v in scan.values()),
            f"scan must map each name to one metric per sparsity ({len(sparsities)}), as sensitivity_scan returns")
    ratios = {}
    for name, metrics in scan.items():
        base = dense if dense is not None else metrics[sparsities.index(0)]
        ratios[name] = 0.0
        for s, metric in sorted(zip(sparsities, metrics)):
            if (base - metric if higher_is_better else metric - base) > max_drop:
                break
            ratios[name] = float(s)
    return ratios


# ----------------------------------------------------------------------------- structured criteria
def _tokens(batch: Any, device: torch.device) -> tuple[tuple, dict, torch.Tensor | None]:
    """(args, kwargs, attention mask or None) of one batch: a dict of model keyword arguments
    (a tokenizer's output) or one tensor of input ids."""
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) for k, v in batch.items()}
        return (), kwargs, kwargs.get("attention_mask")
    require(isinstance(batch, torch.Tensor), f"each batch must be a dict of model inputs or a tensor of ids, got {type(batch).__name__}")
    return (batch.to(device),), {}, None

def _feed(model: nn.Module, batches: Iterable, handles: list, mask: list, device: torch.device) -> None:
    """Run ``batches`` through ``model`` in eval mode with the hooks of ``handles`` attached (``mask[0]``
    set to each batch's attention mask for them); then remove the hooks and restore the mode, even on error."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            args, kwargs, mask[0] = _tokens(batch, device)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)



@torch.no_grad()
def contribution_scores(model: nn.Module, groups: Mapping[str, int], batches: Iterable) -> dict[str, torch.Tensor]:
    """An activation-based structured criterion: how much each group of input columns of a Linear
    adds to its output, averaged over the real tokens of ``batches``:

        score_g = mean_t || W[:, g] x_t[g] ||_2 = mean_t sqrt(x_t[g]^T (W[:, g]^T W[:, g]) x_t[g])

    With groups of 1 (the FFN neurons read by a down projection) this is mean_t |x_tj| * ||W[:, j]||_2,
    the input size times the column norm (cf. Wanda, Sun et al., arXiv:2306.11695, |W_ij| ||X_j||);
    with groups of ``head_dim`` (the heads read by an attention output projection) it is the size of
    each head's share of the attention output (cf. Michel et al., arXiv:1905.10650). A weight
    magnitude criterion would look at ``W`` alone; lesson 07 compares criteria.

    Args:
        model: any module whose Linear layers are named in ``groups``; it is run in eval mode
            (its mode is restored) and no hook or gradient is left behind.
        groups: Linear name -> group size dividing its ``in_features``.
        batches: dicts of model keyword arguments (padding tokens, ``attention_mask`` 0, are left
            out) or tensors of input ids (every token counts).
    Returns:
        name -> float64 scores (in_features // group size,), one per group, in column order.
    """
    modules = dict(model.named_modules())
    require(isinstance(groups, Mapping) and len(groups) > 0, "groups must be a non-empty dict Linear name -> group size")
    for name, g in groups.items():
        require(isinstance(modules.get(name), nn.Linear), f"groups: {name!r} is not a Linear of the model")
        require(is_int(g) and g >= 1 and modules[name].in_features % g == 0,
                f"groups[{name!r}] must be an int dividing in_features = {modules[name].in_features}, got {g!r}")
    device = next(model.parameters()).device
    grams, sums, counts, mask = {}, {}, dict.fromkeys(groups, 0), [None]
    for name, g in groups.items():
        W = modules[name].weight.detach().float()  # (out, C)
        Wg = W.reshape(W.shape[0], -1, g).permute(1, 0, 2)  # (G, out, g)
        grams[name] = Wg.transpose(1, 2) @ Wg  # (G, g, g)
        sums[name] = torch.zeros(Wg.shape[0], dtype=torch.float64, device=device)

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        gram = grams[name]
        x = args[0].detach().float().reshape(-1, gram.shape[0], gram.shape[1])  # (N, G, g), N = B*T tokens
        if mask[0] is not None:
            x = x[mask[0].reshape(-1).bool()]
        q = torch.einsum("ngk,gkl,ngl->ng", x, gram, x).clamp_min(0).sqrt()  # (N, G) contribution norms
        sums[name] += q.sum(0).double()
        counts[name] += len(x)

    handles = [modules[n].register_forward_pre_hook(functools.partial(hook, n)) for n in groups]
    _feed(model, batches, handles, mask, device)
    require(all(counts.values()), "batches gave no token: pass at least one non-empty batch")
    return {n: (sums[n] / counts[n]).cpu() for n in groups}


@torch.no_grad()
def block_importance(model: nn.Module, batches: Iterable) -> torch.Tensor:
    """ShortGPT's Block Influence of every transformer block (Men et al., arXiv:2403.03853, eq. 2):

        BI_i = 1 - mean_t cos(h_t^(i), h_t^(i+1))

    with h^(i) the hidden state entering block i and h^(i+1) the one leaving it, averaged over
    the real tokens of ``batches``. A block that barely turns its input (BI near 0) is the cheapest
    to drop (:func:`lessons_lib.surgery.drop_layers_`).

    Args:
        model: a transformers Llama or BERT model (see :func:`lessons_lib.surgery.readers`); run in
            eval mode, its mode restored, no hook left behind.
        batches: as for :func:`contribution_scores`.
    Returns:
        (num_blocks,) float64 Block Influence, block order.
    """
    blocks = surgery.readers(model).blocks
    device = next(model.parameters()).device
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count, mask = [0] * len(blocks), [None]

    def hook(i: int, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        h_out = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
        if mask[0] is not None:
            cos = cos[mask[0].bool()]
        sums[i] += float(cos.double().sum())
        count[i] += cos.numel()

    handles = [b.register_forward_hook(functools.partial(hook, i), with_kwargs=True) for i, b in enumerate(blocks)]
    _feed(model, batches, handles, mask, device)
    require(all(count), "batches gave no token: pass at least one non-empty batch")
    return 1 - sums / torch.tensor(count, dtype=torch.float64)


@torch.no_grad()
def input_grams(model: nn.Module, names: Sequence[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """Second moments of the inputs of Linear layers, over the real tokens of ``batches``:
    ``G = sum_t z_t z_t^T`` with ``z_t = [x_t; 1]`` (the 1 carries the bias), for :func:`refit_readers_`.

    Args: names: Linear layers of ``model``; batches: as for :func:`contribution_scores`.
    Returns: name -> float64 (in_features + 1, in_features + 1), on the CPU.
    """
    modules = dict(model.named_modules())
    for name in names:
        require(isinstance(modules.get(name), nn.Linear), f"names: {name!r} is not a Linear of the model")
    device = next(model.parameters()).device
    grams, mask = {}, [None]

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, module.in_features)  # (N, C), N = B*T tokens
        if mask[0] is not None:
            x = x[mask[0].reshape(-1).bool()]
        z = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # (N, C+1)
        grams[name] = grams.get(name, 0) + (z.T @ z).double().cpu()  # float32 per batch, float64 sum

    handles = [modules[n].register_forward_pre_hook(functools.partial(hook, n)) for n in names]
    _feed(model, batches, handles, mask, device)
    require(len(grams) == len(names), "batches gave no token: pass at least one non-empty batch")
    return grams


@torch.no_grad()
def refit_readers_(pruned: nn.Module, dense: nn.Module, grams: Mapping[str, torch.Tensor],
                   keep_columns: Mapping[str, torch.Tensor], damp: float = 0.01) -> dict[str, float]:
    """Least-squares reconstruction of the layers that read what was removed (Kwon et al., "A Fast
    Post-Training Pruning Framework for Transformers", arXiv:2204.09656, sec. 4.3): once some input
    columns S of a Linear (W, b) are gone, the kept ones are refitted so that, on the calibration
    inputs, the smaller layer reproduces the dense layer's outputs as well as it can:

        [W' b'] = argmin sum_t || W x_t + b - W' x_t[S] - b' ||^2 = [W b] G[:, S~] (G[S~, S~] + lambda I)^-1

    with G the dense layer's input moments (:func:`input_grams`), S~ = S plus the bias row, and
    lambda = ``damp`` * mean diag(G[S~, S~]) (ridge, as GPTQ's dampening). One pass, no gradients.

    Args:
        pruned: the physically smaller model (``surgery.remove_``), changed in place.
        dense: the model before surgery (its weights are read, never changed).
        grams: name -> moments of the dense layer's inputs, from :func:`input_grams` on ``dense``.
        keep_columns: name -> bool (in_features of the dense layer,) input columns that remain
            (for heads, each head's keep expanded to its ``head_dim`` columns).
        damp: ridge strength, > 0.
    Returns:
        name -> relative output error on the calibration inputs, ||Y - Y'||^2 / ||Y||^2, after the refit.
    """
    require(is_number(damp) and damp > 0, f"damp must be a number > 0 (e.g. 0.01), got {damp!r}")
    dense_modules, pruned_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    errors = {}
    for name, keep in keep_columns.items():
        d, p = dense_modules.get(name), pruned_modules.get(name)
        require(isinstance(d, nn.Linear) and isinstance(p, nn.Linear) and name in grams,
                f"keep_columns: {name!r} must be a Linear of both models with a Gram in grams")
        keep = keep.bool().cpu()
        require(keep.shape == (d.in_features,) and int(keep.sum()) == p.in_features,
                f"keep_columns[{name!r}] must be ({d.in_features},) with {p.in_features} True, got {tuple(keep.shape)}, {int(keep.sum())} True")
        S = torch.cat([keep, torch.tensor([p.bias is not None])])  # (C+1,) kept columns (+ the bias row)
        G = grams[name]  # (C+1, C+1)
        bias = d.bias if d.bias is not None else torch.zeros(d.out_features, device=d.weight.device)
        Wb = torch.cat([d.weight, bias[:, None]], dim=1).double().cpu()  # (out, C+1)
        Gss = G[S][:, S]  # (k(+1), k(+1))
        lam = damp * Gss.diagonal().mean()
        sol = torch.linalg.solve(Gss + lam * torch.eye(len(Gss), dtype=G.dtype), (Wb @ G[:, S]).T).T  # (out, k(+1))
        p.weight.copy_(sol[:, : p.in_features].to(p.weight))
        if p.bias is not None:
            p.bias.copy_(sol[:, -1].to(p.bias))
        D = Wb.clone()
        D[:, S] -= sol  # (out, C+1) what the refitted layer misses, as a map of z = [x; 1]
        errors[name] = float(torch.einsum("ij,jk,ik->", D, G, D) / torch.einsum("ij,jk,ik->", Wb, G, Wb))
    return errors


# ----------------------------------------------------------------------------- recovery objectives
def cross_entropy_objective(model: nn.Module) -> Callable[[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, dict]]:
    """``(images (B, ...), labels (B,)) -> (mean cross-entropy, {"loss": float})`` of a classifier,
    for ``training.run``, :func:`fine_tune_masked` and :func:`gradual_prune` (batches from
    ``data.minibatches``)."""
    device = next(model.parameters()).device

    def objective(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = (b.to(device) for b in batch)
        loss = F.cross_entropy(model(x), y)
        return loss, {"loss": loss.item()}

    return objective


def causal_lm_objective(model: nn.Module) -> Callable[[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, dict]]:
    """``(inputs (B, T), next tokens (B, T)) -> (mean cross-entropy, {"loss": float})`` of a causal
    LM, for ``training.run`` (batches from ``data.lm_windows``)."""
    device = next(model.parameters()).device

    def objective(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = (b.to(device) for b in batch)
        z = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(z.reshape(-1, z.size(-1)).float(), y.reshape(-1))  # (B*T, V) vs (B*T,)
        return loss, {"loss": loss.item()}

    return objective


def heal_(model: nn.Module, batches: Iterable, steps: int, lr: float, *, warmup: int = 0,
          masks: Mapping[str, torch.Tensor] | None = None, grad_clip: float | None = 1.0) -> dict[str, list[float]]:
    """A short "healing" fine-tune of a pruned causal LM on its own training text (next-token
    cross-entropy, AdamW, warm-up then cosine decay to 10% of ``lr``; ``training.run``). With
    ``masks`` the pruned weights stay exactly zero (:func:`fine_tune_masked`). The model is left in
    eval mode. Returns ``training.run``'s history."""
    require(is_int(steps) and steps >= 1, f"steps must be an int >= 1, got {steps!r}")
    require(is_number(lr) and lr > 0, f"lr must be a number > 0, e.g. 1e-3, got {lr!r}")
    objective = causal_lm_objective(model)

    def lr_at(step: int) -> float:
        return training.warmup_cosine(step, steps, warmup, lr)

    if masks is not None:
        history = fine_tune_masked(model, masks, objective, batches, steps, lr_at, grad_clip=grad_clip)
    else:
        model.train()
        try:
            history = training.run(objective, batches, steps, lr_at, [p for p in model.parameters() if p.requires_grad],
                                   grad_clip=grad_clip)
        finally:
            model.eval()
    model.eval()
    return history


def embedding_objective(model: nn.Module) -> Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict]]:
    """``(input_ids (B, T), attention_mask (B, T), target embeddings (B, D)) -> (mean (1 - cos), parts)``:
    embedding distillation of a sentence encoder (lesson 05's MiniLM objective): the model's
    mean-pooled last hidden states (Sentence-BERT pooling) should point where the target's do.
    Each batch is cut to its longest real sentence first, so padding costs nothing."""
    device = next(model.parameters()).device

    def objective(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        ids, mask, target = batch
        T = int(mask.sum(1).max())
        ids, mask, target = ids[:, :T].to(device), mask[:, :T].to(device), target.to(device)  # (B, T), (B, T), (B, D)
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        emb = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, D)
        loss = (1 - F.cosine_similarity(emb.float(), target.float(), dim=-1)).mean()
        return loss, {"loss": loss.item()}

    return objective


# ----------------------------------------------------------------------------- batches of sentences
def trimmed_batches(encoding: Mapping[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """A tokenizer's output (padded to a fixed length) as consecutive batches, each cut after the
    last position where any of its rows has a real token: the same tokens, less padding to
    compute (sort the rows by length first to leave the least)."""
    require(is_int(batch_size) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size!r}")
    mask = encoding["attention_mask"]  # (N, T)
    out = []
    for i in range(0, len(mask), batch_size):
        real = mask[i : i + batch_size].any(dim=0).nonzero()
        T = int(real.max()) + 1 if len(real) else 0
        out.append({k: v[i : i + batch_size, :T] for k, v in encoding.items()})
    return out


def length_buckets(*tensors: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless training batches of sentences of similar length: rows sorted by ``lengths`` (N,)
    (e.g. ``attention_mask.sum(1)``), cut into ``N // batch_size`` batches, served in a new random
    order each epoch (the same generator seed, the same batches). Yields one batch of each tensor."""
    require(all(len(t) == len(lengths) for t in tensors) and 1 <= batch_size <= len(lengths),
            f"tensors must be as long as lengths ({len(lengths)}) and 1 <= batch_size <= {len(lengths)}, got {batch_size}")
    order = lengths.argsort(stable=True)  # (N,) shortest first
    n = len(order) // batch_size
    while True:
        for j in torch.randperm(n, generator=generator).tolist():
            rows = order[j * batch_size : (j + 1) * batch_size]
            yield tuple(t[rows] for t in tensors)


# ----------------------------------------------------------------------------- explorer: sparsity on masks
SCOPES = ("global", "layer-wise")


def scoped_masks(scores: Scores, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """:func:`global_masks` (``scope="global"``) or :func:`layerwise_masks` (``"layer-wise"``)."""
    require(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")
    return global_masks(scores, sparsity) if scope == "global" else layerwise_masks(scores, sparsity)


def mask_summary(scores: Scores, sparsity: float, scope: str) -> dict[str, Any]:
    """Lesson 06's explorer: prune ``scores`` (e.g. :func:`magnitude_scores`) to ``sparsity`` with one
    global threshold or per layer (:func:`scoped_masks`), and report each tensor's sparsity (names
    without ``.weight``), the global one, and the lowest score kept: over all tensors, and in the
    strictest tensor (the largest of the per-tensor lowest kept scores).

    Returns: one table row, {column: value}.
    """
    masks = scoped_masks(scores, sparsity, scope)
    report = _report(masks)
    row: dict[str, Any] = {n.removesuffix(".weight"): f for n, f in report.fractions.items()}
    kept = [float(scores[n][m].min()) for n, m in masks.items() if m.any()]
    row["global"] = report.global_fraction
    row["lowest kept"] = min(kept) if kept else math.nan
    row["lowest kept, strictest tensor"] = max(kept) if kept else math.nan
    return row


def mask_figure(scores: Scores, sparsity: float, scope: str, layer: str | None = None) -> Any:
    """Lesson 06's explorer figure: per-tensor sparsity under both scopes (bars, this scope
    highlighted) and the keep-mask of ``layer`` (default: the largest tensor) as an image, rows =
    output channels, columns = inputs (a conv's in*kh*kw). A matplotlib ``Figure`` (not pyplot)."""
    from matplotlib.figure import Figure

    scores = _check_scores(scores)
    layer = max(scores, key=lambda n: scores[n].numel()) if layer is None else layer
    require(layer in scores, f"layer must be one of {list(scores)}, got {layer!r}")
    fig = Figure(figsize=(12, 3.8), layout="tight")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    names = [n.removesuffix(".weight") for n in scores]
    x = torch.arange(len(names)).numpy()
    for k, other in enumerate(SCOPES):
        fractions = _report(scoped_masks(scores, sparsity, other)).fractions
        ax1.bar(x + (k - 0.5) * 0.4, list(fractions.values()), 0.4, label=other, alpha=1.0 if other == scope else 0.35)
    ax1.axhline(sparsity, color="k", linestyle=":", label="target")
    ax1.set(title=f"Per-tensor sparsity at {sparsity:.0%}", ylabel="fraction pruned", ylim=(0, 1.05), xticks=x)
    ax1.set_xticklabels(names, rotation=30, ha="right")
    ax1.legend(fontsize=8)
    mask = scoped_masks(scores, sparsity, scope)[layer]
    ax2.imshow(mask.reshape(mask.shape[0], -1).numpy(), cmap="gray", aspect="auto", interpolation="nearest")
    ax2.set(title=f"{layer} keep-mask ({scope}; white = kept)", xlabel="input column", ylabel="output channel")
    return fig
