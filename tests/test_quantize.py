"""lessons_lib.quantize against torch's own quantizers and hand computations."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import measure, quantize as Q


@pytest.fixture(autouse=True)
def _quiet_torch_quantizers():
    with warnings.catch_warnings():  # torch warns that quantized tensor types are deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _random_shape(g: torch.Generator) -> tuple[int, ...]:
    dims = int(torch.randint(1, 5, (), generator=g))
    return tuple(int(d) for d in torch.randint(1, 12, (dims,), generator=g))


def _torch_dtype(config: Q.QuantConfig) -> torch.dtype:
    return torch.qint8 if config.symmetric else torch.quint8


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_integers_equal_torch_quantize_per_tensor(symmetric):
    g = torch.Generator().manual_seed(0)
    config = Q.QuantConfig(symmetric=symmetric, granularity="per_tensor")
    for _ in range(40):
        x = torch.randn(_random_shape(g), generator=g) * float(torch.rand((), generator=g) * 5 + 0.1)
        scale, zero = Q.compute_qparams(x, config)
        ours = Q.quantize(x, scale, zero, config)
        theirs = torch.quantize_per_tensor(x, float(scale), int(zero), _torch_dtype(config))
        assert ours.dtype == config.dtype and ours.shape == x.shape
        torch.testing.assert_close(ours, theirs.int_repr(), rtol=0, atol=0)
        torch.testing.assert_close(Q.dequantize(ours, scale, zero, config), theirs.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_integers_equal_torch_quantize_per_channel(symmetric):
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        shape = _random_shape(g)
        axis = int(torch.randint(0, len(shape), (), generator=g))
        config = Q.QuantConfig(symmetric=symmetric, granularity="per_channel", axis=axis)
        x = torch.randn(shape, generator=g) * 3
        scale, zero = Q.compute_qparams(x, config)
        assert scale.shape == zero.shape == (shape[axis],)
        ours = Q.quantize(x, scale, zero, config)
        theirs = torch.quantize_per_channel(x, scale.double(), zero.long(), axis, _torch_dtype(config))
        torch.testing.assert_close(ours, theirs.int_repr(), rtol=0, atol=0)
        torch.testing.assert_close(Q.dequantize(ours, scale, zero, config), theirs.dequantize(), rtol=0, atol=0)


def test_near_rounding_ties_follow_torchs_kernels():
    """x / s + z within a float32 step of halfway, odd zero points: where the order of rounding
    matters (torch's per-tensor kernel rounds once, its per-channel kernel twice)."""
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.0371, 0.0123, 0.29])
    zero = torch.tensor([3, 7, 101], dtype=torch.int32)
    x = (torch.randint(-150, 150, (3, 256), generator=g).float() + 0.5) * scale[:, None]  # near halves
    per_channel = Q.QuantConfig(symmetric=False, granularity="per_channel")
    theirs = torch.quantize_per_channel(x, scale.double(), zero.long(), 0, torch.quint8).int_repr()
    torch.testing.assert_close(Q.quantize(x, scale, zero, per_channel), theirs, rtol=0, atol=0)
    per_tensor = Q.QuantConfig(symmetric=False, granularity="per_tensor")
    for s, z in zip(scale.tolist(), zero.tolist()):
        theirs = torch.quantize_per_tensor(x, s, z, torch.quint8).int_repr()
        torch.testing.assert_close(Q.quantize(x, torch.tensor(s), torch.tensor(z), per_tensor), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, granularity, symmetric):
    g = torch.Generator().manual_seed(bits)
    config = Q.QuantConfig(bits=bits, symmetric=symmetric, granularity=granularity,
                           group_size=8 if granularity == "per_group" else None)
    x = torch.randn(6, 32, generator=g) + 0.5  # min-max range: nothing is clipped
    scale, zero = Q.compute_qparams(x, config)
    q = Q.quantize(x, scale, zero, config)
    assert int(q.min()) >= config.qmin and int(q.max()) <= config.qmax
    step = scale.reshape(-1, 1) if granularity != "per_tensor" else scale
    err = (Q.dequantize(q, scale, zero, config) - x).reshape(step.shape[0] if step.dim() else 1, -1).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all()), float((err / step).max())
    levels = torch.unique(q).numel()
    assert levels <= 2**bits
    torch.testing.assert_close(Q.fake_quantize(x, config), Q.dequantize(q, scale, zero, config), rtol=0, atol=0)


