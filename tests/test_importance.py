"""Tests of lessons_lib.importance: every criterion against a hand computation on a tiny
Linear-ReLU-Linear model (manual backprop, closed-form Hessian diagonal of a piecewise-linear net
under MSE); estimator vs exact (Hutchinson), per-sample vmap vs a loop (Fisher), the source's two
wrong formulas measured against the right ones; the contract (same scores twice, no .grad, hooks,
weight, buffer or mode change) for every criterion; refusals before any work; and one run on the
trained vision teacher. Seeded, small, offline."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import data, importance, prune, teachers, zoo

W1 = [[0.5, -1.0, 0.25], [-0.75, 0.5, 1.0]]
W2 = [[1.0, -0.5], [0.25, 0.75]]
NAMES = ["0.weight", "2.weight"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mlp():
    """Linear(3, 2) - ReLU - Linear(2, 2), float64, fixed weights."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[0].bias.copy_(torch.tensor([0.1, -0.2]))
        model[2].weight.copy_(torch.tensor(W2))
        model[2].bias.copy_(torch.tensor([0.05, -0.1]))
    return model


def _mlp_data(n=8, seed=0):
    g = _gen(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, t


def _batches(x, t, size):
    return [(x[i:i + size], t[i:i + size]) for i in range(0, len(x), size)]


def _manual(x, t):
    """Forward and backward of the MLP under F.mse_loss (mean over B*K), by hand.
    Returns per-sample gradients {name: (B, *w.shape)} of each sample's own loss (mean over K),
    the batch gradient (their mean), pre-activations and hidden activations."""
    w1, w2 = torch.tensor(W1, dtype=torch.float64), torch.tensor(W2, dtype=torch.float64)
    pre = x @ w1.T + torch.tensor([0.1, -0.2], dtype=torch.float64)  # (B, 2)
    h = pre.clamp_min(0)
    out = h @ w2.T + torch.tensor([0.05, -0.1], dtype=torch.float64)  # (B, K)
    K = out.shape[1]
    d_out = 2 * (out - t) / K  # (B, K): d(sample loss)/d out
    d_pre = (d_out @ w2) * (pre > 0)  # (B, 2)
    per_sample = {"0.weight": torch.einsum("bj,bi->bji", d_pre, x), "2.weight": torch.einsum("bk,bj->bkj", d_out, h)}
    return per_sample, {n: g.mean(0) for n, g in per_sample.items()}, pre, h


def _hessian_diag_by_hand(x):
    """MSE through a ReLU net is piecewise linear in each layer's weight, so H = (2 / BK) J^T J:
    h(W2[k, j]) = 2/(BK) sum_b h_bj^2,  h(W1[j, i]) = 2/(BK) sum_b 1[pre_bj > 0] x_bi^2 sum_k W2[k, j]^2."""
    _, _, pre, h = _manual(x, torch.zeros(len(x), 2, dtype=torch.float64))
    B, K = len(x), 2
    w2 = torch.tensor(W2, dtype=torch.float64)
    h2 = (2 / (B * K)) * h.square().sum(0).expand(K, 2)
    h1 = (2 / (B * K)) * torch.einsum("bj,bi->ji", (pre > 0).double(), x.square()) * w2.square().sum(0)[:, None]
    return {"0.weight": h1, "2.weight": h2}


def _weights():
    return {"0.weight": torch.tensor(W1, dtype=torch.float64), "2.weight": torch.tensor(W2, dtype=torch.float64)}


def _close(a, b, **kw):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], **kw)


