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


def test_decays_selects_the_weights_that_decay_and_matches_explicit_parameter_groups():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    twin = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    X = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))

    def objective_for(m):
        return lambda x: (m(x).pow(2).mean(), {})

    training.run(objective_for(model), [X] * 5, 5, lambda s: 0.05, model.parameters(), weight_decay=0.5,
                 decays=training.matrices_only, betas=(0.9, 0.95), grad_clip=1.0)
    # the same by hand: nanoGPT's two groups, AdamW with the same betas, clipping over every parameter
    params = list(twin.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.5},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=0.05, betas=(0.9, 0.95))
    for _ in range(5):
        loss = twin(X).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [p.dim() >= 2 for p in params].count(True) == 2 and training.matrices_only(model[1].weight) is False


def test_on_step_sees_every_step_and_can_stop_training_early():
    model, X, y = _problem()
    objective = lambda b: (((model(b[0]).squeeze(-1) - b[1]) ** 2).mean(), {"mse": 0.0})  # noqa: E731
    seen = []

    def stop_after_three(step, loss):
        seen.append((step, loss))
        return step == 2

    history = training.run(objective, [(X, y)] * 10, 10, lambda s: 0.01, model.parameters(), on_step=stop_after_three)
    assert [s for s, _ in seen] == [0, 1, 2] and len(history["lr"]) == 3 and all(math.isfinite(v) for _, v in seen)
