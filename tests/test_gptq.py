"""GPTQ against its defining properties, and packed storage against exact round trips."""
import pytest
import torch
from torch import nn

from lessons_lib import gptq, packing


def _correlated(n=3000, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # (n, d), correlated columns


def _output_error(X, W, Q):
    return float(((X @ (W - Q).T) ** 2).sum())


def test_incremental_hessian_equals_the_batch_one():
    X = _correlated(n=1000, d=16).double()
    acc = gptq.HessianAccumulator(16, dtype=torch.float64)
    for chunk in (X[:1], X[1:300], X[300:].reshape(7, 100, 16)):  # any leading shape
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * X.T @ X / len(X))
    assert acc.n == 1000


CONFIGS = [gptq.GPTQConfig(bits=4), gptq.GPTQConfig(bits=3, group_size=16), gptq.GPTQConfig(bits=4, group_size=16, act_order=True),
           gptq.GPTQConfig(bits=2, act_order=True), gptq.GPTQConfig(bits=4, symmetric=True, group_size=32)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_with_a_diagonal_hessian_gptq_is_rtn(config):
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.1)
    assert torch.equal(gptq.gptq(W, H, config).qweight, gptq.rtn(W, config).qweight)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gptq_beats_rtn_on_correlated_inputs(config):
    X = _correlated()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    g, r = gptq.gptq(W, acc.H, config).dequantize(), gptq.rtn(W, config).dequantize()
    assert _output_error(X, W, g) < 0.8 * _output_error(X, W, r)


@pytest.mark.parametrize("group_size, block_sizes", [(None, (64, 5)), (16, (16, 8, 4))])
def test_lazy_blocks_do_not_change_the_result(group_size, block_sizes):
    """Lazy updates only batch the arithmetic. Per row, any block size gives the same result. With
    groups, a group's parameters come from the weights at the start of its block (the reference
    rule), so block sizes agree only when each puts a block boundary on every group start, i.e.
    divides group_size; see test_a_group_starting_inside_a_block_depends_on_the_rule otherwise."""
    X, W = _correlated(), torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    a, *others = (gptq.gptq(W, acc.H, gptq.GPTQConfig(bits=4, group_size=group_size, block_size=b)) for b in block_sizes)
    for b in others:
        assert (a.qweight == b.qweight).float().mean() > 0.99  # identical codes up to float rounding ties
        torch.testing.assert_close(b.scale, a.scale)  # (the group scales agree up to float rounding)
        assert _output_error(X, W, b.dequantize()) == pytest.approx(_output_error(X, W, a.dequantize()), rel=1e-3)


# ----------------------------------------------------------------------------- group parameters inside a lazy block
def _minmax(cols, bits, symmetric):
    """GPTQ's reference min-max quantizer for the rows of cols (rows, k): scale and zero point (rows,)."""
    maxq = 2**bits - 1
    lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
    if symmetric:
        return torch.maximum(-lo, hi) / (maxq / 2), torch.full_like(lo, 2 ** (bits - 1))
    scale = (hi - lo) / maxq
    return scale, torch.round(-lo / scale)