# ----------------------------------------------------------------------------- 1. magnitude
def test_magnitude_by_hand_and_l1_l2_rank_alike_until_grouped():
    model = _mlp()
    _close(importance.magnitude(model, p=1), {n: w.abs() for n, w in _weights().items()})
    _close(importance.score("l2", model), {n: w.square() for n, w in _weights().items()})
    l1, l2 = importance.score("l1", model), importance.score("l2", model)
    flat1, flat2 = (torch.cat([s.flatten() for s in d.values()]) for d in (l1, l2))
    assert torch.equal(flat1.argsort(stable=True), flat2.argsort(stable=True))  # same element ranking
    w = torch.tensor([[3.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    row_l1 = importance.reduce({"w": w.abs()}, "sum")["w"]  # [3, 4]: row 1 more important
    row_l2 = importance.reduce({"w": w.square()}, "sum")["w"]  # [9, 8]: row 0 more important
    assert row_l1.argmax() == 1 and row_l2.argmax() == 0


def test_random_is_seeded():
    model = _mlp()
    a, b = importance.random(model, seed=3), importance.score("random", model, seed=3)
    c = importance.random(model, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["0.weight"], c["0.weight"])
    assert all(a[n].shape == w.shape and a[n].dtype == torch.float64 for n, w in _weights().items())
    assert all(bool(((s >= 0) & (s < 1)).all()) for s in a.values())


# ----------------------------------------------------------------------------- 2. gradient, Taylor
def test_gradient_and_taylor_by_hand():
    x, t = _mlp_data()
    batches = _batches(x, t, 4)
    grads = [_manual(bx, bt)[1] for bx, bt in batches]  # per batch: {name: batch-mean gradient}
    w = _weights()
    model = _mlp()
    _close(importance.gradient(model, batches, F.mse_loss), {n: (grads[0][n].abs() + grads[1][n].abs()) / 2 for n in w})
    _close(importance.taylor(model, batches, F.mse_loss),
           {n: ((grads[0][n] * w[n]).abs() + (grads[1][n] * w[n]).abs()) / 2 for n in w})
    _close(importance.taylor(model, batches, F.mse_loss, form="signed"),
           {n: (grads[0][n] + grads[1][n]) / 2 * w[n] for n in w})
    group = {n: ((grads[0][n] * w[n]).sum(1).square() + (grads[1][n] * w[n]).sum(1).square()) / 2 for n in w}
    _close(importance.taylor(model, batches, F.mse_loss, form="group"), group)
    _close(importance.score("taylor", model, batches, F.mse_loss, reduction="taylor_group"), group)


def test_group_taylor_is_square_of_summed_g_times_w():
    x, t = _mlp_data()
    model, w = _mlp(), _weights()
    g = _manual(x, t)[1]
    one = [(x, t)]
    by_hand = {n: torch.stack([(g[n][c] * w[n][c]).sum().square() for c in range(w[n].shape[0])]) for n in w}
    _close(importance.taylor(model, one, F.mse_loss, form="group"), by_hand)
    _close(importance.reduce(importance.taylor(model, one, F.mse_loss, form="signed"), "taylor_group"), by_hand)
    # over several batches Molchanov's per-batch square and the square of the mean gradient part ways
    batches = _batches(x, t, 2)
    per_batch = importance.taylor(model, batches, F.mse_loss, form="group")
    of_mean = importance.reduce(importance.taylor(model, batches, F.mse_loss, form="signed"), "taylor_group")
    assert not torch.allclose(per_batch["0.weight"], of_mean["0.weight"])
    assert all(bool((per_batch[n] >= of_mean[n] - 1e-12).all()) for n in w)  # Jensen: mean of squares >= square of mean


# ----------------------------------------------------------------------------- 3. Fisher
def test_fisher_is_mean_per_sample_squared_gradient_by_hand():
    x, t = _mlp_data()
    per_sample = _manual(x, t)[0]
    model = _mlp()
    _close(importance.fisher(model, _batches(x, t, 4), F.mse_loss), {n: g.square().mean(0) for n, g in per_sample.items()})
    # normalised by the samples actually used: max_samples=6 reads batch 1 and the first 2 of batch 2
    _close(importance.fisher(model, _batches(x, t, 4), F.mse_loss, max_samples=6),
           {n: g[:6].square().mean(0) for n, g in per_sample.items()})


def test_fisher_batch_mean_is_the_sources_formula_and_not_the_fisher():
    x, t = _mlp_data()
    model = _mlp()
    grads = [_manual(bx, bt)[1] for bx, bt in _batches(x, t, 4)]
    source = importance.fisher_batch_mean(model, _batches(x, t, 4), F.mse_loss)
    _close(source, {n: (grads[0][n].square() + grads[1][n].square()) / len(x) for n in NAMES})
    right = importance.fisher(model, _batches(x, t, 4), F.mse_loss)
    assert all(not torch.allclose(source[n], right[n], rtol=0.1) for n in NAMES)
    # with batches of one sample the two coincide
    _close(importance.fisher_batch_mean(model, _batches(x, t, 1), F.mse_loss), right)


def test_fisher_vmap_equals_per_sample_loop_on_cnn_with_batchnorm():
    torch.manual_seed(0)
    model = teachers.SmallCNN(channels=(2, 4, 4), hidden=8).train()  # BatchNorm and Dropout; scored in eval mode
    g = _gen(1)
    x, y = torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)
    got = importance.fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], F.cross_entropy)
    weights = prune.prunable_weights(model)
    model.eval()
    ref = {n: torch.zeros_like(w) for n, w in weights.items()}
    for i in range(len(x)):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(weights.values()))
        for n, gn in zip(weights, gi):
            ref[n] += gn.square() / len(x)
    _close(got, ref, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- 4. SNIP
def test_snip_is_normalised_g_times_w_of_the_first_batch():
    x, t = _mlp_data()
    model, w = _mlp(), _weights()
    g = _manual(x[:4], t[:4])[1]
    s = importance.snip(model, _batches(x, t, 4), F.mse_loss)
    total = sum((g[n] * w[n]).abs().sum() for n in w)
    _close(s, {n: (g[n] * w[n]).abs() / total for n in w})
    assert math.isclose(sum(float(v.sum()) for v in s.values()), 1.0, rel_tol=1e-12)


# ----------------------------------------------------------------------------- 5. activations
def test_activation_and_apoz_by_hand():
    x, t = _mlp_data()
    model = _mlp()
    _, _, pre, h = _manual(x, t)
    out = model(x).detach()
    _close(importance.activation(model, _batches(x, t, 3)), {"0.weight": pre.abs().mean(0), "2.weight": out.abs().mean(0)})
    _close(importance.activation(model, [x[:5], x[5:]], site="relu"), {"0.weight": h.abs().mean(0)})  # bare inputs
    assert list(importance.apoz(model, _batches(x, t, 3))) == ["0.weight"]  # the logits have no ReLU after them
    _close(importance.apoz(model, _batches(x, t, 3)), {"0.weight": (pre > 0).double().mean(0)})  # 1 - APoZ
    _close(importance.apoz(model, _batches(x, t, 3), site={"2.weight": "2"}), {"2.weight": (out != 0).double().mean(0)})
    with pytest.raises(ValueError, match="must name a submodule"):
        importance.activation(model, _batches(x, t, 3), site={"2.weight": "2"}, names=NAMES)
    with pytest.raises(ValueError, match="no nn.ReLU after it"):
        importance.apoz(model, _batches(x, t, 3), names=["2.weight"])


def test_activation_on_conv_is_per_channel_over_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(5, 1, 6, 6, generator=_gen(2))
    conv = model[0](x).detach()  # (B, C, H, W)
    _close(importance.activation(model, [x]), {"0.weight": conv.abs().mean((0, 2, 3)), "3.weight": model(x).detach().abs().mean(0)})
    _close(importance.apoz(model, [x]), {"0.weight": (conv > 0).float().mean((0, 2, 3))})


# ----------------------------------------------------------------------------- 6. second order
def test_exact_hessian_diagonal_by_hand():
    x, t = _mlp_data()
    exact = importance.hessian_diagonal_exact(_mlp(), [(x, t)], F.mse_loss)
    _close(exact, _hessian_diag_by_hand(x))
    two = importance.hessian_diagonal_exact(_mlp(), _batches(x, t, 4), F.mse_loss)
    halves = [_hessian_diag_by_hand(x[:4]), _hessian_diag_by_hand(x[4:])]
    _close(two, {n: (halves[0][n] + halves[1][n]) / 2 for n in NAMES})


def _joint_hessian(model, x, t):
    """The full (10, 10) Hessian of the MLP's loss w.r.t. both weights, flattened in NAMES order."""
    def loss_of(v):  # v (10,) = [W1 (2, 3) flat, W2 (2, 2) flat]
        return F.mse_loss(torch.func.functional_call(model, {"0.weight": v[:6].reshape(2, 3), "2.weight": v[6:].reshape(2, 2)}, (x,)), t)

    v = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])
    return torch.autograd.functional.hessian(loss_of, v)


