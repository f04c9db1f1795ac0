"""Pruning Mixture-of-Experts models: which experts to keep, pruning inside experts, the router,
and skipping experts on the fly.

Built on the layout of :mod:`lessons_lib.moe` (fused experts, one router weight per layer):

- **Choosing experts** (per layer, r kept; then :func:`moe.remove_experts_`): the least used
  experts go (assignment counts); REAP (Lasby et al., "REAP the Experts: Why Pruning Prevails for
  One-Shot MoE Compression", arXiv:2510.13999, eq. 5) scores expert j by the mean over the tokens
  routed to it of g_j(x) ||f_j(x)||_2; Lu et al. ("Not All Experts are Equal: Efficient Expert
  Pruning and Skipping for Mixture-of-Experts Large Language Models", arXiv:2402.14800, sec. 3.1)
  keep, among all C(E, r) subsets, the one whose block output is closest to the full block's;
  random as the baseline.
- **Inside experts**: the course's usage-aware rule (rarely used experts pruned hardest) and
  unstructured magnitude masks per expert (Han et al., arXiv:1506.02626). Fused experts share one
  width, so these are masks: the tensors keep their size.
- **The router**: top-k (:func:`set_top_k_`) and magnitude pruning of its (E, H) weight.
- **Dynamic skipping** (Lu et al., arXiv:2402.14800, sec. 3.2): a token's second expert is skipped
  when its routing weight w2 < beta * w1.

Calibration data as in :mod:`lessons_lib.moe` (token ids (N,), a batch (B, T) or a list of batches).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from lessons_lib import moe, prune
from lessons_lib.checks import is_int, is_number, require

CRITERIA = ("least_used", "reap", "reconstruction", "random")
SCORE_CRITERIA = ("least_used", "reap", "random")
USAGE_BRACKETS = ((0.10, 0.6), (0.30, 0.4))  # token fraction below the bound -> this pruning ratio
MAX_SUBSETS = 100_000
_CHUNK = 4_000_000  # elements of the (subsets, tokens, experts) weight tensor evaluated at once


def _check_r(model: nn.Module, r: object) -> tuple[int, int]:
    top_k, n_experts = moe.moe_blocks(model)[0][1].gate.top_k, model.config.num_experts
    require(is_int(r) and top_k <= r <= n_experts, f"r (experts kept per layer) must be an int in {top_k}..{n_experts}"
            f" (at least top_k={top_k}: lower top_k first with set_top_k_), got {r!r}")
    return top_k, n_experts


# ----------------------------------------------------------------------------- choosing experts
def expert_scores(model: nn.Module, calibration: object, criterion: str, seed: int = 0, *,
                  block_size: int = 128, batch_size: int = 8) -> torch.Tensor:
    """Importance of every expert (higher = keep), per MoE layer, from calibration data.

    - ``"least_used"``: the number of top-k assignments (Lu et al., arXiv:2402.14800, baseline
      "frequency"; Muzio et al., arXiv:2404.05089): the least used experts are dropped first.
    - ``"reap"``: REAP (arXiv:2510.13999, eq. 5), mean over the tokens routed to expert j of
      g_j(x) * ||f_j(x)||_2, with g_j the routing weight the model applies (renormalised where it
      renormalises) and f_j the expert's output; 0 for an expert no token reaches.
    - ``"random"``: uniform scores from ``torch.Generator().manual_seed(seed)`` (the model is not run).

    Returns:
        Scores (MoE layers, E), float64, rows in :func:`moe.moe_blocks` order.
    """
    require(criterion in SCORE_CRITERIA, f"criterion must be one of {SCORE_CRITERIA} (use choose_experts for "
            f"'reconstruction'), got {criterion!r}")
    require(is_int(seed), f"seed must be an int, got {seed!r}")
    blocks = moe.moe_blocks(model)
    batches = moe.calibration_batches(calibration, block_size, batch_size)
    shape = (len(blocks), model.config.num_experts)
    if criterion == "random":
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if criterion == "least_used":
        return moe.routing_stats(model, batches).counts.double()
    total, count = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)

    def on_call(p: int, block: nn.Module, x: torch.Tensor, out: tuple) -> None:
        _, weights, indices = out  # (N, k), (N, k)
        for j in indices.unique().tolist():
            rows, slots = (indices == j).nonzero(as_tuple=True)  # tokens routed to j, and where
            f = moe.expert_outputs(block, x[rows], j)  # (n_j, H)
            total[p, j] += (weights[rows, slots].double() * f.double().norm(dim=-1)).sum()
            count[p, j] += len(rows)

    moe.observe_routing(model, batches, on_call)
    return total / count.clamp_min(1)


@dataclass(frozen=True)
class ReconstructionChoice:
    """Result of :func:`reconstruction_choice`, per MoE layer index.

    ``keep[layer]``: the best subset (ascending indices); ``errors[layer][subset]``: Frobenius
    error ||Y_S - Y||_F of every subset's block output on the calibration tokens; ``reference_norm
    [layer]``: ||Y||_F of the full routed output (for relative errors); ``subsets``: C(E, r).
    """

    keep: dict[int, tuple[int, ...]]
    errors: dict[int, dict[tuple[int, ...], float]]
    reference_norm: dict[int, float]
    subsets: int


def _subset_errors(block: nn.Module, logits: torch.Tensor, gram: torch.Tensor,
                   masks: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Squared errors (S,) of routing restricted to each mask (S, E) and the squared reference norm.
    Output Y_S = sum_e W_S[n, e] f_e(x_n), so ||Y_S - Y||^2 = sum_n D_n^T G_n D_n with D = W_S - W."""
    n_experts = logits.shape[-1]
    full = moe.dense_weights(*moe.route(block, logits), n_experts).double()  # (N, E)
    squared = []
    for chunk in masks.split(max(1, _CHUNK // logits.numel())):
        D = moe.dense_weights(*moe.route(block, logits, chunk), n_experts).double() - full  # (s, N, E)
        squared.append((torch.einsum("sne,nef->snf", D, gram) * D).sum(dim=(1, 2)))  # (s,)
    reference = float(torch.einsum("ne,nef,nf->", full, gram, full))
    return torch.cat(squared), reference


def reconstruction_choice(model: nn.Module, calibration: object, r: int, *, block_size: int = 128,
                          batch_size: int = 8, max_subsets: int = MAX_SUBSETS) -> ReconstructionChoice:
    """Per layer, the r experts whose restricted routing best reconstructs the block's output.

    Lu et al., "Not All Experts are Equal" (arXiv:2402.14800, sec. 3.1, eq. 3): for every subset S
    of r experts, route each calibration token to the top-k among S (softmax over S, renormalised
    as the model does: exactly the block after :func:`moe.remove_experts_`) and measure the
    Frobenius error to the full block's routed output; keep the best (ties: the first subset in
    lexicographic order). Every layer sees the inputs of the unpruned model. A Qwen2-MoE shared
    expert adds the same term to both outputs, so it does not enter the error.

    Efficient: block inputs are captured once by hooks, every expert's output f_e(x_n) is computed
    once, and only its Gram matrices G_n = [f_e(x_n) . f_f(x_n)] (N, E, E) are kept; each subset then
    costs a routing from the router logits and sum_n D_n^T G_n D_n.

    Args:
        model: a supported MoE model (:func:`moe.moe_blocks`), unchanged.
        calibration: calibration data; r: experts kept per layer (top_k..E).
        max_subsets: refuse when C(E, r) is larger (the search is exhaustive).
    """
    _, n_experts = _check_r(model, r)
    require(is_int(max_subsets) and math.comb(n_experts, r) <= max_subsets, f"C({n_experts}, {r}) = "
            f"{math.comb(n_experts, r)} subsets exceed max_subsets={max_subsets!r}: use a score criterion "
            f"(reap, least_used)")
    blocks = moe.moe_blocks(model)
    batches = moe.calibration_batches(calibration, block_size, batch_size)
    grams, logits = [[] for _ in blocks], [[] for _ in blocks]

    def on_call(p: int, block: nn.Module, x: torch.Tensor, out: tuple) -> None:
        f = moe.expert_outputs(block, x).double()  # (E, N, H)
        grams[p].append(torch.einsum("enh,fnh->nef", f, f))  # (N, E, E)
        logits[p].append(out[0])  # (N, E)

    moe.observe_routing(model, batches, on_call)
    subsets = list(itertools.combinations(range(n_experts), r))
    masks = torch.zeros(len(subsets), n_experts, dtype=torch.bool)  # (S, E)
    for i, subset in enumerate(subsets):
        masks[i, list(subset)] = True
    keep, errors, norms = {}, {}, {}
    for p, (layer, block) in enumerate(blocks):
        squared, reference = _subset_errors(block, torch.cat(logits[p]), torch.cat(grams[p]), masks)
        error = squared.clamp_min(0).sqrt()  # (S,)
        keep[layer] = subsets[int(error.argmin())]
        errors[layer] = dict(zip(subsets, error.tolist()))
        norms[layer] = reference ** 0.5
    return ReconstructionChoice(keep, errors, norms, len(subsets))


def choose_experts(model: nn.Module, calibration: object, r: int, criterion: str, seed: int = 0, *,
                   block_size: int = 128, batch_size: int = 8) -> dict[int, tuple[int, ...]]:
    """The r experts to keep in every MoE layer, by ``criterion`` in :data:`CRITERIA`.

    Score criteria (:func:`expert_scores`: least_used, REAP arXiv:2510.13999, random) keep the r
    highest scores (ties: the lower index); ``"reconstruction"`` is Lu et al.'s exhaustive search
    (arXiv:2402.14800, :func:`reconstruction_choice`). Pass the result to :func:`moe.remove_experts_`.

    Returns:
        {MoE layer index: kept expert indices, ascending}.
    """
    require(criterion in CRITERIA, f"criterion must be one of {CRITERIA}, got {criterion!r}")
    _check_r(model, r)
    if criterion == "reconstruction":
        return reconstruction_choice(model, calibration, r, block_size=block_size, batch_size=batch_size).keep
    scores = expert_scores(model, calibration, criterion, seed, block_size=block_size, batch_size=batch_size)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :r]  # (L, r)
    return {layer: tuple(sorted(row.tolist())) for (layer, _), row in zip(moe.moe_blocks(model), order)}


# ----------------------------------------------------------------------------- inside experts
def usage_aware_ratios(token_fraction: torch.Tensor, base_ratio: float) -> torch.Tensor:
    """Per-expert pruning ratio from usage: token fraction < 0.10 -> 0.6, < 0.30 -> 0.4, else ``base_ratio``.

    The course source's rule (SYLLABUS sec. 6: rarely used experts pruned hardest); no paper gives
    these brackets. The token fraction is the fraction of tokens routed to the expert
    (:attr:`moe.RoutingStats.token_fraction`, rows summing to top_k), not the share of assignments.
    Bounds go to the next bracket: exactly 0.10 -> 0.4, exactly 0.30 -> ``base_ratio``.

    Args:
        token_fraction: fractions in [0, 1], any shape, e.g. (MoE layers, E).
        base_ratio: the ratio of busy experts, in [0, 1).
    Returns:
        Ratios shaped like ``token_fraction``, float64.
    """
    fraction = torch.as_tensor(token_fraction, dtype=torch.float64)
    require(fraction.numel() > 0 and bool(((fraction >= 0) & (fraction <= 1)).all()),
            f"token_fraction must hold fractions of tokens in [0, 1], got {token_fraction!r}")
    require(is_number(base_ratio) and 0 <= base_ratio < 1, f"base_ratio must be a number in [0, 1), got {base_ratio!r}")
    ratios = torch.full_like(fraction, float(base_ratio))
    for bound, ratio in reversed(USAGE_BRACKETS):
        ratios = torch.where(fraction < bound, torch.full_like(fraction, ratio), ratios)
    return ratios


def _ratio_table(ratios: object, layers: list[int], n_experts: int, arg: str) -> torch.Tensor:
    """(L, E) float64 table from a number, an (L, E) table, or {layer: E ratios}; all in [0, 1)."""
    accepted = (f"a number in [0, 1), an (L={len(layers)}, E={n_experts}) table, or {{layer: {n_experts} ratios}} "
                f"for layers {layers}")
    if is_number(ratios):
        table = torch.full((len(layers), n_experts), float(ratios), dtype=torch.float64)
    elif isinstance(ratios, Mapping):
        require(sorted(ratios) == layers, f"{arg} must be {accepted}; got keys {sorted(ratios)}")
        table = torch.stack([torch.as_tensor(ratios[layer], dtype=torch.float64).reshape(-1) for layer in layers])
    else:
        require(isinstance(ratios, (torch.Tensor, list, tuple)), f"{arg} must be {accepted}, got {type(ratios).__name__}")
        table = torch.as_tensor(ratios, dtype=torch.float64)
    require(table.shape == (len(layers), n_experts) and bool(((table >= 0) & (table < 1)).all()),
            f"{arg} must be {accepted}; got shape {tuple(table.shape)} or a value outside [0, 1)")
    return table


def uniform_ratio_same_budget(ratios: object) -> float:
    """The single ratio that prunes as many weights as per-expert ``ratios``: their mean.

    All experts of the supported families have one size, so the mean ratio gives the same budget
    (up to the rounding of each expert's count) - the uniform baseline the usage-aware rule (course
    source, SYLLABUS sec. 6) is compared with; magnitude pruning as Han et al. (arXiv:1506.02626).

    Args:
        ratios: per-expert ratios, a tensor/list of any shape or {layer: ratios}.
    """
    values = list(ratios.values()) if isinstance(ratios, Mapping) else [ratios]
    table = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values])
    require(table.numel() > 0 and bool(((table >= 0) & (table < 1)).all()),
            f"ratios must be fractions in [0, 1), got {ratios!r}")
    return float(table.mean())


