"""SparseGPT, Wanda and per-row magnitude pruning against their defining properties."""
import pytest
import torch
from torch import nn

from lessons_lib import gptq, prune, sparsegpt


def _correlated(n=2000, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # (n, d), correlated columns


def _hessian(X):
    acc = gptq.HessianAccumulator(X.shape[1])
    acc.add(X)
    return acc.H


def _output_error(H, W, W_pruned):
    D = W - W_pruned  # (rows, cols)
    return float(torch.trace(D @ H @ D.T))


def _magnitude_per_row(W, s):
    """Reference: the library's per-tensor magnitude masks, applied to one row at a time."""
    return torch.stack([prune.layerwise_masks({"row": row.abs()}, s)["row"] for row in W])


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_with_h_a_multiple_of_identity_sparsegpt_is_magnitude_pruning_per_row(s):
    W = _randn(16, 64)
    W_pruned, keep = sparsegpt.sparsegpt(W, 3.0 * torch.eye(64), s)
    assert torch.equal(keep, _magnitude_per_row(W, s))
    assert torch.equal(W_pruned, W * keep)  # no update: the off-diagonal of H^-1 is exactly zero


@pytest.mark.parametrize("n_m,block_size", [(None, 128), (None, 16), ((2, 4), 128), ((2, 4), 8)])
def test_with_a_diagonal_hessian_sparsegpt_is_wandas_criterion_without_update(n_m, block_size):
    W = _randn(16, 64)
    d = torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.1  # H_jj = 2 ||X_j||^2 / N
    W_pruned, keep = sparsegpt.sparsegpt(W, torch.diag(d), 0.5, n_m, block_size=block_size, damp_ratio=0.0)
    score = W.abs() * d.sqrt()  # (16, 64): Wanda's |W_ij| ||X_j||, up to a constant factor
    blocks = score.split(block_size, dim=1)  # unstructured masks are chosen per block of columns
    expected = torch.cat([sparsegpt.row_masks(b, 0.5, n_m) for b in blocks], dim=1)
    assert torch.equal(keep, expected)
    assert torch.equal(W_pruned, W * keep)


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_output_has_exactly_n_nonzeros_in_every_group_of_m(n_m):
    n, m = n_m
    H = _hessian(_correlated())
    W_pruned, keep = sparsegpt.sparsegpt(_randn(32, 64), H, 1 - n / m, n_m, block_size=32)
    assert ((W_pruned != 0).reshape(32, 64 // m, m).sum(-1) == n).all()  # (rows, groups, m)
    assert torch.equal(W_pruned != 0, keep)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("block_size", [16, 128])
def test_every_row_gets_exactly_the_target_count_of_zeros(s, block_size):
    H = _hessian(_correlated(d=80))
    W_pruned, keep = sparsegpt.sparsegpt(_randn(24, 80), H, s, block_size=block_size)
    assert ((~keep).sum(1) == round(s * 80)).all() and torch.equal(W_pruned != 0, keep)
    _, keep = sparsegpt.sparsegpt(_randn(24, 80), H, s, block_size=block_size, scope="block")  # the authors' choice
    assert int((~keep).sum()) == 24 * round(s * 80)  # exact per matrix; rows may differ


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_obs_update_lowers_the_output_error_of_the_same_mask(n_m):
    X = _correlated()
    H, W = _hessian(X), _randn(32, 64)
    W_pruned, keep = sparsegpt.sparsegpt(W, H, 0.5, n_m, block_size=16)
    assert _output_error(H, W, W_pruned) < 0.7 * _output_error(H, W, W * keep)
    for score in (W.abs(), W.abs() * X.norm(dim=0)):  # and beats magnitude and Wanda's masks
        assert _output_error(H, W, W_pruned) < 0.7 * _output_error(H, W, W * sparsegpt.row_masks(score, 0.5, n_m))


def test_dead_inputs_are_pruned_first_and_stay_finite():
    X = _correlated(d=16)
    X[:, 3] = 0  # an input that is never active
    W_pruned, keep = sparsegpt.sparsegpt(_randn(4, 16), _hessian(X), 0.25)
    assert torch.isfinite(W_pruned).all() and not keep[:, 3].any()


def test_input_norms_from_the_hessian_equal_the_column_norms():
    X = _correlated(n=500, d=16).double()
    acc = gptq.HessianAccumulator(16, dtype=torch.float64)
    for chunk in X.split(128):
        acc.add(chunk)
    torch.testing.assert_close(sparsegpt.input_norms(acc.H, acc.n), X.norm(dim=0).float())


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _calibration(n=4, seed=1):
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))


BLOCK_LINEARS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_the_sequential_driver_visits_every_block_linear_once_in_order():
    model, seen = _tiny_llama(), []

    def record(name, linear, H):
        seen.append((name, linear, None if H is None else tuple(H.shape)))
        return name

    results = gptq.sequential_(model, _calibration(), record)
    assert [n for n, _, _ in seen] == BLOCK_LINEARS and list(results) == BLOCK_LINEARS
    assert all(model.get_submodule(n) is m and shape == (m.in_features,) * 2 for n, m, shape in seen)
    seen.clear()
    gptq.sequential_(model, None, record, needs_hessian=False)  # no data, no forward pass, H is None
    assert [n for n, _, _ in seen] == BLOCK_LINEARS and all(shape is None for _, _, shape in seen)


def _inputs_of(model, names, calibration):
    """name -> every input row of that Linear in one forward pass, (N, in)."""
    X = {}

    def hook(name):
        def record(module, inp, out):  # returns None: the output stays as it is
            X.setdefault(name, inp[0].reshape(-1, module.in_features))
        return record

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(calibration, use_cache=False)
    for h in hooks:
        h.remove()
    return X


def test_wanda_scores_are_weight_times_input_column_norm_and_leave_no_trace():
    model, calibration = _tiny_llama(), _calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = sparsegpt.wanda_scores(model, calibration)
    X = _inputs_of(model, BLOCK_LINEARS, calibration)
    assert list(scores) == [f"{n}.weight" for n in BLOCK_LINEARS]
    for n in BLOCK_LINEARS:
        expected = model.get_submodule(n).weight.abs() * X[n].norm(dim=0)  # (out, in)
        torch.testing.assert_close(scores[f"{n}.weight"], expected, rtol=1e-4, atol=1e-6)
    again = sparsegpt.wanda_scores(model, calibration)
    assert all(torch.equal(scores[k], again[k]) for k in scores)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_sparsegpt_prune_is_sequential_later_blocks_see_pruned_outputs():
    model, calibration = _tiny_llama(), _calibration()
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj" for i in range(2))
    W0, W1 = (model.get_submodule(q).weight.detach().clone() for q in (q0, q1))
    dense = {n: _hessian(x) for n, x in _inputs_of(model, [q0, q1], calibration).items()}
    masks = sparsegpt.sparsegpt_prune_(model, calibration, 0.5)
    pruned = {n: _hessian(x) for n, x in _inputs_of(model, [q1], calibration).items()}  # block 1 reads block 0's pruned output
    W, keep = sparsegpt.sparsegpt(W0, dense[q0], 0.5)
    assert torch.equal(masks[f"{q0}.weight"], keep) and torch.equal(model.get_submodule(q0).weight, W)
    W, keep = sparsegpt.sparsegpt(W1, pruned[q1], 0.5)
    torch.testing.assert_close(model.get_submodule(q1).weight, W)
    assert torch.equal(masks[f"{q1}.weight"], keep)
    assert not torch.equal(sparsegpt.sparsegpt(W1, dense[q1], 0.5)[0], W)  # dense inputs would give another answer


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_model_pruning_touches_block_linears_only_with_the_exact_pattern(method, n_m):
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if method == "magnitude":
        masks = sparsegpt.magnitude_prune_rows_(model, 0.5, n_m)
    else:
        masks = getattr(sparsegpt, f"{method}_prune_")(model, _calibration(), 0.5, n_m, batch_size=2)
    assert list(masks) == [f"{n}.weight" for n in BLOCK_LINEARS]
    for name, keep in masks.items():
        W = model.get_parameter(name)
        assert torch.equal(W != 0, keep)
        assert ((~keep).sum(1) == W.shape[1] // 2).all()
        if n_m:
            assert (keep.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()  # (out, in / 4, 4)
    assert prune.sparsity(masks).global_fraction == 0.5
    untouched = [k for k in before if k not in masks]  # embeddings, norms (the LM head is tied to the embedding)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in untouched)
    if method == "magnitude":
        assert all(torch.equal(model.get_parameter(n), before[n] * masks[n]) for n in masks)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"), ({"sparsity": -0.1}, "sparsity must be"),
    ({"sparsity": True}, "sparsity must be"), ({"sparsity": 0.5, "n_m": (4, 2)}, "needs 1 <= n <= m"),
    ({"sparsity": 0.5, "n_m": (0, 4)}, "needs 1 <= n <= m"), ({"sparsity": 0.5, "n_m": 4}, "pair of ints"),
    ({"sparsity": 0.3, "n_m": (2, 4)}, "pass sparsity=0.5"),
    ({"sparsity": 0.5, "n_m": (3, 6)}, "m=6 must divide the input width 32"),
])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_bad_arguments_raise_before_any_weight_changes(method, kwargs, match):
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        if method == "magnitude":
            sparsegpt.magnitude_prune_rows_(model, **kwargs)
        else:
            getattr(sparsegpt, f"{method}_prune_")(model, _calibration(), **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [({"scope": "layer"}, "scope must be one of"), ({"block_size": 0}, "block_size"),
                                          ({"n_m": (2, 4), "block_size": 6}, "multiple of m=4"), ({"damp_ratio": 1}, "damp_ratio")])
def test_bad_sparsegpt_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparsegpt.sparsegpt(_randn(4, 16), torch.eye(16), 0.5, **kwargs)


def test_pruning_with_calibration_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        sparsegpt.sparsegpt_prune_(_tiny_llama(), torch.zeros(0, 8, dtype=torch.long), 0.5)


@pytest.mark.parametrize("sparsity, n_m", [(0.5, None), (0.5, (2, 4))])
def test_sparsegpt_makes_every_tensor_on_the_weights_device(sparsity, n_m):
    """With "meta" as torch's default device, a tensor made without an explicit device (silently a
    CPU tensor in normal use, the wrong device for a model on a GPU) would land on meta and break
    the run; the results must equal the normal run's (as gptq's device test does)."""
    W = _randn(16, 64)
    H = _hessian(_correlated())
    expected = sparsegpt.sparsegpt(W, H, sparsity, n_m)
    with torch.device("meta"):
        got = sparsegpt.sparsegpt(W, H, sparsity, n_m)
    for a, b in zip(got, expected):
        assert a.device.type == "cpu" and torch.equal(a, b)
