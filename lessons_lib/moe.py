"""Mixture-of-Experts models: where the experts sit, how the router uses them, removing experts.

A sparse-MoE block (Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", arXiv:1701.06538; Jiang et al., "Mixtral of Experts", arXiv:2401.04088)
sends each token x to the ``top_k`` of its E experts with the largest router logits W_g x and sums
their outputs weighted by the routing weights g(x). In transformers 5 the supported families keep

- the router weight ``block.gate.weight`` (E, H): probabilities softmax(W_g x) over all E experts,
  then the top-k, renormalised to sum to 1 (always for Mixtral; when ``norm_topk_prob`` is True
  for Qwen2-MoE, Qwen3-MoE and OLMoE, otherwise the raw softmax values are used);
- all experts fused: ``block.experts.gate_up_proj`` (E, 2I, H) and ``block.experts.down_proj``
  (E, H, I); expert j computes down_j (act(gate_j x) * up_j x).

Supported families (:data:`SUPPORTED_FAMILIES`): Mixtral; Qwen2-MoE (its shared expert and
shared-expert gate sit beside the routed experts and are left alone: every routed-expert
operation here leaves them as they are; dense layers of ``mlp_only_layers`` are skipped); Qwen3-MoE;
OLMoE (Muennighoff et al., arXiv:2409.02060). Other families with fused experts are refused,
because their routers differ (sigmoid scores with a bias correction and expert groups in
DeepSeek-V3, the sparse-mixer of PhiMoE, transposed weights with biases in GPT-OSS, ...).

This module: the layout (:func:`moe_blocks`), routing statistics (:func:`routing_stats`,
:func:`expert_usage`, :func:`usage_summary`), the router's rule and the experts' outputs as plain
tensors (:func:`route`, :func:`expert_outputs`), and removing whole experts (:func:`remove_experts_`).
Choosing experts, pruning inside them, the router (top-k, pruning) and dynamic skipping are in
:mod:`lessons_lib.moe_prune`.

Calibration data (``tokens`` / ``calibration`` arguments) is one of: token ids (N,), cut into
non-overlapping ``block_size`` blocks (tail dropped), ``batch_size`` blocks per forward pass; one
batch (B, T); or a list of batches, each (B, T) or an (inputs, targets) pair as yielded by
:func:`lessons_lib.data.lm_windows`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lessons_lib.checks import is_int, require

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_LAYOUT = ("fused experts.gate_up_proj (E, 2I, H) and experts.down_proj (E, H, I), router gate.weight (E, H), "
           "softmax top-k routing, no biases")


# ----------------------------------------------------------------------------- layout
def _refuse(reason: str) -> None:
    raise ValueError(f"{reason}; supported MoE families: {', '.join(SUPPORTED_FAMILIES)} ({_LAYOUT})")


def _check_block(layer: int, block: nn.Module, n_experts: int) -> None:
    gate, experts = block.gate, block.experts
    up, down, w = (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None),
                   getattr(gate, "weight", None))
    shapes_ok = (all(isinstance(t, torch.Tensor) for t in (up, down, w)) and up.dim() == 3 and down.dim() == 3
                 and w.dim() == 2 and up.shape[0] == down.shape[0] == w.shape[0] == n_experts
                 and up.shape[2] == down.shape[1] == w.shape[1] and up.shape[1] == 2 * down.shape[2])
    flags_ok = (not getattr(experts, "is_transposed", False) and getattr(experts, "is_concatenated", True)
                and not getattr(experts, "has_bias", False) and getattr(experts, "has_gate", True)
                and hasattr(experts, "_apply_gate")
                and getattr(gate, "bias", None) is None and is_int(getattr(gate, "top_k", None))
                and getattr(gate, "num_experts", None) == getattr(experts, "num_experts", None) == n_experts)
    if not (shapes_ok and flags_ok):
        _refuse(f"layer {layer}: unexpected expert layout in {type(block).__name__}")


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """The sparse-MoE blocks of a supported model, as (decoder-layer index, block) in layer order.

    Layout of Mixtral (Jiang et al., arXiv:2401.04088), Qwen2-MoE / Qwen3-MoE (Qwen2 Technical
    Report, arXiv:2407.10671; Qwen3 Technical Report, arXiv:2505.09388) and OLMoE (arXiv:2409.02060)
    in transformers 5 (see the module docstring). Dense layers (Qwen's ``mlp_only_layers``) are left out.

    Args:
        model: a ``*ForCausalLM`` or base model of a family in :data:`SUPPORTED_FAMILIES`.
    Raises:
        ValueError: another family, no MoE block, or a block whose tensors do not have the fused
            layout; the message names the supported families.
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        _refuse(f"model family {family!r} ({type(model).__name__}) is not supported")
    backbone = model if hasattr(model, "layers") else getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        _refuse(f"{type(model).__name__} has no decoder layers (model.layers / model.model.layers)")
    blocks = [(i, layer.mlp) for i, layer in enumerate(layers)
              if hasattr(getattr(layer, "mlp", None), "experts") and hasattr(layer.mlp, "gate")]
    if not blocks:
        _refuse(f"{type(model).__name__} has no sparse-MoE block")
    for i, block in blocks:
        _check_block(i, block, config.num_experts)
    return blocks


def _renormalises(block: nn.Module) -> bool:
    return bool(getattr(block.gate, "norm_topk_prob", True))  # Mixtral's router always renormalises


def route(block: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's routing rule on router logits: softmax, top-k, renormalised as the model does.

    Mixtral (arXiv:2401.04088, eq. 1-2): g(x) = softmax(top-k(W_g x)); Qwen-MoE / OLMoE renormalise
    only when ``norm_topk_prob``. With ``allowed``, the softmax and the top-k run over the allowed
    experts only: exactly what the block computes after :func:`remove_experts_` keeps them (Lu et
    al., "Not All Experts are Equal", arXiv:2402.14800, sec. 3.1: routing restricted to a subset).

    Args:
        block: a block from :func:`moe_blocks` (gives top-k and the normalisation).
        logits: router logits (N, E).
        allowed: None, or bool masks (E,) or (S, E) of experts that may be chosen (>= top_k each).
    Returns:
        weights (N, k) or (S, N, k) in the dtype of ``logits``; expert indices, same shape.
    """
    probs_in = logits.float()  # (N, E)
    if allowed is not None:
        probs_in = torch.where(allowed.unsqueeze(-2), probs_in, float("-inf"))  # (N, E) or (S, N, E)
    weights, indices = torch.softmax(probs_in, dim=-1).topk(block.gate.top_k, dim=-1)  # (..., N, k)
    if _renormalises(block):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def dense_weights(weights: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routing weights scattered into a dense (..., N, E) tensor (zeros for unchosen experts).

    Mixtral (arXiv:2401.04088, eq. 1): the block output is sum_j G(x)_j E_j(x) with this G.
    """
    dense = weights.new_zeros(*weights.shape[:-1], n_experts)  # (..., N, E)
    return dense.scatter(-1, indices, weights)


def expert_outputs(block: nn.Module, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
    """Outputs of the block's experts on hidden states x, unweighted: E_j(x) = down_j(act(gate_j x) * up_j x).

    Mixtral (arXiv:2401.04088, sec. 2.1): SwiGLU experts. All experts at once, or one.

    Args:
        block: a block from :func:`moe_blocks`.
        x: inputs (N, H) of the block.
        expert: None for all experts, else one expert index.
    Returns:
        (E, N, H) for all experts, (N, H) for one.
    """
    experts = block.experts
    up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, H), (E, H, I)
    if expert is not None:
        return experts._apply_gate(x @ up[expert].T) @ down[expert].T  # (N, 2I) -> (N, I) -> (N, H)
    hidden = experts._apply_gate(torch.einsum("nh,eih->eni", x, up))  # (E, N, 2I) -> (E, N, I)
    return torch.einsum("eni,ehi->enh", hidden, down)  # (E, N, H)


# ----------------------------------------------------------------------------- calibration
def calibration_batches(data: object, block_size: int = 128, batch_size: int = 8) -> list[torch.Tensor]:
    """Token batches (B, T) from token ids (N,), one batch (B, T), or a list of batches / (inputs, targets).

    The usual calibration protocol of post-training compression (GPTQ, arXiv:2210.17323, sec. 5:
    random or consecutive windows of text); non-overlapping blocks, tail dropped.

    Raises:
        ValueError: another form, non-integer ids, or fewer than ``block_size`` tokens.
    """
    require(is_int(block_size) and block_size >= 1 and is_int(batch_size) and batch_size >= 1,
            f"block_size and batch_size must be positive ints, got {block_size!r}, {batch_size!r}")
    accepted = "token ids (N,), one batch (B, T), or a list of (B, T) batches / (inputs, targets) pairs"
    if isinstance(data, torch.Tensor):
        require(not data.is_floating_point() and data.dim() in (1, 2), f"calibration data must be {accepted}, "
                f"got a {data.dtype} tensor of shape {tuple(data.shape)}")
        if data.dim() == 2:
            return [data]
        n_blocks = len(data) // block_size
        require(n_blocks > 0, f"need at least {block_size} tokens, got {len(data)}")
        blocks = data[: n_blocks * block_size].view(n_blocks, block_size)  # (n_blocks, T)
        return list(blocks.split(batch_size))
    require(isinstance(data, list) and len(data) > 0, f"calibration data must be {accepted}, got {type(data).__name__}")
    batches = [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b for b in data]
    require(all(isinstance(b, torch.Tensor) and b.dim() == 2 and not b.is_floating_point() for b in batches),
            f"calibration data must be {accepted}; a list item is not an integer (B, T) tensor or pair")
    return batches


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


RouterCall = Callable[[int, nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], None]


def observe_routing(model: nn.Module, batches: Sequence[torch.Tensor], on_call: RouterCall) -> None:
    """Run the model (eval, no grad) on ``batches`` and call ``on_call(position, block, x, (logits,
    weights, indices))`` for every router call: x (N, H) is the block input, the rest the router's
    outputs (N, E), (N, k), (N, k). Hooks are removed afterwards, even on error.

    The router outputs of Mixtral (arXiv:2401.04088) as transformers computes them.
    """
    blocks = moe_blocks(model)

    def hook(position: int, block: nn.Module) -> Callable:
        return lambda module, args, out: on_call(position, block, args[0].reshape(-1, args[0].shape[-1]), out)

    handles = [block.gate.register_forward_hook(hook(p, block)) for p, (_, block) in enumerate(blocks)]
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches:
                model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- usage
@dataclass(frozen=True)
class RoutingStats:
    """Per MoE layer (rows, in :func:`moe_blocks` order) and expert (columns).

    ``counts``: top-k assignments (int64), summing to ``tokens * top_k`` in every row;
    ``weight_mass``: sum of the routing weights each expert received (float64; rows sum to
    ``tokens`` when the router renormalises); ``token_fraction``: counts / tokens, the fraction of
    tokens routed to the expert (rows sum to top_k; an expert is chosen at most once per token).
    """

    layers: tuple[int, ...]
    tokens: int
    top_k: int
    counts: torch.Tensor
    weight_mass: torch.Tensor
    token_fraction: torch.Tensor

    @property
    def share(self) -> torch.Tensor:
        """Share of the assignments (float32, rows sum to 1): what :func:`expert_usage` returns."""
        return (self.counts.double() / self.counts.sum(dim=-1, keepdim=True)).float()


def routing_stats(model: nn.Module, tokens: object, block_size: int = 128, batch_size: int = 8) -> RoutingStats:
    """Counts, routing-weight mass and token fraction of every expert in every MoE layer.

    The load statistics of Shazeer et al. (arXiv:1701.06538, sec. 4: importance = summed gate
    values, load = number of tokens) measured on the trained router, as Lu et al. (arXiv:2402.14800,
    fig. 2) show them for Mixtral.

    Args:
        model: a supported MoE model (:func:`moe_blocks`).
        tokens: calibration data (module docstring).
        block_size, batch_size: how token ids (N,) are cut into batches.
    """
    blocks = moe_blocks(model)
    batches = calibration_batches(tokens, block_size, batch_size)
    n_experts = model.config.num_experts
    counts = torch.zeros(len(blocks), n_experts, dtype=torch.int64)
    mass = torch.zeros(len(blocks), n_experts, dtype=torch.float64)
    seen = [0] * len(blocks)

    def on_call(p: int, block: nn.Module, x: torch.Tensor, out: tuple) -> None:
        _, weights, indices = out  # (N, k), (N, k)
        counts[p] += torch.bincount(indices.flatten(), minlength=n_experts)
        mass[p].index_add_(0, indices.flatten(), weights.flatten().double())
        seen[p] += len(x)

    observe_routing(model, batches, on_call)
    top_k = blocks[0][1].gate.top_k
    return RoutingStats(tuple(i for i, _ in blocks), seen[0], top_k, counts, mass, counts.double() / seen[0])


def expert_usage(model: nn.Module, tokens: torch.Tensor, block_size: int = 128, batch_size: int = 8) -> torch.Tensor:
    """Share of the top-k routing assignments that each expert receives, per MoE layer.

    ``routing_stats(...).share``: tokens are cut into non-overlapping ``block_size`` blocks (tail
    dropped); each token sends ``top_k`` assignments, so a uniform router gives every expert
    1 / num_experts (Shazeer et al., arXiv:1701.06538; Jiang et al., arXiv:2401.04088).

    Args:
        model: a supported MoE causal LM (:func:`moe_blocks`).
        tokens: token ids (N,).
        block_size: tokens per block.
        batch_size: blocks per forward pass.
    Returns:
        Usage (MoE layers, experts), float32, each row summing to 1.
    """
    return routing_stats(model, tokens, block_size, batch_size).share


def usage_summary(usage: torch.Tensor) -> dict:
    """Unevenness of expert usage (layers, experts), JSON-ready.

    The coefficient of variation is the imbalance measure of Shazeer et al. (arXiv:1701.06538,
    sec. 4, whose balancing loss penalises its square).

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


# ----------------------------------------------------------------------------- changing the model
def _check_keep(keep: object, blocks: list[tuple[int, nn.Module]], n_experts: int, top_k: int) -> dict[int, list[int]]:
    layers = [i for i, _ in blocks]
    require(isinstance(keep, Mapping) and sorted(keep) == layers,
            f"keep must be a dict with one entry per MoE layer {layers} -> expert indices to keep, "
            f"got {sorted(keep) if isinstance(keep, Mapping) else type(keep).__name__}")
    chosen = {}
    for layer in layers:
        kept = keep[layer].tolist() if isinstance(keep[layer], torch.Tensor) else keep[layer]
        require(isinstance(kept, (list, tuple)) and all(is_int(j) and 0 <= j < n_experts for j in kept),
                f"keep[{layer}] must be a list of expert indices in 0..{n_experts - 1}, got {keep[layer]!r}")
        require(len(set(kept)) == len(kept), f"keep[{layer}] has duplicate expert indices: {list(kept)}")
        chosen[layer] = sorted(kept)
    sizes = {len(k) for k in chosen.values()}
    require(len(sizes) == 1, f"keep must keep the same number of experts in every layer (one config value, "
            f"num_experts, holds it), got {sorted(sizes)}")
    n_kept = sizes.pop()
    require(1 <= n_kept, f"keep must keep at least one expert per layer (1..{n_experts}), got 0")
    require(n_kept >= top_k, f"keeping {n_kept} experts is fewer than top_k={top_k} experts per token: lower "
            f"top_k first with moe_prune.set_top_k_(model, {n_kept}), or keep between {top_k} and {n_experts}")
    return chosen


@torch.no_grad()
def remove_experts_(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> None:
    """Remove whole experts in place: keep[layer] = the expert indices that stay in that MoE layer.

    Expert pruning as in Lu et al. ("Not All Experts are Equal: Efficient Expert Pruning and
    Skipping for Mixture-of-Experts Large Language Models", arXiv:2402.14800, sec. 3.1): the router
    rows and both fused expert tensors are sliced along the expert dim, the expert counts of the
    router, the experts module, the model and ``config.num_experts`` (Mixtral's
    ``num_local_experts``) are updated. Every layer must keep the same number of experts, since
    one config value holds the count and ``from_pretrained`` builds every layer from it. Kept
    experts are renumbered in ascending order of their old index. The router still takes a softmax
    over the kept experts: where it renormalises the top-k (Mixtral), removing an expert that is
    never among the top-k changes no output; where it does not (``norm_topk_prob`` False), the
    weights of the remaining experts grow. A Qwen2-MoE shared expert is untouched.

    Args:
        model: a supported MoE model (:func:`moe_blocks`).
        keep: {MoE layer index: expert indices}, one entry per MoE layer, same count everywhere,
            at least ``top_k`` (else lower it with :func:`lessons_lib.moe_prune.set_top_k_`).
    Raises:
        ValueError: before any change, for a bad ``keep``.
    """
    blocks = moe_blocks(model)
    n_experts, top_k = model.config.num_experts, blocks[0][1].gate.top_k
    chosen = _check_keep(keep, blocks, n_experts, top_k)
    for layer, block in blocks:
        index = torch.tensor(chosen[layer], device=block.gate.weight.device)
        for module, name in ((block.gate, "weight"), (block.experts, "gate_up_proj"), (block.experts, "down_proj")):
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(old.data.index_select(0, index).clone(), requires_grad=old.requires_grad))
        block.gate.num_experts = block.experts.num_experts = len(index)
    n_kept = len(next(iter(chosen.values())))
    model.config.num_experts = n_kept  # the attribute_map sets num_local_experts where that is the name
    if hasattr(model, "num_experts"):
        model.num_experts = n_kept