def test_values_beyond_the_range_clip_to_the_end_levels():
    config = Q.QuantConfig(bits=4, symmetric=False, granularity="per_tensor")
    scale, zero = Q.qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), config)  # s = 0.2, z = 5
    torch.testing.assert_close(scale, torch.tensor(0.2))
    assert int(zero) == 5
    x = torch.tensor([-100.0, -1.0, -1.09, -1.11, 0.0, 2.0, 2.09, 2.11, 100.0])
    q = Q.quantize(x, scale, zero, config)
    assert q.tolist() == [0, 0, 0, 0, 5, 15, 15, 15, 15]
    x_hat = Q.dequantize(q, scale, zero, config)
    torch.testing.assert_close(x_hat[[0, -1]], torch.tensor([-1.0, 2.0]))  # the ends of the range
    sym = Q.QuantConfig(bits=8, symmetric=True, granularity="per_tensor")
    s, z = Q.qparams_from_range(torch.tensor(-3.0), torch.tensor(1.0), sym)
    torch.testing.assert_close(s, torch.tensor(3.0 / 127.5))  # all 256 codes: step max / 127.5
    assert Q.quantize(torch.tensor([-3.0, 3.0, -1e6, 1e6]), s, z, sym).tolist() == [-128, 127, -128, 127]
    narrow = Q.QuantConfig(bits=8, symmetric=True, granularity="per_tensor", narrow_range=True)
    s, z = Q.qparams_from_range(torch.tensor(-3.0), torch.tensor(1.0), narrow)
    torch.testing.assert_close(s, torch.tensor(3.0 / 127))  # restricted grid: step max / 127
    assert Q.quantize(torch.tensor([-3.0, 3.0, -1e6, 1e6]), s, z, narrow).tolist() == [-127, 127, -127, 127]


def test_fake_quantize_gradient_is_straight_through_inside_and_zero_when_clipped():
    config = Q.QuantConfig(bits=4, symmetric=True, granularity="per_channel")
    scale = torch.tensor([0.1, 0.25])
    zero = torch.zeros(2, dtype=torch.int32)
    x = torch.tensor([[0.05, 0.7, -0.79, 0.9, -5.0], [0.3, 1.74, 1.9, -2.0, -2.2]], requires_grad=True)
    ours = Q.fake_quantize(x, config, scale, zero)
    ours.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    theirs = torch.fake_quantize_per_channel_affine(x2, scale, zero, 0, config.qmin, config.qmax)
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert x.grad.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 1, 0]]


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_low_bit_symmetric_equals_torch_fake_quantize(bits):
    g = torch.Generator().manual_seed(3)
    config = Q.QuantConfig(bits=bits, symmetric=True, granularity="per_channel", axis=1)
    x = torch.randn(5, 7, 9, generator=g)
    scale, zero = Q.compute_qparams(x, config)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zero, 1, config.qmin, config.qmax)
    torch.testing.assert_close(Q.fake_quantize(x, config), theirs, rtol=0, atol=0)


# ----------------------------------------------------------------------------- observers
def test_minmax_observer_by_hand():
    x = torch.tensor([[-1.0, 0.5, 2.0], [-0.2, 0.1, 0.4], [1.0, 3.0, 2.5]])
    sym = Q.QuantConfig(granularity="per_channel")
    scale, zero = Q.compute_qparams(x, sym)
    torch.testing.assert_close(scale, torch.tensor([2.0, 0.4, 3.0]) / 127.5)
    assert zero.tolist() == [0, 0, 0]
    narrow = Q.QuantConfig(granularity="per_channel", narrow_range=True)
    torch.testing.assert_close(Q.compute_qparams(x, narrow)[0], torch.tensor([2.0, 0.4, 3.0]) / 127)
    asym = Q.QuantConfig(symmetric=False, granularity="per_channel")
    scale, zero = Q.compute_qparams(x, asym)
    torch.testing.assert_close(scale, torch.tensor([3.0, 0.6, 3.0]) / 255)  # row 3 widened to [0, 3]
    assert zero.tolist() == [round(1 / (3 / 255)), round(0.2 / (0.6 / 255)), 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_symmetric_minmax_equals_torch_symmetric_observers(bits, granularity):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 40, generator=g) * torch.linspace(0.1, 3, 6)[:, None]
    config = Q.QuantConfig(bits=bits, symmetric=True, granularity=granularity, axis=0)
    kwargs = dict(dtype=torch.qint8, quant_min=config.qmin, quant_max=config.qmax)
    theirs = (MinMaxObserver(qscheme=torch.per_tensor_symmetric, **kwargs) if granularity == "per_tensor"
              else PerChannelMinMaxObserver(ch_axis=0, qscheme=torch.per_channel_symmetric, **kwargs))
    theirs(x)
    t_scale, t_zero = theirs.calculate_qparams()
    scale, zero = Q.compute_qparams(x, config)
    torch.testing.assert_close(scale, t_scale.reshape(scale.shape))
    assert zero.flatten().tolist() == t_zero.flatten().tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_b_bit_symmetric_quantizer_uses_all_2_to_the_b_codes(bits):
    # A tensor that needs every code: evenly spread over [-m, m], many values per step. With the full
    # grid -m lands exactly on the tie -(2^(b-1) - 1/2) steps, which rounds (half to even) to the
    # bottom code: m is chosen so that the step is exactly 1/4 and float rounding cannot break the tie.
    m = (2 ** (bits - 1) - 0.5) / 4
    x = torch.linspace(-m, m, 64 * 2**bits).reshape(1, -1)
    full = Q.QuantConfig(bits=bits, symmetric=True, granularity="per_tensor")
    q = Q.quantize(x, *Q.compute_qparams(x, full), full)
    assert q.unique().tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    narrow = Q.QuantConfig(bits=bits, symmetric=True, granularity="per_tensor", narrow_range=True)
    q = Q.quantize(x, *Q.compute_qparams(x, narrow), narrow)
    assert q.unique().tolist() == list(range(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1)))  # one code fewer
    if bits == 2:
        assert q.unique().tolist() == [-1, 0, 1]  # the three-level "2-bit" grid


