"""Tests of lessons_lib.tp_importance: Torch-Pruning 1.6.1's importance classes (Fang et al.,
DepGraph, arXiv:2301.12900) against lessons_lib.importance on the vision teacher with a few MNIST
batches: the exact relation each kind satisfies, what GroupHessianImportance.accumulate_grad really
keeps (the last sample's squared gradient), no side effects on the caller's model, refusals before
any work, and the agreement helpers by hand. Small and offline."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lessons_lib import data, importance, tp_importance, zoo

tp = pytest.importorskip("torch_pruning")

OPTIONS = dict(tp_importance.OPTIONS)


@pytest.fixture(scope="module")
def cnn():
    return zoo.load_teacher("vision")


@pytest.fixture(scope="module")
def batches():
    """Four batches of 32 digits from across the (class-sorted) train split."""
    X, y = data.load_mnist("train")
    idx = torch.arange(0, len(X), 27)[:128]
    return [(X[idx[i:i + 32]], y[idx[i:i + 32]]) for i in range(0, 128, 32)]


@pytest.fixture(scope="module")
def example(batches):
    return batches[0][0][:1]


def _weights(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _obd_sum(model, fisher):
    """sum over each filter of F_ii * w_i^2: TP's Hessian score with h = ``fisher``."""
    w = _weights(model)
    return importance.reduce({n: f * w[n].square() for n, f in fisher.items()}, "sum")


def test_magnitude_kinds_are_our_l1_norm_and_our_squared_l2_norm(cnn, example):
    l1 = tp_importance.channel_scores(cnn, "magnitude_l1", example)
    l2 = tp_importance.channel_scores(cnn, "magnitude_l2", example)
    ours_l1 = importance.reduce(importance.magnitude(cnn), "l1")
    ours_l2 = importance.reduce(importance.magnitude(cnn), "l2")
    assert list(l1) == list(ours_l1) == ["features.0.weight", "features.4.weight", "features.8.weight",
                                         "classifier.1.weight", "classifier.4.weight"]
    squares = importance.reduce(importance.magnitude(cnn, p=2), "sum")
    for n in ours_l1:
        torch.testing.assert_close(l1[n], ours_l1[n])
        torch.testing.assert_close(l2[n], ours_l2[n].square())  # the SQUARED norm, sum_s w_s^2
        torch.testing.assert_close(l2[n], squares[n])
        assert not torch.allclose(l2[n], ours_l2[n])
    assert all(r == pytest.approx(1.0) for r in tp_importance.agreement(ours_l2, l2).values())
    assert all(r == pytest.approx(1.0) for r in tp_importance.agreement(ours_l1, l1).values())
    for ratio in (0.25, 0.5):
        assert tp_importance.same_removed(ours_l2, l2, ratio) == 1.0


def test_taylor_is_abs_filter_sum_of_g_times_w_on_the_mean_gradient(cnn, batches, example):
    one = tp_importance.channel_scores(cnn, "taylor", example, batches[:1], F.cross_entropy)
    group_one = importance.taylor(cnn, batches[:1], F.cross_entropy, form="group")
    for n in group_one:  # one batch: the square root of Molchanov's group criterion
        torch.testing.assert_close(one[n], group_one[n].sqrt().float(), rtol=1e-4, atol=1e-8)

    theirs = tp_importance.channel_scores(cnn, "taylor", example, batches, F.cross_entropy)
    signed = importance.reduce(importance.taylor(cnn, batches, F.cross_entropy, form="signed"), "taylor_group")
    for n in signed:  # several: |sum_s gbar_s w_s|, gbar the mean of the batch gradients
        torch.testing.assert_close(theirs[n], signed[n].sqrt().float(), rtol=1e-4, atol=1e-8)
    # Molchanov squares per batch, then averages: close in rank, not the same.
    rho = tp_importance.agreement(importance.taylor(cnn, batches, F.cross_entropy, form="group"), theirs)
    assert min(rho.values()) > 0.8 and min(rho.values()) < 0.99, rho


def test_tp_default_taylor_sums_abs_g_times_w(cnn, batches, example):
    """multivariable=False (TP's default): sum_s |g_s w_s| = reduce(taylor(form="abs"), "sum") on one batch."""
    work = copy.deepcopy(cnn).eval()
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
    x, y = batches[0]
    F.cross_entropy(work(x), y).backward()
    scorer = tp.importance.GroupTaylorImportance(**OPTIONS)
    ours = importance.reduce(importance.taylor(cnn, batches[:1], F.cross_entropy, form="abs"), "sum")
    group = graph.get_pruning_group(work.features[4], tp.prune_conv_out_channels, idxs=list(range(64)))
    torch.testing.assert_close(scorer(group), ours["features.4.weight"], rtol=1e-4, atol=1e-8)


