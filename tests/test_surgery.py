"""Surgery: a physically smaller model computes what the structurally masked one computes."""
import copy
import sys

import pytest
import torch
import transformers
from torch import nn
from torch.testing import assert_close

from lessons_lib import data, measure, surgery, zoo

transformers.logging.set_verbosity_error()
CONVS = ("features.0", "features.4", "features.8")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cnn():
    return zoo.load_teacher("vision")


@pytest.fixture(scope="module")
def lm():
    return zoo.load_teacher("lm")


@pytest.fixture(scope="module")
def minilm():
    return data.load_minilm()


@pytest.fixture(scope="module")
def digits():
    return data.load_mnist("val")[0][::8][:64]  # every class (the split is sorted by class)


def snapshot(model):
    config = model.config.to_dict() if hasattr(model, "config") else None
    return {k: v.clone() for k, v in model.state_dict().items()}, config


def assert_unchanged(model, before):
    state, config = snapshot(model)
    assert state.keys() == before[0].keys() and config == before[1]
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k


def random_keep(n, k, g):
    """A bool keep-vector (n,) with k random True entries."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[:k]] = True
    return keep


def l2_keep(weight, k):
    """Keep the k rows (output filters) of largest L2 norm."""
    norms = weight.detach().flatten(1).norm(dim=1)  # (C_out,)
    return torch.zeros(len(norms), dtype=torch.bool).index_fill_(0, norms.topk(k).indices, True)


def masked_and_removed(model, plan):
    masked = surgery.structural_mask_(copy.deepcopy(model), plan)
    return masked, surgery.remove_(copy.deepcopy(model), plan)


def tiny_llama(heads=8, kv_heads=2, layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- measure.flops
def test_flops_match_hand_count_for_linear_and_conv2d():
    x = torch.randn(5, 12)
    assert measure.flops(nn.Linear(12, 7), x) == 2 * 5 * 12 * 7
    img = torch.randn(2, 3, 10, 10)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # output 5x5
    assert measure.flops(conv, img) == 2 * 2 * 8 * 5 * 5 * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, 3, groups=2, bias=False)  # output 8x8, 2 inputs per filter
    assert measure.flops(grouped, torch.randn(1, 4, 10, 10)) == 2 * 8 * 8 * 8 * 2 * 3 * 3


# ----------------------------------------------------------------------------- CNN / MLP chains
def test_vision_cnn_masked_equals_pruned_and_shrinks_as_counted(cnn, digits):
    g = torch.Generator().manual_seed(0)
    keep = {"features.0": random_keep(32, 20, g), "features.4": random_keep(64, 40, g),
            "features.8": random_keep(64, 30, g), "classifier.1": random_keep(128, 100, g)}
    masked, pruned = masked_and_removed(cnn, surgery.plan_channels(cnn, keep))
    assert_close(pruned(digits), masked(digits))
    assert [pruned.features[i].out_channels for i in (0, 4, 8)] == [20, 40, 30]
    assert pruned.features[9].num_features == 30 and pruned.classifier[1].in_features == 30 * 9
    conv = 20 * 1 * 9 + 40 * 20 * 9 + 30 * 40 * 9
    bn = 2 * (20 + 40 + 30)
    head = (30 * 9 * 100 + 100) + (100 * 10 + 10)
    assert measure.count_parameters(pruned) == conv + bn + head


def test_zeroing_filters_alone_is_not_the_pruned_model(cnn, digits):
    """The BatchNorm trap: a zero filter still leaves beta - gamma*mean/sqrt(var+eps) behind."""
    keep = {"features.4": torch.arange(32)}
    pruned = surgery.remove_(copy.deepcopy(cnn), surgery.plan_channels(cnn, keep))
    naive = copy.deepcopy(cnn)
    with torch.no_grad():
        naive.features[4].weight[32:] = 0
    assert (naive(digits) - pruned(digits)).abs().max() > 1e-2


def test_mlp_chain_with_batchnorm1d_and_sigmoid():
    """Masking zeroes the consumer's columns, so even sigmoid(0) = 1/2 contributes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Sigmoid(), nn.Dropout(0.1),
                          nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    model[1].running_mean.normal_()
    model.eval()
    keep = {"0": [1, 3, 4, 8], "4": torch.tensor([True, False] * 4)}
    masked, pruned = masked_and_removed(model, surgery.plan_channels(model, keep))
    x = torch.randn(16, 6)
    assert_close(pruned(x), masked(x))
    assert [m.weight.shape for m in (pruned[0], pruned[4], pruned[6])] == [(4, 6), (4, 4), (3, 4)]


