"""The one training loop and the learning-rate schedules that the library shares.

Used by :mod:`lessons_lib.zoo` (the teacher builds), :func:`lessons_lib.distill.train` and
:func:`lessons_lib.qat.fine_tune`; each of those only chooses the objective, the optimiser, which
weights decay, the schedule and what to do after a step (evaluate, stop early).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lessons_lib.checks import is_int

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


def run(objective: Callable, batches: Iterable, steps: int, lr_at: Callable[[int], float],
        params: Iterable[nn.Parameter], optimizer: str = "adamw", weight_decay: float = 0.0,
        decays: Callable[[nn.Parameter], bool] | None = None, betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = None, on_step: Callable[[int, float], bool | None] | None = None,
        progress: bool = False, desc: str = "train") -> dict[str, list[float]]:
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
    Returns:
        The history: each logged part, and ``lr``, -> one float per step taken.
    Raises:
        ValueError if the batches run out; FloatingPointError if the loss stops being finite.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = list(params)
    groups: list = params
    if decays is not None:
        groups = [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
                  {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr_at(0), momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=lr_at(0), betas=betas, weight_decay=weight_decay)
    history: dict[str, list[float]] = defaultdict(list)
    batches = iter(batches)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        rate = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = rate
        try:
            loss, parts = objective(next(batches))
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {steps} steps") from None
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"the loss became {float(loss.detach())} at step {step} (learning rate {rate:.3g}): "
                                     "lower the learning rate or warm up")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        for key, value in parts.items():
            history[key].append(value)
        history["lr"].append(rate)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if on_step is not None and on_step(step, float(loss.detach())):
            break
    return dict(history)
