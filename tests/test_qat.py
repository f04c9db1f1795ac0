"""Tests of lessons_lib.qat: the STE, fake quantization against torch's own kernels, prepare /
convert, batch-norm folding, the learning-rate schedule, progressive QAT. Seeded, tiny, offline."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import qat, quantize, teachers, training


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return teachers.SmallCNN(channels=(4, 8, 8), hidden=16).eval()


def _observe(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_ste_round_rounds_forward_and_passes_the_gradient_through():
    x = torch.tensor([-1.6, -0.4, 0.2, 0.5, 2.7], requires_grad=True)
    y = qat.ste_round(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
    fq = qat.FakeQuantize(qat.activation_config(8), track=True)
    _observe(fq, torch.tensor([0.0, 2.55]))  # range [0, 2.55]: scale 0.01, zero point 0
    x = torch.tensor([-1.0, 0.0, 0.3, 1.234, 2.55, 3.0, 10.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quantize_forward_equals_quantize_then_dequantize():
    w = torch.randn(6, 5, generator=_gen())
    fq = qat.FakeQuantize(qat.weight_config(4), track=False)
    scale, zero = quantize.compute_qparams(w, fq.config)
    expected = quantize.dequantize(quantize.quantize(w, scale, zero, fq.config), scale, zero, fq.config)
    torch.testing.assert_close(fq(w), expected, rtol=0, atol=0)
    assert fq(w).unique(dim=None).numel() <= 6 * 16  # at most 16 levels per row


def test_fake_quantize_matches_torchs_kernels_values_and_gradients():
    """An independent reference: torch.fake_quantize_per_{channel,tensor}_affine, same qparams."""
    w = torch.randn(8, 12, generator=_gen(1), requires_grad=True)
    cfg = qat.weight_config(4)
    scale, zero = quantize.compute_qparams(w.detach(), cfg)
    ours = qat.FakeQuantize(cfg, track=False)(w)
    ref_w = w.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(ref_w, scale, zero, 0, -8, 7)
    torch.testing.assert_close(ours, ref)
    g = torch.randn(8, 12, generator=_gen(2))
    (ours * g).sum().backward(), (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad)

    x = torch.randn(4, 7, generator=_gen(3)) * 3
    fq = _observe(qat.FakeQuantize(qat.activation_config(8), track=True), x)
    xs = (x * 1.5).requires_grad_()  # some values now fall outside the frozen range
    s, z = fq.qparams()
    ours = fq(xs)
    ref_x = xs.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(ref_x, float(s), int(z), 0, 255)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward(), ref.sum().backward()
    torch.testing.assert_close(xs.grad, ref_x.grad)


def test_activation_range_first_batch_then_moving_average_then_frozen_in_eval():
    fq = qat.FakeQuantize(qat.activation_config(8, averaging_constant=0.5), track=True)
    with pytest.raises(RuntimeError, match="seen no data"):
        fq.eval()(torch.ones(3))
    fq.train()
    fq(torch.tensor([-1.0, 2.0]))
    assert (float(fq.lo), float(fq.hi)) == (-1.0, 2.0)
    fq(torch.tensor([-3.0, 4.0]))
    assert (float(fq.lo), float(fq.hi)) == (-2.0, 3.0)  # halfway: c = 0.5
    fq.eval()(torch.tensor([-100.0, 100.0]))
    assert (float(fq.lo), float(fq.hi)) == (-2.0, 3.0)


def test_prepare_swaps_layers_keeps_weights_and_disabled_quantization_is_the_float_model():
    model = _tiny_cnn()
    qat.fold_batchnorm_(model)
    x = torch.randn(5, 1, 28, 28, generator=_gen())
    with torch.no_grad():
        reference = model(x)
    names = qat.prepare_(model, qat.weight_config(4), qat.activation_config(8))
    assert names == ["features.0", "features.4", "features.8", "classifier.1", "classifier.4"]
    assert isinstance(model.features[0], qat.QATConv2d) and isinstance(model.classifier[4], qat.QATLinear)
    assert qat.prepare_(model, qat.weight_config(4)) == []  # already prepared: nothing to do
    for m in model.modules():
        if isinstance(m, qat.QAT_TYPES):
            m.set_quantization(False)
    _observe(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)
        for m in model.modules():
            if isinstance(m, qat.QAT_TYPES):
                m.set_quantization(True)
        assert not torch.allclose(model(x), reference)  # 4-bit weights change the output


def test_fold_batchnorm_keeps_the_eval_output():
    model = _tiny_cnn()
    model.train()
    with torch.no_grad():  # give the BNs non-trivial running statistics
        for k in range(3):
            model(torch.randn(16, 1, 28, 28, generator=_gen(k)) * 2 + 1)
    model.eval()
    x = torch.randn(4, 1, 28, 28, generator=_gen(9))
    with torch.no_grad():
        before = model(x)
    assert qat.fold_batchnorm_(model) == ["features.0", "features.4", "features.8"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 8), (2, 8), (4, None)])
def test_convert_gives_integer_weights_equal_to_the_fake_quantized_ones(w_bits, a_bits):
    model = _tiny_cnn(seed=w_bits)
    qat.fold_batchnorm_(model)
    qat.prepare_(model, qat.weight_config(w_bits), qat.activation_config(a_bits) if a_bits else None)
    x = torch.randn(6, 1, 28, 28, generator=_gen(4))
    _observe(model, x)
    integer = qat.convert(model)
    assert isinstance(model.features[0], qat.QATConv2d), "convert must leave the original untouched"
    for name in ("features.0", "features.4", "features.8", "classifier.1", "classifier.4"):
        q, fake = integer.get_submodule(name), model.get_submodule(name)
        assert q.qweight.dtype == torch.int8
        assert int(q.qweight.min()) >= -(2 ** (w_bits - 1)) and int(q.qweight.max()) <= 2 ** (w_bits - 1) - 1
        torch.testing.assert_close(q.dequantized_weight(), fake.weight_fq(fake.weight).detach(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(integer(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_integer_accumulator_holds_exact_integers():
    lin = nn.Linear(64, 8)
    layer = qat.QATLinear.from_float(lin, qat.weight_config(4), qat.activation_config(8))
    x = torch.randn(10, 64, generator=_gen(5))
    _observe(layer, x)
    q = qat.convert(nn.Sequential(layer))[0]
    xi, _ = q._integer_input(x)
    acc = F.linear(xi, q.qweight.float())
    assert torch.equal(xi, xi.round()) and torch.equal(acc, acc.round())
    exact = (xi.double() @ q.qweight.double().T)
    assert torch.equal(acc.double(), exact)


def test_schedule_matches_its_formula_at_the_boundaries():
    f = training.warmup_step_decay(total_steps=100, warmup_steps=10, decay_every=30, gamma=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(29) == 1.0  # step // 30 == 0
    assert f(30) == pytest.approx(0.1) and f(59) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.01) and f(99) == pytest.approx(0.001)
    g = training.warmup_step_decay(total_steps=5, warmup_steps=0, decay_every=2, gamma=0.5)
    assert [g(s) for s in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert rates == pytest.approx([0.2 * f(s) for s in range(40)])


def test_fine_tune_lowers_the_loss_and_follows_the_schedule():
    torch.manual_seed(0)
    X = torch.randn(256, 8, generator=_gen(6))
    y = (X[:, 0] + X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    qat.prepare_(model, qat.weight_config(4), qat.activation_config(8))

    def batches():
        while True:
            for i in range(0, 256, 32):
                yield X[i : i + 32], y[i : i + 32]

    schedule = training.warmup_step_decay(60, 5, 40)
    history = qat.fine_tune(model, batches(), 60, 0.1, schedule)
    assert history["lr"] == pytest.approx([0.1 * schedule(s) for s in range(60)])
    assert sum(history["loss"][-8:]) < 0.5 * sum(history["loss"][:8])
    assert not model.training
    with pytest.raises(ValueError, match="ran out after 2"):
        qat.fine_tune(model, iter([(X[:4], y[:4])] * 2), 3, 0.1)


def test_progressive_prepares_stage_by_stage_and_trains_after_each():
    model = _tiny_cnn()
    qat.fold_batchnorm_(model)
    seen = []

    def train_stage(m, k):
        seen.append(sorted(n for n, mod in m.named_modules() if isinstance(mod, qat.QAT_TYPES)))
        return k * 10

    stages = [["features.0"], ["features.4", "features.8"], ["classifier.1", "classifier.4"]]
    out = qat.progressive_(model, stages, qat.weight_config(4), qat.activation_config(8), train_stage)
    assert out == [0, 10, 20]
    assert seen == [["features.0"], ["features.0", "features.4", "features.8"],
                    ["classifier.1", "classifier.4", "features.0", "features.4", "features.8"]]


def test_bad_input_is_refused_with_what_is_accepted():
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            qat.weight_config(bits)
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            qat.activation_config(bits)
    with pytest.raises(ValueError, match=r"warmup_steps must be an int in \[0, total_steps=100\)"):
        training.warmup_step_decay(100, 100, 30)
    with pytest.raises(ValueError, match=r"warmup_steps must be an int in \[0, total_steps=100\)"):
        training.warmup_step_decay(100, 150, 30)
    with pytest.raises(ValueError, match="decay_every must be an int >= 1"):
        training.warmup_step_decay(100, 10, 0)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        training.warmup_step_decay(100, 10, 30, gamma=0)
    model = _tiny_cnn()
    noop = lambda m, k: None  # noqa: E731
    for stages in ([], [[]], [["features.0"], []]):
        with pytest.raises(ValueError, match="stages must be a non-empty list of non-empty lists"):
            qat.progressive_(model, stages, qat.weight_config(4), None, noop)
    with pytest.raises(ValueError, match="a layer appears in two stages"):
        qat.progressive_(model, [["features.0"], ["features.0"]], qat.weight_config(4), None, noop)
    with pytest.raises(ValueError, match="not Linear/Conv2d layers of the model: \\['features.1'\\]"):
        qat.progressive_(model, [["features.1"]], qat.weight_config(4), None, noop)
    with pytest.raises(ValueError, match="not Linear/Conv2d layers"):
        qat.prepare_(model, qat.weight_config(4), layers=["nope"])
    assert not any(isinstance(m, qat.QAT_TYPES) for m in model.modules()), "refused input changed the model"
    with pytest.raises(ValueError, match="no QAT layers"):
        qat.convert(model)
    with pytest.raises(ValueError, match="steps >= 1 and lr > 0"):
        qat.fine_tune(model, iter([]), 0, 0.1)


def test_calibrate_sets_ranges_in_eval_mode_so_dropout_does_not_inflate_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    assert qat.prepare_(model, qat.weight_config(8), qat.activation_config(8), layers=["2"]) == ["2"]
    x = torch.randn(64, 8, generator=_gen(7))
    qat.calibrate_(model, [x[:32], x[32:]])
    assert not model.training
    with torch.no_grad():  # what reaches layer 2 without dropout, batch by batch
        h1, h2 = (model[0](b) for b in (x[:32], x[32:]))
    fq = model[2].input_fq
    h = torch.cat([h1, h2])  # calibration: the running min and max over every batch, each batch counts the same
    assert float(fq.hi) == pytest.approx(float(h.max()), rel=1e-6) and float(fq.lo) == pytest.approx(float(h.min()), rel=1e-6)
    from torch.ao.quantization.observer import MinMaxObserver

    theirs = MinMaxObserver(quant_min=0, quant_max=255)
    for b in (h2, h1):
        theirs(b)
    t_scale, t_zero = theirs.calculate_qparams()
    scale, zero = fq.qparams()
    torch.testing.assert_close(scale, t_scale.reshape(()))
    assert int(zero) == int(t_zero)
    qat.calibrate_(model, [x[32:], x[:32]])  # again, other order: the same range (calibration starts afresh)
    assert float(fq.hi) == pytest.approx(float(h.max()), rel=1e-6) and float(fq.lo) == pytest.approx(float(h.min()), rel=1e-6)
    wide = x[:32] * 100
    with torch.no_grad():
        model[2].train()(wide)  # in training, the moving average takes over: one step of c towards the batch
    c = fq.config.averaging_constant
    assert float(fq.hi) == pytest.approx(float(h.max()) + c * (float(wide.max()) - float(h.max())), rel=1e-5)
    with pytest.raises(ValueError, match="no activation quantizers"):
        qat.calibrate_(nn.Sequential(qat.QATLinear.from_float(nn.Linear(2, 2), qat.weight_config(8), None)), [x])
    with pytest.raises(ValueError, match="at least one batch"):
        qat.calibrate_(model, [])


def test_asymmetric_weights_and_unknown_optimizers_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="weights must be quantized symmetrically"):
        qat.prepare_(model, quantize.QuantConfig(bits=4, symmetric=False), None)
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adamw'\)"):
        qat.fine_tune(model, iter([]), 1, 0.1, optimizer="adam")
