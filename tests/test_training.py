"""Tests of lessons_lib.training: the shared warm-up + cosine rate and the shared training loop."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lessons_lib import training


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [training.warmup_cosine(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and training.warmup_cosine(100, 100, 10, 1.0) == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 90)))  # halfway: 0.55


def _problem():
    X = torch.randn(128, 4, generator=torch.Generator().manual_seed(0))
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    torch.manual_seed(0)
    return nn.Linear(4, 1), X, y


@pytest.mark.parametrize("optimizer", training.OPTIMIZERS)
def test_run_minimises_logs_every_step_and_follows_the_rate(optimizer):
    model, X, y = _problem()

    def objective(batch):
        loss = ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)] * 50
    history = training.run(objective, batches, 200, lambda s: 0.1 * 0.99**s, model.parameters(), optimizer=optimizer)
    assert history["lr"] == pytest.approx([0.1 * 0.99**s for s in range(200)])
    assert len(history["mse"]) == 200 and history["mse"][-1] < 0.05 * history["mse"][0]


def test_run_refuses_bad_input_and_stops_on_a_non_finite_loss():
    model, X, y = _problem()
    objective = lambda b: (((model(b[0]).squeeze(-1) - b[1]) ** 2).mean(), {})  # noqa: E731
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adamw'\)"):
        training.run(objective, [(X, y)], 1, lambda s: 0.1, model.parameters(), optimizer="adam")
    with pytest.raises(ValueError, match="batches ran out after 2 of 3 steps"):
        training.run(objective, [(X, y)] * 2, 3, lambda s: 0.1, model.parameters())
    with pytest.raises(FloatingPointError, match="at step 0"):
        training.run(objective, [(X * float("nan"), y)], 1, lambda s: 0.1, model.parameters())
