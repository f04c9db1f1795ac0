"""Tests of lessons_lib.prune: exact mask counts against sort-based references, agreement with
torch.nn.utils.prune on the vision teacher, N:M groups, masks kept through AdamW steps, the cubic
schedule, gradual pruning, the sensitivity scan, and refusals that leave the model unchanged.
Seeded, small, offline."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from lessons_lib import prune, teachers, zoo


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return teachers.SmallCNN(channels=(4, 8, 8), hidden=16).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _reference_keep(flat, k):
    """Independent reference for the counting and tie rules: a stable sort, the first k pruned."""
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


@pytest.fixture(scope="module")
def vision():
    return zoo.load_teacher("vision")


# ----------------------------------------------------------------------------- weights and scores
def test_prunable_weights_picks_linear_and_conv_weights_and_more_only_when_asked():
    model = _tiny_cnn()
    assert list(prune.prunable_weights(model)) == ["features.0.weight", "features.4.weight", "features.8.weight",
                                                   "classifier.1.weight", "classifier.4.weight"]
    assert prune.prunable_weights(model)["features.0.weight"] is model.features[0].weight  # the Parameter itself
    with_bias = prune.prunable_weights(model, include_bias=True)
    assert "classifier.1.bias" in with_bias and "features.1.weight" not in with_bias
    norms = prune.prunable_weights(model, include_norms=True, include_bias=True)
    assert {"features.1.weight", "features.1.bias"} <= set(norms)


def test_prunable_weights_treats_a_tied_head_as_an_embedding_and_counts_it_once():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = TinyLM()
    assert list(prune.prunable_weights(model)) == ["proj.weight"]
    assert list(prune.prunable_weights(model, include_embeddings=True)) == ["embed.weight", "proj.weight"]
    assert list(prune.prunable_weights(model, include_norms=True)) == ["proj.weight", "norm.weight"]


def test_prunable_weights_refuses_a_model_without_layers_and_bad_flags():
    with pytest.raises(ValueError, match="model"):
        prune.prunable_weights(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="include_bias"):
        prune.prunable_weights(_tiny_cnn(), include_bias=1)


def test_magnitude_scores_are_abs_copies_and_unknown_names_are_refused_with_a_hint():
    model = _tiny_cnn()
    scores = prune.magnitude_scores(model, ["classifier.4.weight"])
    assert torch.equal(scores["classifier.4.weight"], model.classifier[4].weight.abs())
    assert not scores["classifier.4.weight"].requires_grad
    with pytest.raises(ValueError, match=r"names.*did you mean \['classifier.4.weight'\]"):
        prune.magnitude_scores(model, ["classifier.4"])


# ----------------------------------------------------------------------------- unstructured masks
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 0.95])
def test_global_masks_prune_exactly_round_s_times_total_with_the_tie_rule(sparsity):
    scores = {"a": torch.randint(0, 7, (13, 11), generator=_gen(1)), "b": torch.randint(0, 7, (5, 3, 3), generator=_gen(2))}
    masks = prune.global_masks(scores, sparsity)
    total = 13 * 11 + 45
    assert prune.sparsity(masks).global_zeros == round(sparsity * total)
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), _reference_keep(flat, round(sparsity * total)))


def test_global_masks_work_above_the_16m_elements_that_torch_quantile_refuses():
    big = torch.rand(17_000_000, generator=_gen(3))  # float32 rand: many exact ties; torch.quantile raises here
    scores = {"a": big[:12_000_000].reshape(3000, 4000), "b": big[12_000_000:]}
    masks = prune.global_masks(scores, 0.3)
    keep = torch.cat([masks["a"].flatten(), masks["b"]])
    assert int((~keep).sum()) == round(0.3 * 17_000_000)
    assert big[~keep].max() <= big[keep].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.95])
def test_layerwise_masks_are_exact_per_tensor_and_accept_per_layer_ratios(sparsity):
    scores = {"a": torch.randint(0, 5, (10, 10), generator=_gen(4)).float(), "b": torch.randn(7, 3, generator=_gen(5))}
    masks = prune.layerwise_masks(scores, sparsity)
    for name, s in scores.items():
        assert torch.equal(masks[name].flatten(), _reference_keep(s.flatten(), round(sparsity * s.numel())))
    mixed = prune.sparsity(prune.layerwise_masks(scores, {"a": sparsity, "b": 0.5}))
    assert mixed.zeros == {"a": round(sparsity * 100), "b": round(0.5 * 21)}


def test_layerwise_ratios_must_name_every_tensor_and_only_those():
    scores = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
    with pytest.raises(ValueError, match="no ratio for \\['b'\\]"):
        prune.layerwise_masks(scores, {"a": 0.5})
    with pytest.raises(ValueError, match="unknown parameter names \\['c'\\]"):
        prune.layerwise_masks(scores, {"a": 0.5, "b": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match=r"sparsity\['b'\] must be a number in \[0, 1\)"):
        prune.layerwise_masks(scores, {"a": 0.5, "b": 1.0})


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.8, 0.95])
def test_global_masks_equal_torch_global_unstructured_on_the_vision_teacher(vision, sparsity):
    ours = prune.global_masks(prune.magnitude_scores(vision), sparsity)
    theirs = copy.deepcopy(vision)
    modules = dict(theirs.named_modules())
    params = [(modules[n.rsplit(".", 1)[0]], "weight") for n in ours]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    agree = sum(int((ours[n] == m.weight_mask.bool()).sum()) for n, (m, _) in zip(ours, params))
    assert agree / sum(m.numel() for m in ours.values()) == 1.0


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_layerwise_masks_equal_torch_l1_unstructured_per_layer(vision, sparsity):
    ours = prune.layerwise_masks(prune.magnitude_scores(vision), sparsity)
    theirs = copy.deepcopy(vision)
    for name, module in theirs.named_modules():
        if f"{name}.weight" in ours:
            torch_prune.l1_unstructured(module, "weight", amount=sparsity)
            assert torch.equal(ours[f"{name}.weight"], module.weight_mask.bool())


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_channel_masks_of_l2_norms_equal_torch_ln_structured(vision, ratio):
    weights = prune.prunable_weights(vision)
    keep = prune.channel_masks({n: prune.channel_norms(w, p=2) for n, w in weights.items()}, ratio)
    theirs = copy.deepcopy(vision)
    for name, module in theirs.named_modules():
        if f"{name}.weight" in keep:
            torch_prune.ln_structured(module, "weight", amount=ratio, n=2, dim=0)
            expanded = prune.expand_channels(keep[f"{name}.weight"], module.weight)
            assert torch.equal(expanded, module.weight_mask.bool())
            assert int((~keep[f"{name}.weight"]).sum()) == round(ratio * module.weight.shape[0])


def test_channel_masks_never_remove_every_channel():
    with pytest.raises(ValueError, match="all 3 channels"):
        prune.channel_masks({"w": torch.tensor([1.0, 2.0, 3.0])}, 0.9)
    with pytest.raises(ValueError, match="1-D"):
        prune.channel_masks({"w": torch.randn(3, 2)}, 0.5)


def test_nm_masks_keep_exactly_n_largest_per_group_of_m_along_the_inputs():
    linear = torch.randn(6, 16, generator=_gen(6))
    conv = torch.randn(4, 2, 3, 2, generator=_gen(7))  # in*kh*kw = 12
    masks = prune.nm_masks({"linear": linear, "conv": conv}, n=2, m=4)
    groups = masks["linear"].reshape(6, 4, 4)  # (out, groups, m)
    assert (groups.sum(-1) == 2).all()
    top = linear.reshape(6, 4, 4).topk(2, dim=-1).indices
    assert torch.equal(groups, torch.zeros(6, 4, 4, dtype=torch.bool).scatter_(-1, top, True))
    assert (masks["conv"].reshape(4, 3, 4).sum(-1) == 2).all()  # flattened (out, in*kh*kw)
    one_of_three = prune.nm_masks({"w": torch.randn(3, 9, generator=_gen(8))}, n=1, m=3)["w"]
    assert (one_of_three.reshape(3, 3, 3).sum(-1) == 1).all()


@pytest.mark.parametrize("n, m, match", [(3, 2, "n must be"), (0, 4, "n must be"), (2, 5, "m=5 must divide"),
                                         (True, 4, "n must be"), (2, 0, "m must be")])
def test_nm_masks_refuse_bad_n_and_m(n, m, match):
    with pytest.raises(ValueError, match=match):
        prune.nm_masks({"w": torch.randn(4, 8)}, n=n, m=m)


def test_sparsity_report_counts_masks_and_model_zeros():
    model = _tiny_cnn()
    masks = prune.global_masks(prune.magnitude_scores(model), 0.6)
    from_masks = prune.sparsity(masks)
    prune.apply_masks_(model, masks)
    from_model = prune.sparsity(model)
    assert from_masks.zeros == from_model.zeros and from_model.global_total == sum(w.numel() for w in masks.values())
    assert from_model.global_fraction == pytest.approx(0.6, abs=1 / from_model.global_total)
    assert from_model.rows()[-1]["name"] == "(global)" and len(from_model.rows()) == len(masks) + 1


# ----------------------------------------------------------------------------- masks kept while training
def _momentum_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8, generator=_gen(9)), torch.randn(32, 1, generator=_gen(10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):  # momentum built up before pruning
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    masks = prune.global_masks(prune.magnitude_scores(model), 0.7)
    return model, x, y, opt, masks


def _masked_values(model, masks):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m] for n, m in masks.items()])


def test_mask_keeper_keeps_weights_exactly_zero_through_adamw_momentum_and_removes_its_hooks():
    model, x, y, opt, masks = _momentum_setup()
    keeper = prune.MaskKeeper(model, masks)
    assert (_masked_values(model, masks) == 0).all()
    for step in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        assert all((p.grad[~masks[n]] == 0).all() for n, p in model.named_parameters() if n in masks)
        opt.step()
        assert (_masked_values(model, masks) != 0).any()  # the old momentum regrows them ...
        keeper(step, 0.0)
        assert (_masked_values(model, masks) == 0).all()  # ... until the keeper re-applies the masks
    keeper.remove()
    assert all(not p._backward_hooks for p in model.parameters())


def test_fine_tune_masked_trains_on_training_run_and_leaves_masks_and_no_hooks():
    model, x, y, _, masks = _momentum_setup()
    model.eval()
    seen = []
    history = prune.fine_tune_masked(model, masks, lambda b: (F.mse_loss(model(b[0]), b[1]), {"loss": 0.0}),
                                     [(x, y)] * 6, 6, lambda step: 1e-2, weight_decay=0.1,
                                     on_step=lambda step, loss: seen.append(step))
    assert len(history["loss"]) == 6 and seen == list(range(6))
    assert (_masked_values(model, masks) == 0).all() and not model.training
    assert all(not p._backward_hooks for p in model.parameters())


# ----------------------------------------------------------------------------- gradual pruning
def test_cubic_sparsity_boundaries_staircase_and_monotone():
    kw = dict(initial=0.1, start=10, end=50, every=10)
    values = [prune.cubic_sparsity(t, 0.8, **kw) for t in range(70)]
    assert values[:10] == [0.0] * 10 and values[10] == 0.1 and values[50] == 0.8 and values[69] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[20:30] == [values[20]] * 10  # held between pruning steps
    assert values[20] == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 10 / 40) ** 3)
    assert prune.cubic_sparsity(50, 0.8, end=100) == pytest.approx(0.7)  # 0.8 * (1 - 0.5^3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(final=1.0, end=10), "final must be"), (dict(final=0.5, initial=0.6, end=10), "initial"),
    (dict(final=0.5, start=5, end=5), "end must be"), (dict(final=0.5, end=10, every=3), "every must"),
    (dict(final=0.5, start=-1, end=10), "start must"), (dict(final=-0.1, end=10), "final must")])
def test_cubic_sparsity_refuses_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune.cubic_sparsity(0, **kwargs)


def _regression():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(64, 8, generator=_gen(11)), torch.randn(64, 4, generator=_gen(12))
    return model, (lambda b: (F.mse_loss(model(b[0]), b[1]), {"loss": 0.0})), [(x, y)] * 40


@pytest.mark.parametrize("global_", [True, False])
def test_gradual_prune_follows_the_schedule_and_ends_exactly_at_the_final_sparsity(global_):
    model, objective, batches = _regression()
    zero_sets = []
    result = prune.gradual_prune(model, objective, batches, 30, lambda step: 1e-2, 0.75, end=20, start=4, every=4,
                                 global_=global_, on_step=lambda s, l: zero_sets.append(
                                     torch.cat([w.detach().flatten() == 0 for w in prune.prunable_weights(model).values()])))
    expected = [prune.cubic_sparsity(t, 0.75, start=4, end=20, every=4) for t in range(30)]
    assert result.history["sparsity"] == expected and len(result.history["loss"]) == 30
    counts = [round(s * 384) if global_ else round(s * 256) + round(s * 128) for s in expected]  # 256 + 128 weights
    assert [int(z.sum()) for z in zero_sets] == counts  # the masks in force at each step
    assert all((a <= b).all() for a, b in zip(zero_sets, zero_sets[1:]))  # the pruned set only grows
    report = prune.sparsity(result.masks)
    assert report.global_zeros == round(0.75 * 384) and prune.sparsity(model).zeros == report.zeros
    if not global_:
        assert report.zeros == {"0.weight": 192, "2.weight": 96}
    assert all(not p._backward_hooks for p in model.parameters())


# ----------------------------------------------------------------------------- sensitivity
def test_sensitivity_scan_prunes_one_layer_at_a_time_and_restores_bit_exactly():
    model = _tiny_cnn()
    before = _state(model)
    x = torch.randn(16, 1, 28, 28, generator=_gen(13))
    dense_out = model(x).detach()
    calls = []

    def evaluate(m):
        calls.append(prune.sparsity(m).zeros)
        with torch.no_grad():
            return float((m(x) - dense_out).abs().max())

    names = ["features.4.weight", "classifier.1.weight"]
    scan = prune.sensitivity_scan(model, names, [0.0, 0.5, 0.9], evaluate)
    assert _same_state(model, before)
    assert list(scan) == names and scan[names[0]][0] == 0.0 and scan[names[0]][1] < scan[names[0]][2]
    assert calls[1]["features.4.weight"] == round(0.5 * 8 * 4 * 9) and calls[1]["classifier.1.weight"] == 0  # one layer at a time

    def broken(m):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError):
        prune.sensitivity_scan(model, names, [0.5], broken)
    assert _same_state(model, before)


def test_ratios_from_scan_take_the_largest_sparsity_before_the_first_drop_too_large():
    sparsities = [0.9, 0.0, 0.5, 0.7]  # any order
    scan = {"a": [0.60, 0.95, 0.94, 0.90], "b": [0.94, 0.95, 0.80, 0.94], "c": [0.1, 0.95, 0.2, 0.3]}
    assert prune.ratios_from_scan(scan, sparsities, 0.02) == {"a": 0.5, "b": 0.0, "c": 0.0}
    assert prune.ratios_from_scan(scan, sparsities, 0.06) == {"a": 0.7, "b": 0.0, "c": 0.0}
    losses = {"a": [3.0, 1.0, 1.1, 1.2]}
    assert prune.ratios_from_scan(losses, sparsities, 0.15, higher_is_better=False) == {"a": 0.5}
    assert prune.ratios_from_scan({"a": [0.9, 0.9]}, [0.5, 0.9], 0.01, dense=0.9) == {"a": 0.9}
    with pytest.raises(ValueError, match="include 0.0"):
        prune.ratios_from_scan({"a": [0.9, 0.9]}, [0.5, 0.9], 0.01)
    with pytest.raises(ValueError, match="max_drop"):
        prune.ratios_from_scan(scan, sparsities, -0.1)


# ----------------------------------------------------------------------------- refusals leave the model unchanged
def _calls(model):
    objective = lambda b: (model(b).sum(), {})  # noqa: E731
    batches = [torch.randn(2, 1, 28, 28)] * 4
    good = prune.global_masks(prune.magnitude_scores(model), 0.5)
    bad_shape = {**good, "features.0.weight": torch.ones(3, 3, dtype=torch.bool)}
    return {
        "global sparsity 1": (lambda: prune.global_masks(prune.magnitude_scores(model), 1.0), "sparsity must be"),
        "global sparsity bool": (lambda: prune.global_masks(prune.magnitude_scores(model), True), "sparsity must be"),
        "layerwise -0.1": (lambda: prune.layerwise_masks(prune.magnitude_scores(model), -0.1), "sparsity must be"),
        "scores empty": (lambda: prune.global_masks({}, 0.5), "scores must be"),
        "scores nan": (lambda: prune.global_masks({"w": torch.tensor([float("nan")])}, 0.5), "NaN"),
        "mask shape": (lambda: prune.apply_masks_(model, bad_shape), "features.0.weight"),
        "mask float": (lambda: prune.apply_masks_(model, {"features.0.weight": torch.ones(4, 1, 3, 3)}), "bool tensor"),
        "mask name": (lambda: prune.apply_masks_(model, {"features.0": good["features.0.weight"]}), "did you mean"),
        "keeper on_step": (lambda: prune.MaskKeeper(model, good, on_step=3), "on_step"),
        "fine-tune optimizer": (lambda: prune.fine_tune_masked(model, good, objective, batches, 2, lambda s: 1e-3,
                                                               optimizer="adam"), "optimizer must be"),
        "fine-tune option": (lambda: prune.fine_tune_masked(model, good, objective, batches, 2, lambda s: 1e-3,
                                                            lr=1e-3), "accepted are"),
        "fine-tune steps": (lambda: prune.fine_tune_masked(model, good, objective, batches, 0, lambda s: 1e-3), "steps must"),
        "gradual final": (lambda: prune.gradual_prune(model, objective, batches, 4, lambda s: 1e-3, 1.2, end=2),
                          "final must be"),
        "gradual end": (lambda: prune.gradual_prune(model, objective, batches, 4, lambda s: 1e-3, 0.5, end=4), "end"),
        "gradual names": (lambda: prune.gradual_prune(model, objective, batches, 4, lambda s: 1e-3, 0.5, end=2,
                                                      names=["nope"]), "names"),
        "gradual global_": (lambda: prune.gradual_prune(model, objective, batches, 4, lambda s: 1e-3, 0.5, end=2,
                                                        global_="yes"), "global_"),
        "scan sparsities": (lambda: prune.sensitivity_scan(model, None, [0.5, 1.0], lambda m: 0.0), r"sparsities\[1\]"),
        "scan duplicate": (lambda: prune.sensitivity_scan(model, None, [0.5, 0.5], lambda m: 0.0), "distinct"),
        "scan names": (lambda: prune.sensitivity_scan(model, ["x.weight"], [0.5], lambda m: 0.0), "names"),
        "scan evaluate": (lambda: prune.sensitivity_scan(model, None, [0.5], evaluate=None), "evaluate"),
        "gradual scores_fn": (lambda: prune.gradual_prune(model, objective, batches, 4, lambda s: 1e-3, 0.5, end=2,
                                                          scores_fn=None), "scores_fn"),
        "report": (lambda: prune.sparsity({}), "masks_or_model"),
        "channel norm p": (lambda: prune.channel_norms(model.features[0].weight, p=0), "p must be"),
        "channel ratio": (lambda: prune.channel_masks({"w": torch.ones(4)}, 1.0), "ratio must be"),
    }


@pytest.mark.parametrize("case", list(_calls(_tiny_cnn())))
def test_bad_input_is_refused_by_name_before_the_model_changes(case):
    model = _tiny_cnn()
    call, match = _calls(model)[case]
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        call()
    assert _same_state(model, before)
    assert all(not p._backward_hooks for p in model.parameters())
