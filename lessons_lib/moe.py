"""Mixture-of-Experts models: how their routers use the experts.

Lesson 08 (pruning MoE) grows this module; for now it measures expert usage, which the teacher
zoo records for its Mixtral teacher and lesson 00 shows (Shazeer et al., "Outrageously Large
Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", arXiv:1701.06538; Jiang et al.,
"Mixtral of Experts", arXiv:2401.04088: softmax router, top-k experts per token).
"""
from __future__ import annotations

import torch
from torch import nn


def expert_usage(model: nn.Module, tokens: torch.Tensor, block_size: int = 128, batch_size: int = 8) -> torch.Tensor:
    """Share of the top-k routing assignments that each expert receives, per MoE layer.

    Tokens are cut into non-overlapping ``block_size`` blocks (tail dropped); each token sends
    ``top_k`` assignments, so a uniform router gives every expert 1 / num_experts.

    Args:
        model: a Hugging Face MoE causal LM that accepts ``output_router_logits=True`` (Mixtral).
        tokens: token ids (N,).
        block_size: tokens per block.
        batch_size: blocks per forward pass.
    Returns:
        Usage (layers, experts), float32, each row summing to 1.
    """
    top_k, n_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise ValueError(f"need at least {block_size} tokens, got {len(tokens)}")
    blocks = tokens[: n_blocks * block_size].view(n_blocks, block_size)  # (n_blocks, T)
    counts = torch.zeros(model.config.num_hidden_layers, n_experts)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, n_blocks, batch_size):
            router_logits = model(blocks[i : i + batch_size], output_router_logits=True).router_logits
            for layer, logits in enumerate(router_logits):  # logits: (B*T, E)
                chosen = logits.topk(top_k, dim=-1).indices  # (B*T, top_k)
                counts[layer] += torch.bincount(chosen.flatten(), minlength=n_experts).float()
    model.train(was_training)
    return counts / counts.sum(dim=-1, keepdim=True)


def usage_summary(usage: torch.Tensor) -> dict:
    """Unevenness of expert usage (layers, experts), JSON-ready.

    Returns:
        usage rows; per layer the coefficient of variation (std / mean, 0 = perfectly even), the
        max/min ratio (None where some expert gets nothing) and the count of unused experts;
        the overall min and max usage.
    """
    low, high = usage.min(dim=-1).values, usage.max(dim=-1).values  # (layers,)
    cv = usage.std(dim=-1, unbiased=False) / usage.mean(dim=-1)  # (layers,)
    return {"usage": [[round(float(u), 6) for u in row] for row in usage],
            "cv_per_layer": [round(float(c), 4) for c in cv],
            "max_min_ratio_per_layer": [round(float(h / l), 4) if l > 0 else None for h, l in zip(high, low)],
            "unused_experts_per_layer": [int(n) for n in (usage == 0).sum(dim=-1)],
            "min_usage": round(float(usage.min()), 6), "max_usage": round(float(usage.max()), 6)}