def test_channel_errors_name_the_argument_and_leave_the_model_unchanged(cnn):
    before = snapshot(cnn)
    cases = {"no Conv/Linear layer named 'features.1'": {"features.1": [0]},
             r"must have shape \(32,\)": {"features.0": torch.ones(31, dtype=torch.bool)},
             "keeps none of 64": {"features.4": torch.zeros(64, dtype=torch.bool)},
             "makes the model's output": {"classifier.4": [0, 1]},
             r"distinct and in \[0, 32\)": {"features.0": [0, 0, 5]},
             "1-D integer indices": {"features.0": torch.ones(32)}}
    for match, keep in cases.items():
        with pytest.raises(ValueError, match=match):
            surgery.remove_(cnn, surgery.plan_channels(cnn, keep))
    plan = surgery.plan_channels(cnn, {"features.0": [0, 1]})
    small = surgery.remove_(copy.deepcopy(cnn), plan)
    with pytest.raises(ValueError, match="applies once"):
        surgery.structural_mask_(small, plan)
    with pytest.raises(ValueError, match="cut each tensor dimension once"):
        plan + plan
    assert_unchanged(cnn, before)


# ----------------------------------------------------------------------------- Torch-Pruning
def test_torch_pruning_with_explicit_indices_gives_the_same_model(cnn, digits):
    keep = {f"{name}.weight": l2_keep(cnn.get_submodule(name).weight, k)  # parameter names, as prune.py's
            for name, k in zip((*CONVS, "classifier.1"), (16, 48, 24, 64))}
    ours = surgery.remove_(copy.deepcopy(cnn), surgery.plan_channels(cnn, keep))
    theirs = surgery.torch_pruning_remove_(copy.deepcopy(cnn), keep, digits[:1])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert measure.count_parameters(ours) == measure.count_parameters(theirs)
    assert_close(theirs(digits), ours(digits))


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_torch_pruning_l2_ratio_chooses_our_channels(cnn, digits, ratio):
    """Same per-layer ratio, same criterion (L2 norm of each filter): same model. The ratio
    counts channels, so the parameters shrink by about 1-(1-ratio)^2."""
    keep = {}
    for name in (*CONVS, "classifier.1"):
        weight = cnn.get_submodule(name).weight
        keep[name] = l2_keep(weight, int(weight.shape[0] * (1 - ratio)))  # Torch-Pruning's rounding
    ours = surgery.remove_(copy.deepcopy(cnn), surgery.plan_channels(cnn, keep))
    theirs = copy.deepcopy(cnn)
    surgery.torch_pruning_l2_(theirs, ratio, digits[:1], ignored_layers=[theirs.classifier[4]])
    assert theirs.classifier[4].out_features == 10
    assert measure.count_parameters(ours) == measure.count_parameters(theirs)
    assert_close(theirs(digits), ours(digits))
    shrink = 1 - measure.count_parameters(ours) / measure.count_parameters(cnn)
    assert abs(shrink - (1 - (1 - ratio) ** 2)) < 0.05


