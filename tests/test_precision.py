import struct

import numpy as np
import pytest
import torch
from torch import nn

from lessons_lib import precision


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_float_facts_equal_finfo(name, dtype):
    info, fi = precision.format_info(name), torch.finfo(dtype)
    assert (info.bits, info.max, info.min, info.smallest_normal, info.eps) == (fi.bits, fi.max, fi.min, fi.smallest_normal, fi.eps)
    assert 1 + info.exponent_bits + info.mantissa_bits == fi.bits
    # the smallest subnormal really is representable, and half of it rounds to zero
    tiny = torch.tensor(info.smallest_subnormal, dtype=dtype)
    assert float(tiny) == info.smallest_subnormal > 0
    assert float(torch.tensor(info.smallest_subnormal / 2.01, dtype=dtype)) == 0.0


def test_integer_facts():
    int8, int4 = precision.format_info("int8"), precision.format_info("int4")
    ii = torch.iinfo(torch.int8)
    assert (int8.min, int8.max, int8.levels, int8.bits) == (ii.min, ii.max, 256, 8)
    assert (int4.min, int4.max, int4.levels, int4.bits) == (-8, 7, 16, 4)


def test_fp16_range_limits():
    fmax = precision.format_info("fp16").max
    assert float(torch.tensor(fmax, dtype=torch.float16)) == fmax
    assert torch.isinf(torch.tensor(fmax * 1.01, dtype=torch.float16))
    assert not torch.isinf(torch.tensor(fmax * 1.01, dtype=torch.bfloat16))


def test_fp32_fields_agree_with_struct():
    values = torch.randn(200, generator=torch.Generator().manual_seed(0)) * 1e3
    values[:3] = torch.tensor([0.0, -0.0, 1e-40])  # zeros and a subnormal
    sign, exponent, mantissa = precision.float_fields(values)
    for v, s, e, m in zip(values.tolist(), sign.tolist(), exponent.tolist(), mantissa.tolist()):
        (raw,) = struct.unpack(">I", struct.pack(">f", v))
        assert (s, e, m) == (raw >> 31, (raw >> 23) & 0xFF, raw & 0x7FFFFF)


def test_fp16_fields_agree_with_numpy():
    values = torch.randn(200, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    sign, exponent, mantissa = precision.float_fields(values)
    raw = values.numpy().view(np.uint16).astype(np.int64)  # numpy's own float16 bit patterns
    np.testing.assert_array_equal(sign.numpy(), raw >> 15)
    np.testing.assert_array_equal(exponent.numpy(), (raw >> 10) & 0x1F)
    np.testing.assert_array_equal(mantissa.numpy(), raw & 0x3FF)


def test_bf16_has_the_layout_of_fp32s_top_half():
    values = torch.randn(100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    s16, e16, m16 = precision.float_fields(values)
    s32, e32, m32 = precision.float_fields(values.float())  # exact widening
    assert torch.equal(s16, s32) and torch.equal(e16, e32) and torch.equal(m16, m32 >> 16)


def _bf16_nearest_even_by_bits(values: np.ndarray) -> np.ndarray:
    """FP32 -> BF16 -> FP32 on the FP32 bit patterns: add 0x7FFF plus the last kept bit, drop 16 bits."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.int64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_bf16_conversion_rounds_to_nearest_even_not_truncates():
    rng = np.random.default_rng(4)
    values = (rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(np.float32)
    one = np.float32(1.0).view(np.uint32)
    ties = np.array([one + 0x8000, one + 0x18000], dtype=np.uint32).view(np.float32)  # 1 + 2**-8, 1 + 3 * 2**-8
    special = np.array([0.1, -0.1, 65504.0, np.finfo(np.float32).max, 1e-40, -1e-40], dtype=np.float32)
    values = np.concatenate([values, ties, special])
    stored = precision.round_trip(torch.from_numpy(values), "bf16").numpy()
    np.testing.assert_array_equal(stored, _bf16_nearest_even_by_bits(values))
    assert np.any(stored != ((values.view(np.uint32) >> 16) << 16).view(np.float32))  # not a truncation
    assert stored[-6] > values[-6]  # 0.1 rounds up (its dropped bits start 11...); truncation would go down
    assert (stored[-8], stored[-7]) == (1.0, 1 + 2**-6)  # exact ties go to the even neighbour, down and up
    assert stored[-4] == 65536.0 and precision.bit_string(65504.0, "bf16") == "0 10001111 0000000"  # carry
    assert np.isinf(stored[-3])  # the carry overflows at the top of FP32's range
    assert precision.describe_value(65504.0, "bf16")["stored"] == 65536.0


def test_bit_string():
    assert precision.bit_string(1.0, "fp32") == "0 01111111 " + "0" * 23
    assert precision.bit_string(-2.0, "fp16") == "1 10000 0000000000"
    assert precision.bit_string(65504.0, "fp16") == "0 11110 1111111111"


def test_step_size_is_eps_times_power_of_two():
    for name in ("fp32", "fp16", "bf16"):
        eps = precision.format_info(name).eps
        torch.testing.assert_close(precision.step_size(torch.tensor([1.0, 2.0, 1.5]), name),
                                   torch.tensor([eps, 2 * eps, eps]))
    assert float(precision.step_size(torch.tensor([1000.0]), "fp16")) == 0.5  # 512 <= x < 1024


def test_round_trip_error_within_half_a_step():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(3)) * 100 + 0.01
    for name in ("fp16", "bf16"):
        err = (precision.round_trip(x, name) - x).abs()
        assert (err <= precision.step_size(x, name) / 2 + 1e-12).all()


def test_cast_leaves_the_original_untouched():
    model = nn.Linear(3, 2)
    half = precision.cast(model, "fp16")
    assert half.weight.dtype == torch.float16 and model.weight.dtype == torch.float32
    torch.testing.assert_close(half.weight.float(), model.weight, atol=1e-3, rtol=1e-3)


class Planted(nn.Module):
    """A healthy stem, then a layer whose outputs exceed FP16's range."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blowup = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.stem.weight.fill_(0.5)
            self.stem.bias.zero_()
            self.blowup.weight.fill_(5000.0)
            self.blowup.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.blowup(torch.relu(self.stem(x)))))


