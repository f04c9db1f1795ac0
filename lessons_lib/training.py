"""The one training loop and the warm-up + cosine learning rate that the library shares.

Used by :mod:`lessons_lib.zoo` (the rate of the teacher builds), :func:`lessons_lib.distill.train`
and :func:`lessons_lib.qat.fine_tune`; each of those only chooses the objective, the optimiser and
the schedule.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

OPTIMIZERS = ("sgd", "adamw")


def warmup_cosine(step: int, total: int, warmup: int, lr: float) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine decay from
    ``lr`` to ``0.1 * lr`` at ``total`` (Loshchilov & Hutter, SGDR, arXiv:1608.03983)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def run(objective: Callable, batches: Iterable, steps: int, lr_at: Callable[[int], float],
        params: Iterable[nn.Parameter], optimizer: str = "adamw", weight_decay: float = 0.0,
        grad_clip: float | None = None, progress: bool = False, desc: str = "train") -> dict[str, list[float]]:
    """Minimise ``objective(batch)[0]`` for ``steps`` optimiser steps, one batch each.

    Args:
        objective: ``batch -> (loss, parts)``, parts a dict of floats to log (e.g. ``{"loss": ...}``).
        batches: at least ``steps`` of them.
        lr_at: the learning rate of each step.
        params: what to optimise.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        grad_clip: max gradient norm, or None.
    Returns:
        The history: each logged part, and ``lr``, -> one float per step.
    Raises:
        ValueError if the batches run out; FloatingPointError if the loss stops being finite.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    params = list(params)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr_at(0), momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr_at(0), weight_decay=weight_decay)
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
    return dict(history)