@dataclass(frozen=True)
class ExpertMasks:
    """Masks applied in place, keyed by parameter name (``model.named_parameters()``): ``masks[name]``
    a bool keep-mask (True = keep) shaped like the fused parameter, usable with
    :func:`prune.apply_masks_` / :class:`prune.MaskKeeper`; ``zeros[name]`` (E,) int64 weights masked
    off per expert (per router row for the router)."""

    masks: dict[str, torch.Tensor]
    zeros: dict[str, torch.Tensor]

    @property
    def fraction(self) -> float:
        """Masked-off fraction of all the masked parameters."""
        return sum(int(z.sum()) for z in self.zeros.values()) / sum(m.numel() for m in self.masks.values())


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


@torch.no_grad()
def prune_within_experts_(model: nn.Module, ratios: object) -> ExpertMasks:
    """Unstructured magnitude masks inside every expert, at that expert's ratio, applied in place.

    Magnitude pruning (Han et al., arXiv:1506.02626) per expert: in expert j of a layer, the
    ``round(ratio * numel)`` smallest |w| of its gate_up slice (2I, H) and, separately, of its down
    slice (H, I) are zeroed (:func:`prune.layerwise_masks`' counting and tie rules). Ratios per
    expert come e.g. from :func:`usage_aware_ratios` (course source, SYLLABUS sec. 6). The fused
    tensors must keep one width for all experts, so this MASKS: every tensor keeps its size and
    nothing gets faster without a sparse kernel; the masks are not kept during later training
    unless you pass them to :class:`prune.MaskKeeper`.

    Args:
        model: a supported MoE model (:func:`moe.moe_blocks`).
        ratios: a number in [0, 1) for every expert, an (MoE layers, E) table, or {layer: E ratios}.
    Raises:
        ValueError: before any change, for bad ratios.
    """
    blocks = moe.moe_blocks(model)
    table = _ratio_table(ratios, [i for i, _ in blocks], model.config.num_experts, "ratios")
    names, masks, zeros = _param_names(model), {}, {}
    for p, (_, block) in enumerate(blocks):
        for weight in (block.experts.gate_up_proj, block.experts.down_proj):
            scores = {str(j): w.abs() for j, w in enumerate(weight)}
            keep = prune.layerwise_masks(scores, {str(j): float(table[p, j]) for j in range(len(weight))})
            mask = torch.stack([keep[str(j)] for j in range(len(weight))])  # (E, rows, cols)
            weight.masked_fill_(~mask, 0)
            masks[names[id(weight)]], zeros[names[id(weight)]] = mask, (~mask).flatten(1).sum(dim=1)
    return ExpertMasks(masks, zeros)