def test_hutchinson_converges_to_exact_like_one_over_sqrt_probes():
    x, t = _mlp_data()
    model, batches = _mlp(), [(x, t)]
    H = _joint_hessian(model, x, t)
    exact = torch.cat([h.flatten() for h in importance.hessian_diagonal_exact(model, batches, F.mse_loss).values()])
    torch.testing.assert_close(exact, H.diagonal())
    off = H.square().sum(1) - H.diagonal().square()  # (10,) one probe's error variance: sum_{j != i} H_ij^2
    rms = {}
    for probes in (8, 512):
        errors = torch.stack([torch.cat([h.flatten() for h in importance.hutchinson_diagonal(
            model, batches, F.mse_loss, probes=probes, seed=seed).values()]) - exact for seed in range(4)])  # (4, 10)
        assert bool((errors.abs() <= 4.5 * (off / probes).sqrt()).all())  # within 4.5 sigma, every element
        rms[probes] = float(errors.square().mean().sqrt())
        theory = float((off.mean() / probes).sqrt())
        assert 0.5 < rms[probes] / theory < 2, (probes, rms[probes], theory)
    assert rms[512] / exact.abs().mean() < 0.15  # close at many probes
    assert 4 < rms[8] / rms[512] < 16  # 64x the probes: ~8x less error (1 / sqrt(probes))


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()  # MSE on one output, one-hot inputs: H diagonal
    x = torch.eye(3, dtype=torch.float64)
    t = torch.zeros(3, 1, dtype=torch.float64)
    est = importance.hutchinson_diagonal(model, [(x, t)], F.mse_loss, probes=1)
    torch.testing.assert_close(est["0.weight"], torch.full((1, 3), 2 / 3, dtype=torch.float64))