def test_asymmetric_minmax_and_moving_average_equal_torch_observers():
    from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(64, generator=g) * (i + 1) + i for i in range(4)]
    for name, theirs in (("minmax", MinMaxObserver()), ("moving_average", MovingAverageMinMaxObserver(0.2))):
        config = Q.QuantConfig(symmetric=False, granularity="per_tensor", observer=name, averaging_constant=0.2)
        ours = Q.Observer(config)
        for b in batches:
            ours.update(b)
            theirs(b)
        scale, zero = ours.qparams()
        t_scale, t_zero = theirs.calculate_qparams()
        torch.testing.assert_close(scale, t_scale.reshape(()))
        assert int(zero) == int(t_zero)
    lo = batches[0].min()
    for b in batches[1:]:
        lo = lo + 0.2 * (b.min() - lo)  # the moving average written out
    torch.testing.assert_close(ours.lo, lo)


def test_percentile_observer_by_hand():
    x = torch.arange(1, 1001, dtype=torch.float32)
    x[-1] = 1e6  # one outlier
    config = Q.QuantConfig(symmetric=True, granularity="per_tensor", observer="percentile", percentile=99.0)
    scale, _ = Q.compute_qparams(x, config)
    k = round(0.99 * 999) + 1  # nearest rank, 1-based
    torch.testing.assert_close(scale, x.abs().sort().values[k - 1] / 127.5)
    assert float(scale) < 1000 / 127 * 1.01  # the outlier is clipped, not stretched over
    asym = Q.QuantConfig(symmetric=False, granularity="per_tensor", observer="percentile", percentile=90.0)
    lo, hi = Q.batch_range(x - 500, asym)
    assert (float(lo), float(hi)) == (101 - 500, 900 - 500)


def test_mse_observer_equals_a_brute_force_search_and_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(5)
    x = torch.distributions.StudentT(2.0).sample((2, 500))  # heavy-tailed, like real activations
    config = Q.QuantConfig(bits=4, granularity="per_channel", observer="mse", mse_grid=50)
    scale, _ = Q.compute_qparams(x, config)
    for row in range(2):
        amax = x[row].abs().max()
        errs = []
        for i in range(1, 51):
            s = amax * (i / 50) / 7.5  # the full 4-bit grid: (qmax - qmin) / 2 = 7.5
            x_hat = torch.clamp(torch.round(x[row] / s), -8, 7) * s
            errs.append(float((x_hat - x[row]).pow(2).mean()))
        best = min(range(50), key=errs.__getitem__)
        torch.testing.assert_close(scale[row], amax * ((best + 1) / 50) / 7.5)
    minmax = Q.QuantConfig(bits=4, granularity="per_channel")
    err_mse = (Q.fake_quantize(x, config) - x).pow(2).mean()
    err_minmax = (Q.fake_quantize(x, minmax) - x).pow(2).mean()
    assert err_mse < err_minmax
    del g