def _slow_gptq_codes(W, H, bits, group_size, block_size, rule, symmetric=False, damp_ratio=0.01):
    """GPTQ the slow, obvious way, in float64: one column at a time, its error spread at once onto
    every later column with the explicit inverse Hessian (downdated after each column), no lazy
    batching. The lazy blocks only say where a group's parameters come from: ``start`` is a copy of
    the weights taken when the pass enters a block. "reference": the group's columns in ``start``.
    "updated": the columns of the current block as updated so far, those beyond it from ``start``."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    H += damp_ratio * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    for c in range(cols):
        if c % block_size == 0:
            start, end = W.clone(), min(c + block_size, cols)  # the weights as at the start of c's block
        if c % group_size == 0:
            source = start[:, c : c + group_size] if rule == "reference" else torch.cat([W[:, c:end], start[:, end:]], 1)[:, :group_size]
            scale, zero = _minmax(source, bits, symmetric)
        codes[:, c] = torch.clamp(torch.round(W[:, c] / scale) + zero, 0, 2**bits - 1)
        err = (W[:, c] - scale * (codes[:, c] - zero)) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]  # OBS: the rest compensates column c's error
        Hinv -= Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]  # column c leaves the problem
    return codes.to(torch.uint8)


SLOW_CASES = [(3, 16, 20, False), (4, 8, 12, False), (2, 16, 24, True), (3, 16, 48, False), (4, 16, 16, False)]  # bits, group, block, symmetric


@pytest.mark.parametrize("rule", gptq.GROUP_RULES)
@pytest.mark.parametrize("bits, group_size, block_size, symmetric", SLOW_CASES)
def test_grouped_gptq_matches_a_slow_column_by_column_version_of_its_rule(rule, bits, group_size, block_size, symmetric):
    X, W = _correlated(seed=bits + block_size), torch.randn(32, 64, generator=torch.Generator().manual_seed(group_size + block_size))
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    config = gptq.GPTQConfig(bits=bits, group_size=group_size, block_size=block_size, symmetric=symmetric, group_rule=rule)
    expected = _slow_gptq_codes(W, acc.H, bits, group_size, block_size, rule, symmetric)
    assert torch.equal(gptq.gptq(W, acc.H, config).qweight, expected)


def test_the_reference_rule_is_the_default():
    assert gptq.GPTQConfig().group_rule == "reference"


def test_a_group_starting_inside_a_block_depends_on_the_rule():
    X, W = _correlated(), torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    codes = lambda **kw: gptq.gptq(W, acc.H, gptq.GPTQConfig(bits=3, group_size=16, **kw)).qweight
    assert not torch.equal(codes(block_size=20), codes(block_size=20, group_rule="updated"))  # groups at 16, 32 start mid-block
    assert not torch.equal(codes(block_size=20), codes(block_size=16))  # the reference rule follows the blocks
    for block_size in (16, 8):  # every group starts a block: nothing of the block is updated yet, the rules agree
        assert torch.equal(codes(block_size=block_size), codes(block_size=block_size, group_rule="updated"))
    with_act_order = gptq.gptq(W, acc.H, gptq.GPTQConfig(bits=3, group_size=16, act_order=True))
    static = gptq.rtn(W, gptq.GPTQConfig(bits=3, group_size=16))  # act-order: groups fixed from the original weights
    assert torch.equal(with_act_order.scale, static.scale) and torch.equal(with_act_order.zero_point, static.zero_point)


def test_codes_respect_bits_and_groups():
    X, W = _correlated(), torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    qw = gptq.gptq(W, acc.H, gptq.GPTQConfig(bits=3, group_size=16, act_order=True))
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 7
    assert qw.scale.shape == (8, 4) and qw.zero_point.shape == (8, 4)
    Q = qw.dequantize()
    for g in range(4):  # each (row, group) holds at most 8 distinct values
        assert all(len(torch.unique(row)) <= 8 for row in Q[:, 16 * g : 16 * (g + 1)])


def test_dead_inputs_get_zero_weight():
    X = _correlated(d=16)
    X[:, 3] = 0  # an input that is never active
    acc = gptq.HessianAccumulator(16)
    acc.add(X)
    Q = gptq.gptq(torch.randn(4, 16), acc.H, gptq.GPTQConfig(bits=4)).dequantize()
    assert torch.isfinite(Q).all() and torch.equal(Q[:, 3], torch.zeros(4))


def test_int4_layout_is_two_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert packing.pack_bits(codes, 4).tolist() == [[0x21, 0x0F]]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_model_driver_quantizes_every_block_linear_and_packs_and_reloads(tmp_path):
    model = _tiny_llama()
    calibration = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    results = gptq.quantize_model_(model, calibration, gptq.GPTQConfig(bits=4, group_size=16), batch_size=4)
    assert len(results) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert "lm_head" not in results and all(n.startswith("model.layers.") for n in results)
    for name, qw in results.items():
        torch.testing.assert_close(model.get_submodule(name).weight, qw.dequantize())
    packing.pack_model_(model, results)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    packing.save_packed(model, tmp_path / "packed")
    reloaded = packing.load_packed(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)


def test_sequential_driver_matches_quantizing_the_first_block_by_hand():
    model = _tiny_llama()
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    q_proj = model.model.layers[0].self_attn.q_proj
    acc = gptq.HessianAccumulator(32)
    hook = q_proj.register_forward_hook(lambda m, inp, out: acc.add(inp[0]))
    with torch.no_grad():
        model(calibration, use_cache=False)
    hook.remove()
    expected = gptq.gptq(q_proj.weight, acc.H, gptq.GPTQConfig(bits=3)).qweight
    results = gptq.quantize_model_(model, calibration, gptq.GPTQConfig(bits=3))
    assert torch.equal(results["model.layers.0.self_attn.q_proj"].qweight, expected)


@pytest.mark.parametrize("kwargs,match", [({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\)"),
                                          ({"group_size": 0}, "group_size must be None"),
                                          ({"damp_ratio": 1.5}, "damp_ratio")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gptq.GPTQConfig(**kwargs)


def test_bad_inputs_to_the_driver():
    model = _tiny_llama()
    calibration = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="group_size=24 must divide the input width 32"):
        gptq.quantize_model_(model, calibration, gptq.GPTQConfig(group_size=24))
    with pytest.raises(ValueError, match="needs calibration data"):
        gptq.quantize_model_(model, torch.zeros(0, 8, dtype=torch.long), gptq.GPTQConfig())
    with pytest.raises(ValueError, match=r"no transformer blocks found in Sequential: the supported layouts are model\.layers .*encoder\.layer"):
        gptq.quantize_model_(nn.Sequential(nn.Linear(4, 4)), calibration, gptq.GPTQConfig())
    for block in model.model.layers:  # a model whose blocks hold no nn.Linear
        for name, child in list(block.named_children()):
            setattr(block, name, nn.Identity())
    with pytest.raises(ValueError, match="no nn.Linear"):
        gptq.quantize_model_(model, calibration, gptq.GPTQConfig())


def test_tinygemm_layout_matches_our_dequantization_on_cpu():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    qw = gptq.rtn(W, gptq.GPTQConfig(bits=4, group_size=64))
    packed, sz = packing.tinygemm_weight(qw, "cpu")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    y = packing.tinygemm_linear(x, packed, sz, 64).float()
    reference = x.float() @ qw.dequantize().T
    torch.testing.assert_close(y, reference, rtol=0.02, atol=0.05 * float(reference.abs().max()) / 10)
    with pytest.raises(ValueError, match="4-bit weights with groups"):
        packing.tinygemm_weight(gptq.rtn(W, gptq.GPTQConfig(bits=3, group_size=64)), "cpu")


def test_fitting_group_size():
    model = _tiny_llama()  # input widths 32 (attention, gate/up) and 64 (down)
    assert gptq.fitting_group_size(model, 128) == 32
    assert gptq.fitting_group_size(model, 20) == 16
    model.model.layers[0].mlp.down_proj = nn.Linear(48, 32)
    assert gptq.fitting_group_size(model, 128) == 16


def test_linears_reading_the_same_input_share_one_hessian():
    model = _tiny_llama()
    block = model.model.layers[0]
    group = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    calibration = torch.randint(0, 64, (2, 8))
    inputs = gptq._first_block_inputs(model, block, [{"input_ids": calibration}], {"use_cache": False})
    H = gptq._block_hessians(block, group, inputs)
    assert H["self_attn.q_proj"] is H["self_attn.k_proj"] is H["self_attn.v_proj"]
    assert H["mlp.gate_proj"] is H["mlp.up_proj"]
    assert H["self_attn.o_proj"] is not H["self_attn.q_proj"] and H["mlp.down_proj"].shape == (64, 64)


class _FreesItsFirstInput(nn.Module):
    """a reads a temporary that is freed before b's (different) input is made: the allocator
    usually hands b's input the same address, which once made a and b share a Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x * 2)  # the temporary x * 2 is freed once a has read it
        return self.b(x - 3) + h


