"""One-shot pruning of language models from a little calibration data: SparseGPT and Wanda.

Both prune the Linears inside the decoder blocks (embeddings and the LM head stay dense, as in the
papers) and walk the blocks with the GPTQ module's sequential driver, :func:`gptq.sequential_`:
block i is pruned from the outputs of blocks 0..i-1 already pruned. With calibration inputs X
(N, cols) of a Linear with weight W (rows, cols), the driver hands over H = 2 X^T X / N
(:class:`gptq.HessianAccumulator`).

- **Magnitude per row** (:func:`magnitude_prune_rows_`): in every output row, zero the smallest
  |W_ij|. The baseline; needs no data.
- **Wanda** (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", arXiv:2306.11695, eq. 1): score S_ij = |W_ij| * ||X_j||_2, compared within each output
  row; no weight update. ||X_j||_2 = sqrt(N H_jj / 2) (:func:`input_norms`).
- **SparseGPT** (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", arXiv:2301.00774, Algorithm 1): GPTQ's column-by-column Optimal Brain Surgeon pass
  with "zero" as the quantizer. Columns are visited in order; for each block of ``block_size``
  columns the mask is chosen from the OBS saliency w^2 / [H^-1]_jj^2 of the weights *as updated so
  far* (rows of H^-1 from the upper Cholesky factor of H^-1, as in GPTQ); each pruned weight's error
  err = w / [H^-1]_jj is then spread onto the columns not yet visited, W[:, j:] -= err [H^-1]_{j, j:}.

Relations the tests check: with a diagonal H the Cholesky factor is diagonal, so SparseGPT makes no
update and its saliency is w^2 (H_jj + lambda): with lambda = 0, Wanda's criterion squared (the
Wanda paper draws this link to SparseGPT); with H = c I it is magnitude pruning per row.

Worked example: ``sparsegpt(torch.tensor([[1., -2., 3., -4.]]), torch.eye(4), 0.5)`` returns
``([[0., 0., 3., -4.]], [[False, False, True, True]])``, magnitude pruning, since H = I.

Conventions: masks are bool, True = keep, keyed by parameter name (``"model.layers.0.mlp.up_proj.weight"``)
so :mod:`lessons_lib.prune` can report and keep them; ``n_m=(n, m)`` keeps ``n`` weights in every
``m`` consecutive inputs of a row (2:4 = ``(2, 4)``, as :func:`prune.nm_masks`). Ties: the lower
column index is pruned first.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from lessons_lib import gptq, prune
from lessons_lib.checks import is_int, is_number, require

SCOPES = ("row", "block")
NM = Sequence[int]


# ----------------------------------------------------------------------------- checks
def check_target(sparsity: float, n_m: NM | None = None) -> tuple[int, int] | None:
    """Raise ``ValueError`` unless ``sparsity`` is in [0, 1) and ``n_m`` is None or (n, m) with
    1 <= n <= m and sparsity == 1 - n/m. Returns ``n_m`` as a tuple (or None)."""
    require(is_number(sparsity) and 0 <= sparsity < 1,
            f"sparsity must be a number in [0, 1) (the fraction of weights pruned), got {sparsity!r}")
    if n_m is None:
        return None
    require(isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(is_int(v) for v in n_m),
            f"n_m must be None or a pair of ints (n, m): n weights kept in every m, e.g. (2, 4), got {n_m!r}")
    n, m = n_m
    require(1 <= n <= m, f"n_m=(n, m) needs 1 <= n <= m (n weights kept in every m), got {tuple(n_m)}")
    require(math.isclose(sparsity, 1 - n / m, abs_tol=1e-9),
            f"n_m={tuple(n_m)} prunes {1 - n / m:g} of the weights: pass sparsity={1 - n / m:g}, got {sparsity!r}")
    return n, m


def _check_widths(model: nn.Module, n_m: tuple[int, int] | None) -> None:
    for group in gptq.block_linears(model):
        for name, linear in group.items():
            require(n_m is None or linear.in_features % n_m[1] == 0, f"m={n_m and n_m[1]} must divide the input width "
                    f"{linear.in_features} of {name!r}; use an m among its divisors")


def _check_options(block_size: int, damp_ratio: float, scope: str, n_m: tuple[int, int] | None) -> None:
    require(is_int(block_size) and block_size >= 1, f"block_size must be a positive int, e.g. 128, got {block_size!r}")
    require(n_m is None or block_size % n_m[1] == 0,
            f"block_size={block_size} must be a multiple of m={n_m and n_m[1]} so that no group of m straddles two blocks")
    require(is_number(damp_ratio) and 0 <= damp_ratio < 1,
            f"damp_ratio must be a number in [0, 1), e.g. 0.01, got {damp_ratio!r}")
    require(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")


# ----------------------------------------------------------------------------- masks and scores
def _prune_lowest(scores: torch.Tensor, k: int, scope: str = "row") -> torch.Tensor:
    """Keep-mask of scores (rows, cols): the k lowest of every row pruned ("row"), or the k * rows
    lowest of the whole matrix ("block"). Ties: the lower index is pruned first (stable sort)."""
    keep = torch.ones(scores.numel() if scope == "block" else scores.shape, dtype=torch.bool, device=scores.device)
    if scope == "block":
        order = scores.reshape(-1).sort(stable=True).indices  # (rows * cols,) ascending
        return keep.scatter_(0, order[: k * scores.shape[0]], False).reshape(scores.shape)
    order = scores.sort(dim=1, stable=True).indices  # (rows, cols) ascending per row
    return keep.scatter_(1, order[:, :k], False)


def row_masks(scores: torch.Tensor, sparsity: float, n_m: NM | None = None) -> torch.Tensor:
    """Per-output-row keep-mask: in every row of scores (rows, cols) prune the ``round(sparsity * cols)``
    lowest, or with ``n_m=(n, m)`` keep the ``n`` highest of every ``m`` consecutive columns.

    Returns: bool (rows, cols), True = keep; exactly the same count pruned in every row.
    """
    n_m = check_target(sparsity, n_m)
    require(isinstance(scores, torch.Tensor) and scores.dim() == 2, "scores must be a 2-D tensor (rows, cols)")
    if n_m is not None:
        return prune.nm_masks({"W": scores}, *n_m)["W"]
    return _prune_lowest(scores.detach(), round(sparsity * scores.shape[1]))


def input_norms(H: torch.Tensor, n_rows: int) -> torch.Tensor:
    """||X_j||_2, the norm of each input column over the ``n_rows`` calibration rows, from the Hessian
    H = 2 X^T X / n_rows of :class:`gptq.HessianAccumulator` (``n_rows`` is its ``n``): since
    H_jj = 2 ||X_j||^2 / n_rows, ||X_j||_2 = sqrt(n_rows * H_jj / 2).

    Returns: (cols,) float32.
    """
    return torch.sqrt(torch.diagonal(H).float() * (n_rows / 2))  # (cols,)


def _wanda(W: torch.Tensor, H: torch.Tensor, n_rows: int) -> torch.Tensor:
    return W.detach().abs().float() * input_norms(H, n_rows)[None, :]  # (rows, cols): |W_ij| * ||X_j||_2


def _param_names(results: dict) -> dict:
    return {f"{name}.weight": value for name, value in results.items()}


@torch.no_grad()
def wanda_scores(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Wanda's score |W_ij| * ||X_j||_2 (arXiv:2306.11695, eq. 1) of every block Linear of the *dense*
    model (one pass, nothing pruned; the model is left untouched, with no hook or ``.grad``).

    ||X_j||_2 is over all calibration tokens (n_samples * T rows), which reach every Linear of a
    dense transformer. (A routed MoE expert sees fewer: its norms are then scaled by a factor
    common to the layer, which leaves every comparison within a row unchanged.)

    Args:
        model: a Hugging Face causal LM (see :func:`gptq.decoder_layers`), on the CPU.
        calibration: token ids (n_samples, T).
    Returns:
        Parameter name -> scores (out, in), float32, for :func:`row_masks` or :mod:`lessons_lib.prune`.
    """
    n_rows = calibration.numel() if isinstance(calibration, torch.Tensor) else 0
    scores = gptq.sequential_(model, calibration, lambda name, linear, H: _wanda(linear.weight, H, n_rows),
                              batch_size, desc="wanda")
    return _param_names(scores)