def test_per_group_equals_per_channel_on_the_reshaped_groups():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(8, 64, generator=g)
    for symmetric in (True, False):
        grouped = Q.QuantConfig(bits=4, symmetric=symmetric, granularity="per_group", group_size=16)
        per_row = Q.QuantConfig(bits=4, symmetric=symmetric, granularity="per_channel")
        scale, zero = Q.compute_qparams(W, grouped)
        assert scale.shape == (8, 4)
        r_scale, r_zero = Q.compute_qparams(W.reshape(32, 16), per_row)  # (out * groups, group_size)
        torch.testing.assert_close(scale, r_scale.reshape(8, 4), rtol=0, atol=0)
        q = Q.quantize(W, scale, zero, grouped)
        torch.testing.assert_close(q, Q.quantize(W.reshape(32, 16), r_scale, r_zero, per_row).reshape(8, 64), rtol=0, atol=0)
        torch.testing.assert_close(Q.dequantize(q, scale, zero, grouped),
                                   Q.dequantize(q.reshape(32, 16), r_scale, r_zero, per_row).reshape(8, 64))


def test_finer_granularity_gives_smaller_error_on_rows_of_different_scales():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(16, 64, generator=g) * torch.logspace(-2, 0, 16)[:, None]  # rows 100x apart
    errs = {gr: float((Q.fake_quantize(W, Q.QuantConfig(granularity=gr, group_size=16 if gr == "per_group" else None)) - W).pow(2).mean())
            for gr in Q.GRANULARITIES}
    assert errs["per_group"] <= errs["per_channel"] < errs["per_tensor"] / 4


# ----------------------------------------------------------------------------- weight-only Linear
@pytest.mark.parametrize("config", [Q.QuantConfig(), Q.QuantConfig(symmetric=False),
                                    Q.QuantConfig(bits=4, granularity="per_group", group_size=8)])
def test_weight_only_linear_is_the_dequantized_matmul_with_real_int8_bytes(config):
    torch.manual_seed(8)
    linear = nn.Linear(32, 12)
    ours = Q.WeightOnlyLinear.from_linear(linear, config)
    scale, zero = Q.compute_qparams(linear.weight.detach(), config)
    q = Q.quantize(linear.weight.detach(), scale, zero, config)
    torch.testing.assert_close(ours.qweight, q, rtol=0, atol=0)
    x = torch.randn(3, 5, 32)
    expected = F.linear(x, Q.dequantize(q, scale, zero, config), linear.bias)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(ours(x), linear(x), rtol=0, atol=0.02 * 2 ** (8 - config.bits))  # close to FP32
    state = ours.state_dict()
    assert state["qweight"].dtype in (torch.int8, torch.uint8) and state["qweight"].shape == (12, 32)
    zero_bytes = 0 if config.symmetric else scale.numel()  # one int8/uint8 zero point per scale
    assert measure.state_bytes(ours) == 12 * 32 + 4 * scale.numel() + zero_bytes + 4 * 12
    assert ("zero_point" in state) == (not config.symmetric)