def test_missing_torch_pruning_says_how_to_install(cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-pruning"):
        surgery.torch_pruning_remove_(copy.deepcopy(cnn), {"features.0": [0]}, torch.zeros(1, 1, 28, 28))


# ----------------------------------------------------------------------------- Llama
def test_llama_uniform_heads_and_neurons_fit_the_config(lm, tmp_path):
    g = torch.Generator().manual_seed(0)
    L = lm.config.num_hidden_layers
    plan = (surgery.plan_heads(lm, {i: random_keep(4, 2, g) for i in range(L)})
            + surgery.plan_neurons(lm, {i: random_keep(448, 320, g) for i in range(L)}))
    masked, pruned = masked_and_removed(lm, plan)
    ids = torch.randint(0, lm.config.vocab_size, (2, 24), generator=g)
    logits = pruned(ids).logits
    assert_close(logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (2, 2, 320, 32)
    assert not hasattr(cfg, "pruned_widths")
    assert pruned.model.layers[5].self_attn.q_proj.weight.shape == (64, 128)
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, logits)
    three = surgery.remove_(copy.deepcopy(lm), surgery.plan_heads(lm, {i: [0, 1, 2] for i in range(L)}))
    assert three.config.num_attention_heads == 4  # LlamaConfig demands hidden_size % heads == 0: 128 % 3 != 0
    assert three.config.pruned_widths == {"num_attention_heads": [3] * L, "num_key_value_heads": [3] * L}


def test_llama_non_uniform_widths_are_stored_and_rebuilt_by_load_pruned(lm, tmp_path):
    g = torch.Generator().manual_seed(1)
    L = lm.config.num_hidden_layers
    plan = (surgery.plan_heads(lm, {i: random_keep(4, 1 + i % 4, g) for i in range(L)})
            + surgery.plan_neurons(lm, {i: random_keep(448, 100 + 20 * i, g) for i in range(0, L, 2)}))
    masked, pruned = masked_and_removed(lm, plan)
    ids = torch.randint(0, lm.config.vocab_size, (2, 16), generator=g)
    logits = pruned(ids).logits
    assert_close(logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    widths = pruned.config.pruned_widths
    assert widths["num_attention_heads"] == widths["num_key_value_heads"] == [1 + i % 4 for i in range(L)]
    assert widths["intermediate_size"] == [100 + 20 * i if i % 2 == 0 else 448 for i in range(L)]
    pruned.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatched"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = surgery.load_pruned(tmp_path)
    assert torch.equal(reloaded(ids).logits, logits)
    assert reloaded.config.pruned_widths == widths


def test_grouped_query_attention_keeps_whole_groups_even(tmp_path):
    model = tiny_llama(heads=8, kv_heads=2)  # query heads 0-3 share KV head 0, 4-7 share KV head 1
    before = snapshot(model)
    for bad in ([0, 4, 5], [0, 1, 2, 4]):
        with pytest.raises(ValueError, match="grouped-query attention.*kept per group"):
            surgery.plan_heads(model, {0: bad})
    assert_unchanged(model, before)
    plan = surgery.plan_heads(model, {0: [1, 2, 5, 6], 1: [4, 5, 6, 7]})  # 2 per group; group 1 only
    masked, pruned = masked_and_removed(model, plan)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_close(pruned(ids).logits, masked(ids).logits)
    attn0, attn1 = (layer.self_attn for layer in pruned.model.layers)
    assert (attn0.k_proj.out_features, attn0.num_key_value_groups) == (16, 2)
    assert (attn1.k_proj.out_features, attn1.num_key_value_groups) == (8, 4)
    assert pruned.config.pruned_widths == {"num_attention_heads": [4, 4], "num_key_value_heads": [2, 1]}
    pruned.save_pretrained(tmp_path / "gqa")
    reloaded = surgery.load_pruned(tmp_path / "gqa")
    assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    surgery.drop_layers_(reloaded, [0])  # what is left is uniform again: back into the config fields
    cfg = reloaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2) and not hasattr(cfg, "pruned_widths")
    reloaded.save_pretrained(tmp_path / "one")
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    assert torch.equal(one(ids).logits, reloaded(ids).logits)


def test_transformer_errors_leave_the_model_unchanged(lm):
    before = snapshot(lm)
    cases = [(surgery.plan_heads, {0: torch.zeros(4, dtype=torch.bool)}, "keep\\[0\\] keeps none of 4"),
             (surgery.plan_heads, {12: [0]}, "unknown layer index \\[12\\]; accepted: integers 0..11"),
             (surgery.plan_neurons, {3: torch.ones(447, dtype=torch.bool)}, "keep\\[3\\].*shape \\(448,\\)"),
             (surgery.drop_layers_, torch.zeros(12, dtype=torch.bool), "keep keeps none of 12"),
             (surgery.drop_layers_, [0, 12], "in \\[0, 12\\)")]
    for fn, keep, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(lm, keep)
    with pytest.raises(ValueError, match="model_type in \\('llama', 'bert'\\)"):
        surgery.plan_heads(nn.Linear(2, 2), {0: [0]})
    assert_unchanged(lm, before)


def run_layers(model, ids, layer_ids):
    """Hand-built reference: embeddings, then only the listed decoder layers, norm, head."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    h = inner.embed_tokens(ids)  # (B, T, C)
    pos = torch.arange(ids.shape[1])[None]  # (1, T)
    rope = inner.rotary_emb(h, position_ids=pos)
    mask = create_causal_mask(config=inner.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
    for i in layer_ids:
        h = inner.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    return model.lm_head(inner.norm(h))  # (B, T, V)


@torch.no_grad()
def test_drop_layers_keeps_the_kv_cache_consistent(lm, tmp_path):
    keep = [0, 1, 2, 5, 8, 11]
    ids = torch.randint(0, lm.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert_close(run_layers(lm, ids, range(12)), lm(ids).logits)  # the reference is right
    small = surgery.drop_layers_(copy.deepcopy(lm), torch.tensor([i in keep for i in range(12)]))
    assert small.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == list(range(6))
    full = small(ids).logits
    assert_close(full, run_layers(lm, ids, keep))
    out = small(ids[:, :8], use_cache=True)  # prefill, then one token at a time
    steps = [out.logits]
    for t in range(8, 20):
        out = small(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    assert len(out.cache.layers) == 6 and out.cache.get_seq_length() == 20
    assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, full)


# ----------------------------------------------------------------------------- BERT / MiniLM
@torch.no_grad()
def test_minilm_ffn_fits_the_config_heads_need_load_pruned(minilm, tmp_path):
    model, tok = minilm
    batch = tok(["Pruning removes whole heads.", "A short one."], padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    ffn = surgery.plan_neurons(model, {i: random_keep(1536, 1024, g) for i in range(6)})
    masked, pruned = masked_and_removed(model, ffn)
    hidden = pruned(**batch).last_hidden_state
    assert_close(hidden, masked(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert pruned.config.intermediate_size == 1024 and not hasattr(pruned.config, "pruned_widths")
    pruned.save_pretrained(tmp_path / "ffn")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "ffn").eval()
    assert torch.equal(reloaded(**batch).last_hidden_state, hidden)

    heads = surgery.plan_heads(pruned, {i: random_keep(12, 10, g) for i in range(6)})
    masked, pruned = masked_and_removed(pruned, heads)
    hidden = pruned(**batch).last_hidden_state
    assert_close(hidden, masked(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)
    attn = pruned.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.attention_head_size) == (10, 320, 32)
    assert pruned.config.num_attention_heads == 12  # head size = hidden_size / num_attention_heads
    assert pruned.config.pruned_widths == {"num_attention_heads": [10] * 6}
    pruned.save_pretrained(tmp_path / "heads")
    with pytest.raises(RuntimeError, match="mismatched"):
        transformers.AutoModel.from_pretrained(tmp_path / "heads")
    assert torch.equal(surgery.load_pruned(tmp_path / "heads")(**batch).last_hidden_state, hidden)

    surgery.drop_layers_(pruned, [0, 2, 4])
    assert pruned.config.num_hidden_layers == 3 and pruned.config.pruned_widths == {"num_attention_heads": [10] * 3}
    pruned.save_pretrained(tmp_path / "three")
    reloaded = surgery.load_pruned(tmp_path / "three")
    assert len(reloaded.encoder.layer) == 3
    assert torch.equal(reloaded(**batch).last_hidden_state, pruned(**batch).last_hidden_state)
