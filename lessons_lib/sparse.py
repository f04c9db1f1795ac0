"""Storing and running sparse weights: what a mask saves on disk and when it saves time.

A pruned weight only gets smaller or faster if it is stored or computed in a sparse format:

- ``dense``: every element, ``numel * b`` bytes (b = bytes per value).
- ``csr32`` / ``csr64``: compressed sparse rows of the 2-D view (rows = output channels) with
  int32 / int64 indices: ``nnz * b`` values + ``nnz * i`` column indices + ``(rows + 1) * i`` row
  pointers (i = 4 or 8 bytes). Smaller than dense only past a sparsity of ``i / (b + i)`` (plus a
  little): 50% for fp32 values with int32 indices, 67% with int64.
- ``bitmask``: one bit per element (``ceil(numel / 8)`` bytes) + the ``nnz`` kept values.

Speed is another matter: unstructured sparse kernels usually beat dense ones only at high
sparsity, if at all (Hoefler et al., "Sparsity in Deep Learning", arXiv:2102.00554, survey the
gap). Measure with ``lessons_lib.measure.benchmark`` and read the
break-even with :func:`sparse_breakeven`. 2:4 semi-structured sparsity (Mishra et al.,
arXiv:2104.08378) runs on sparse tensor cores: CUDA GPUs of compute capability >= 8.0 only.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from lessons_lib.checks import is_number, require

FORMATS = ("dense", "csr32", "csr64", "bitmask")
INDEX_DTYPES = (torch.int32, torch.int64)


def _rows(shape: torch.Size) -> int:
    """Rows of the 2-D view: output channels for (out, in, ...), one row for a vector."""
    return shape[0] if len(shape) >= 2 else 1


def storage_bytes(tensor: torch.Tensor, fmt: str, value_dtype: torch.dtype | None = None) -> int:
    """Exact bytes to store ``tensor`` in format ``fmt`` (formulas in the module docstring).

    Args:
        tensor: a weight (its non-zeros are kept) or a bool mask (its True entries are kept).
        fmt: one of ``FORMATS``.
        value_dtype: dtype of the stored values; None = the weight's own (required for a mask).
    Returns: bytes. Example: a 4x4 fp32 weight with 4 non-zeros: dense 64, csr32 16 + 16 + 20 = 52,
        csr64 16 + 32 + 40 = 88, bitmask 2 + 16 = 18.
    """
    require(isinstance(tensor, torch.Tensor) and tensor.numel() > 0,
            f"tensor must be a non-empty weight or bool mask, got {type(tensor).__name__}")
    require(fmt in FORMATS, f"fmt must be one of {FORMATS}, got {fmt!r}")
    if value_dtype is None:
        require(tensor.dtype != torch.bool, "a bool mask carries no values: pass value_dtype, e.g. torch.float32")
        value_dtype = tensor.dtype
    require(isinstance(value_dtype, torch.dtype), f"value_dtype must be a torch.dtype, got {value_dtype!r}")
    b = torch.empty((), dtype=value_dtype).element_size()
    n = tensor.numel()
    nnz = int(tensor.sum()) if tensor.dtype == torch.bool else int(torch.count_nonzero(tensor))
    if fmt == "dense":
        return n * b
    if fmt == "bitmask":
        return math.ceil(n / 8) + nnz * b
    i = 4 if fmt == "csr32" else 8
    return nnz * b + nnz * i + (_rows(tensor.shape) + 1) * i


def to_csr(weight: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The non-zeros of ``weight`` as a real ``torch.sparse_csr_tensor``, built from scratch.

    Args: weight (out, in, ...) or (n,), viewed as (out, in*...) or (1, n); index_dtype int32 or int64.
    Returns: a sparse CSR tensor of that 2-D shape: ``crow_indices`` (rows + 1,), ``col_indices``
        (nnz,), ``values`` (nnz,); ``csr @ x`` computes ``weight2d @ x``.
    """
    require(isinstance(weight, torch.Tensor) and weight.numel() > 0 and weight.dtype != torch.bool,
            f"weight must be a non-empty numeric tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    require(index_dtype in INDEX_DTYPES, f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    W = weight.detach().reshape(_rows(weight.shape), -1)  # (rows, cols)
    nz = W != 0  # (rows, cols)
    require(index_dtype == torch.int64 or int(nz.sum()) < 2**31, "more than 2^31 non-zeros: use index_dtype=torch.int64")
    crow = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
    crow[1:] = nz.sum(dim=1).cumsum(0)  # row r holds entries crow[r]:crow[r+1]
    col = nz.nonzero()[:, 1]  # row-major order: (nnz,)
    return torch.sparse_csr_tensor(crow.to(index_dtype), col.to(index_dtype), W[nz], size=W.shape,
                                   check_invariants=True)


def csr_bytes(csr: torch.Tensor) -> int:
    """Bytes actually held by a sparse CSR tensor: row pointers + column indices + values."""
    require(isinstance(csr, torch.Tensor) and csr.layout == torch.sparse_csr, "csr must be a sparse CSR tensor (see to_csr)")
    return sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))


