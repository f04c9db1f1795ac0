"""Tests of lessons_lib.moe and lessons_lib.moe_prune on tiny MoE models built offline from configs.

Each check compares against an independent reference: the block's own forward (captured by hooks),
a brute-force search over pruned copies of a block, counts seen by hooks, exact counting rules.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from lessons_lib import moe, moe_prune, prune

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(family: str, experts: int = 4, top_k: int = 2, seed: int = 0, **extra) -> nn.Module:
    """A 2-layer MoE causal LM of ``family`` (Qwen2-MoE: layer 1 dense, layer 0 with a shared expert)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=8, num_local_experts=experts, num_experts_per_tok=top_k, **extra)
        return tf.MixtralForCausalLM(cfg).eval()
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                                num_experts=experts, num_experts_per_tok=top_k, mlp_only_layers=[1], **extra)
        return tf.Qwen2MoeForCausalLM(cfg).eval()
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=8, num_experts=experts, head_dim=8,
                                num_experts_per_tok=top_k, norm_topk_prob=True, **extra)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    cfg = tf.OlmoeConfig(**COMMON, intermediate_size=8, num_experts=experts, num_experts_per_tok=top_k, **extra)
    return tf.OlmoeForCausalLM(cfg).eval()


def tokens(n_blocks: int = 4, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n_blocks * T,), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor, T: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.view(-1, T)).logits