def test_hessian_accumulate_grad_keeps_only_the_last_samples_squared_gradient(cnn, batches, example):
    """The issue's question: does accumulating over samples give the mean of the per-sample squared
    gradients? In 1.6.1, no: ``accumulate_grad`` checks ``name not in self._accu_grad`` on a dict
    keyed by the Parameter, always true, so each call overwrites the buffer and the count stays 1."""
    x, y = batches[0][0][:6], batches[0][1][:6]
    work = copy.deepcopy(cnn).eval()
    params = dict(work.named_parameters())
    per_sample = {n: [] for n in params}  # explicit loop, one sample at a time
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(work(x[i:i + 1]), y[i:i + 1]), list(params.values()))
        for n, g in zip(params, grads):
            per_sample[n].append(g.square())
    scorer = tp.importance.GroupHessianImportance(**OPTIONS)
    losses = F.cross_entropy(work(x), y, reduction="none")  # TP's docstring, step by step
    for loss in losses:
        work.zero_grad()
        loss.backward(retain_graph=True)
        scorer.accumulate_grad(work)
    assert set(scorer._accu_grad) == set(params.values())
    for n, p in params.items():
        squares = torch.stack(per_sample[n])
        held = scorer._accu_grad[p]
        torch.testing.assert_close(held, squares[-1], rtol=1e-5, atol=1e-12)  # the LAST sample's g^2
        assert scorer._counter[p] == 1
        if squares.mean(0).abs().max() > 0:
            assert not torch.allclose(held, squares.mean(0)) and not torch.allclose(held, squares.sum(0))

    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
    work.eval()
    group = graph.get_pruning_group(work.features[0], tp.prune_conv_out_channels, idxs=list(range(32)))
    score = scorer(group)  # sum_s w_s^2 * g_last,s^2
    w0 = params["features.0.weight"].detach()
    expected = (w0.square() * per_sample["features.0.weight"][-1]).flatten(1).sum(1)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-20)
    # The same through channel_scores: our Fisher of the last sample alone, times w^2, per filter.
    theirs = tp_importance.channel_scores(cnn, "hessian", example, [(x[:3], y[:3]), (x[3:], y[3:])], F.cross_entropy)
    last = _obd_sum(cnn, importance.fisher(cnn, [(x[-1:], y[-1:])], F.cross_entropy))
    mean = _obd_sum(cnn, importance.fisher(cnn, [(x, y)], F.cross_entropy))  # what the code means to compute
    for n in last:
        torch.testing.assert_close(theirs[n], last[n], rtol=1e-4, atol=1e-20)
        assert not torch.allclose(theirs[n], mean[n], rtol=1e-2, atol=0)


def test_no_side_effects_on_the_callers_model(batches, example):
    model = zoo.load_teacher("vision").train()  # train mode: the copy must still score in eval mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]
    data2 = [(x[:8], y[:8]) for x, y in batches[:2]]
    scores = {k: tp_importance.channel_scores(model, k, example, data2, F.cross_entropy) for k in tp_importance.KINDS}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()] == hooks
    # Gradients the caller already holds neither enter the scores nor change.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    again = tp_importance.channel_scores(model, "taylor", example, data2, F.cross_entropy)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(again[n], scores["taylor"][n]) for n in again)
    eval_scores = tp_importance.channel_scores(model.eval(), "taylor", example, data2, F.cross_entropy)
    assert all(torch.equal(eval_scores[n], scores["taylor"][n]) for n in again)


def test_refusals_come_before_any_work(cnn, example):
    def untouchable():
        raise AssertionError("batches were read")
        yield

    with pytest.raises(ValueError, match="magnitude_l1.*magnitude_l2.*taylor.*hessian"):
        tp_importance.channel_scores(cnn, "fisher", example, untouchable(), F.cross_entropy)
    with pytest.raises(ValueError, match="needs batches"):
        tp_importance.channel_scores(cnn, "taylor", example)
    with pytest.raises(ValueError, match="needs batches"):
        tp_importance.channel_scores(cnn, "taylor", example, torch.zeros(2, 1, 28, 28), F.cross_entropy)
    with pytest.raises(ValueError, match="needs loss_fn"):
        tp_importance.channel_scores(cnn, "hessian", example, untouchable())
    with pytest.raises(ValueError, match="ignored_layers"):
        tp_importance.channel_scores(cnn, "taylor", example, untouchable(), F.cross_entropy, ["features.99"])
    with pytest.raises(ValueError, match="empty"):
        tp_importance.channel_scores(cnn, "taylor", example, [], F.cross_entropy)


def test_ignored_layers_by_module_or_name(cnn, example):
    full = tp_importance.channel_scores(cnn, "magnitude_l1", example)
    for ignored in ([cnn.classifier[4]], ["classifier.4"], ["classifier.4.weight"]):
        part = tp_importance.channel_scores(cnn, "magnitude_l1", example, ignored_layers=ignored)
        assert list(part) == list(full)[:-1]
        assert all(torch.equal(part[n], full[n]) for n in part)


def test_agreement_and_same_removed_by_hand():
    ours = {"x": torch.tensor([0.1, 0.2, 0.3, 0.4]), "y": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    theirs = {"x": torch.tensor([1.0, 2.0, 4.0, 3.0]), "y": torch.tensor([1.0, 2.0, 3.0, 4.0]), "z": torch.ones(2)}
    assert tp_importance.agreement(ours, theirs) == pytest.approx({"x": 0.8, "y": -1.0})
    assert tp_importance.same_removed(ours, theirs, 0.5) == 0.5  # x: {0, 1} both; y: {2, 3} vs {0, 1}
    assert tp_importance.same_removed(ours, theirs, 0.0) == 1.0
    with pytest.raises(ValueError, match="share no layer"):
        tp_importance.agreement({"a": torch.ones(2)}, theirs)
    with pytest.raises(ValueError, match="ratio"):
        tp_importance.same_removed(ours, theirs, 1.0)