def test_quantize_linears_replaces_only_the_chosen_linears_in_place():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)))
    x = torch.randn(10, 16)
    reference = model(x)
    fp32_bytes = measure.state_bytes(model)
    names = Q.quantize_linears_(model, Q.QuantConfig(), filter_fn=lambda m, name: m.out_features != 4)
    assert names == ["0", "2.0"]
    assert isinstance(model[0], Q.WeightOnlyLinear) and isinstance(model[2][0], Q.WeightOnlyLinear)
    assert type(model[2][1]) is nn.Linear
    assert measure.state_bytes(model) < 0.4 * fp32_bytes
    cos = F.cosine_similarity(model(x), reference, dim=-1)
    assert float(cos.min()) > 0.999


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "2..8"), ({"bits": 9}, "2..8"), ({"bits": 8.0}, "2..8"), ({"bits": True}, "2..8"),
    ({"observer": "histogram"}, "minmax"), ({"granularity": "per_row"}, "per_channel"),
    ({"granularity": "per_group"}, "group_size"), ({"granularity": "per_group", "group_size": 0}, "group_size"),
    ({"group_size": 32}, "per_group"), ({"percentile": 0}, "percentile"), ({"averaging_constant": 2}, "averaging"),
    ({"mse_grid": 0}, "mse_grid"), ({"symmetric": "yes"}, "symmetric"),
    ({"narrow_range": 1}, "narrow_range"), ({"symmetric": False, "narrow_range": True}, "narrow_range"),
])
def test_bad_configs_raise_value_errors_that_say_what_is_accepted(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.QuantConfig(**kwargs)


def test_group_size_that_does_not_divide_and_bad_axis_are_refused():
    with pytest.raises(ValueError, match="must divide"):
        Q.compute_qparams(torch.randn(4, 30), Q.QuantConfig(granularity="per_group", group_size=16))
    with pytest.raises(ValueError, match="axis"):
        Q.compute_qparams(torch.randn(4, 30), Q.QuantConfig(axis=2))
    with pytest.raises(ValueError, match="axis=0"):
        Q.WeightOnlyLinear.from_linear(nn.Linear(4, 4), Q.QuantConfig(axis=1))
    with pytest.raises(RuntimeError, match="update"):
        Q.Observer(Q.QuantConfig()).qparams()
    assert math.isfinite(float(Q.compute_qparams(torch.zeros(3), Q.QuantConfig(granularity="per_tensor"))[0]))


def test_quantize_linears_works_inside_a_hugging_face_model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(10)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16)).eval()
    ids = torch.randint(0, 50, (3, 10))
    with torch.inference_mode():
        reference = model(input_ids=ids).last_hidden_state  # (3, 10, 32)
    names = Q.quantize_linears_(model, Q.QuantConfig())
    assert len(names) == 2 * 6 + 1  # q, k, v, attention output, FFN in, FFN out per layer, and the pooler
    with torch.inference_mode():
        out = model(input_ids=ids).last_hidden_state
    cos = F.cosine_similarity(out.flatten(0, 1), reference.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.999
    assert all(v.dtype == torch.int8 for k, v in model.state_dict().items() if k.endswith("qweight"))


# ----------------------------------------------------------------------------- one grid everywhere
def test_every_symmetric_quantizer_of_the_library_uses_the_same_full_grid():
    from lessons_lib import gptq, qat

    g = torch.Generator().manual_seed(11)
    W = torch.randn(8, 256, generator=g)
    config = Q.QuantConfig(bits=2, symmetric=True, granularity="per_channel", axis=0)
    scale, zero = Q.compute_qparams(W, config)
    ours = Q.fake_quantize(W, config)
    codes = Q.quantize(W, scale, zero, config)
    assert codes.unique().tolist() == [-2, -1, 0, 1]
    # the bottom code holds only a row's most negative weight, and only when that is the row's max |w|
    negative_extreme = W.gather(1, W.abs().argmax(1, keepdim=True)).squeeze(1) < 0  # (rows,)
    assert ((codes == -2).any(1) <= negative_extreme).all() and int((codes == -2).sum()) <= int(negative_extreme.sum())
    # QAT's weight fake-quantizer: the same values
    torch.testing.assert_close(qat.FakeQuantize(qat.weight_config(2), track=False)(W), ours, rtol=0, atol=0)
    # GPTQ's symmetric RTN: codes in [0, 3] around the zero point 2 (the reference's (maxq + 1) / 2)
    qw = gptq.rtn(W, gptq.GPTQConfig(bits=2, symmetric=True))
    assert qw.zero_point.unique().tolist() == [2]
    assert qw.qweight.unique().tolist() == [0, 1, 2, 3]
    # GPTQ divides (w / s, as the reference), torch.ao multiplies by 1 / s: the two can round an exact
    # tie (a row's -max|w| sits at -1.5 steps) to different neighbours, at the same error
    differ = (qw.dequantize() - ours).abs() > 1e-6
    torch.testing.assert_close(qw.dequantize()[~differ], ours[~differ], rtol=0, atol=1e-6)
    at_tie = ((W / scale[:, None]).abs() - 1.5).abs() < 1e-5
    assert (differ <= at_tie).all()
    torch.testing.assert_close((qw.dequantize() - W).abs()[differ], (ours - W).abs()[differ])
    # the restricted grid, kept as an option: three values per row at 2 bits
    narrow = Q.fake_quantize(W, qat.weight_config(2, narrow_range=True))
    assert narrow.div(W.abs().amax(1, keepdim=True)).unique().tolist() == [-1.0, 0.0, 1.0]


def test_fake_quantize_weights_changes_only_the_chosen_layers_in_place():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = Q.QuantConfig(bits=4)
    names = Q.fake_quantize_weights_(model, config, filter_fn=lambda m, n: n != "3")
    assert names == ["0", "2"]
    for n in ("0", "2"):
        torch.testing.assert_close(model.get_submodule(n).weight, Q.fake_quantize(before[f"{n}.weight"], config), rtol=0, atol=0)
        torch.testing.assert_close(model.get_submodule(n).bias, before[f"{n}.bias"], rtol=0, atol=0)
    torch.testing.assert_close(model[3].weight, before["3.weight"], rtol=0, atol=0)
    assert len(model[2].weight.unique()) <= 16 * 5  # at most 16 levels per output row
