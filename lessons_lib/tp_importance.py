"""Torch-Pruning's own channel importance, computed by its classes, to hold against ours.

Torch-Pruning (Fang, Ma, Song, Mi, Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023,
arXiv:2301.12900; version 1.6.1) scores the output channels of a layer through its dependency
graph: ``DG.get_pruning_group(layer, prune_*_out_channels, idxs)`` collects every slice coupled
to those channels (the filter, its BatchNorm, the next layer's input columns) and an importance
object turns the group into one score per channel. Its options, set in :data:`OPTIONS`:

- ``group_reduction``: how the coupled layers' scores merge: "mean" (its default), "sum", "max",
  "prod", "gate" (the last layer) or "first" (the root layer alone). Ours score one weight alone,
  so "first": the channel's own filter.
- ``normalizer``: a rescaling of each group's scores: "mean" (its default, divide by their mean),
  "sum", "max", "standarization" (min-max), "gaussian", "lamp", "sentinel_q", or None (raw). A
  positive per-layer scale keeps each layer's ranking and changes only comparisons across layers;
  None keeps the raw value, comparable with ours.
- ``bias``: also add the bias terms; False, as ours score the weight only.

With them, per output channel c of a weight W (s runs over its inputs and kernel taps; ``imp`` is
``lessons_lib.importance``; gbar = mean over batches of each batch's mean-loss gradient):

- "magnitude_l1", ``GroupMagnitudeImportance(p=1)``: sum_s |w_s| = ``imp.reduce(imp.magnitude(m), "l1")``.
- "magnitude_l2", ``GroupMagnitudeImportance(p=2)``: sum_s w_s^2, the *squared* filter norm,
  ``imp.reduce(imp.magnitude(m), "l2") ** 2`` = ``imp.reduce(imp.magnitude(m, p=2), "sum")``.
- "taylor", ``GroupTaylorImportance(multivariable=True)``: |sum_s gbar_s w_s| =
  ``sqrt(imp.reduce(imp.taylor(.., form="signed"), "taylor_group"))``; on one batch the square root
  of Molchanov's group form ``imp.taylor(.., form="group")``. It reads ``p.grad``: we backpropagate
  every batch's mean loss and divide the accumulated ``.grad`` by the number of batches.
  (``multivariable=False``, its default, gives sum_s |gbar_s w_s| = ``reduce(taylor(.., form="signed"), "l1")``.)
- "hessian", ``GroupHessianImportance``: sum_s w_s^2 h_s, h read from ``p.grad`` after the
  procedure its docstring prescribes (per sample n: ``zero_grad``, backward of the sample's loss,
  ``accumulate_grad(model)``). It means h = mean_n g_n^2, the empirical Fisher diagonal (score =
  ``2 * reduce(0.5 * fisher * w^2, "sum")``, Theis et al.'s Fisher pruning), but in 1.6.1
  ``accumulate_grad`` tests ``name not in self._accu_grad`` on a dict keyed by the parameter: the
  test is always true, so every call *overwrites* the buffer and the count stays 1. It holds the
  LAST sample's squared gradient, not the sum or the mean of all of them, so the score is
  sum_s w_s^2 g_N,s^2 = ``reduce(fisher(last sample alone) * w^2, "sum")`` (pinned by the tests).

Every kind runs on a deep copy of the model in eval mode (like ours: dropout off, BatchNorm on its
running statistics): the caller's model gets no ``.grad``, no hook, no change of weights or mode
(``build_dependency`` itself calls ``model.eval()`` and never restores the mode). Scores come back
as TP's ``float32``.
"""
from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lessons_lib import prune, stats, surgery
from lessons_lib.checks import is_number, require

Scores = dict[str, torch.Tensor]
KINDS = ("magnitude_l1", "magnitude_l2", "taylor", "hessian")
GRADIENT_KINDS = ("taylor", "hessian")
OPTIONS = MappingProxyType({"group_reduction": "first", "normalizer": None, "bias": False})


def _importance(tp: Any, kind: str) -> Any:
    classes = tp.importance
    if kind == "magnitude_l1":
        return classes.GroupMagnitudeImportance(p=1, **OPTIONS)
    if kind == "magnitude_l2":
        return classes.GroupMagnitudeImportance(p=2, **OPTIONS)
    if kind == "taylor":
        return classes.GroupTaylorImportance(multivariable=True, **OPTIONS)
    return classes.GroupHessianImportance(**OPTIONS)


def _ignored(model: nn.Module, ignored_layers: Iterable) -> set[str]:
    """Module names of ``ignored_layers``: modules of ``model``, module names, or weight names."""
    require(isinstance(ignored_layers, Iterable) and not isinstance(ignored_layers, (str, nn.Module)),
            f"ignored_layers must be a list of modules of the model or names, got {ignored_layers!r}")
    by_id = {id(m): n for n, m in model.named_modules()}
    names = set(by_id.values())
    out = set()
    for item in ignored_layers:
        name = by_id.get(id(item)) if isinstance(item, nn.Module) else item
        name = name.removesuffix(".weight") if isinstance(name, str) and name not in names else name
        require(isinstance(name, str) and name in names,
                f"ignored_layers: {item!r} is not a submodule of the model nor a module/weight name")
        out.add(name)
    return out


def _pairs(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        require(isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor),
                f"each batch must be an (inputs, targets) pair of tensors, got {type(batch).__name__}")
        yield batch[0].to(device), batch[1].to(device)


