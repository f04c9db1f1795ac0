"""Tests of lessons_lib.sparse: byte formulas against hand counts and real CSR tensors, a from-scratch
CSR against torch's, CSR matmul against dense, the break-even reading, and the 2:4 availability
check (which must answer, not raise, on a CPU). Seeded, small, offline."""
from __future__ import annotations

import pytest
import torch

from lessons_lib import prune, sparse


def _pruned(shape, sparsity, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return w.masked_fill(~prune.layerwise_masks({"w": w.abs()}, sparsity)["w"], 0)


def test_storage_bytes_match_hand_counts():
    w = torch.zeros(4, 4)
    w[0, 0], w[1, 2], w[3, 1], w[3, 3] = 1.0, -2.0, 3.0, 4.0
    assert [sparse.storage_bytes(w, f) for f in sparse.FORMATS] == [64, 16 + 16 + 20, 16 + 32 + 40, 2 + 16]
    assert sparse.storage_bytes(w.half(), "bitmask") == 2 + 8
    mask = w != 0
    assert sparse.storage_bytes(mask, "csr32", value_dtype=torch.float32) == sparse.storage_bytes(w, "csr32")
    assert sparse.storage_bytes(torch.ones(9, dtype=torch.bool), "bitmask", value_dtype=torch.bfloat16) == 2 + 18


@pytest.mark.parametrize("shape", [(12, 20), (6, 3, 3, 3), (50,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_to_csr_equals_torch_csr_and_the_formula_equals_its_real_bytes(shape, sparsity):
    w = _pruned(shape, sparsity)
    w2d = w.reshape(shape[0] if len(shape) > 1 else 1, -1)
    reference = w2d.to_sparse_csr()
    for index_dtype, fmt in ((torch.int64, "csr64"), (torch.int32, "csr32")):
        csr = sparse.to_csr(w, index_dtype)
        assert csr.crow_indices().dtype == index_dtype and csr.col_indices().dtype == index_dtype
        assert torch.equal(csr.crow_indices().long(), reference.crow_indices())
        assert torch.equal(csr.col_indices().long(), reference.col_indices())
        assert torch.equal(csr.values(), reference.values())
        assert torch.equal(csr.to_dense(), w2d)
        assert sparse.csr_bytes(csr) == sparse.storage_bytes(w, fmt)


def test_csr_with_an_empty_row_counts_its_row_pointer():
    w = _pruned((5, 8), 0.5)
    w[2] = 0
    csr = sparse.to_csr(w, torch.int32)
    assert csr.crow_indices()[2] == csr.crow_indices()[3]
    assert sparse.csr_bytes(csr) == sparse.storage_bytes(w, "csr32") == 4 * (int((w != 0).sum()) * 2 + 6)


@pytest.mark.parametrize("index_dtype", sparse.INDEX_DTYPES)
def test_csr_matmul_equals_dense_matmul(index_dtype):
    w = _pruned((32, 48), 0.9, seed=1)
    x = torch.randn(48, 7, generator=torch.Generator().manual_seed(2))
    csr = sparse.to_csr(w, index_dtype)
    torch.testing.assert_close(csr @ x, w @ x)
    torch.testing.assert_close(torch.sparse.mm(csr, x), w @ x)


def test_dense_beats_csr_in_bytes_below_the_index_overhead_break_even():
    half = _pruned((64, 64), 0.4)
    assert sparse.storage_bytes(half, "csr32") > sparse.storage_bytes(half, "dense")
    very = _pruned((64, 64), 0.9)
    assert sparse.storage_bytes(very, "bitmask") < sparse.storage_bytes(very, "csr32") < sparse.storage_bytes(very, "dense")


def test_sparse_breakeven_interpolates_the_first_crossing():
    rows = [(0.9, 10.0, 9.0), (0.5, 10.0, 20.0), (0.7, 10.0, 12.0), (0.8, 10.0, 8.0), (0.95, 10.0, 11.0)]
    assert sparse.sparse_breakeven(rows) == pytest.approx(0.7 + 0.1 * 2 / (2 + 2))  # 0.75, first crossing
    assert sparse.sparse_breakeven([(0.5, 10.0, 9.0), (0.9, 10.0, 5.0)]) == 0.5  # faster already at the lowest
    assert sparse.sparse_breakeven([(0.5, 1.0, 3.0), (0.9, 1.0, 1.0)]) is None  # a tie is not faster


@pytest.mark.parametrize("rows", [[], [(0.5, 1.0, 1.0), (0.5, 1.0, 2.0)], [(1.5, 1.0, 1.0)], [(0.5, 0.0, 1.0)]])
def test_sparse_breakeven_refuses_bad_rows(rows):
    with pytest.raises(ValueError, match="rows"):
        sparse.sparse_breakeven(rows)


@pytest.mark.parametrize("call, match", [
    (lambda: sparse.storage_bytes(torch.ones(3), "csr16"), "fmt must be one of"),
    (lambda: sparse.storage_bytes(torch.ones(3, dtype=torch.bool), "dense"), "value_dtype"),
    (lambda: sparse.storage_bytes(torch.ones(3), "dense", value_dtype="float32"), "value_dtype"),
    (lambda: sparse.to_csr(torch.ones(3, 3), torch.int16), "index_dtype"),
    (lambda: sparse.csr_bytes(torch.ones(3, 3)), "csr must be")])
def test_bad_arguments_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_semi_structured_available_answers_without_raising():
    ok, reason = sparse.semi_structured_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in reason


@pytest.mark.skipif(not sparse.semi_structured_available()[0], reason="needs a CUDA GPU of compute capability >= 8.0")
def test_nm_masks_give_the_layout_torch_2_4_kernels_accept():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)).half()
    w24 = w.masked_fill(~prune.nm_masks({"w": w.float().abs()})["w"], 0).cuda()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4)).half().cuda()
    s24 = torch.sparse.to_sparse_semi_structured(w24)
    torch.testing.assert_close(s24 @ x, w24 @ x, rtol=1e-3, atol=1e-2)
