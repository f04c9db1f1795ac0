"""Tests of lessons_lib.gate: the gate's bounds on both sides (absolute and relative, higher- and
lower-is-better, and binary rounding), the fallback order and its "nothing passes" answer, the picker's constraints
and its closest miss, the hardware flags, and the ValueErrors for bad input. Pure Python, fast."""
from __future__ import annotations

import math

import pytest
import torch

from lessons_lib import gate, sparse

ACC = gate.Metric("accuracy", higher_is_better=True, tolerance=0.25)  # bound 0.5 - 0.25 = 0.25
ACC_REL = gate.Metric("accuracy", higher_is_better=True, tolerance=0.25, relative=True)  # 0.5 - 0.125
PPL = gate.Metric("perplexity", higher_is_better=False, tolerance=2.0)  # 8 + 2 = 10
PPL_REL = gate.Metric("perplexity", higher_is_better=False, tolerance=0.5, relative=True)  # 8 + 4 = 12
BASE = {"accuracy": 0.5, "perplexity": 8.0}
EPS = 1e-6


# ----------------------------------------------------------------------------- check
@pytest.mark.parametrize("metric, bound, worse", [
    (ACC, 0.25, -1), (ACC_REL, 0.375, -1), (PPL, 10.0, +1), (PPL_REL, 12.0, +1)])
def test_a_value_exactly_at_the_bound_passes_and_just_past_it_fails(metric, bound, worse):
    assert metric.bound(BASE[metric.name]) == bound
    at = gate.check({metric.name: bound}, BASE, [metric])
    assert at.passed and at.rows[0].bound == bound and at.rows[0].violation == 0
    inside = gate.check({metric.name: bound - worse * EPS}, BASE, [metric])
    assert inside.passed and inside.rows[0].violation < 0
    past = gate.check({metric.name: bound + worse * EPS}, BASE, [metric])
    assert not past.passed and past.failed == (metric.name,)
    assert past.rows[0].violation == pytest.approx(EPS / BASE[metric.name])
    assert "fails by" in past.rows[0].reason and "passes" in at.rows[0].reason


def test_decimal_bounds_are_not_lost_to_binary_rounding():
    # 0.8 - 0.1 == 0.7000000000000001 in floating point; 0.7 is still exactly at the bound.
    ten_points = gate.Metric("accuracy", True, 0.1)
    assert 0.8 - 0.1 > 0.7 and gate.check({"accuracy": 0.7}, {"accuracy": 0.8}, [ten_points]).passed
    assert not gate.check({"accuracy": 0.6999}, {"accuracy": 0.8}, [ten_points]).passed


def test_zero_tolerance_means_no_worse_and_improvements_pass():
    strict = [gate.Metric("accuracy", True), gate.Metric("perplexity", False)]
    assert gate.check(BASE, BASE, strict).passed
    assert gate.check({"accuracy": 0.9, "perplexity": 3.0}, BASE, strict).passed
    result = gate.check({"accuracy": 0.49, "perplexity": 8.5}, BASE, strict)
    assert not result.passed and result.failed == ("accuracy", "perplexity")


def test_every_metric_must_pass_and_the_worst_violation_is_relative_to_each_baseline():
    result = gate.check({"accuracy": 0.45, "perplexity": 11.0}, BASE, [ACC, PPL])
    assert not result.passed and result.failed == ("perplexity",)
    assert result.worst_violation == pytest.approx(1.0 / 8.0)
    assert "FAIL (perplexity)" in str(result)


def test_a_nan_candidate_fails_instead_of_raising():
    result = gate.check({"accuracy": math.nan}, BASE, [ACC])
    assert not result.passed and result.rows[0].violation == math.inf and "NaN" in result.rows[0].reason


def test_missing_metrics_name_what_is_present():
    with pytest.raises(ValueError, match=r"\['f1'\] missing from candidate; candidate has: \['accuracy'\]"):
        gate.check({"accuracy": 0.5}, {"f1": 0.5, "accuracy": 0.5}, [gate.Metric("f1", True), ACC])
    with pytest.raises(ValueError, match="missing from baseline; baseline has: "):
        gate.check({"f1": 0.5}, BASE, [gate.Metric("f1", True)])


@pytest.mark.parametrize("kwargs, match", [
    ({"tolerance": -0.01}, "tolerance must be a finite number >= 0"),
    ({"tolerance": math.inf}, "tolerance must be a finite number >= 0"),
    ({"tolerance": True}, "tolerance must be a finite number >= 0"),
    ({"higher_is_better": 1}, "higher_is_better must be True or False"),
    ({"relative": "yes"}, "relative must be True or False")])
def test_a_bad_metric_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gate.Metric(**{"name": "accuracy", "higher_is_better": True, **kwargs})