def sparse_breakeven(rows: Iterable[tuple[float, float, float]]) -> float | None:
    """The lowest sparsity at which the sparse kernel is faster, from measured timings.

    Sorted by sparsity, the *first crossing* (sparse slower at one row, faster at the next) is
    located by linear interpolation of ``sparse_time - dense_time`` between those two rows.

    Args: rows: (sparsity in [0, 1], dense_time, sparse_time) with times > 0 in any one unit,
        distinct sparsities.
    Returns: the interpolated sparsity; the lowest measured one if sparse is faster there already
        (the break-even lies at or below it); None if sparse is never faster.
    """
    rows = sorted(tuple(r) for r in rows)
    require(len(rows) > 0 and len({r[0] for r in rows}) == len(rows),
            "rows must be a non-empty list of (sparsity, dense_time, sparse_time) with distinct sparsities")
    for s, dense, sparse in rows:
        require(all(is_number(v) for v in (s, dense, sparse)) and 0 <= s <= 1 and dense > 0 and sparse > 0,
                f"rows: each row must be (sparsity in [0, 1], dense_time > 0, sparse_time > 0), got {(s, dense, sparse)}")
    gaps = [(s, sparse - dense) for s, dense, sparse in rows]  # < 0: sparse faster
    if gaps[0][1] < 0:
        return float(gaps[0][0])
    for (s0, g0), (s1, g1) in zip(gaps, gaps[1:]):
        if g1 < 0:
            return s0 + (s1 - s0) * g0 / (g0 - g1)  # g0 >= 0 > g1: zero of the line through both
    return None


def semi_structured_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``torch.sparse.to_sparse_semi_structured`` (2:4) can run here: it needs a CUDA GPU of
    compute capability >= 8.0 (Ampere or newer). Never raises.

    Args: device: the CUDA device to check (None: the current one).
    Returns: (available, reason in words).
    """
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured (needs torch >= 2.1)"
    try:
        if not torch.cuda.is_available():
            return False, "CUDA is not available: 2:4 semi-structured kernels run on CUDA GPUs only"
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
    except Exception as err:  # a bad device index, a broken driver
        return False, f"cannot query the CUDA device ({type(err).__name__}: {err})"
    if major < 8:
        return False, f"{name} has compute capability {major}.{minor}; 2:4 kernels need >= 8.0"
    return True, f"{name}, compute capability {major}.{minor}"


def semi_structured_linear(out_features: int, in_features: int, batch: int, dtype: torch.dtype = torch.float16,
                           device: torch.device | str = "cuda", seed: int = 0) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], float]:
    """One Linear layer's product with a 2:4 weight, dense and on sparse tensor cores, ready to time.

    W (out, in) is random normal, pruned 2:4 by magnitude (``prune.nm_masks``); X is (batch, in).
    ``dense()`` computes ``F.linear(X, W)`` with the zeros stored; ``sparse()`` the same with
    ``torch.sparse.to_sparse_semi_structured(W)`` (half the values plus 2-bit metadata: Mishra et
    al., arXiv:2104.08378). Time them with ``measure.interleaved(..., device=device)``.

    Args: out_features, in_features: multiples of 64 (the kernels' tile constraints); batch >= 1;
        dtype: torch.float16 or torch.bfloat16; device: a CUDA device of compute capability >= 8.0.
    Returns: (dense, sparse, max |dense() - sparse()| / max |dense()|).
    Raises: RuntimeError with :func:`semi_structured_available`'s reason when 2:4 cannot run there.
    """
    from lessons_lib import prune

    ok, why = semi_structured_available(device)
    if not ok:
        raise RuntimeError(f"2:4 semi-structured sparsity cannot run here: {why}")
    require(dtype in (torch.float16, torch.bfloat16), f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    require(all(isinstance(v, int) and v >= 1 for v in (out_features, in_features, batch)),
            "out_features, in_features and batch must be positive ints")
    require(out_features % 64 == 0 and in_features % 64 == 0,
            f"out_features and in_features must be multiples of 64, got {out_features} x {in_features}")
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)  # (out, in)
    W = (W * prune.nm_masks({"w": W.abs()}, 2, 4)["w"]).to(device=device, dtype=dtype)
    X = torch.randn(batch, in_features, generator=g).to(device=device, dtype=dtype)  # (batch, in)
    W_sparse = torch.sparse.to_sparse_semi_structured(W)
    dense = lambda: F.linear(X, W)  # noqa: E731
    sparse = lambda: F.linear(X, W_sparse)  # noqa: E731
    reference = dense().float()
    error = float((reference - sparse().float()).abs().max() / reference.abs().max())
    return dense, sparse, error