# ----------------------------------------------------------------------------- the router
def set_top_k_(model: nn.Module, k: int) -> None:
    """Route every token to ``k`` experts from now on (in place; weights unchanged).

    Top-k routing of Shazeer et al. (arXiv:1701.06538, sec. 2.1); top-1 is Switch routing (Fedus
    et al., arXiv:2101.03961). Updates every router's and block's ``top_k``, the model's
    ``num_experts_per_tok`` and the config's. With renormalisation (Mixtral), top-1 gives the chosen
    expert weight 1.

    Raises:
        ValueError: before any change, unless 1 <= k <= number of experts.
    """
    blocks = moe.moe_blocks(model)
    n_experts = model.config.num_experts
    require(is_int(k) and 1 <= k <= n_experts, f"k must be an int in 1..{n_experts} (the number of experts), got {k!r}")
    for _, block in blocks:
        block.gate.top_k = k
        if hasattr(block, "top_k"):
            block.top_k = k
    model.config.num_experts_per_tok = k
    if hasattr(model, "num_experts_per_tok"):
        model.num_experts_per_tok = k


@torch.no_grad()
def prune_router_(model: nn.Module, sparsity: float) -> ExpertMasks:
    """Magnitude-prune each MoE layer's router weight (E, H) in place, to ``sparsity`` per layer.

    Unstructured magnitude pruning (Han et al., arXiv:1506.02626) of the gating network W_g of
    Shazeer et al. (arXiv:1701.06538, eq. 3): the ``round(sparsity * E * H)`` smallest |w| of the
    layer's router are zeroed (:func:`prune.layerwise_masks`' rules). ``zeros`` counts per router row.

    Raises:
        ValueError: before any change, unless 0 <= sparsity < 1.
    """
    blocks = moe.moe_blocks(model)
    require(is_number(sparsity) and 0 <= sparsity < 1, f"sparsity must be a number in [0, 1), got {sparsity!r}")
    names, masks, zeros = _param_names(model), {}, {}
    for _, block in blocks:
        weight = block.gate.weight  # (E, H)
        mask = prune.layerwise_masks({"router": weight.abs()}, sparsity)["router"]
        weight.masked_fill_(~mask, 0)
        masks[names[id(weight)]], zeros[names[id(weight)]] = mask, (~mask).sum(dim=1)
    return ExpertMasks(masks, zeros)