def block_io(model: nn.Module, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (block input (N, H), block output (N, H))} captured by forward hooks."""
    seen = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0].reshape(-1, a[0].shape[-1]),
                                                                                       out.reshape(-1, out.shape[-1]))))
               for i, block in moe.moe_blocks(model)]
    logits(model, ids)
    for h in handles:
        h.remove()
    return seen


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict, config: dict) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config


def never_routed_mixtral() -> nn.Module:
    """Mixtral, 6 experts, top-2: router rows +u, -u, +v, -v, 0, 0, so exactly two logits are > 0 for any
    input (one of +-u.x, one of +-v.x) and experts 4 and 5 (logit 0) are never among the top-2."""
    model = tiny("mixtral", experts=6)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, block in moe.moe_blocks(model):
            u, v = torch.randn(2, 16, generator=g)
            block.gate.weight.copy_(torch.stack([u, -u, v, -v, 0 * u, 0 * u]))
    return model


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_blocks_finds_the_sparse_blocks(family):
    model = tiny(family)
    blocks = moe.moe_blocks(model)
    assert [i for i, _ in blocks] == ([0] if family == "qwen2_moe" else [0, 1])  # Qwen2 layer 1 is dense
    assert all(block is model.model.layers[i].mlp for i, block in blocks)
    assert [i for i, _ in moe.moe_blocks(model.model)] == [i for i, _ in blocks]  # the base model too


def test_moe_blocks_refuses_other_models():
    import transformers as tf

    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2))
    phimoe = tf.PhimoeForCausalLM(tf.PhimoeConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                                  bos_token_id=0, eos_token_id=0, pad_token_id=0))
    broken = tiny("mixtral")
    experts = broken.model.layers[1].mlp.experts
    experts.down_proj = nn.Parameter(experts.down_proj.data.transpose(1, 2).contiguous())  # (E, I, H): not the layout
    for model, reason in ((llama, "'llama'"), (phimoe, "'phimoe'"), (nn.Linear(2, 2), "None"),
                          (broken, "layer 1: unexpected expert layout")):
        with pytest.raises(ValueError, match=reason) as err:
            moe.moe_blocks(model)
        assert "mixtral, qwen2_moe, qwen3_moe, olmoe" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_and_expert_outputs_reproduce_the_block(family):
    model = tiny(family)
    ids = tokens(2)
    io, router = block_io(model, ids), {}
    handles = [b.gate.register_forward_hook(lambda m, a, out, i=i: router.__setitem__(i, out)) for i, b in moe.moe_blocks(model)]
    logits(model, ids)
    for h in handles:
        h.remove()
    for i, block in moe.moe_blocks(model):
        x, y = io[i]
        weights, indices = moe.route(block, router[i][0])
        assert torch.equal(weights, router[i][1]) and torch.equal(indices, router[i][2])
        f = moe.expert_outputs(block, x)  # (E, N, H)
        routed = torch.einsum("ne,enh->nh", moe.dense_weights(weights, indices, f.shape[0]), f)
        torch.testing.assert_close(moe.expert_outputs(block, x, 2), f[2])
        if family == "qwen2_moe":
            routed = routed + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(routed, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- usage
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_routing_stats_counts_mass_and_usage(family):
    model, ids = tiny(family), tokens(5)
    seen = {i: [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.float64)] for i, _ in moe.moe_blocks(model)}

    def record(i):
        def hook(module, args, out):
            seen[i][0] += torch.bincount(out[2].flatten(), minlength=4)
            seen[i][1].index_add_(0, out[2].flatten(), out[1].flatten().double())
        return hook

    handles = [b.gate.register_forward_hook(record(i)) for i, b in moe.moe_blocks(model)]
    logits(model, ids[:64])  # the 4 whole blocks of 16 (the 5th is cut below by block_size=16)
    for h in handles:
        h.remove()
    stats = moe.routing_stats(model, ids[:70], block_size=16, batch_size=3)  # tail of 6 tokens dropped
    assert stats.layers == (0, 1) and stats.tokens == 64 and stats.top_k == 2
    assert stats.counts.sum(-1).tolist() == [64 * 2, 64 * 2]
    assert torch.equal(stats.counts, torch.stack([seen[i][0] for i in (0, 1)]))
    torch.testing.assert_close(stats.weight_mass, torch.stack([seen[i][1] for i in (0, 1)]))
    if family == "mixtral":  # renormalised: each token hands out weight 1
        torch.testing.assert_close(stats.weight_mass.sum(-1), torch.full((2,), 64.0, dtype=torch.float64))
    torch.testing.assert_close(stats.token_fraction.sum(-1), torch.full((2,), 2.0, dtype=torch.float64))
    assert torch.equal(moe.expert_usage(model, ids[:70], block_size=16, batch_size=3), stats.share)
    as_batches = moe.routing_stats(model, [(ids[:32].view(2, 16), None), ids[32:64].view(2, 16)])
    assert torch.equal(as_batches.counts, stats.counts)
    with pytest.raises(ValueError, match="calibration data must be"):
        moe.routing_stats(model, ids.float())


# ----------------------------------------------------------------------------- removing experts
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_experts_save_reload_gives_identical_logits(family, tmp_path):
    model, ids = tiny(family), tokens(2)
    layers = [i for i, _ in moe.moe_blocks(model)]
    keep = {i: [[0, 2, 3], [1, 2, 3]][n % 2] for n, i in enumerate(layers)}
    gate0 = model.model.layers[0].mlp.gate.weight.detach().clone()
    moe.remove_experts_(model, keep)
    block = model.model.layers[0].mlp
    assert block.experts.gate_up_proj.shape == (3, 16, 16) and block.experts.down_proj.shape == (3, 16, 8)
    assert torch.equal(block.gate.weight, gate0[[0, 2, 3]]) and block.gate.num_experts == block.experts.num_experts == 3
    assert model.config.num_experts == 3 and model.num_experts == 3
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_removing_never_routed_experts_leaves_logits_unchanged():
    model, ids = never_routed_mixtral(), tokens(4)
    stats = moe.routing_stats(model, ids, block_size=16)
    assert (stats.counts[:, 4:] == 0).all() and (stats.counts[:, :4] > 0).all()
    before = logits(model, ids)
    moe.remove_experts_(model, {0: [0, 1, 2, 3], 1: [3, 2, 1, 0]})  # order does not matter
    assert model.config.num_local_experts == 4
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keep, match", [
    ({0: [], 1: []}, "at least one expert"),
    ({0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}, r"expert indices in 0\.\.3"),
    ({0: [0, 0, 1], 1: [0, 1, 2]}, "duplicate"),
    ({0: [0, 1, 5], 1: [0, 1, 2]}, r"expert indices in 0\.\.3"),
    ({0: [0], 1: [1]}, r"fewer than top_k=2.*set_top_k_\(model, 1\)"),
    ({0: [0, 1], 1: [0, 1, 2]}, "same number of experts"),
    ({0: [0, 1]}, r"one entry per MoE layer \[0, 1\]"),
    ([0, 1], "dict"),
])
def test_remove_experts_refuses_bad_keep_before_any_change(keep, match):
    model = tiny("mixtral")
    before, config = state(model), model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        moe.remove_experts_(model, keep)
    assert_unchanged(model, before, config)


def test_set_top_k_changes_routing_and_refuses_bad_k():
    model, ids = tiny("mixtral"), tokens(2)
    before, config = state(model), model.config.to_dict()
    for k in (0, 5, 1.0, True):
        with pytest.raises(ValueError, match=r"k must be an int in 1\.\.4"):
            moe_prune.set_top_k_(model, k)
    assert_unchanged(model, before, config)
    moe_prune.set_top_k_(model, 3)
    stats = moe.routing_stats(model, ids, block_size=16)
    assert stats.counts.sum(-1).tolist() == [32 * 3] * 2 and stats.top_k == 3
    assert model.config.num_experts_per_tok == 3 and model.model.layers[0].mlp.top_k == 3


# ----------------------------------------------------------------------------- choosing experts
def pruned_block(block: nn.Module, subset: tuple[int, ...]) -> nn.Module:
    """Brute force: a copy of the block with only ``subset``'s router rows and expert slices."""
    copy_ = copy.deepcopy(block)
    idx = list(subset)
    copy_.gate.weight = nn.Parameter(block.gate.weight.data[idx])
    copy_.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj.data[idx])
    copy_.experts.down_proj = nn.Parameter(block.experts.down_proj.data[idx])
    copy_.gate.num_experts = copy_.experts.num_experts = len(idx)
    return copy_