def test_linears_reading_different_inputs_never_share_a_hessian_even_if_memory_is_reused():
    block = _FreesItsFirstInput()
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0))  # large enough to be reused at once
    inputs = [((x,), {})]
    expected = {"a": (x * 2).reshape(-1, 64), "b": (x - 3).reshape(-1, 64)}
    for attempt in range(5):  # reuse is up to the allocator: give it several chances to happen
        with torch.no_grad():
            H = gptq._block_hessians(block, {"a": block.a, "b": block.b}, inputs)
        assert H["a"] is not H["b"]
        for name, X in expected.items():
            torch.testing.assert_close(H[name], 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 5}, "bits must be one of"), ({"bits": True}, "bits must be one of"), ({"bits": 4.0}, "bits must be one of"),
    ({"group_size": 0}, "group_size must be None"), ({"group_size": True}, "group_size must be None"),
    ({"symmetric": 1}, "symmetric must be True or False"), ({"act_order": "yes"}, "act_order must be True or False"),
    ({"damp_ratio": 1.0}, "damp_ratio must be a number in"), ({"damp_ratio": "0.01"}, "damp_ratio must be a number in"),
    ({"damp_ratio": True}, "damp_ratio must be a number in"),
    ({"block_size": 0}, "block_size must be a positive int"), ({"block_size": True}, "block_size must be a positive int"),
    ({"group_rule": "exact"}, r"group_rule must be one of \('reference', 'updated'\)"), ({"group_rule": None}, "group_rule must be one of"),
    ({"group_rule": "updated", "act_order": True, "group_size": 16}, "group_rule='updated' needs act_order=False"),
])
def test_config_checks_every_field_and_says_what_is_accepted(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gptq.GPTQConfig(**kwargs)


# ----------------------------------------------------------------------------- devices
def test_the_hessian_lives_on_the_device_of_its_inputs():
    acc = gptq.HessianAccumulator(8)  # no device given: follows the first inputs
    acc.add(torch.randn(4, 8, device="meta"))
    assert acc.H.device.type == "meta" and acc.n == 4
    pinned = gptq.HessianAccumulator(8, device="meta")  # a device given: inputs move there
    pinned.add(torch.randn(4, 8))
    assert pinned.H.device.type == "meta"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gptq_and_rtn_make_every_tensor_on_the_weights_device(config):
    """With "meta" as torch's default device, any tensor made without an explicit device (a CPU
    tensor, silently, in normal use) would land on meta and break the run or the result."""
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    acc = gptq.HessianAccumulator(64)
    acc.add(_correlated())
    expected = gptq.gptq(W, acc.H, config)
    with torch.device("meta"):
        got, rounded = gptq.gptq(W, acc.H, config), gptq.rtn(W, config)
    for field in ("qweight", "scale", "zero_point"):
        assert getattr(got, field).device.type == "cpu" and torch.equal(getattr(got, field), getattr(expected, field))
    assert got.loss == expected.loss and torch.equal(rounded.qweight, gptq.rtn(W, config).qweight)


def test_the_driver_makes_every_tensor_on_the_models_device():
    model, expected_model = _tiny_llama(), _tiny_llama()
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    expected = gptq.quantize_model_(expected_model, calibration, gptq.GPTQConfig(bits=3, group_size=16))
    with torch.device("meta"):  # see test_gptq_and_rtn_make_every_tensor_on_the_weights_device
        got = gptq.quantize_model_(model, calibration, gptq.GPTQConfig(bits=3, group_size=16))
    assert all(torch.equal(got[n].qweight, q.qweight) for n, q in expected.items())


class _TinyDecoder(nn.Module):
    """Embedding, then blocks of two Linears at ``model.layers``: small enough to run on "meta"."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(64, 16)
        self.model.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        if input_ids.device != self.model.embed.weight.device:  # as a real device would refuse (meta does not)
            raise RuntimeError(f"token ids on {input_ids.device}, embeddings on {self.model.embed.weight.device}")
        h = self.model.embed(input_ids)
        for block in self.model.layers:
            h = block(h)
        return h


def test_off_the_cpu_the_driver_works_on_the_models_device_and_leaves_threads_alone(monkeypatch):
    with torch.device("meta"):
        model = _TinyDecoder()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("the thread count changed for non-CPU work"))
    seen = []
    calibration = torch.randint(0, 64, (4, 8))  # on the CPU: moved to the model's device
    gptq.sequential_(model, calibration, lambda name, linear, H: seen.append((name, linear.weight.device.type, H.device.type, H.shape)))
    assert [s[0] for s in seen] == [f"model.layers.{i}.{j}" for i in range(2) for j in (0, 2)]
    assert all(s[1:3] == ("meta", "meta") for s in seen) and seen[1][3] == (32, 32)


def test_on_the_cpu_gptq_runs_single_threaded(monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    gptq.gptq(torch.randn(4, 16), torch.eye(16), gptq.GPTQConfig())
    assert calls[0] == 1 and len(calls) == 2  # one thread, then the old count back