# ----------------------------------------------------------------------------- dynamic skipping
def _require_top2(model: nn.Module) -> list[tuple[int, nn.Module]]:
    blocks = moe.moe_blocks(model)
    top_k = blocks[0][1].gate.top_k
    require(top_k == 2, f"dynamic skipping needs top_k == 2 experts per token (it may skip the second), got top_k={top_k}")
    return blocks


def skip_betas(model: nn.Module, calibration: object, *, block_size: int = 128, batch_size: int = 8) -> dict[int, float]:
    """Per MoE layer, the median over calibration tokens of w2 / w1 (second over first routing weight).

    Lu et al. (arXiv:2402.14800, sec. 3.2): the threshold beta of dynamic skipping is set to the
    median of w2 / w1 on calibration data, so about half the second experts are skipped. The ratio
    is the same with or without renormalisation. Median: the lower middle value (``torch.median``).

    Raises:
        ValueError: unless top_k == 2.
    """
    blocks = _require_top2(model)
    batches = moe.calibration_batches(calibration, block_size, batch_size)
    ratios = [[] for _ in blocks]
    moe.observe_routing(model, batches, lambda p, block, x, out: ratios[p].append(out[1][:, 1] / out[1][:, 0]))
    return {layer: float(torch.cat(r).median()) for (layer, _), r in zip(blocks, ratios)}


