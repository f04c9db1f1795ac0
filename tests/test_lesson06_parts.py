"""Tests of what lesson 06 added to the library: the activation-based structured score, ShortGPT's
block influence, input moments and the least-squares refit, the training objectives and healing,
sentence batches, the explorer callbacks, ``surgery.readers`` and the 2:4 GPU helper's refusal.
Each is checked against an independent computation on a tiny seeded model. Offline."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.testing import assert_close

from lessons_lib import evaluate, prune, sparse, surgery

transformers.logging.set_verbosity_error()


class Toy(nn.Module):
    """Embedding -> Linear(6, 8) -> ReLU -> Linear(8, 4), called like a Hugging Face encoder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.down(torch.relu(self.up(self.emb(input_ids))))


def _toy_batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def _real_inputs(model, batches):
    """The inputs of ``model.down`` at the real tokens, (N, 8), computed without hooks."""
    rows = []
    with torch.no_grad():
        for b in batches:
            h = torch.relu(model.up(model.emb(b["input_ids"])))  # (B, T, 8)
            rows.append(h[b["attention_mask"].bool()])
    return torch.cat(rows)


def tiny_llama(layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


# ----------------------------------------------------------------------------- contribution scores
@pytest.mark.parametrize("g", [1, 2, 4])
def test_contribution_scores_are_the_mean_norm_of_each_groups_output_over_real_tokens(g):
    model = Toy().train()
    batches = _toy_batches()
    scores = prune.contribution_scores(model, {"down": g}, batches)["down"]
    X = _real_inputs(model, batches)  # (N, 8)
    W = model.down.weight.detach()  # (4, 8)
    reference = torch.stack([torch.stack([(W[:, j * g:(j + 1) * g] @ x[j * g:(j + 1) * g]).norm() for j in range(8 // g)]) for x in X]).mean(0)
    assert_close(scores, reference.double(), rtol=1e-5, atol=1e-6)
    assert model.training and not model.down._forward_pre_hooks, "mode restored, no hook left"
    if g == 1:  # |x_j| * ||W[:, j]||
        assert_close(scores, (X.abs().mean(0) * W.norm(dim=0)).double(), rtol=1e-5, atol=1e-6)


def test_contribution_scores_refuse_bad_groups_and_take_id_tensors():
    model = Toy()
    with pytest.raises(ValueError, match="dividing in_features"):
        prune.contribution_scores(model, {"down": 3}, _toy_batches())
    with pytest.raises(ValueError, match="is not a Linear"):
        prune.contribution_scores(model, {"emb": 1}, _toy_batches())
    ids = _toy_batches()[0]["input_ids"]
    every_token = prune.contribution_scores(model, {"down": 1}, [ids])["down"]
    assert_close(every_token, prune.contribution_scores(model, {"down": 1}, [{"input_ids": ids}])["down"])


# ----------------------------------------------------------------------------- block influence
def test_block_importance_is_one_minus_the_cosine_between_each_blocks_input_and_output():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    bi = prune.block_importance(model, [ids[:1], ids[1:]])
    with torch.no_grad():  # independent: run the blocks by hand
        h = model.model.embed_tokens(ids)  # (B, T, H)
        position_ids = torch.arange(ids.shape[1])[None]
        rope = model.model.rotary_emb(h, position_ids)
        causal = torch.full((12, 12), float("-inf")).triu(1)[None, None]  # (1, 1, T, T)
        reference = []
        for layer in model.model.layers:
            out = layer(h, attention_mask=causal, position_ids=position_ids, position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
            reference.append(1 - F.cosine_similarity(h, out, dim=-1).double().mean())
            h = out
    assert_close(bi, torch.stack(reference), rtol=1e-5, atol=1e-6)
    assert not any(layer._forward_hooks for layer in model.model.layers)


def test_block_importance_counts_only_real_tokens_of_a_padded_batch():
    model = tiny_bert()
    ids = torch.randint(1, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    alone = prune.block_importance(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded = prune.block_importance(model, [{"input_ids": padded_ids, "attention_mask": (padded_ids != 0).long()}])
    assert_close(alone, padded, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- input moments and refit
def test_input_grams_sum_outer_products_of_the_real_inputs_with_a_one():
    model = Toy()
    batches = _toy_batches()
    G = prune.input_grams(model, ["down"], batches)["down"]
    X = _real_inputs(model, batches)  # (9 real tokens, 8)
    Z = torch.cat([X, torch.ones(len(X), 1)], dim=1).double()  # (N, 9)
    assert_close(G, Z.T @ Z, rtol=1e-5, atol=1e-5)


def test_refit_readers_solves_the_ridge_least_squares_problem():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 5))
    X = torch.randn(200, 10) @ torch.randn(10, 10)  # correlated inputs: the refit has something to exploit
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    pruned = nn.Sequential(nn.Linear(int(keep.sum()), 5))
    G = prune.input_grams(dense, ["0"], [X])
    damp = 1e-3
    errors = prune.refit_readers_(pruned, dense, G, {"0": keep}, damp=damp)
    # independent: solve the damped normal equations by stacking sqrt(lambda) I under the data (lstsq)
    Z = torch.cat([X[:, keep], torch.ones(200, 1)], dim=1).double()  # (N, k+1)
    Y = dense(X).detach().double()  # (N, 5)
    lam = damp * (Z * Z).sum(0).mean()
    A = torch.cat([Z, lam.sqrt() * torch.eye(Z.shape[1], dtype=torch.float64)])
    B = torch.cat([Y, torch.zeros(Z.shape[1], 5, dtype=torch.float64)])
    sol = torch.linalg.lstsq(A, B).solution.T  # (5, k+1)
    assert_close(pruned[0].weight.detach().double(), sol[:, :-1], rtol=1e-4, atol=1e-5)
    assert_close(pruned[0].bias.detach().double(), sol[:, -1], rtol=1e-4, atol=1e-5)
    residual = ((Y - pruned(X[:, keep]).detach().double()) ** 2).sum() / (Y**2).sum()
    assert errors["0"] == pytest.approx(float(residual), rel=1e-3)
    naive = copy.deepcopy(pruned)
    with torch.no_grad():
        naive[0].weight.copy_(dense[0].weight[:, keep])
        naive[0].bias.copy_(dense[0].bias)
    assert ((Y - naive(X[:, keep]).detach().double()) ** 2).sum() > ((Y - pruned(X[:, keep]).detach().double()) ** 2).sum()


def test_refit_readers_checks_the_kept_columns():
    dense, pruned = nn.Sequential(nn.Linear(4, 2)), nn.Sequential(nn.Linear(2, 2))
    G = prune.input_grams(dense, ["0"], [torch.randn(8, 4)])
    with pytest.raises(ValueError, match="with 2 True"):
        prune.refit_readers_(pruned, dense, G, {"0": torch.tensor([True, True, True, False])})
    with pytest.raises(ValueError, match="damp"):
        prune.refit_readers_(pruned, dense, G, {"0": torch.tensor([True, True, False, False])}, damp=0)


# ----------------------------------------------------------------------------- objectives, healing, batches
def test_objectives_equal_the_plain_losses():
    model = tiny_llama(layers=1)
    x, y = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6))
    loss, parts = prune.causal_lm_objective(model)((x, y))
    assert_close(loss, F.cross_entropy(model(x).logits.reshape(-1, 64), y.reshape(-1)))
    assert parts["loss"] == pytest.approx(loss.item())
    cnn = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    images, labels = torch.randn(5, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    assert_close(prune.cross_entropy_objective(cnn)((images, labels))[0], F.cross_entropy(cnn(images), labels))


def test_embedding_objective_ignores_padding_and_trimming():
    model = tiny_bert()
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 3 + [0] * 6, [1] * 4 + [0] * 5])
    ids = ids * mask
    target = torch.randn(3, 32)
    loss, _ = prune.embedding_objective(model)((ids, mask, target))
    with torch.no_grad():
        emb = evaluate.mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)  # untrimmed
    assert_close(loss.detach(), (1 - F.cosine_similarity(emb, target, dim=-1)).mean(), rtol=1e-5, atol=1e-6)


def test_heal_with_masks_keeps_them_exact_lowers_the_loss_and_ends_in_eval_mode():
    model = tiny_llama(layers=1)
    names = list(prune.prunable_weights(model))
    masks = prune.nm_masks(prune.magnitude_scores(model, names), 2, 4)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 8, (400,), generator=g)  # a tiny vocabulary: easy to learn

    def windows():
        while True:
            starts = torch.randint(0, 380, (4,), generator=g)
            w = stream[starts[:, None] + torch.arange(17)]  # (4, 17)
            yield w[:, :-1], w[:, 1:]

    history = prune.heal_(model, windows(), 30, 3e-3, warmup=3, masks=masks)
    assert not model.training
    assert history["loss"][-1] < history["loss"][0]
    params = dict(model.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


def test_trimmed_batches_cut_each_batch_to_its_longest_sentence():
    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    out = prune.trimmed_batches({"input_ids": ids, "attention_mask": mask}, 2)
    assert [b["input_ids"].shape for b in out] == [(2, 3), (2, 5)]
    assert torch.equal(out[1]["input_ids"], ids[2:, :5])


def test_length_buckets_serve_sorted_batches_each_epoch_in_a_seeded_order():
    lengths = torch.tensor([5, 1, 4, 2, 6, 3, 9])
    rows = torch.arange(7)
    first = [b[0].tolist() for _, b in zip(range(3), prune.length_buckets(rows, lengths=lengths, batch_size=2, generator=torch.Generator().manual_seed(0)))]
    again = [b[0].tolist() for _, b in zip(range(3), prune.length_buckets(rows, lengths=lengths, batch_size=2, generator=torch.Generator().manual_seed(0)))]
    assert first == again
    assert sorted(first) == sorted([[1, 3], [5, 2], [0, 4]]), "rows by length (1, 2 | 3, 4 | 5, 6), the longest left over"


# ----------------------------------------------------------------------------- explorer callbacks
def test_mask_summary_reports_what_the_masks_prune():
    g = torch.Generator().manual_seed(0)
    scores = {"a.weight": torch.rand(8, 4, generator=g), "b.weight": torch.rand(2, 4, generator=g) * 5}
    row = prune.mask_summary(scores, 0.5, "global")
    masks = prune.global_masks(scores, 0.5)
    assert row["a"] == prune.sparsity(masks).fractions["a.weight"] and row["global"] == 0.5
    assert row["lowest kept"] == min(float(scores[n][m].min()) for n, m in masks.items())
    layerwise = prune.mask_summary(scores, 0.5, "layer-wise")
    assert layerwise["a"] == layerwise["b"] == 0.5
    assert layerwise["lowest kept, strictest tensor"] >= layerwise["lowest kept"]
    with pytest.raises(ValueError, match="scope"):
        prune.mask_summary(scores, 0.5, "per-row")


def test_mask_figure_draws_both_scopes_and_a_mask_image():
    g = torch.Generator().manual_seed(0)
    scores = {"a.weight": torch.rand(8, 4, generator=g), "b.weight": torch.rand(3, 2, 2, 2, generator=g)}
    fig = prune.mask_figure(scores, 0.7, "global", layer="b.weight")
    bars, image = fig.axes
    assert len(bars.patches) == 4 and image.images[0].get_array().shape == (3, 8)


# ----------------------------------------------------------------------------- surgery.readers, sparse GPU helper
def test_readers_name_the_output_and_down_projections():
    for model in (tiny_llama(layers=2), tiny_bert()):
        r = surgery.readers(model)
        modules = dict(model.named_modules())
        assert len(r.heads) == len(r.neurons) == len(r.blocks) == 2
        assert all(isinstance(modules[n], nn.Linear) for n in r.heads + r.neurons)
        assert r.head_dim == 8 and modules[r.heads[0]].in_features % r.head_dim == 0
    with pytest.raises(ValueError, match="model_type"):
        surgery.readers(Toy())


def test_semi_structured_linear_says_why_it_cannot_run_without_a_suitable_gpu():
    ok, why = sparse.semi_structured_available()
    if ok:
        dense, sparse_fn, err = sparse.semi_structured_linear(128, 128, 64)
        assert err < 1e-2 and dense().shape == sparse_fn().shape == (64, 128)
    else:
        with pytest.raises(RuntimeError, match="cannot run here"):
            sparse.semi_structured_linear(128, 128, 64)