def test_bad_arguments_of_check_raise():
    with pytest.raises(ValueError, match="distinct names"):
        gate.check(BASE, BASE, [ACC, ACC_REL])
    with pytest.raises(ValueError, match="non-empty sequence of Metric"):
        gate.check(BASE, BASE, [])
    with pytest.raises(ValueError, match="finite number"):
        gate.check(BASE, {"accuracy": math.nan}, [ACC])
    with pytest.raises(ValueError, match="must be a number"):
        gate.check({"accuracy": "0.5"}, BASE, [ACC])


def test_results_are_frozen_and_consistent():
    result = gate.check(BASE, BASE, [ACC])
    with pytest.raises(AttributeError):
        result.passed = False
    with pytest.raises(ValueError, match="must equal all"):
        gate.GateResult(False, result.rows)


# ----------------------------------------------------------------------------- fallback
CONFIGS = [("int4", {"accuracy": 0.2, "perplexity": 30.0}),
           ("int8-per-tensor", {"accuracy": 0.3, "perplexity": 10.5}),
           ("int8-per-channel", {"accuracy": 0.45, "perplexity": 9.0}),
           ("fp16", {"accuracy": 0.5, "perplexity": 8.0})]


def test_first_passing_returns_the_most_aggressive_config_that_passes():
    result = gate.first_passing(CONFIGS, BASE, [ACC, PPL])
    assert result.passed and result.chosen == "int8-per-channel" and result.fell_back == 2
    assert [name for name, _ in result.tried] == ["int4", "int8-per-tensor", "int8-per-channel"]
    assert result.result.passed and result.closest is None
    assert "after 2 fallback(s)" in str(result)
    first = gate.first_passing(CONFIGS[3:], BASE, [ACC, PPL])
    assert first.chosen == "fp16" and first.fell_back == 0


def test_when_nothing_passes_the_answer_names_the_closest_without_raising():
    result = gate.first_passing(CONFIGS[:2], BASE, [ACC, PPL])
    assert not result.passed and result.chosen is None and result.fell_back == 2
    # int4 misses by (10 - 30) / 8 = 2.5 of the perplexity baseline, int8-per-tensor by 0.5 / 8.
    assert result.closest == "int8-per-tensor" and not result.result.passed
    assert "none of the 2 configurations meets the budget; closest: 'int8-per-tensor'" in str(result)


def test_fallback_checks_every_config_before_gating():
    with pytest.raises(ValueError, match="config 'b'"):
        gate.first_passing([("a", BASE), ("b", {"accuracy": 0.5})], BASE, [ACC, PPL])
    with pytest.raises(ValueError, match="distinct"):
        gate.first_passing([("a", BASE), ("a", BASE)], BASE, [ACC])
    with pytest.raises(ValueError, match="non-empty"):
        gate.first_passing([], BASE, [ACC])


# ----------------------------------------------------------------------------- pick
TABLE = [
    {"name": "fp32", "accuracy": 0.990, "bytes": 400, "latency_ms": 10.0},
    {"name": "fp16-cuda", "accuracy": 0.990, "bytes": 200, "latency_ms": 2.0, "needs": {"cuda", "fp16"}},
    {"name": "int8", "accuracy": 0.985, "bytes": 100, "latency_ms": 6.0, "needs": {"cpu"}},
    {"name": "int4", "accuracy": 0.950, "bytes": 50, "latency_ms": 5.0, "needs": {"cpu"}},
]
KEYS = dict(quality_key="accuracy", cost_key="latency_ms", higher_is_better=True)


def test_pick_returns_the_cheapest_row_within_every_constraint():
    cpu = {"cpu", "avx2"}
    assert gate.pick(TABLE, **KEYS, max_quality_loss=0.01, hardware=cpu).chosen["name"] == "int8"
    assert gate.pick(TABLE, **KEYS, max_quality_loss=0.05, hardware=cpu).chosen["name"] == "int4"  # 0.95 at the bound
    assert gate.pick(TABLE, **KEYS, hardware={"cuda", "fp16"}).chosen["name"] == "fp16-cuda"
    assert gate.pick(TABLE, **KEYS).chosen["name"] == "fp16-cuda"  # no hardware filter
    by_size = gate.pick(TABLE, quality_key="accuracy", cost_key="bytes", higher_is_better=True,
                        max_quality_loss=0.005, hardware=cpu)
    assert by_size.chosen["name"] == "int8" and dict(by_size.rejected)["int4"].startswith("accuracy loss 0.04")
    assert "lacks" in dict(by_size.rejected)["fp16-cuda"]