class SkipCounter:
    """Live counts of one :func:`dynamic_skipping` context: second-expert ``calls`` (tokens routed
    while it was active) and how many were ``skipped``, in total and per MoE layer."""

    def __init__(self, layers: list[int]) -> None:
        self._counts = {layer: [0, 0] for layer in layers}  # layer -> [skipped, calls]

    def _add(self, layer: int, skipped: int, calls: int) -> None:
        self._counts[layer][0] += skipped
        self._counts[layer][1] += calls

    @property
    def per_layer(self) -> dict[int, tuple[int, int]]:
        """{MoE layer index: (skipped, calls)}."""
        return {layer: (s, c) for layer, (s, c) in self._counts.items()}

    @property
    def skipped(self) -> int:
        return sum(s for s, _ in self._counts.values())

    @property
    def calls(self) -> int:
        return sum(c for _, c in self._counts.values())

    @property
    def fraction(self) -> float:
        """Skipped / calls (0.0 before any call)."""
        return self.skipped / self.calls if self.calls else 0.0


class _DynamicSkipping:
    def __init__(self, blocks: list[tuple[int, nn.Module]], betas: dict[int, float]) -> None:
        self.blocks, self.betas, self.saved = blocks, betas, []
        self.counter = SkipCounter([layer for layer, _ in blocks])

    def _forward(self, layer: int, original: Callable) -> Callable:
        beta = self.betas[layer]

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            w1, w2 = top_k_weights[:, 0], top_k_weights[:, 1]  # (N,), w1 >= w2
            skip = w2 < beta * w1  # (N,)
            self.counter._add(layer, int(skip.sum()), len(skip))
            if not skip.any():
                return original(hidden_states, top_k_index, top_k_weights)
            first = torch.where(skip, torch.ones_like(w1), w1)[:, None]  # (N, 1): a lone expert gets weight 1
            out = original(hidden_states, top_k_index[:, :1], first)  # (N, H)
            kept = (~skip).nonzero().flatten()  # tokens that still call their second expert
            if len(kept):
                out = out.index_add(0, kept, original(hidden_states[kept], top_k_index[kept, 1:], top_k_weights[kept, 1:]))
            return out

        return forward

    def __enter__(self) -> SkipCounter:
        for layer, block in self.blocks:
            experts = block.experts
            self.saved.append((experts, experts.__dict__.get("forward")))
            experts.forward = self._forward(layer, experts.forward)
        return self.counter

    def __exit__(self, *exc: object) -> bool:
        for experts, previous in reversed(self.saved):
            if previous is None:
                del experts.forward
            else:
                experts.forward = previous
        self.saved = []
        return False