def _loss(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(outputs, targets)
    require(isinstance(loss, torch.Tensor) and loss.dim() == 0, "loss_fn must return a scalar mean loss")
    return loss


def _mean_gradients(work: nn.Module, batches: Iterable, loss_fn: Callable, device: torch.device) -> None:
    """``p.grad`` = mean over batches of each batch's mean-loss gradient (TP's Taylor reads it)."""
    count = 0
    for x, y in _pairs(batches, device):
        _loss(loss_fn, work(x), y).backward()  # accumulates into .grad
        count += 1
    require(count > 0, "batches is empty: pass at least one (inputs, targets) batch")
    for p in work.parameters():
        if p.grad is not None:
            p.grad.div_(count)


def _per_sample(work: nn.Module, batches: Iterable, loss_fn: Callable, device: torch.device, imp: Any) -> None:
    """GroupHessianImportance's documented loop: per sample zero_grad, backward, accumulate_grad."""
    used = 0
    for x, y in _pairs(batches, device):
        outputs = work(x)
        for i in range(len(x)):
            work.zero_grad()
            _loss(loss_fn, outputs[i:i + 1], y[i:i + 1]).backward(retain_graph=i < len(x) - 1)
            imp.accumulate_grad(work)
            used += 1
    require(used > 0, "batches gave no sample: pass at least one non-empty (inputs, targets) batch")


def channel_scores(model: nn.Module, kind: str, example_inputs: Any, batches: Iterable | None = None,
                   loss_fn: Callable | None = None, ignored_layers: Sequence = ()) -> Scores:
    """Torch-Pruning's importance of every output channel of each Conv/Linear not ignored (the
    module docstring gives each ``kind``'s formula in terms of ``lessons_lib.importance``).

    Args:
        model: traced by ``model(example_inputs)`` (a copy of it is; the model itself is untouched).
        kind: one of :data:`KINDS`; "taylor" and "hessian" need ``batches`` and ``loss_fn``.
        example_inputs: e.g. one input batch, for ``tp.DependencyGraph().build_dependency``.
        batches: iterable of (inputs, targets), read once; loss_fn(outputs, targets): the mean loss.
        ignored_layers: modules of ``model`` or their (weight) names to leave out.
    Returns: {weight name: (C_out,) float32 scores}, higher = more important.
    Raises: ValueError for an unknown kind or missing data, before any work.
    """
    require(isinstance(kind, str) and kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
    if kind in GRADIENT_KINDS:
        require(isinstance(batches, Iterable) and not isinstance(batches, (torch.Tensor, str)),
                f"kind {kind!r} needs batches, an iterable of (inputs, targets) pairs (gradient kinds: "
                f"{GRADIENT_KINDS}; data-free: magnitude_l1, magnitude_l2), got {type(batches).__name__}")
        require(callable(loss_fn), f"kind {kind!r} needs loss_fn(outputs, targets) -> mean loss "
                                   f"(e.g. F.cross_entropy), got {loss_fn!r}")
    skip = _ignored(model, ignored_layers)
    targets = [n for n, m in model.named_modules() if isinstance(m, prune.PRUNABLE) and n not in skip]
    require(bool(targets), "no Conv/Linear layer left to score (all ignored, or none in the model)")
    tp = surgery._torch_pruning()
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.grad = None  # the caller's gradients, copied along, must not enter TP's scores
        p.requires_grad_(True)
    device = next(work.parameters()).device
    inputs = example_inputs.to(device) if isinstance(example_inputs, torch.Tensor) else example_inputs
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=inputs)
    work.eval()
    imp = _importance(tp, kind)
    with torch.enable_grad():
        if kind == "taylor":
            _mean_gradients(work, batches, loss_fn, device)
        elif kind == "hessian":
            _per_sample(work, batches, loss_fn, device, imp)
    modules = dict(work.named_modules())
    out = {}
    for name in targets:
        layer = modules[name]
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(layer, fn, idxs=list(range(layer.weight.shape[0])))
        out[f"{name}.weight"] = imp(group).detach()
    return out


# ----------------------------------------------------------------------------- agreement
def _common(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> list[str]:
    require(isinstance(ours, Mapping) and isinstance(theirs, Mapping), "ours and theirs must be dicts name -> scores")
    names = [n for n in ours if n in theirs]
    require(bool(names), f"ours and theirs share no layer name: {list(ours)[:3]} vs {list(theirs)[:3]}")
    for n in names:
        require(ours[n].shape == theirs[n].shape and ours[n].dim() == 1,
                f"{n!r}: need 1-D per-channel scores of one shape, got {tuple(ours[n].shape)} and "
                f"{tuple(theirs[n].shape)}")
    return names


def agreement(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer (the names both hold), Spearman's rank correlation of two per-channel scorings."""
    return {n: stats.spearman(ours[n], theirs[n]) for n in _common(ours, theirs)}


def same_removed(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], ratio: float) -> float:
    """Fraction of the shared layers in which both scorings remove the same set of channels, the
    ``round(ratio * C)`` lowest as ``prune.channel_masks`` picks them (ties: lower index first)."""
    require(is_number(ratio) and 0 <= ratio < 1, f"ratio must be a number in [0, 1), got {ratio!r}")
    names = _common(ours, theirs)
    a = prune.channel_masks({n: ours[n] for n in names}, ratio)
    b = prune.channel_masks({n: theirs[n] for n in names}, ratio)
    return sum(bool(torch.equal(a[n].cpu(), b[n].cpu())) for n in names) / len(names)
