"""Tests of lessons_lib.distill: the KD loss against hand computations, its invariants, hint
losses, student builders and layer-copy initialisation. Seeded, tiny, offline."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lessons_lib import data, distill, teachers


def _hand_kd(s, t, y, T, alpha):
    """The KD loss written out with exp/log/sum only (no torch.nn.functional)."""
    def log_softmax(z):
        z = z - z.max(dim=-1, keepdim=True).values
        return z - z.exp().sum(dim=-1, keepdim=True).log()

    log_q, log_p = log_softmax(s / T), log_softmax(t / T)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()  # sum over classes, mean over rows
    ce = -log_softmax(s)[torch.arange(len(y)), y].mean()
    return alpha * ce + (1 - alpha) * T**2 * kl


def _tiny_llama(layers=4, hidden=32, vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g) * 2, torch.randn(6, 10, generator=g) * 2
    y = torch.randint(0, 10, (6,), generator=g)
    return s, t, y


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("T, alpha", [(1.0, 0.0), (2.0, 0.5), (4.0, 0.1), (3.0, 1.0)])
def test_kd_loss_equals_hand_computation(logits, T, alpha):
    s, t, y = logits
    torch.testing.assert_close(distill.kd_loss(s, t, y, temperature=T, alpha=alpha), _hand_kd(s, t, y, T, alpha))


def test_worked_example_two_classes():
    # p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    loss = distill.kd_loss(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), temperature=1.0, alpha=0.0)
    assert float(loss) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_default_kldivloss_is_c_times_too_small(logits):
    s, t, _ = logits
    with pytest.warns(UserWarning, match="batchmean"):  # torch itself warns about the default
        wrong = nn.KLDivLoss()(torch.log_softmax(s, -1), torch.softmax(t, -1))  # reduction="mean"
    right = distill.soft_loss(s, t, temperature=1.0)
    torch.testing.assert_close(right, wrong * s.size(-1))


def test_batchmean_divides_by_the_first_dimension_only_so_sequences_are_flattened():
    # (B, T, V) language-model logits: batchmean sums over all B*T tokens and divides by B alone,
    # i.e. T times the per-token KL; flattened to (B*T, V) it is the per-token KL, which kd_loss returns.
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 5, 11
    s, t = torch.randn(B, T, V, generator=g, dtype=torch.float64), torch.randn(B, T, V, generator=g, dtype=torch.float64)
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)  # (B, T, V)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # sum over V, mean over the B*T tokens
    batchmean = nn.KLDivLoss(reduction="batchmean")
    torch.testing.assert_close(batchmean(log_q, log_p.exp()), T * per_token)
    torch.testing.assert_close(batchmean(log_q.reshape(-1, V), log_p.exp().reshape(-1, V)), per_token)
    with pytest.warns(UserWarning, match="batchmean"):
        torch.testing.assert_close(nn.KLDivLoss()(log_q, log_p.exp()), per_token / V)  # the default: V times too small
    torch.testing.assert_close(distill.kd_loss(s, t, temperature=1.0, alpha=0.0), per_token.float())
    torch.testing.assert_close(distill.soft_loss(s.reshape(-1, V), t.reshape(-1, V), temperature=1.0), per_token.float())


def test_zero_when_student_equals_teacher(logits):
    s, _, _ = logits
    for T in (0.5, 1.0, 4.0):
        assert float(distill.kd_loss(s, s.clone(), temperature=T, alpha=0.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.kd_loss(s, s.clone() + 3.0, temperature=2.0, alpha=0.0)) == pytest.approx(0.0, abs=1e-6)


def test_kl_is_positive_when_they_differ(logits):
    s, t, _ = logits
    assert float(distill.kd_loss(s, t, temperature=2.0, alpha=0.0)) > 0.01


def test_value_does_not_depend_on_batch_size(logits):
    s, t, y = logits
    once = distill.kd_loss(s, t, y, temperature=3.0, alpha=0.3)
    repeated = distill.kd_loss(s.repeat(5, 1), t.repeat(5, 1), y.repeat(5), temperature=3.0, alpha=0.3)
    torch.testing.assert_close(repeated, once)


def test_sequence_logits_flatten_tokens_and_honour_ignore_and_mask():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[1, 3:] = -100  # ignored positions
    keep = y != -100
    expected = _hand_kd(s[keep], t[keep], y[keep], 2.0, 0.4)
    torch.testing.assert_close(distill.kd_loss(s, t, y, temperature=2.0, alpha=0.4), expected)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    torch.testing.assert_close(distill.kd_loss(s, t, y, temperature=2.0, alpha=0.4, mask=mask),
                               _hand_kd(s[keep & mask], t[keep & mask], y[keep & mask], 2.0, 0.4))
    # without labels (alpha = 0) every position of the sequence counts
    torch.testing.assert_close(distill.kd_loss(s, t, temperature=2.0, alpha=0.0),
                               _hand_kd(s.reshape(10, 7), t.reshape(10, 7), y.reshape(10).clamp_min(0), 2.0, 0.0))


def test_gradients_reach_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 5), nn.Linear(8, 5)
    d = distill.Distiller(student, teacher, distill.DistillConfig(temperature=2.0, alpha=0.5))
    loss, parts = d((torch.randn(4, 8), torch.randint(0, 5, (4,))))
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in d.parameters()} == {id(p) for p in student.parameters()}  # teacher not trainable
    assert parts["loss"] == pytest.approx(loss.item())


def test_temperature_squared_keeps_gradient_size_comparable():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 10, generator=g)
    norms, unscaled = {}, {}
    for T in (2.0, 4.0, 8.0):
        s = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
        distill.kd_loss(s, t, temperature=T, alpha=0.0).backward()
        norms[T] = float(s.grad.norm())
        unscaled[T] = norms[T] / T**2  # what the same loss without the T^2 factor would give
    assert max(norms.values()) / min(norms.values()) < 1.5
    assert unscaled[2.0] / unscaled[8.0] > 10  # without T^2, T=8 gradients shrink >10x


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
    ({"temperature": "2"}, "temperature must be a number"),
    ({"alpha": None}, "alpha must be a number"),
    ({"feature_weight": -1.0}, "feature_weight must be a number >= 0"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 10.0}, "steps must be an int >= 1"),
    ({"steps": True}, "steps must be an int >= 1"),
    ({"lr": 0.0}, "lr must be a number > 0"),
    ({"lr": "1e-3"}, "lr must be a number > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
    ({"warmup": -1}, "warmup must be an int >= 0"),
    ({"warmup": 2.5}, "warmup must be an int >= 0"),
    ({"grad_clip": 0.0}, "grad_clip must be a number > 0 or None"),
    ({"ignore_index": 1.5}, "ignore_index must be an int"),
])
def test_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distill.DistillConfig(**kwargs)


def test_loss_refuses_bad_input(logits):
    s, t, y = logits
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill.kd_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="labels=None needs alpha=0"):
        distill.kd_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="share the vocabulary"):
        distill.kd_loss(s, torch.randn(6, 12), y, alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits=None needs alpha=1"):
        distill.kd_loss(s, None, y, alpha=0.5)
    with pytest.raises(ValueError, match="alpha < 1 needs a teacher"):
        distill.Distiller(nn.Linear(2, 2), None, distill.DistillConfig(alpha=0.5))((torch.randn(3, 2), torch.tensor([0, 1, 0])))
    with pytest.raises(ValueError, match="hints need a teacher"):
        distill.Distiller(nn.Linear(2, 2), None, distill.DistillConfig(feature_weight=1.0), [distill.FeatureHint("", "", 2, 2)])


def test_offline_teacher_logits_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 5), nn.Linear(8, 5)
    x, y = torch.randn(4, 8), torch.randint(0, 5, (4,))
    cfg = distill.DistillConfig(temperature=3.0, alpha=0.2)
    live, _ = distill.Distiller(student, teacher, cfg)((x, y))
    (g_live,) = torch.autograd.grad(live, student.weight)
    with torch.no_grad():
        cached = teacher(x)
    offline, _ = distill.Distiller(student, None, cfg)((x, y, cached))
    (g_offline,) = torch.autograd.grad(offline, student.weight)
    assert torch.equal(live, offline) and torch.equal(g_live, g_offline)


# ----------------------------------------------------------------------------- hints
def test_feature_hint_projection_shapes_and_zero_at_match():
    torch.manual_seed(0)
    hint = distill.FeatureHint("features", "features", student_dim=16, teacher_dim=64, channel_dim=1)
    assert isinstance(hint.proj, nn.Linear) and tuple(hint.proj.weight.shape) == (64, 16)
    s, t = torch.randn(4, 16, 3, 3, requires_grad=True), torch.randn(4, 64, 3, 3)
    loss = hint(s, t)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert s.grad.shape == s.shape and hint.proj.weight.grad.shape == (64, 16)
    same = distill.FeatureHint("a", "b", 32, 32)  # equal widths: no projection
    assert isinstance(same.proj, nn.Identity)
    x = torch.randn(2, 5, 32)
    assert float(same(x, x)) == 0.0
    with pytest.raises(ValueError, match="expects widths"):
        hint(torch.randn(4, 8, 3, 3), t)


def test_distiller_with_hints_on_the_vision_teacher():
    torch.manual_seed(0)
    teacher = teachers.SmallCNN().eval()
    student = distill.vision_student(teacher, width=0.5)
    hint = distill.FeatureHint("features", "features", 32, 64, channel_dim=1)  # (16, 32, 32) convs
    d = distill.Distiller(student, teacher, distill.DistillConfig(alpha=0.5, feature_weight=1.0), [hint])
    loss, parts = d((torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])))
    assert set(parts) == {"task", "feature", "loss"}
    assert parts["loss"] == pytest.approx(parts["task"] + parts["feature"], rel=1e-5)
    loss.backward()
    assert hint.proj.weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in d.parameters()} == {id(p) for p in [*student.parameters(), hint.proj.weight]}


# ----------------------------------------------------------------------------- students
def test_vision_student_is_narrower_and_smaller():
    teacher = teachers.SmallCNN()
    student = distill.vision_student(teacher, width=0.5)
    convs = [m.out_channels for m in student.features if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 32] and student.classifier[1].out_features == 64
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert 0.2 < ratio < 0.3
    assert student(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="width must be in"):
        distill.vision_student(teacher, width=1.5)


def test_layer_map_is_every_other_layer_with_first_and_last():
    assert distill.layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert distill.layer_map(6, 3) == [0, 3, 5]
    assert distill.layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="student layers <= teacher layers"):
        distill.layer_map(6, 7)


def test_layer_copy_copies_the_right_layers_exactly():
    teacher = _tiny_llama(layers=6)
    student = distill.lm_student(teacher, num_layers=3, init="copy")
    t_layers, s_layers = teacher.model.layers, student.model.layers
    for i, j in enumerate([0, 3, 5]):
        for (name, p_s), (_, p_t) in zip(s_layers[i].named_parameters(), t_layers[j].named_parameters()):
            assert torch.equal(p_s, p_t), f"student layer {i}.{name} != teacher layer {j}"
    assert not torch.equal(s_layers[1].mlp.up_proj.weight, t_layers[1].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()  # a copy


def test_random_and_narrow_students():
    teacher = _tiny_llama(layers=4, hidden=32)
    torch.manual_seed(1)
    narrow = distill.lm_student(teacher, num_layers=2, hidden_size=16, init="random")
    assert (narrow.config.num_hidden_layers, narrow.config.hidden_size, narrow.config.intermediate_size) == (2, 16, 32)
    assert narrow.config.head_dim == 4 and teacher.config.hidden_size == 32  # the teacher's config is untouched
    assert narrow(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)
    random = distill.lm_student(teacher, num_layers=2, init="random")
    assert not torch.equal(random.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_student_builders_refuse_bad_input():
    teacher = _tiny_llama(layers=4)
    with pytest.raises(ValueError, match="student layers <= teacher layers"):
        distill.lm_student(teacher, num_layers=5, init="copy")
    with pytest.raises(ValueError, match="init must be one of"):
        distill.lm_student(teacher, num_layers=2, init="every-other")
    with pytest.raises(ValueError, match="narrower student needs init='random'"):
        distill.lm_student(teacher, num_layers=2, hidden_size=16, init="copy")
    other = _tiny_llama(layers=4, vocab=80)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill.copy_layers_(distill.lm_student(teacher, 2, init="random"), other)


# ----------------------------------------------------------------------------- training
def test_training_with_kd_moves_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    student = nn.Linear(4, 3)
    X = torch.randn(256, 4)
    y = teacher(X).argmax(-1).detach()
    cfg = distill.DistillConfig(temperature=2.0, alpha=0.0, steps=60, lr=0.05)
    with torch.no_grad():
        before = distill.kd_loss(student(X), teacher(X), temperature=2.0, alpha=0.0).item()
    history = distill.train(distill.Distiller(student, teacher, cfg),
                            data.minibatches(X, y, batch_size=32, generator=torch.Generator().manual_seed(0)), cfg)
    with torch.no_grad():
        after = distill.kd_loss(student(X), teacher(X), temperature=2.0, alpha=0.0).item()
    assert len(history["loss"]) == 60 and after < 0.5 * before
    with pytest.raises(ValueError, match="batches ran out"):
        distill.train(distill.Distiller(student, teacher, cfg), [(X, y)] * 3, cfg)


def test_minibatches_and_lm_windows_are_seeded_and_shifted():
    X, y = torch.arange(10.0), torch.arange(10)
    a = next(data.minibatches(X, y, batch_size=4, generator=torch.Generator().manual_seed(3)))
    b = next(data.minibatches(X, y, batch_size=4, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0].long(), a[1])
    ids = torch.arange(100)
    x, target = next(data.lm_windows(ids, block_size=8, batch_size=3, generator=torch.Generator().manual_seed(0)))
    assert x.shape == target.shape == (3, 8) and torch.equal(target, x + 1)