def test_detector_names_the_planted_overflow_and_removes_its_hooks():
    model = Planted().half()
    x = torch.full((2, 4), 3.0, dtype=torch.float16)  # stem -> 6, blowup -> 8 * 6 * 5000 = 240000
    report = precision.detect_overflow(model, lambda: model(x), "fp16")
    assert report.first_nonfinite == "blowup"
    assert all(not m._forward_hooks for m in model.modules())
    fp32 = Planted()
    healthy = precision.detect_overflow(fp32, lambda: fp32(x.float()), "fp32")
    assert healthy.first_nonfinite is None
    assert [m.name for m in healthy.modules] == ["stem", "blowup", "head", ""]
    assert healthy.modules[1].max_abs == pytest.approx(240000.0)
    assert "blowup" in precision.detect_overflow(fp32, lambda: fp32(x.float()), "fp16").near_overflow()


def test_detector_reports_none_on_a_healthy_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half()
    report = precision.detect_overflow(model, lambda: model(torch.randn(3, 4).half()), "fp16")
    assert report.first_nonfinite is None and report.near_overflow() == []
    assert len(report.modules) == 4


@pytest.mark.parametrize("call", [
    lambda: precision.format_info("fp8"),
    lambda: precision.cast(nn.Linear(2, 2), "int8"),
    lambda: precision.autocast("cpu", "fp32"),
    lambda: precision.bit_string(1.0, "int4"),
])
def test_unknown_format_lists_the_accepted_ones(call):
    with pytest.raises(ValueError, match="unknown format .*; accepted: "):
        call()


def test_native_support_reads_flags():
    assert precision.native_16bit_support({"avx512_bf16", "sse2"}) == {"bf16": ["avx512_bf16"], "fp16": []}


def test_describe_value_against_numpy_and_saturation():
    d = precision.describe_value(0.1, "fp16")
    assert d["stored"] == float(np.float16(0.1))
    assert d["abs_error"] == pytest.approx(abs(float(np.float16(0.1)) - 0.1))
    assert precision.describe_value(70000.0, "fp16")["stored"] == float("inf")
    assert precision.describe_value(70000.0, "bf16")["stored"] == float(torch.tensor(70000.0).bfloat16())
    assert precision.describe_value(300.0, "int8")["stored"] == 127.0  # saturates
    d4 = precision.describe_value(-3.6, "int4")
    assert (d4["stored"], d4["bits"]) == (-4.0, "1100")  # two's complement of -4


def test_tf32_sets_both_precisions_and_restores_them_even_after_an_error():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with precision.tf32():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with precision.tf32(False):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(RuntimeError), precision.tf32():
        raise RuntimeError("boom")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(ValueError, match="enabled must be True or False"), precision.tf32("yes"):
        pass