def dynamic_skipping(model: nn.Module, betas: float | Mapping[int, float]) -> _DynamicSkipping:
    """Context manager: inside it, a token's second expert is skipped when w2 < beta * w1.

    Dynamic skipping of Lu et al. (arXiv:2402.14800, sec. 3.2) for top-2 models: for a skipped
    token only the first expert runs, with weight 1 (renormalised over the one kept expert); the
    others are unchanged. beta = 0 changes nothing; beta = 1 skips every second expert (except an
    exact tie w2 == w1), i.e. top-1 routing. Implemented by wrapping each block's
    ``experts.forward`` (so the router, its logits and a shared expert are untouched); the original
    forwards come back on exit, also on error. ``with dynamic_skipping(model, skip_betas(model,
    calib)) as counter:`` yields a :class:`SkipCounter` (``.calls``, ``.skipped``, ``.fraction``).

    Args:
        model: a supported top-2 MoE model (:func:`moe.moe_blocks`).
        betas: one beta in [0, 1] for all layers, or {MoE layer index: beta} for every MoE layer.
    Raises:
        ValueError: here, before anything is changed: top_k != 2 or a beta outside [0, 1].
    """
    blocks = _require_top2(model)
    layers = [layer for layer, _ in blocks]
    table = dict.fromkeys(layers, betas) if not isinstance(betas, Mapping) else dict(betas)
    require(sorted(table) == layers and all(is_number(b) and 0 <= b <= 1 for b in table.values()),
            f"betas must be a number in [0, 1] or {{layer: beta in [0, 1]}} for the MoE layers {layers}, got {betas!r}")
    return _DynamicSkipping(blocks, {layer: float(b) for layer, b in table.items()})


