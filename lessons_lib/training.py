"""The one training loop and the learning-rate schedules that the library shares.

Used by :mod:`lessons_lib.zoo` (the teacher builds), :func:`lessons_lib.distill.train` and
:func:`lessons_lib.qat.fine_tune`; each of those only chooses the objective, the optimiser, which
weights decay, the schedule and what to do after a step (evaluate, stop early).

The same loop runs data-parallel over any number of processes when it is handed a Hugging Face
Accelerate ``Accelerator`` (https://huggingface.co/docs/accelerate, "Add Accelerate to your code"):
the objective and the optimiser are prepared by it (DDP or FSDP wraps the objective, so gradients
are all-reduced during ``backward``), each process trains on its own rows of every global batch,
and the logged numbers are averaged over the processes. Without an accelerator nothing of this
runs and the loop is exactly the single-process one. :mod:`lessons_lib.scale` launches it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lessons_lib.checks import is_int

if TYPE_CHECKING:  # accelerate is optional: imported only by the caller that builds an Accelerator
    from accelerate import Accelerator

OPTIMIZERS = ("sgd", "adamw")


def warmup_cosine(step: int, total: int, warmup: int, lr: float) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine decay from
    ``lr`` to ``0.1 * lr`` at ``total`` (Loshchilov & Hutter, SGDR, arXiv:1608.03983)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def warmup_step_decay(total_steps: int, warmup_steps: int, decay_every: int, gamma: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then step decay.

        factor(step) = (step + 1) / warmup_steps          for step < warmup_steps
                     = gamma ** (step // decay_every)     afterwards

    (the source's ``lr * 0.1 ** (epoch // decay)``, with steps for epochs). Multiply the base
    learning rate by it, or pass it to ``torch.optim.lr_scheduler.LambdaLR``.
    """

    if not (is_int(total_steps) and total_steps >= 1):
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not (is_int(warmup_steps) and 0 <= warmup_steps < total_steps):
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}) "
                         f"(0 = no warm-up; a warm-up as long as training never trains at full rate), got {warmup_steps!r}")
    if not (is_int(decay_every) and decay_every >= 1):
        raise ValueError(f"decay_every must be an int >= 1 (steps between decays; > total_steps = never), got {decay_every!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1] (0.1 = divide by ten at each decay), got {gamma!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** (step // decay_every)

    return factor


def matrices_only(p: nn.Parameter) -> bool:
    """Weight decay for weight matrices and conv kernels only, not biases, norms or gains (dim < 2);
    the rule of nanoGPT's ``configure_optimizers`` and of the zoo's language models."""
    return p.dim() >= 2


class Supervised(nn.Module):
    """The objective ``(x, y) -> (loss_fn(model(x), y), {"loss": float})`` of supervised training, as a module.

    It computes what :func:`lessons_lib.qat.fine_tune`'s objective computes (inputs and targets moved
    to the model's device first), in the form :func:`run` needs under an accelerator: DDP and FSDP
    average gradients only for the passes that go through the module they wrap (PyTorch,
    "DistributedDataParallel" and "FSDP" notes), so a plain closure over the model cannot be wrapped.

    Args:
        model: the module to train.
        loss_fn: ``loss_fn(model(x), y)`` -> a scalar tensor (default cross-entropy).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model(x), y), got {loss_fn!r}")
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        device = next(self.model.parameters()).device
        loss = self.loss_fn(self.model(x.to(device)), y.to(device))
        return loss, {"loss": float(loss.detach())}


def shard_batch(batch: Any, index: int, count: int) -> Any:
    """Process ``index``'s rows of a global batch split over ``count`` processes.

    Every tensor of ``batch`` (a tensor, or tuples, lists and dicts of them; anything else is kept
    as is) gives its rows ``[index * B / count, (index + 1) * B / count)`` along dimension 0: the
    contiguous split of Accelerate's ``split_batches=True``, so the global batch, and with averaged
    gradients the optimisation, is the same whatever ``count`` (``count`` = 1 returns every row).

    Raises:
        ValueError: ``index`` not in [0, count), tensors with different numbers of rows, or a
            number of rows B that ``count`` does not divide.
    """
    if not (is_int(count) and count >= 1 and is_int(index) and 0 <= index < count):
        raise ValueError(f"need count >= 1 processes and a process index in [0, count), got index={index!r}, count={count!r}")
    sizes = set()

    def collect(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            if item.dim() == 0:
                raise ValueError("a batch tensor has no rows to split (0-d); every tensor of a batch needs a batch dimension")
            sizes.add(item.shape[0])
        elif isinstance(item, (list, tuple)):
            for x in item:
                collect(x)
        elif isinstance(item, dict):
            for x in item.values():
                collect(x)

    collect(batch)
    if len(sizes) > 1:
        raise ValueError(f"the tensors of a batch must have the same number of rows to be split, got {sorted(sizes)}")
    if sizes and next(iter(sizes)) % count:
        raise ValueError(f"a global batch of {next(iter(sizes))} rows cannot be split evenly over {count} processes: "
                         f"use a batch size divisible by {count}")
    rows = next(iter(sizes)) // count if sizes else 0

    def cut(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item[index * rows : (index + 1) * rows]
        if isinstance(item, (list, tuple)):
            out = [cut(x) for x in item]
            return type(item)(*out) if hasattr(item, "_fields") else type(item)(out)
        if isinstance(item, dict):
            return type(item)((k, cut(v)) for k, v in item.items())
        return item

    return cut(batch)


def _check_accelerated(accelerator: "Accelerator", objective: Callable, params: list[nn.Parameter]) -> None:
    """What :func:`run` needs from its arguments when it is given an accelerator."""
    if not isinstance(objective, nn.Module):
        raise ValueError(f"with an accelerator, objective must be an nn.Module (e.g. distill.Distiller, or "
                         f"training.Supervised(model, loss_fn)) that the accelerator can wrap to average gradients "
                         f"over the processes; got {type(objective).__name__}")
    if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(f"the accelerator's gradient_accumulation_steps must be 1 (run takes one optimiser step per "
                         f"batch; raise the batch size instead), got {accelerator.gradient_accumulation_steps}")
    owned = {id(p) for p in objective.parameters()}
    if not params or any(id(p) not in owned for p in params):
        raise ValueError("with an accelerator, params must be parameters of objective (their gradients are averaged "
                         "over the processes only there); pass objective.parameters() or a subset of them")


def _averaged(accelerator: "Accelerator", loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss and the logged parts, each averaged over the processes (one all-reduce)."""
    values = torch.tensor([float(loss), *(float(v) for v in parts.values())], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").cpu()
    return values[0], {key: float(v) for key, v in zip(parts, values[1:])}


def _anyone(accelerator: "Accelerator | None", flag: object) -> bool:
    """Whether ``flag`` is true on any process (on the only one without an accelerator)."""
    if accelerator is None:
        return bool(flag)
    votes = accelerator.reduce(torch.tensor([float(bool(flag))], device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


def run(objective: Callable, batches: Iterable, steps: int, lr_at: Callable[[int], float],
        params: Iterable[nn.Parameter], optimizer: str = "adamw", weight_decay: float = 0.0,
        decays: Callable[[nn.Parameter], bool] | None = None, betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = None, on_step: Callable[[int, float], bool | None] | None = None,
        progress: bool = False, desc: str = "train", accelerator: "Accelerator | None" = None) -> dict[str, list[float]]:
    """Minimise ``objective(batch)[0]`` for ``steps`` optimiser steps, one batch each.

    Args:
        objective: ``batch -> (loss, parts)``, parts a dict of floats to log (e.g. ``{"loss": ...}``).
        batches: at least ``steps`` of them.
        lr_at: the learning rate of each step.
        params: what to optimise.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        decays: which parameters it applies to, e.g. :func:`matrices_only`; None = all of them.
        betas: AdamW's moment coefficients.
        grad_clip: max gradient norm over ``params`` (in their order), or None.
        on_step: called as ``on_step(step, loss)`` after each optimiser step (evaluate, save the best
            weights, ...); returning True stops training there (early stopping), as minGPT's
            trainer callbacks.
        accelerator: None (the default): this process alone, exactly as the loop always ran. Or an
            ``accelerate.Accelerator``, on every process of a launch (:mod:`lessons_lib.scale`):
            ``objective`` must then be an ``nn.Module`` holding ``params`` (e.g. a
            ``distill.Distiller`` or :class:`Supervised`); it and the optimiser are prepared by the
            accelerator (DDP or FSDP: gradients averaged over the processes in ``backward``), each
            batch is a *global* batch of which every process takes its own rows
            (:func:`shard_batch`: the batch size must divide by the number of processes), the
            logged parts and the loss given to ``on_step`` are averaged over the processes, all of
            them stop when ``on_step`` returns True on any, and only the main process shows a
            progress bar. Every process must build the same objective (same seed, same initial
            weights) and draw the same batches. With equal rows per process and a loss that
            averages over rows, this is the single-process optimisation up to float rounding.
    Returns:
        The history: each logged part, and ``lr``, -> one float per step taken.
    Raises:
        ValueError if the batches run out; FloatingPointError if the loss stops being finite.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = list(params)
    if accelerator is not None:
        _check_accelerated(accelerator, objective, params)
    groups: list = params
    if decays is not None:
        groups = [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
                  {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr_at(0), momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=lr_at(0), betas=betas, weight_decay=weight_decay)
    clip_params = params
    if accelerator is not None:
        from accelerate.utils import DistributedType, send_to_device

        objective, opt = accelerator.prepare(objective, opt)
        if accelerator.distributed_type == DistributedType.FSDP:  # sharded: clip the wrapper's own parameters
            clip_params = list(objective.parameters())
    history: dict[str, list[float]] = defaultdict(list)
    batches = iter(batches)
    shown = progress and (accelerator is None or accelerator.is_main_process)
    bar = tqdm(range(steps), desc=desc, disable=not shown, leave=False)
    for step in bar:
        rate = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = rate
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {steps} steps") from None
        if accelerator is not None:
            batch = send_to_device(shard_batch(batch, accelerator.process_index, accelerator.num_processes), accelerator.device)
        loss, parts = objective(batch)
        seen = loss.detach()
        if accelerator is not None:
            seen, parts = _averaged(accelerator, seen, parts)
        if not torch.isfinite(seen):
            raise FloatingPointError(f"the loss became {float(seen)} at step {step} (learning rate {rate:.3g}): "
                                     "lower the learning rate or warm up")
        opt.zero_grad(set_to_none=True)
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss)
        if grad_clip is not None:
            if accelerator is None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            else:
                accelerator.clip_grad_norm_(clip_params, grad_clip)
        opt.step()
        for key, value in parts.items():
            history[key].append(value)
        history["lr"].append(rate)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(seen):.3f}")
        if on_step is not None and _anyone(accelerator, on_step(step, float(seen))):
            break
    return dict(history)