def test_row_sum_snippet_is_hessian_times_ones_not_the_diagonal():
    x, t = _mlp_data()
    model = _mlp()
    rows = importance.hessian_row_sums(model, [(x, t)], F.mse_loss)
    params = dict(model.named_parameters())
    for n in NAMES:
        H = torch.autograd.functional.hessian(lambda v, n=n: F.mse_loss(torch.func.functional_call(model, {n: v}, (x,)), t),
                                              params[n].detach()).reshape(params[n].numel(), -1)  # the weight's own block
        torch.testing.assert_close(rows[n], (H @ torch.ones(len(H), dtype=H.dtype)).reshape(params[n].shape), rtol=1e-12, atol=1e-14)
        assert not torch.allclose(rows[n], H.diagonal().reshape(params[n].shape))
    hutch = importance.hutchinson_diagonal(model, [(x, t)], F.mse_loss, probes=512)
    exact = importance.hessian_diagonal_exact(model, [(x, t)], F.mse_loss)
    err_rows = sum(float((rows[n] - exact[n]).norm()) for n in NAMES)
    err_hutch = sum(float((hutch[n] - exact[n]).norm()) for n in NAMES)
    assert err_hutch < err_rows / 3  # the estimator beats the snippet against the truth


def test_obd_is_half_h_w_squared():
    x, t = _mlp_data()
    model, w, h = _mlp(), _weights(), _hessian_diag_by_hand(x)
    _close(importance.obd(model, [(x, t)], F.mse_loss, hessian="exact"), {n: 0.5 * h[n] * w[n].square() for n in w})
    approx = importance.obd(model, [(x, t)], F.mse_loss, probes=512)
    _close(approx, {n: 0.5 * h[n] * w[n].square() for n in w}, rtol=0.2, atol=0.02)