def test_pick_size_budget_passes_at_exactly_the_budget():
    assert gate.pick(TABLE, **KEYS, max_bytes=100, hardware={"cpu"}).chosen["name"] == "int4"
    assert gate.pick(TABLE, **KEYS, max_bytes=100, max_quality_loss=0.005, hardware={"cpu"}).chosen["name"] == "int8"
    assert not gate.pick(TABLE, **KEYS, max_bytes=99, max_quality_loss=0.005, hardware={"cpu"}).found


def test_pick_with_a_given_baseline_and_a_relative_tolerance_and_lower_is_better():
    assert gate.pick(TABLE, **KEYS, max_quality_loss=0.0, baseline=0.985, hardware={"cpu"}).chosen["name"] == "int8"
    relative = gate.pick(TABLE, **KEYS, max_quality_loss=0.04, relative=True, hardware={"cpu"})  # 0.99 * 0.96 = 0.9504
    assert relative.chosen["name"] == "int8"
    ppl = [{"name": "fp32", "ppl": 10.0, "ms": 9.0}, {"name": "int8", "ppl": 10.5, "ms": 4.0}]
    assert gate.pick(ppl, quality_key="ppl", cost_key="ms", higher_is_better=False, max_quality_loss=0.5).chosen["name"] == "int8"
    assert gate.pick(ppl, quality_key="ppl", cost_key="ms", higher_is_better=False, max_quality_loss=0.4).chosen["name"] == "fp32"


def test_when_nothing_fits_pick_names_the_closest_and_by_how_much():
    result = gate.pick(TABLE, **KEYS, max_bytes=80, max_quality_loss=0.01, hardware={"cpu"})
    assert not result.found and result.chosen is None
    # int8 is 20 bytes (25%) over 80; int4 fits the size but loses 0.04 > 0.01 (3% of 0.99 past the bound).
    assert result.closest == "int4" and result.shortfall == pytest.approx(0.03 / 0.99)
    assert "exceeds the tolerance 0.01 by 0.03" in result.miss
    assert "closest: 'int4'" in str(result)
    only_gpu = gate.pick(TABLE[1:2], **KEYS, hardware={"cpu"})
    assert only_gpu.closest == "fp16-cuda" and only_gpu.shortfall == math.inf and "['cuda', 'fp16']" in only_gpu.miss


@pytest.mark.parametrize("kwargs, match", [
    ({"max_quality_loss": -0.1}, "max_quality_loss must be None or a finite number >= 0"),
    ({"max_bytes": -1}, "max_bytes must be None"),
    ({"cost_key": "latency"}, r"row 0 lacks key\(s\) \['latency'\]; it has: \['accuracy', 'bytes', 'latency_ms', 'name'\]"),
    ({"quality_key": "acc"}, r"lacks key\(s\) \['acc'\]"),
    ({"max_bytes": 10, "bytes_key": "size"}, r"lacks key\(s\) \['size'\]"),
    ({"max_quality_loss": 0.01, "baseline_name": "bf16"}, "no baseline row named 'bf16'"),
    ({"hardware": "cpu"}, "hardware must be None or a collection"),
    ({"higher_is_better": None}, "higher_is_better must be True or False")])
def test_pick_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gate.pick(TABLE, **{**KEYS, **kwargs})


def test_pick_refuses_a_bad_needs_field_and_an_empty_table():
    with pytest.raises(ValueError, match="'needs' must be a collection of str"):
        gate.pick([{"name": "a", "accuracy": 1.0, "latency_ms": 1.0, "needs": "cuda"}], **KEYS)
    with pytest.raises(ValueError, match="non-empty sequence of mappings"):
        gate.pick([], **KEYS)


# ----------------------------------------------------------------------------- hardware
def test_hardware_support_reports_torchs_flags_and_reuses_the_2_4_check():
    hw = gate.hardware_support("cpu")
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert hw.cuda_available == torch.cuda.is_available()
    assert set(hw.int8_engines) == set(torch.backends.quantized.supported_engines) - {"none"}
    assert (hw.sparse_2_4, hw.sparse_2_4_reason) == sparse.semi_structured_available()
    assert {"cpu", hw.cpu_capability.lower()} <= hw.features and "cuda" not in hw.features
    assert all(f"int8:{e}" in hw.features for e in hw.int8_engines)
    with pytest.raises(AttributeError):
        hw.cuda_available = True
    assert gate.pick(TABLE, **KEYS, hardware=hw.features).chosen["name"] in ("int8", "int4")


def test_hardware_support_on_cuda():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            gate.hardware_support("cuda")
        return
    hw = gate.hardware_support("cuda")
    assert hw.gpu and hw.cuda_capability == torch.cuda.get_device_capability()
    assert hw.cuda_bf16 == (hw.cuda_capability[0] >= 8) and "cuda" in hw.features
    assert ("2:4" in hw.features) == sparse.semi_structured_available()[0]


def test_hardware_support_refuses_unknown_devices():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        gate.hardware_support("tpu")
