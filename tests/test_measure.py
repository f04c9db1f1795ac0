import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from lessons_lib import measure, session


def test_count_parameters_counts_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as in many language models
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert measure.count_parameters(model) == 40
    emb.weight.requires_grad_(False)
    assert measure.count_parameters(model, trainable_only=True) == 0


def test_state_bytes_by_dtype():
    lin = nn.Linear(10, 5)
    assert measure.state_bytes(lin) == (50 + 5) * 4
    assert measure.state_bytes(lin.half()) == (50 + 5) * 2
    bn = nn.BatchNorm1d(3)  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert measure.state_bytes(bn) == 4 * 3 * 4 + 8


def test_state_bytes_counts_tied_tensors_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert measure.state_bytes(nn.ModuleDict({"emb": emb, "head": head})) == 40 * 4


def test_state_bytes_of_a_dynamically_quantized_linear_matches_a_hand_count():
    model = nn.Sequential(nn.Linear(64, 32))
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    # int8 weight (1 byte each) + fp32 bias + the module's fp32 scale and int64 zero point
    assert measure.state_bytes(q) == 64 * 32 * 1 + 32 * 4 + 4 + 8


def test_serialized_bytes_includes_format_overhead():
    lin = nn.Linear(100, 100)
    size = measure.serialized_bytes(lin)
    assert measure.state_bytes(lin) < size < measure.state_bytes(lin) + 4096


def test_path_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 7)
    assert measure.path_bytes(tmp_path / "a.bin") == 10
    assert measure.path_bytes(tmp_path) == 17
    with pytest.raises(FileNotFoundError, match="nothing"):
        measure.path_bytes(tmp_path / "nothing")


def test_timing_statistics_by_hand():
    t = measure.Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median_ms == 3.0
    assert t.mean_ms == 22.0
    assert t.iqr_ms == 2.0  # inclusive quartiles 2 and 4
    assert t.min_ms == 1.0
    assert measure.Timing((5.0,)).iqr_ms == 0.0


def test_benchmark_runs_warmup_untimed_then_repeats():
    calls = []
    timing = measure.benchmark(lambda: calls.append(1), warmup=4, repeats=7)
    assert len(calls) == 11
    assert len(timing.times_ms) == 7


def test_benchmark_measures_real_time():
    timing = measure.benchmark(lambda: time.sleep(0.002), warmup=1, repeats=5)
    assert timing.min_ms >= 2.0  # sleep never returns early


def test_benchmark_stops_at_max_seconds():
    timing = measure.benchmark(lambda: time.sleep(0.01), warmup=0, repeats=1000, max_seconds=0.03)
    assert 1 <= len(timing.times_ms) <= 4


@pytest.mark.parametrize("warmup,repeats", [(-1, 5), (0, 0)])
def test_benchmark_rejects_bad_counts(warmup, repeats):
    with pytest.raises(ValueError, match="warmup"):
        measure.benchmark(lambda: None, warmup=warmup, repeats=repeats)


_PEAK_SCRIPT = """
import time, torch
from lessons_lib import measure

def hold_200_mib():
    x = torch.ones(50 * 2**20)  # 200 MiB, written so the pages are resident
    time.sleep(0.5)  # long enough for the sampler thread to run on a loaded machine
    return float(x[0])

print(measure.peak_memory_bytes(hold_200_mib), measure.peak_memory_bytes(lambda: None))
"""


def test_peak_memory_sees_a_large_temporary_allocation():
    # In a fresh process: in a test worker, memory freed by earlier tests but still resident (the
    # allocator keeps it) can hold the 200 MiB, and the resident set then does not grow at all.
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    held, nothing = int(out[0]), int(out[1])
    assert held > 150 * 2**20
    assert nothing < 50 * 2**20


def test_state_bytes_counts_the_inner_tensors_of_torchao_weights():
    session.silence_known_noise()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    out, inp = 128, 256
    bias = out * 4
    int8 = nn.Sequential(nn.Linear(inp, out))
    quantize_(int8, Int8WeightOnlyConfig())  # int8 codes, one float32 scale and one int8 zero point per row
    assert measure.state_bytes(int8) == out * inp + out * 4 + out + bias
    int4 = nn.Sequential(nn.Linear(inp, out))
    quantize_(int4, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    groups = out * inp // 32  # int4 values stored one per byte ("unpacked"), a scale and zero point per group
    assert measure.state_bytes(int4) == out * inp + groups * 4 + groups + bias


def test_interleaved_alternates_the_callables_round_by_round():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = measure.interleaved(fns, repeats=6, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then 3 rounds of 2 calls each
    assert list(timings) == ["a", "b"] and all(len(t.times_ms) == 6 for t in timings.values())
    with pytest.raises(ValueError, match="rounds >= 1"):
        measure.interleaved(fns, repeats=6, rounds=0)