# ----------------------------------------------------------------------------- 7. combined; reduce
def test_combined_by_hand_and_scope_changes_a_global_ranking():
    a = {"a": torch.tensor([0.0, 1.0, 2.0, 4.0]), "b": torch.tensor([0.0, 30.0, 60.0, 70.0])}
    layer = importance.combined({"x": a}, {"x": 1.0}, scope="layer")
    glob = importance.combined({"x": a}, {"x": 1.0}, scope="global")
    _close(layer, {"a": torch.tensor([0, 0.25, 0.5, 1]), "b": torch.tensor([0, 3 / 7, 6 / 7, 1])})
    _close(glob, {"a": a["a"] / 70, "b": a["b"] / 70})
    keep_layer, keep_glob = prune.global_masks(layer, 0.5), prune.global_masks(glob, 0.5)
    assert [int(keep_layer[n].sum()) for n in a] == [2, 2] and [int(keep_glob[n].sum()) for n in a] == [1, 3]
    y = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([5.0, 5.0, 5.0, 5.0])}
    both = importance.combined({"x": a, "y": y}, {"x": 3, "y": 1})
    _close(both, {"a": (3 * layer["a"] + torch.tensor([1, 2 / 3, 1 / 3, 0])) / 4, "b": (3 * layer["b"] + 1) / 4})


def test_reduce_by_hand():
    s = {"w": torch.tensor([[1.0, -2.0], [3.0, 0.0]])}
    assert importance.reduce(s, "l1")["w"].tolist() == [3.0, 3.0]
    torch.testing.assert_close(importance.reduce(s, "l2")["w"], torch.tensor([5 ** 0.5, 3.0]))
    assert importance.reduce(s, "sum")["w"].tolist() == [-1.0, 3.0]
    assert importance.reduce(s, "taylor_group")["w"].tolist() == [1.0, 9.0]
    conv = torch.randn(4, 2, 3, 3, generator=_gen(5))
    torch.testing.assert_close(importance.reduce({"c": conv}, "l1")["c"], conv.abs().sum((1, 2, 3)))
    torch.testing.assert_close(importance.reduce({"c": conv}, "l2")["c"], prune.channel_norms(conv, 2))
    torch.testing.assert_close(importance.reduce({"c": conv}, "sum", group_size=2)["c"], conv.reshape(2, -1).sum(1))
    model = _mlp()
    _close(importance.score("l1", model, reduction="l1"), {n: w.abs().sum(1) for n, w in _weights().items()})


# ----------------------------------------------------------------------------- the contract, for every criterion
OPTIONS = {"hutchinson": {"probes": 3}, "obd": {"probes": 3}}


def _hooks(model):
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, k)) for m in model.modules() for k in kinds)


