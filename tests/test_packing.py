"""Packed low-bit storage: exact bit packing, zero points at ``bits``, and exact file sizes."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lessons_lib import gptq, packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = packing.pack_bits(codes, bits)
    assert packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(packing.unpack_bits(packed, bits, 37), codes)


def test_pack_bits_rejects_codes_outside_the_range():
    with pytest.raises(ValueError, match="lie in"):
        packing.pack_bits(torch.tensor([[0, 16]]), 4)
    with pytest.raises(ValueError, match="lie in"):
        packing.pack_bits(torch.tensor([[-1, 3]]), 4)


def test_packed_linear_equals_the_dequantized_matmul():
    linear = nn.Linear(64, 8)
    qw = gptq.rtn(linear.weight, gptq.GPTQConfig(bits=4, group_size=32))
    layer = packing.PackedLinear.from_quantized(linear, qw)
    x = torch.randn(3, 64)
    W_hat = gptq.dequantize_codes(qw.qweight, qw.scale.half(), qw.zero_point, 32)  # scales are stored in FP16
    torch.testing.assert_close(layer(x), F.linear(x, W_hat, linear.bias), rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantized_weight(), qw.dequantize(), rtol=2e-3, atol=1e-4)
    packed_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert packed_bytes == 8 * 32 + 8 * 2 * 2 + 2 * 4 + 8 * 4  # codes + fp16 scales + 4-bit zeros + fp32 bias


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_points_are_packed_at_bits_along_the_outputs(bits, symmetric):
    linear = nn.Linear(48, 13, bias=False)  # 13 outputs: the zero points' last byte is partly padding
    qw = gptq.rtn(linear.weight, gptq.GPTQConfig(bits=bits, group_size=16, symmetric=symmetric))
    layer = packing.PackedLinear.from_quantized(linear, qw)
    assert layer.qzeros.dtype == torch.uint8 and layer.qzeros.shape == (3, math.ceil(13 * bits / 8))
    assert torch.equal(layer.zero_points().long(), qw.zero_point.long())  # (13, 3), exactly
    assert torch.equal(layer.qzeros, packing.pack_bits(qw.zero_point.T.to(torch.uint8), bits))  # group-major, as GPTQ's qzeros


def _tiny_llama(hidden=32, intermediate=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _expected_bytes(model, results):
    """Bytes the packed file's tensors must take, from the shapes alone (an independent count)."""
    total = 0
    for name, qw in results.items():
        out, cols = qw.qweight.shape
        n_groups = qw.scale.shape[1]
        total += out * math.ceil(cols * qw.bits / 8)  # codes
        total += 2 * out * n_groups  # FP16 scales
        total += n_groups * math.ceil(out * qw.bits / 8)  # bits-bit zero points
    for name, p in model.named_parameters():  # tied weights are listed (and stored) once
        if name.removesuffix(".weight") not in results:
            total += p.numel() * p.element_size()
    return total


CASES = [(4, 16, False), (3, 16, False), (2, None, True), (8, 32, False), (3, None, False)]


@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_pack_save_load_gives_identical_weights_and_the_exact_byte_count(tmp_path, bits, group_size, act_order):
    model = _tiny_llama()
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(bits))
    config = gptq.GPTQConfig(bits=bits, group_size=group_size, act_order=act_order)
    results = gptq.quantize_model_(model, calibration, config, batch_size=2)
    expected = _expected_bytes(model, results)
    packing.pack_model_(model, results)
    path = packing.save_packed(model, tmp_path / "packed") / packing.WEIGHTS_FILE
    reloaded = packing.load_packed(tmp_path / "packed")
    for name, qw in results.items():
        layer = reloaded.get_submodule(name)
        assert isinstance(layer, packing.PackedLinear)
        assert torch.equal(unpacked := packing.unpack_bits(layer.qweight, bits, layer.in_features), qw.qweight)
        assert torch.equal(layer.zero_points().long(), qw.zero_point.long())
        W_hat = gptq.dequantize_codes(unpacked, qw.scale.half(), qw.zero_point, group_size)  # only the scales are rounded (FP16)
        assert torch.equal(layer.dequantized_weight(), W_hat)
        assert torch.equal(layer.dequantized_weight(), model.get_submodule(name).dequantized_weight())
    tensors = load_file(path)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == expected
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]  # safetensors: 8-byte length, JSON header, data
    assert path.stat().st_size == 8 + header_len + expected
    stored = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)  # tied: stored once


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 8)])
def test_tied_embeddings_are_quantized_once_for_lookup_and_head_and_reload_identically(tmp_path, bits, group_size):
    model = _tiny_llama()
    W = model.get_input_embeddings().weight.detach().clone()  # (64, 32)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    qw = packing.pack_tied_embeddings_(model, bits=bits, group_size=group_size)
    W_hat = gptq.dequantize_codes(qw.qweight, qw.scale.half(), qw.zero_point, group_size)  # (64, 32): FP16 scales, as stored
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert torch.equal(embed(ids), W_hat[ids]), "a lookup returns the dequantized rows"
    x = torch.randn(5, 32)
    assert torch.equal(head(x), F.linear(x, W_hat)), "the head multiplies by the same table"
    assert embed.qweight is head.qweight and embed.scale is head.scale, "one table, not two"
    assert float((W_hat - W).abs().max()) <= float(qw.scale.max()) / 2 * 1.01, "round to nearest: at most half a step per weight"
    with torch.inference_mode():
        logits = model(ids).logits
    path = packing.save_packed(model, tmp_path / "tied") / packing.WEIGHTS_FILE
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    stored = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert sum(k.endswith(".qweight") and ("embed" in k or "lm_head" in k) for k in stored) == 1, "stored once"
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in stored), "no float table left"
    assert stored[next(k for k in stored if k.endswith("qweight"))]["dtype"] == "U8"
    reloaded = packing.load_packed(tmp_path / "tied")
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, logits)
    assert isinstance(reloaded.get_input_embeddings(), packing.PackedEmbedding)


def test_tied_embeddings_refuse_an_untied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        packing.pack_tied_embeddings_(LlamaForCausalLM(cfg))