@pytest.mark.parametrize("family, r", [("mixtral", 2), ("mixtral", 3), ("olmoe", 3), ("qwen2_moe", 2)])
def test_reconstruction_choice_equals_brute_force(family, r):
    model, ids = tiny(family), tokens(3)
    io = block_io(model, ids)
    choice = moe_prune.reconstruction_choice(model, ids, r, block_size=16)
    assert choice.subsets == len(list(itertools.combinations(range(4), r)))
    for i, block in moe.moe_blocks(model):
        x, y = io[i]
        with torch.no_grad():
            brute = {s: float((pruned_block(block, s)(x[None]).reshape_as(y) - y).double().norm())
                     for s in itertools.combinations(range(4), r)}
        assert choice.keep[i] == min(brute, key=brute.get)
        got = torch.tensor([choice.errors[i][s] for s in brute], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(list(brute.values()), dtype=torch.float64), rtol=2e-4, atol=1e-6)


def test_reconstruction_drops_the_never_routed_experts():
    model = never_routed_mixtral()
    choice = moe_prune.reconstruction_choice(model, tokens(3), 4, block_size=16)
    assert choice.keep == {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}
    assert all(choice.errors[i][(0, 1, 2, 3)] < 1e-6 * choice.reference_norm[i] for i in (0, 1))
    assert moe_prune.choose_experts(model, tokens(3), 4, "least_used", block_size=16) == choice.keep
    assert moe_prune.choose_experts(model, tokens(3), 4, "reap", block_size=16) == choice.keep


def test_expert_scores_match_independent_references():
    model, ids = tiny("mixtral"), tokens(3)
    io, router = block_io(model, ids), {}
    handles = [b.gate.register_forward_hook(lambda m, a, out, i=i: router.__setitem__(i, out)) for i, b in moe.moe_blocks(model)]
    logits(model, ids)
    for h in handles:
        h.remove()
    reap = moe_prune.expert_scores(model, ids, "reap", block_size=16)
    for i, block in moe.moe_blocks(model):
        x, (_, weights, indices) = io[i][0], router[i]
        for j in range(4):
            with torch.no_grad():
                terms = [float(weights[n, s]) * float(block.experts(x[n:n + 1], torch.tensor([[j]]), torch.ones(1, 1)).norm())
                         for n in range(len(x)) for s in range(2) if indices[n, s] == j]
            assert reap[i, j].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    used = moe_prune.expert_scores(model, ids, "least_used", block_size=16)
    assert torch.equal(used, moe.routing_stats(model, ids, block_size=16).counts.double())
    r0, r1 = (moe_prune.expert_scores(model, ids, "random", seed=s, block_size=16) for s in (0, 1))
    assert torch.equal(r0, moe_prune.expert_scores(model, ids, "random", block_size=16)) and not torch.equal(r0, r1)
    chosen = moe_prune.choose_experts(model, ids, 3, "reap", block_size=16)
    assert chosen == {i: tuple(sorted(reap[p].argsort(descending=True)[:3].tolist())) for p, i in enumerate((0, 1))}


