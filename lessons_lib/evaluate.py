"""Quality metrics shared by every lesson: accuracy, perplexity, embedding agreement.

All functions run the model under ``torch.inference_mode`` and leave it in the train/eval state
it was in.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def logits(output: object) -> torch.Tensor:
    """Logits from a plain tensor output or a Hugging Face ``ModelOutput``."""
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def predictions(
    model: nn.Module,
    X: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Top-1 predicted class of each input, int64 (N,) on the CPU (for paired tests, lessons_lib.stats).

    Args:
        model: maps a batch of inputs (B, ...) to logits (B, num_classes).
        X: inputs (N, ...); cast to the model's floating dtype on the fly.
        batch_size: inputs per forward pass.
        device: where to run.
    """
    if len(X) == 0:
        raise ValueError("X must hold at least one input")
    dtype = _model_dtype(model)
    preds = []
    with _eval_mode(model):
        for i in range(0, len(X), batch_size):
            xb = X[i : i + batch_size].to(device=device, dtype=dtype if X.is_floating_point() else X.dtype)
            preds.append(logits(model(xb)).argmax(dim=-1).cpu())
    return torch.cat(preds)


def correct(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which inputs the model classifies correctly: bool (N,) on the CPU, the paired outcome that
    ``stats.mcnemar`` compares between two models on the same inputs. Arguments as :func:`predictions`;
    ``y`` the true classes (N,)."""
    if len(X) != len(y):
        raise ValueError(f"X and y must hold the same number of examples, got {len(X)} and {len(y)}")
    return predictions(model, X, batch_size, device) == y.cpu()


def accuracy(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of a classifier: the share of :func:`predictions` equal to ``y`` (N,), in [0, 1]."""
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must be non-empty and equally long, got {len(X)} and {len(y)}")
    return int(correct(model, X, y, batch_size, device).sum()) / len(X)


def causal_lm_nll(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over non-overlapping blocks.

    The token stream is cut into ``len(ids) // block_size`` blocks of ``block_size`` tokens (the
    tail is dropped); each block predicts its own tokens 2..T from 1..T-1, as in the usual
    WikiText-2 perplexity protocol with stride equal to the context.

    Args:
        model: a causal LM taking ``input_ids`` (B, T) and returning logits (B, T, V) or an object
            with ``.logits``.
        ids: token ids (N,).
        block_size: tokens per block (the model's context or less).
        batch_size: blocks per forward pass.
        device: where to run.
    Returns:
        (total negative log-likelihood in nats, number of predicted tokens).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (N,), got shape {tuple(ids.shape)}")
    n_blocks = len(ids) // block_size
    if block_size < 2 or n_blocks == 0:
        raise ValueError(f"need block_size >= 2 and at least one block; got block_size={block_size}, {len(ids)} tokens")
    blocks = ids[: n_blocks * block_size].view(n_blocks, block_size)  # (n_blocks, T)
    total, count = 0.0, 0
    with _eval_mode(model):
        for i in range(0, n_blocks, batch_size):
            xb = blocks[i : i + batch_size].to(device)  # (B, T)
            z = logits(model(xb)).float()  # (B, T, V)
            nll = F.cross_entropy(
                z[:, :-1].reshape(-1, z.size(-1)),  # (B*(T-1), V)
                xb[:, 1:].reshape(-1),  # (B*(T-1),)
                reduction="sum",
            )
            total += float(nll)
            count += xb[:, 1:].numel()
    return total, count


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> float:
    """Perplexity exp(mean next-token NLL) of a causal LM; see :func:`causal_lm_nll`."""
    total, count = causal_lm_nll(model, ids, block_size, batch_size, device)
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf  # a broken model gives inf, not an OverflowError


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids``.

    The baseline a language model must beat: it knows token frequencies and nothing about context.

    Args:
        train_ids: token ids (N,) to count.
        eval_ids: token ids (M,) to score.
        vocab_size: number of possible ids (every id gets one pseudo-count).
    """
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0  # (V,)
    log_p = torch.log(counts / counts.sum())  # (V,)
    return math.exp(-float(log_p[eval_ids.flatten()].mean()))


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity between two embedding matrices.

    Args:
        a, b: embeddings (N, D), e.g. of the same sentences from an FP32 and a compressed model.
    Returns:
        Cosines (N,), in float32.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as the mask-weighted mean of token states (Sentence-BERT pooling).

    Args:
        last_hidden: token states (B, T, D).
        attention_mask: 1 for real tokens, 0 for padding (B, T).
    Returns:
        Embeddings (B, D).
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, T, 1)
    return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def sentence_embeddings(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean-pooled sentence embeddings (:func:`mean_pool`) of a Hugging Face encoder, e.g. MiniLM.

    Args:
        model: returns ``last_hidden_state`` (B, T, H) for ``input_ids`` and ``attention_mask``.
        batches: tokenizer outputs, each with ``input_ids`` and ``attention_mask`` (B, T).
        device: where to run.
    Returns:
        float32 (N, H) on the CPU, the batches' rows in order.
    """
    out = []
    with _eval_mode(model), torch.inference_mode():
        for b in batches:
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            out.append(mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask).float().cpu())
    if not out:
        raise ValueError("batches is empty: pass at least one tokenizer output")
    return torch.cat(out)  # (N, H)


def nearest_neighbour_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (by cosine) is the same under ``a`` and ``b``.

    Args:
        a, b: embeddings (N, D) of the same N items from two models, N >= 2.
    """
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two (N, D) matrices of equal shape with N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}")

    def nn_index(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T  # (N, N)
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(dim=-1)  # (N,)

    return float((nn_index(a) == nn_index(b)).float().mean())