# ----------------------------------------------------------------------------- weight-only quantization of the experts
@dataclass(frozen=True)
class QuantizedExperts:
    """What :func:`quantize_experts_` stored, per fused parameter name: ``code_bytes`` (the packed
    codes, ``bits`` per weight) and ``param_bytes`` (one fp16 scale and one ``bits``-bit zero point
    per group of ``group_size`` inputs), and ``original_bytes`` (the tensor as it was)."""

    bits: int
    group_size: int
    code_bytes: dict[str, int]
    param_bytes: dict[str, int]
    original_bytes: dict[str, int]

    @property
    def stored_bytes(self) -> int:
        return sum(self.code_bytes.values()) + sum(self.param_bytes.values())

    @property
    def ratio(self) -> float:
        """Stored bytes / original bytes of the quantized tensors."""
        return self.stored_bytes / sum(self.original_bytes.values())


@torch.no_grad()
def quantize_experts_(model: nn.Module, bits: int = 4, group_size: int = 32) -> QuantizedExperts:
    """Round-to-nearest weight-only quantization of every expert, in place (the weights are replaced
    by their dequantized values, as :func:`lessons_lib.gptq.quantize_model_` does for Linears).

    Fused experts are not ``nn.Linear``, so Linear-only tools (``quantize_dynamic``, GPTQ's
    sequential driver) do not reach them. Each expert's matrix (gate_up (2I, H), down (H, I)) is
    quantized row by row in groups of ``group_size`` consecutive inputs, asymmetric min-max (the
    per-group grid of GPTQ, Frantar et al., arXiv:2210.17323, and of AWQ); the codes are packed
    ``bits`` per weight (:func:`lessons_lib.packing.pack_bits`) to count the bytes they would take.

    Args:
        model: a supported MoE model (:func:`moe.moe_blocks`).
        bits: 2..8. group_size: inputs per group, dividing every expert's input width.
    Raises:
        ValueError: before any change, for bad bits / group_size.
    """
    from lessons_lib import packing, quantize

    require(is_int(bits) and 2 <= bits <= 8, f"bits must be an int in 2..8, got {bits!r}")
    blocks = moe.moe_blocks(model)
    widths = {w.shape[-1] for _, b in blocks for w in (b.experts.gate_up_proj, b.experts.down_proj)}
    require(is_int(group_size) and group_size >= 1 and all(n % group_size == 0 for n in widths),
            f"group_size must be a positive int dividing the experts' input widths {sorted(widths)}, got {group_size!r}")
    config = quantize.QuantConfig(bits=bits, symmetric=False, granularity="per_group", group_size=group_size)
    names = _param_names(model)
    codes, params, original = {}, {}, {}
    for _, block in blocks:
        for weight in (block.experts.gate_up_proj, block.experts.down_proj):
            rows = weight.detach().reshape(-1, weight.shape[-1]).float()  # (E * out, in)
            scale, zero = quantize.compute_qparams(rows, config)
            q = quantize.quantize(rows, scale, zero, config)  # uint8 codes in [0, 2^bits)
            name = names[id(weight)]
            codes[name] = packing.pack_bits(q, bits).numel()
            params[name] = scale.numel() * 2 + math.ceil(zero.numel() * bits / 8)
            original[name] = weight.numel() * weight.element_size()
            weight.copy_(quantize.dequantize(q, scale, zero, config).reshape(weight.shape).to(weight.dtype))
    return QuantizedExperts(bits, group_size, codes, params, original)