def test_choice_refuses_bad_arguments():
    model, ids = tiny("mixtral"), tokens(2)
    with pytest.raises(ValueError, match="criterion must be one of"):
        moe_prune.choose_experts(model, ids, 3, "magnitude")
    with pytest.raises(ValueError, match=r"r \(experts kept per layer\) must be an int in 2\.\.4.*top_k=2"):
        moe_prune.choose_experts(model, ids, 1, "reap")
    with pytest.raises(ValueError, match="max_subsets"):
        moe_prune.reconstruction_choice(model, ids, 2, max_subsets=5)
    with pytest.raises(ValueError, match="use choose_experts"):
        moe_prune.expert_scores(model, ids, "reconstruction")


# ----------------------------------------------------------------------------- inside experts, router
def test_usage_aware_ratios_brackets_and_budget():
    fraction = torch.tensor([[0.0, 0.0999, 0.10, 0.2999], [0.30, 0.5, 1.0, 0.1001]])
    ratios = moe_prune.usage_aware_ratios(fraction, 0.2)
    assert ratios.tolist() == [[0.6, 0.6, 0.4, 0.4], [0.2, 0.2, 0.2, 0.4]]
    assert moe_prune.uniform_ratio_same_budget(ratios) == pytest.approx(3.0 / 8)
    assert moe_prune.uniform_ratio_same_budget({0: [0.6, 0.2], 3: [0.4, 0.2]}) == pytest.approx(0.35)
    for bad, match in (((fraction, 1.0), "base_ratio"), ((fraction + 1, 0.2), "token_fraction")):
        with pytest.raises(ValueError, match=match):
            moe_prune.usage_aware_ratios(*bad)


def test_prune_within_experts_masks_each_expert_at_its_ratio():
    model = tiny("mixtral")
    ratios = torch.tensor([[0.6, 0.4, 0.2, 0.0], [0.2, 0.2, 0.6, 0.4]])
    dense = state(model)
    result = moe_prune.prune_within_experts_(model, ratios)
    assert set(result.masks) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    for name, mask in result.masks.items():
        layer, weight = int(name.split(".")[2]), dict(model.named_parameters())[name]
        assert weight.shape == dense[name].shape == mask.shape  # masks, not surgery
        for j in range(4):
            n = mask[j].numel()
            assert int(result.zeros[name][j]) == int((~mask[j]).sum()) == round(float(ratios[layer, j]) * n)
            assert torch.equal(weight[j], torch.where(mask[j], dense[name][j], 0.0))
            if (~mask[j]).any():
                assert dense[name][j][mask[j]].abs().min() >= dense[name][j][~mask[j]].abs().max()
    assert result.fraction == pytest.approx(float(ratios.mean()), abs=1e-3)
    again = tiny("mixtral")
    prune.apply_masks_(again, result.masks)  # the masks follow lessons_lib.prune's conventions
    assert all(torch.equal(again.state_dict()[k], model.state_dict()[k]) for k in dense)
    before, config = state(model), model.config.to_dict()
    for bad in (1.0, torch.full((2, 3), 0.1), {0: [0.1] * 4}, -0.1):
        with pytest.raises(ValueError, match="ratios must be"):
            moe_prune.prune_within_experts_(model, bad)
    assert_unchanged(model, before, config)


def test_prune_router_per_layer():
    model = tiny("olmoe")
    dense = state(model)
    before, config = state(model), model.config.to_dict()
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        moe_prune.prune_router_(model, 1.0)
    assert_unchanged(model, before, config)
    result = moe_prune.prune_router_(model, 0.3)
    for name, mask in result.masks.items():
        assert name.endswith("mlp.gate.weight") and int((~mask).sum()) == round(0.3 * 4 * 16) == int(result.zeros[name].sum())
        assert int((model.state_dict()[name] == 0).sum()) == int((~mask).sum())
        assert dense[name][mask].abs().min() >= dense[name][~mask].abs().max()


# ----------------------------------------------------------------------------- dynamic skipping
@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_skipping_beta_zero_is_the_identity(family):
    model, ids = tiny(family), tokens(2)
    reference = logits(model, ids)
    with moe_prune.dynamic_skipping(model, 0.0) as counter:
        assert torch.equal(logits(model, ids), reference)
    layers = len(moe.moe_blocks(model))
    assert counter.calls == 32 * layers and counter.skipped == 0 and counter.fraction == 0.0
    assert all("forward" not in b.experts.__dict__ for _, b in moe.moe_blocks(model))