# ----------------------------------------------------------------------------- SparseGPT on one matrix
def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, n_m: NM | None = None, block_size: int = 128,
              damp_ratio: float = 0.01, scope: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (rows, cols) given the Hessian H (cols, cols) of its inputs: SparseGPT, Algorithm 1.

    Args:
        W: weight (rows = outputs, cols = inputs); not modified.
        H: 2 X^T X / N (any positive multiple gives the same result up to ``damp_ratio``'s lambda).
        sparsity: fraction pruned, in [0, 1); with ``n_m`` it must be 1 - n/m.
        n_m: None (unstructured) or (n, m): keep n of every m consecutive inputs, chosen when the
            pass reaches the group (so from weights already updated): the paper's N:M extension.
        block_size: columns per mask selection and lazy update (the paper's B_s = B = 128).
        damp_ratio: lambda = damp_ratio * mean(diag H) added to the diagonal.
        scope: "row" (default): every row prunes the same number of weights in each block of
            columns, so every row ends with exactly ``round(sparsity * cols)`` zeros (the counts per
            block are round(sparsity * i2) - round(sparsity * i1)); "block": one threshold over all
            rows of the block of columns, as the authors' code (rows then differ in sparsity).
    Returns:
        (W_pruned (rows, cols) float32 with exact zeros where pruned, keep-mask (rows, cols) bool).
    """
    n_m = check_target(sparsity, n_m)
    _check_options(block_size, damp_ratio, scope, n_m)
    require(W.dim() == 2 and H.shape == (W.shape[1], W.shape[1]),
            f"W must be (rows, cols) and H (cols, cols), got {tuple(W.shape)} and {tuple(H.shape)}")
    require(n_m is None or W.shape[1] % n_m[1] == 0, f"m={n_m and n_m[1]} must divide the input width {W.shape[1]}")
    with gptq._one_thread_on(W.device), torch.no_grad():
        return _sparsegpt(W, H, sparsity, n_m, block_size, damp_ratio, scope)


def _sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, block_size: int,
               damp_ratio: float, scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    W = W.detach().float().clone()  # (rows, cols)
    rows, cols = W.shape
    H = H.detach().to(W.device, torch.float64).clone()  # everything on W's device
    dead = torch.diag(H) == 0  # inputs never active: their weights do nothing, prune them first
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp_ratio * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    M = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (rows, B), (B, B)
        Err1 = torch.zeros_like(W1)
        d1 = torch.diag(Hinv1)[None, :]  # (1, B)
        if n_m is None:  # adaptive mask selection for the whole block, from the updated weights
            k = round(sparsity * i2) - round(sparsity * i1)
            M[:, i1:i2] = _prune_lowest(W1**2 / d1**2, k, scope)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:  # N:M: choose the group when the pass reaches it
                g = slice(i, i + n_m[1])
                M[:, i1 + g.start : i1 + g.stop] = prune.nm_masks({"W": W1[:, g] ** 2 / d1[:, g] ** 2}, *n_m)["W"]
            keep = M[:, i1 + i]
            err = W1[:, i] * ~keep / Hinv1[i, i]  # (rows,): non-zero only for the weights pruned here
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # OBS update inside the block
            W1[:, i] *= keep  # exact zeros (the update left them at w - w, up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns
    return W, M


# ----------------------------------------------------------------------------- whole models
PruneOne = Callable[[nn.Linear, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]  # -> (W_pruned, keep)


def _prune_model(model: nn.Module, calibration: torch.Tensor | None, prune_one: PruneOne, needs_hessian: bool,
                 batch_size: int, progress: bool, desc: str) -> dict[str, torch.Tensor]:
    def process(name: str, linear: nn.Linear, H: torch.Tensor | None) -> torch.Tensor:
        W, keep = prune_one(linear, H)
        linear.weight.copy_(W.to(linear.weight.dtype))
        return keep

    return _param_names(gptq.sequential_(model, calibration, process, batch_size, needs_hessian, progress, desc))


@torch.no_grad()
def magnitude_prune_rows_(model: nn.Module, sparsity: float, n_m: NM | None = None) -> dict[str, torch.Tensor]:
    """Zero the smallest |W_ij| of every output row (or keep the n largest of every m) of every
    block Linear, in place: the baseline of both papers. Embeddings and the LM head are untouched.

    Returns: parameter name -> keep-mask (out, in), bool.
    """
    n_m = check_target(sparsity, n_m)
    _check_widths(model, n_m)

    def prune_one(linear: nn.Linear, H: None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = row_masks(linear.weight.abs(), sparsity, n_m)
        return linear.weight * keep, keep

    return _prune_model(model, None, prune_one, False, 1, False, "magnitude")


@torch.no_grad()
def wanda_prune_(model: nn.Module, calibration: torch.Tensor, sparsity: float, n_m: NM | None = None,
                 batch_size: int = 8, progress: bool = False) -> dict[str, torch.Tensor]:
    """Wanda (arXiv:2306.11695, section 3): in every output row of every block Linear, zero the
    weights of lowest |W_ij| * ||X_j||_2 (or keep the n highest of every m), block by block, in place.
    Sequential as the authors' code: block i's norms come from the pruned blocks 0..i-1.

    Args: model (CPU causal LM), calibration token ids (n_samples, T), sparsity in [0, 1),
        n_m None or (n, m), batch_size sequences per forward pass, progress bar over blocks.
    Returns: parameter name -> keep-mask (out, in), bool.
    """
    n_m = check_target(sparsity, n_m)
    _check_widths(model, n_m)
    n_rows = calibration.numel() if isinstance(calibration, torch.Tensor) else 0

    def prune_one(linear: nn.Linear, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = row_masks(_wanda(linear.weight, H, n_rows), sparsity, n_m)
        return linear.weight * keep, keep

    return _prune_model(model, calibration, prune_one, True, batch_size, progress, "wanda")


@torch.no_grad()
def sparsegpt_prune_(model: nn.Module, calibration: torch.Tensor, sparsity: float, n_m: NM | None = None,
                     block_size: int = 128, damp_ratio: float = 0.01, scope: str = "row", batch_size: int = 8,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """SparseGPT (arXiv:2301.00774) on every block Linear of a causal LM, block by block, in place:
    block i's Hessians come from the outputs of blocks 0..i-1 already pruned and updated.

    Args: as :func:`sparsegpt` for the pruning; model (CPU causal LM), calibration token ids
        (n_samples, T), batch_size sequences per forward pass, progress bar over blocks.
    Returns: parameter name -> keep-mask (out, in), bool. Invalid arguments raise ``ValueError``
        before any weight changes.
    """
    n_m = check_target(sparsity, n_m)
    _check_widths(model, n_m)
    _check_options(block_size, damp_ratio, scope, n_m)

    def prune_one(linear: nn.Linear, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _sparsegpt(linear.weight, H, sparsity, n_m, block_size, damp_ratio, scope)

    return _prune_model(model, calibration, prune_one, True, batch_size, progress, "sparsegpt")