@pytest.mark.parametrize("criterion", importance.CRITERIA)
def test_contract_same_scores_twice_and_no_side_effects(criterion):
    torch.manual_seed(0)
    model = teachers.SmallCNN(channels=(2, 4, 4), hidden=8).train()
    model.features[1].eval()  # a mixed mode must come back as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    old_grad = torch.full_like(model.features[0].weight, 7.0)
    model.features[0].weight.grad = old_grad  # a .grad set before scoring stays, untouched
    g = _gen(1)
    batches = [(torch.randn(3, 1, 28, 28, generator=g), torch.randint(0, 10, (3,), generator=g))]
    first = importance.score(criterion, model, batches, F.cross_entropy, **OPTIONS.get(criterion, {}))
    second = importance.score(criterion, model, batches, F.cross_entropy, **OPTIONS.get(criterion, {}))
    assert list(first) == list(second) and all(torch.equal(first[n], second[n]) for n in first)
    assert all(bool(torch.isfinite(s).all()) and not s.requires_grad for s in first.values())
    assert model.features[0].weight.grad is old_grad and bool((old_grad == 7).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "features.0.weight")
    assert _hooks(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights and BN buffers, bitwise
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("criterion", ["gradient", "fisher", "hutchinson"])
def test_scores_the_same_inside_no_grad(criterion):
    x, t = _mlp_data()
    model = _mlp()
    outside = importance.score(criterion, model, [(x, t)], F.mse_loss)
    with torch.no_grad():
        inside = importance.score(criterion, model, [(x, t)], F.mse_loss)
    _close(inside, outside, rtol=0, atol=0)


def test_score_equals_the_functions():
    x, t = _mlp_data()
    model, b = _mlp(), _batches(x, t, 4)
    _close(importance.score("fisher", model, b, F.mse_loss, max_samples=5), importance.fisher(model, b, F.mse_loss, max_samples=5))
    _close(importance.score("obd", model, b, F.mse_loss, hessian="exact"), importance.obd(model, b, F.mse_loss, hessian="exact"))
    _close(importance.score("taylor", model, b, F.mse_loss, reduction="sum"), importance.reduce(importance.taylor(model, b, F.mse_loss), "sum"))
    by_parts = {c: importance.score(c, model, b, F.mse_loss) for c in importance.SOURCE_WEIGHTS}
    _close(importance.score("combined", model, b, F.mse_loss, scope="global"),
           importance.combined(by_parts, importance.SOURCE_WEIGHTS, scope="global"))


# ----------------------------------------------------------------------------- refusals, before any work
class _Untouchable:
    """Batches that fail the test if anything reads them."""

    def __iter__(self):
        raise AssertionError("batches were read before the arguments were checked")


def test_refusals_before_any_work():
    model, b = _mlp(), _Untouchable()
    with pytest.raises(ValueError) as info:
        importance.score("hessian", model, b, F.mse_loss)
    assert all(c in str(info.value) for c in importance.CRITERIA)
    for c in importance.CRITERIA:
        if c not in importance.DATA_FREE:
            with pytest.raises(ValueError, match="needs data"):
                importance.score(c, model, None, F.mse_loss)
        if c not in importance.DATA_FREE + importance.STRUCTURED:
            with pytest.raises(ValueError, match="needs loss_fn"):
                importance.score(c, model, b, None)
    for fn in (importance.gradient, importance.taylor, importance.fisher, importance.snip, importance.hutchinson_diagonal):
        with pytest.raises(ValueError):
            fn(model, None, F.mse_loss)
    for probes in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="probes"):
            importance.hutchinson_diagonal(model, b, F.mse_loss, probes=probes)
        with pytest.raises(ValueError, match="probes"):
            importance.score("obd", model, b, F.mse_loss, probes=probes)
    s = {"w": torch.ones(2, 2)}
    for weights in ({"x": 0, "y": 0}, {"x": -1, "y": 1}, {"x": float("nan"), "y": 1}, {"x": 1}):
        with pytest.raises(ValueError, match="weights"):
            importance.combined({"x": s, "y": s}, weights)
    with pytest.raises(ValueError, match="weights"):
        importance.score("combined", model, b, F.mse_loss, weights={"l1": 0.0, "gradient": 0.0})
    with pytest.raises(ValueError, match="scope"):
        importance.combined({"x": s}, {"x": 1}, scope="per-layer")
    with pytest.raises(ValueError, match="unknown options"):
        importance.score("fisher", model, b, F.mse_loss, probes=3)
    with pytest.raises(ValueError, match="already one per channel"):
        importance.score("activation", model, b, reduction="l2")
    with pytest.raises(ValueError, match="taylor"):
        importance.score("fisher", model, b, F.mse_loss, reduction="taylor_group")
    with pytest.raises(ValueError, match="max_numel"):
        importance.hessian_diagonal_exact(model, b, F.mse_loss, max_numel=5)
    with pytest.raises(ValueError, match="max_samples"):
        importance.fisher(model, b, F.mse_loss, max_samples=0)
    with pytest.raises(ValueError, match="unknown parameter names"):
        importance.gradient(model, b, F.mse_loss, names=["0"])
    with pytest.raises(ValueError, match="how"):
        importance.reduce(s, "l3")
    with pytest.raises(ValueError, match="element scores"):
        importance.reduce({"w": torch.ones(3)}, "l1")
    assert model.training  # nothing switched the model's mode


