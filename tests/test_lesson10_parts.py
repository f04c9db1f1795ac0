"""Tests of what lesson 10 (notebooks/10_scaling_up.ipynb) adds to lessons_lib.scale: step timing
in the launched processes, the all-reduce timing, the in-process QAT arithmetic of N processes
(qat_sliced, quantized_codes), one training step for timing, and the explorer's model. CPU only, in
this process (the two-process launch itself is tests/test_scale.py's and the lesson's)."""
from __future__ import annotations

import pytest
import torch

from lessons_lib import qat, quantize, scale

TINY_QAT = scale.ScaleConfig(task="qat", steps=2, batch_size=2, block=16)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_qat_sliced_in_one_slice_is_the_lessons_qat_bit_for_bit():
    plain, h_plain = scale.train(TINY_QAT)  # qat.fine_tune: lesson 04's own path
    sliced, h_sliced = scale.qat_sliced(TINY_QAT, 1)
    assert _same(plain, sliced) and h_plain == h_sliced


def test_qat_sliced_in_two_slices_differs_only_by_rounding_without_fake_quant():
    whole, _ = scale.qat_sliced(TINY_QAT, 1, fake_quant=False)
    halves, _ = scale.qat_sliced(TINY_QAT, 2, fake_quant=False)
    assert all(not m.weight_fq.enabled for m in whole.modules() if isinstance(m, qat.QAT_TYPES))
    assert 0 <= scale.max_relative_difference(halves.state_dict(), whole.state_dict()) < 1e-5


def test_qat_sliced_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="config.task must be 'qat'"):
        scale.qat_sliced(scale.ScaleConfig(task="distill"), 1)
    with pytest.raises(ValueError, match="divides batch_size=2"):
        scale.qat_sliced(TINY_QAT, 3)
    with pytest.raises(ValueError, match="fake_quant must be True or False"):
        scale.qat_sliced(TINY_QAT, 1, fake_quant=1)


def test_quantized_codes_are_the_integers_the_fake_quantized_weights_stand_for():
    model, _ = scale.qat_sliced(scale.ScaleConfig(task="qat", steps=1, batch_size=2, block=8, bits=3), 1)
    codes = scale.quantized_codes(model)
    assert codes and all(".layers." in name for name in codes)
    for name, q in codes.items():
        m = model.get_submodule(name)
        assert int(q.min()) >= -4 and int(q.max()) <= 3  # 3-bit signed codes
        scale_, zero = quantize.compute_qparams(m.weight.detach(), m.weight_fq.config)
        fake = m.weight_fq(m.weight.detach())
        assert torch.allclose(quantize.dequantize(q, scale_, zero, m.weight_fq.config), fake)
    with pytest.raises(ValueError, match="no QAT layers"):
        scale.quantized_codes(torch.nn.Linear(2, 2))


def test_max_relative_difference_and_samples_per_second():
    a = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor([1, 2])}
    b = {"w": torch.tensor([3.0, 4.5]), "n": torch.tensor([9, 9])}  # integer tensors are not compared
    assert scale.max_relative_difference(a, a) == 0.0
    assert scale.max_relative_difference(b, a) == pytest.approx(0.5 / 5)
    with pytest.raises(ValueError, match="name different tensors"):
        scale.max_relative_difference(a, {"w": a["w"]})
    summary = {"config": {"batch_size": 8}, "step_seconds": [0.5, 0.25, 0.25, 1.0]}
    assert scale.samples_per_second(summary) == pytest.approx(8 / 0.375)
    with pytest.raises(ValueError, match="no step_seconds"):
        scale.samples_per_second({"config": {"batch_size": 8}, "step_seconds": []})


def test_training_step_trains_on_the_first_rows_and_refuses_others():
    step = scale.training_step(scale.ScaleConfig(task="distill", batch_size=4, block=16, student_layers=2))
    first = step(4)
    assert torch.isfinite(torch.tensor(first)) and torch.isfinite(torch.tensor(step(2)))
    with pytest.raises(ValueError, match="divides batch_size=4"):
        step(3)


@pytest.fixture
def one_process_accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_on_step_sees_every_step_and_changes_nothing(one_process_accelerator):
    config = scale.ScaleConfig(task="distill", steps=3, batch_size=2, block=16, student_layers=2)
    seen = []
    timed, h_timed = scale.train(config, one_process_accelerator, on_step=lambda step, loss: seen.append((step, loss)))
    plain, h_plain = scale.train(config, one_process_accelerator)
    assert [s for s, _ in seen] == [0, 1, 2] and [loss for _, loss in seen] == h_timed["loss"]
    assert _same(timed, plain) and h_timed == h_plain
    with pytest.raises(ValueError, match="on_step needs an accelerator"):
        scale.train(config, on_step=lambda step, loss: None)


def test_allreduce_seconds_needs_two_processes_and_checks_its_arguments():
    assert scale.allreduce_seconds(10) is None  # no process group in this process
    with pytest.raises(ValueError, match="numel must be an int >= 1"):
        scale.allreduce_seconds(0)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        scale.allreduce_seconds(10, repeats=0)


def test_scaling_estimate_reproduces_its_measurements_and_the_ideal():
    fixed = dict(step_full=0.6, step_part=0.35, allreduce=0.02, batch_size=8)
    one = scale.scaling_estimate(processes=1, global_batch=8, **fixed)
    assert one["step s"] == pytest.approx(0.6) and one["speedup"] == 1.0 and one["all-reduce share"] == 0
    two = scale.scaling_estimate(processes=2, global_batch=8, measured=1.3, **fixed)
    assert two["step s"] == pytest.approx(0.35 + 0.02) and two["measured speedup"] == 1.3
    assert scale.scaling_estimate(processes=2, global_batch=16, measured=1.3, **fixed)["measured speedup"] == "-"
    four = scale.scaling_estimate(processes=4, global_batch=8, **fixed)  # ring all-reduce: 2 (N-1)/N of the N=2 time
    assert four["step s"] == pytest.approx(0.1 + 0.5 / 8 * 2 + 0.02 * 1.5)
    ideal = scale.scaling_estimate(step_full=0.6, step_part=0.3, allreduce=0.0, batch_size=8, processes=8, global_batch=64)
    assert ideal["speedup"] == pytest.approx(8) and ideal["efficiency"] == pytest.approx(1)
    noisy = scale.scaling_estimate(step_full=0.3, step_part=0.4, allreduce=0.0, batch_size=8, processes=2, global_batch=8)
    assert noisy["speedup"] == pytest.approx(1)  # a half step timed longer than a full one: nothing splits
    with pytest.raises(ValueError, match="global_batch must be a number >= processes"):
        scale.scaling_estimate(processes=16, global_batch=8, **fixed)
    with pytest.raises(ValueError, match="batch_size must be an even int"):
        scale.scaling_estimate(step_full=0.6, step_part=0.35, allreduce=0.0, batch_size=3, processes=1, global_batch=8)
    fig = scale.scaling_figure(processes=4, global_batch=8, measured=1.3, **fixed)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 4