def test_dynamic_skipping_beta_one_is_top1_and_restores_on_error():
    model, ids = tiny("mixtral"), tokens(2)
    top1 = copy.deepcopy(model)
    moe_prune.set_top_k_(top1, 1)
    with moe_prune.dynamic_skipping(model, {0: 1.0, 1: 1}) as counter:
        torch.testing.assert_close(logits(model, ids), logits(top1, ids), rtol=0, atol=1e-6)
    assert counter.fraction == 1.0 and counter.per_layer == {0: (32, 32), 1: (32, 32)}
    reference = logits(copy.deepcopy(model), ids)
    with pytest.raises(RuntimeError, match="inside"):
        with moe_prune.dynamic_skipping(model, 1.0):
            raise RuntimeError("inside")
    assert torch.equal(logits(model, ids), reference)


def test_dynamic_skipping_mixed_tokens_match_the_rule():
    model, ids = tiny("mixtral"), tokens(2)
    io, router = {}, {}
    block = model.model.layers[0].mlp
    h1 = block.register_forward_hook(lambda m, a, out: io.__setitem__(0, (a[0].reshape(-1, 16), out.reshape(-1, 16))))
    h2 = block.gate.register_forward_hook(lambda m, a, out: router.__setitem__(0, out))
    with moe_prune.dynamic_skipping(model, 0.8) as counter:
        logits(model, ids)
    h1.remove(), h2.remove()
    x, y = io[0]
    _, w, idx = router[0]
    f = moe.expert_outputs(block, x)  # (E, N, H)
    n = torch.arange(len(x))
    skip = w[:, 1] < 0.8 * w[:, 0]
    expected = torch.where(skip[:, None], f[idx[:, 0], n], w[:, :1] * f[idx[:, 0], n] + w[:, 1:] * f[idx[:, 1], n])
    assert 0 < int(skip.sum()) < len(x) and counter.per_layer[0] == (int(skip.sum()), len(x))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_skip_betas_are_medians_and_bad_inputs_are_refused():
    model, ids = tiny("mixtral"), tokens(4)
    ratios = {}
    h = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: ratios.__setitem__(0, out[1][:, 1] / out[1][:, 0]))
    betas = moe_prune.skip_betas(model, ids, block_size=16)
    h.remove()
    assert betas[0] == float(ratios[0].median()) and set(betas) == {0, 1}
    with moe_prune.dynamic_skipping(model, betas) as counter:
        logits(model, ids)
    assert counter.per_layer[0][0] == int((ratios[0] < betas[0]).sum())  # strict: the median itself is kept
    assert 0.3 < counter.fraction < 0.7
    before, config = state(model), model.config.to_dict()
    for bad in (-0.1, 1.5, {0: 0.5}, {0: 0.5, 1: 2.0}, "half"):
        with pytest.raises(ValueError, match="betas must be"):
            moe_prune.dynamic_skipping(model, bad)
    assert_unchanged(model, before, config)
    assert all("forward" not in b.experts.__dict__ for _, b in moe.moe_blocks(model))
    top3 = tiny("mixtral", top_k=3)
    for call in (lambda: moe_prune.dynamic_skipping(top3, 0.5), lambda: moe_prune.skip_betas(top3, ids, block_size=16)):
        with pytest.raises(ValueError, match="top_k == 2.*top_k=3"):
            call()


def test_quantize_experts_by_hand_bytes_and_error_bound():
    model = tiny("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = moe_prune.quantize_experts_(model, bits=4, group_size=8)
    fused = [n for n in before if n.endswith(("gate_up_proj", "down_proj"))]
    assert sorted(q.code_bytes) == sorted(fused)
    for n in fused:
        w, wq = before[n], dict(model.named_parameters())[n].detach()
        rows = w.reshape(-1, 8)  # groups of 8 inputs
        step = (rows.max(1).values.clamp(min=0) - rows.min(1).values.clamp(max=0)) / 15  # asymmetric min-max, 16 levels
        assert ((wq.reshape(-1, 8) - rows).abs() <= step[:, None] / 2 + 1e-6).all()
        assert q.code_bytes[n] == w.numel() // 2  # 4 bits per weight
        assert q.param_bytes[n] == rows.shape[0] * 2 + rows.shape[0] // 2  # fp16 scale + 4-bit zero per group
        assert len(torch.unique(wq.reshape(-1, 8)[0])) <= 16
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n not in fused), "only the experts change"
    assert q.ratio == pytest.approx(sum(q.code_bytes[n] + q.param_bytes[n] for n in fused) / sum(before[n].numel() * 4 for n in fused))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="group_size must be"):
        moe_prune.quantize_experts_(model, bits=4, group_size=5)
    with pytest.raises(ValueError, match="bits must be"):
        moe_prune.quantize_experts_(model, bits=1)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