# ----------------------------------------------------------------------------- the trained vision teacher
ZOO_OPTIONS = {"hutchinson": {"probes": 8}, "obd": {"probes": 8}, "hessian_exact": {"names": ["features.0.weight"]}}
# the exact diagonal costs one double backprop per element: its smallest layer (288) on 4 digits, ~5 s here


def test_every_criterion_on_the_vision_teacher():
    model = zoo.load_teacher("vision")
    X, y = data.load_mnist("train")
    batches = [(X[:16], y[:16]), (X[16:32], y[16:32])]
    weights = prune.prunable_weights(model)
    for c in importance.CRITERIA:
        start = time.perf_counter()
        some = [(X[:4], y[:4])] if c == "hessian_exact" else batches
        scores = importance.score(c, model, some, F.cross_entropy, **ZOO_OPTIONS.get(c, {}))
        seconds = time.perf_counter() - start
        assert seconds < 20, f"{c} took {seconds:.1f} s"
        assert scores and all(bool(torch.isfinite(s).all()) for s in scores.values()), c
        for n, s in scores.items():
            expected = (weights[n].shape[0],) if c in importance.STRUCTURED else weights[n].shape
            assert s.shape == expected, (c, n, s.shape)
    assert not model.training


class _Attention(nn.Module):
    """One self-attention layer through F.scaled_dot_product_attention, like Hugging Face's."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 8) -> (B, 5)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # (B, heads 2, T, 4) each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.out(a.mean(1))


def test_second_order_criteria_run_through_scaled_dot_product_attention():
    torch.manual_seed(0)
    model = _Attention()
    batches = [(torch.randn(4, 6, 8), torch.randint(0, 5, (4,)))]
    exact = importance.hessian_diagonal_exact(model, batches, F.cross_entropy)
    rows = importance.hessian_row_sums(model, batches, F.cross_entropy)
    errors = []
    for probes in (250, 4000):
        est = importance.hutchinson_diagonal(model, batches, F.cross_entropy, probes=probes)
        assert set(exact) == set(est) == set(rows) == {"qkv.weight", "out.weight"}
        num = sum(float((est[n] - exact[n]).square().sum()) for n in exact)
        errors.append(math.sqrt(num / sum(float(exact[n].square().sum()) for n in exact)))
    assert errors[1] < 0.5 and errors[1] < errors[0] / 2  # 16x the probes: about 1/4 of the error


def test_expand_relative_error_and_causal_lm_loss_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    channel = {"0.weight": torch.tensor([1.0, 5.0]), "2.weight": torch.tensor([3.0, 2.0, 1.0])}
    out = importance.expand(channel, model)
    assert out["0.weight"].shape == (2, 1, 3, 3) and out["2.weight"].shape == (3, 2)
    assert torch.equal(out["0.weight"][1], torch.full((1, 3, 3), 5.0)) and torch.equal(out["2.weight"][:, 0], channel["2.weight"])
    masks = prune.global_masks(out, 0.5)  # the lowest-scored channels go whole
    assert not masks["0.weight"][0].any() and masks["0.weight"][1].all()
    with pytest.raises(ValueError, match="must have shape"):
        importance.expand({"0.weight": torch.ones(3)}, model)
    exact = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    assert importance.relative_error({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])}, exact) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="all zeros"):
        importance.relative_error(exact, {"a": torch.zeros(2), "b": torch.zeros(1)})
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    by_hand = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(importance.causal_lm_loss(logits, targets), by_hand)

    class Out:
        pass

    wrapped = Out()
    wrapped.logits = logits
    torch.testing.assert_close(importance.causal_lm_loss(wrapped, targets), by_hand)
