"""Model surgery: turn structured keep-vectors into a physically smaller model.

The course splits structured pruning in three: a criterion scores channels, neurons or heads
(:mod:`lessons_lib.importance`), pruning turns scores into keep-vectors (:mod:`lessons_lib.prune`),
and surgery, here, deletes what is not kept. Surgery never sees scores: it takes, per layer, a
bool keep-vector ``(n,)`` or the integer indices to keep. Two phases, as everywhere in the library:

1. **Plan** (nothing changes): :func:`plan_channels` (Conv/Linear outputs of a sequential CNN or
   MLP), :func:`plan_neurons` (transformer FFN neurons) and :func:`plan_heads` (attention heads)
   check every argument and return a :class:`Plan`: which slices of which tensors to keep.
   Plans add up (``plan_heads(...) + plan_neurons(...)``).
2. **Apply**: :func:`remove_` slices the tensors (the model becomes smaller), or
   :func:`structural_mask_` zeroes what the plan drops, shapes unchanged. Both give the same
   outputs (up to float summation order): the masked model is the reference the smaller one is
   tested against.

A removed output channel is cut everywhere it goes: its filter row (and bias), its BatchNorm
entries, and the next layer's input columns; after a ``Flatten`` the next Linear reads each
channel as a block of H*W columns (channel-major (C, H, W) order). Li et al., "Pruning Filters for
Efficient ConvNets" (arXiv:1608.08710); Torch-Pruning finds the same couplings in any
graph (Fang et al., "DepGraph", arXiv:2301.12900): :func:`torch_pruning_remove_` runs it.

**BatchNorm and masking.** Zeroing a filter is not enough: BatchNorm then outputs the constant
``beta - gamma * mean / sqrt(var + eps)``, which ReLU passes and the next layer sums. So
:func:`structural_mask_` also zeroes BN's gamma and beta (the channel's output is then exactly 0,
in eval and train mode: cf. Liu et al., "Network Slimming", arXiv:1708.06519) *and* the next
layer's input columns, so that the channel contributes nothing whatever activation follows
(sigmoid(0) != 0). Running statistics are left as they are. The smaller model drops the channel,
constant included; folding that constant into the next bias would be exact only without padding.

Transformers (``model_type`` "llama" or "bert", e.g. the zoo LM and all-MiniLM-L6-v2): FFN
neurons are rows of gate/up (Llama) or ``intermediate.dense`` (BERT) and columns of the down
projection; a head is ``head_dim`` rows of q, k, v and ``head_dim`` columns of the output
projection (Michel et al., "Are Sixteen Heads Really Better than One?", arXiv:1905.10650).
:func:`drop_layers_` removes whole blocks (Men et al., "ShortGPT", arXiv:2403.03853; Gromov et al.,
arXiv:2403.17887) and renumbers ``layer_idx`` so the KV cache stays consistent.

**Config and saving.** After :func:`remove_` the HF config follows the modules: a width that is
the same in every layer and that a config field can hold is written there, and ``save_pretrained``
+ ``from_pretrained`` just work. Other widths go to
``config.pruned_widths = {field: [width of layer 0, 1, ...]}``, saved in ``config.json``; then
``from_pretrained`` refuses the checkpoint (size mismatch) and :func:`load_pruned` rebuilds it.
Widths a config cannot hold: different per layer; BERT heads (BERT derives its head size as
hidden_size / num_attention_heads, so fewer heads cannot be written); Llama head counts that do not
divide hidden_size (``LlamaConfig.validate`` demands it, although ``head_dim`` is explicit).
(transformers 5.24 has a config-side ``per_layer_config``, but Llama/BERT cannot be built from it:
reading ``config.intermediate_size`` then raises ``AmbiguousGlobalPerLayerAttributeError``.)
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

Keep = Union[torch.Tensor, Sequence[int]]  # bool keep-vector (n,) or integer indices to keep
ARCHS = ("llama", "bert")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


@dataclass(frozen=True)
class Cut:
    """Keep the entries ``index`` (sorted int64, (k,)) along ``dim`` of ``<module>.<tensor>``,
    whose full size along ``dim`` is ``size`` (checked before anything is changed)."""

    module: str
    tensor: str
    dim: int
    index: torch.Tensor
    size: int


@dataclass(frozen=True)
class Plan:
    """The slices one surgery keeps. Made by the ``plan_*`` functions, applied once by
    :func:`remove_` or :func:`structural_mask_`; ``plan_a + plan_b`` applies both."""

    cuts: tuple[Cut, ...]

    def __post_init__(self) -> None:
        seen = [(c.module, c.tensor, c.dim) for c in self.cuts]
        twice = sorted({s for s in seen if seen.count(s) > 1})
        if twice:
            raise ValueError(f"a plan may cut each tensor dimension once; cut twice: {twice}")

    def __add__(self, other: Plan) -> Plan:
        return Plan(self.cuts + other.cuts)


def _keep_index(keep: Keep, size: int, what: str) -> torch.Tensor:
    """Sorted int64 indices (k,) from a bool keep-vector (size,) or distinct integer indices."""
    t = torch.as_tensor(keep)
    if t.numel() == 0 or (t.dtype == torch.bool and not t.any()):
        raise ValueError(f"{what} keeps none of {size}: removing all of a layer would disconnect the model; "
                         f"keep at least one (to remove whole transformer blocks use drop_layers_)")
    if t.dtype == torch.bool:
        if t.shape != (size,):
            raise ValueError(f"{what}: a bool keep-vector must have shape ({size},), got {tuple(t.shape)}")
        return t.nonzero().flatten()
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what}: pass a bool keep-vector of shape ({size},) or 1-D integer indices, "
                         f"got dtype {t.dtype}, shape {tuple(t.shape)}")
    index = t.long().unique()  # sorted: the smaller layer keeps the original order
    if index.numel() != t.numel() or index[0] < 0 or index[-1] >= size:
        raise ValueError(f"{what}: indices must be distinct and in [0, {size}), got {t.tolist()}")
    return index


def _blocks(index: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of blocks of ``width`` consecutive entries: (k,) -> (k*width,), i*width + j."""
    return (index[:, None] * width + torch.arange(width)).reshape(-1)  # (k, width) -> (k*width,)


def _rows(name: str, module: nn.Module, index: torch.Tensor, size: int) -> list[Cut]:
    """Cuts of output entries: weight rows (dim 0) and the bias, if any."""
    return [Cut(name, t, 0, index, size) for t in ("weight", "bias") if getattr(module, t, None) is not None]


# ----------------------------------------------------------------------------- CNN / MLP chains
def _consumer_cuts(leaves: list[tuple[str, nn.Module]], start: int, index: torch.Tensor, C: int,
                   name: str) -> list[Cut]:
    """Follow producer ``name``'s C channels forward to the first Conv/Linear that reads them."""
    cuts, accepted = [], "BatchNorm, Flatten, elementwise activations, pooling, dropout, Identity"
    for n, m in leaves[start + 1:]:
        if isinstance(m, _NORMS):
            if m.num_features != C:
                raise ValueError(f"keep[{name!r}]: {n} normalises {m.num_features} channels, {name} makes {C}")
            cuts += [Cut(n, t, 0, index, C) for t in ("weight", "bias", "running_mean", "running_var")
                     if getattr(m, t, None) is not None]
        elif isinstance(m, (*_CONVS, nn.Linear)):
            size = m.weight.shape[1]
            S = size // C  # inputs per channel: 1, or H*W after a Flatten
            if S * C != size or (isinstance(m, _CONVS) and (S != 1 or m.groups != 1)):
                raise ValueError(f"keep[{name!r}]: {n} reads {size} inputs, which are not blocks of {name}'s {C} channels")
            return cuts + [Cut(n, "weight", 1, _blocks(index, S), size)]
        elif not isinstance(m, (*_ELEMENTWISE, nn.Flatten)):
            raise ValueError(f"keep[{name!r}]: cannot follow channels through {n} ({type(m).__name__}); accepted "
                             f"between two layers: {accepted} (other graphs: torch_pruning_remove_)")
    raise ValueError(f"keep[{name!r}]: {name} makes the model's output; removing its channels changes the output shape")


def plan_channels(model: nn.Module, keep: Mapping[str, Keep]) -> Plan:
    """Plan to remove output channels of Conv layers and output neurons of Linear layers.

    The model's leaf modules, in registration order, must be its data flow (true of
    ``nn.Sequential`` chains and of :class:`lessons_lib.teachers.SmallCNN`); residual or
    branching graphs are not traced (Torch-Pruning's dependency graph handles them).

    Args:
        model: e.g. ``SmallCNN``: names ``"features.0"``, ``"features.4"``, ``"features.8"`` (convs),
            ``"classifier.1"`` (the hidden Linear).
        keep: Conv/Linear name (or its weight's name, ``"features.0.weight"``, as
            ``prune.channel_masks`` returns them) -> bool keep-vector (C_out,) or indices to keep.
    Returns:
        A :class:`Plan`: producer rows (+ bias), BatchNorm entries, consumer input columns.
    Raises:
        ValueError: unknown name, grouped conv, wrong length, nothing kept, an untraceable module
            in between, or a layer whose outputs are the model's outputs. The model is untouched.
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    position = {n: i for i, (n, m) in enumerate(leaves) if isinstance(m, (*_CONVS, nn.Linear))}
    cuts: list[Cut] = []
    for key, vec in keep.items():
        name = key.removesuffix(".weight") if key not in position else key
        if name not in position:
            raise ValueError(f"keep: no Conv/Linear layer named {key!r}; accepted: {sorted(position)}")
        module = leaves[position[name]][1]
        if isinstance(module, _CONVS) and module.groups != 1:
            raise ValueError(f"keep[{name!r}]: grouped convolutions (groups={module.groups}) are not supported")
        C = module.weight.shape[0]
        index = _keep_index(vec, C, f"keep[{name!r}]")
        cuts += _rows(name, module, index, C) + _consumer_cuts(leaves, position[name], index, C, name)
    return Plan(tuple(cuts))


# ----------------------------------------------------------------------------- transformers
@dataclass(frozen=True)
class _Layout:
    """Where the parts of one transformer block live, relative to the block."""

    layers: str  # the ModuleList of blocks, as the end of its qualified name
    attn: str  # the module that holds the head attributes
    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]  # FFN input projections: a neuron is a row
    down: str  # FFN output projection: a neuron is a column
    fields: tuple[str, ...]  # per-layer widths the HF config can hold as one number


_LAYOUTS = {
    "llama": _Layout("layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                     ("num_attention_heads", "num_key_value_heads", "intermediate_size")),
    "bert": _Layout("encoder.layer", "attention.self", "attention.self.query", "attention.self.key",
                    "attention.self.value", "attention.output.dense", ("intermediate.dense",), "output.dense",
                    ("intermediate_size",)),
}


def _find_layers(model: nn.Module) -> tuple[_Layout, str, nn.ModuleList]:
    """(layout, qualified name of the block list, the block list) of a Llama or BERT model."""
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in _LAYOUTS:
        raise ValueError(f"model: transformer surgery supports config.model_type in {ARCHS}, got {arch!r}")
    suffix = _LAYOUTS[arch].layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
            return _LAYOUTS[arch], name, module
    raise ValueError(f"model: found no ModuleList named '*{suffix}' in this {arch} model")


@dataclass(frozen=True)
class Readers:
    """Where a criterion can read what each block's heads and FFN neurons contribute.

    ``blocks``: the transformer blocks (a ``ModuleList``); ``heads[i]`` / ``neurons[i]``: the
    qualified name of block i's output projection (o_proj or BERT's ``attention.output.dense``) and
    of its FFN down projection (``down_proj`` or ``output.dense``); ``head_dim``: the input columns
    of the output projection that one head writes.
    """

    blocks: nn.ModuleList
    heads: tuple[str, ...]
    neurons: tuple[str, ...]
    head_dim: int


def readers(model: nn.Module) -> Readers:
    """The :class:`Readers` of a transformers Llama or BERT model (ValueError for other models)."""
    lay, prefix, layers = _find_layers(model)
    return Readers(layers, tuple(f"{prefix}.{i}.{lay.o}" for i in range(len(layers))),
                   tuple(f"{prefix}.{i}.{lay.down}" for i in range(len(layers))),
                   _head_dim(layers[0].get_submodule(lay.attn)))


def _layer_items(keep: Mapping[int, Keep], n: int) -> list[tuple[int, Keep]]:
    bad = [i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"keep: unknown layer index {bad}; accepted: integers 0..{n - 1}")
    return sorted(keep.items())


def _head_dim(attn: nn.Module) -> int:
    return getattr(attn, "head_dim", None) or attn.attention_head_size


def plan_neurons(model: nn.Module, keep: Mapping[int, Keep]) -> Plan:
    """Plan to remove FFN neurons: rows of gate_proj/up_proj and columns of down_proj (Llama), or
    rows of ``intermediate.dense`` and columns of ``output.dense`` (BERT).

    Args:
        model: a transformers Llama or BERT model (``LlamaForCausalLM``, ``BertModel``, ...).
        keep: layer index -> bool keep-vector (intermediate_size,) or neuron indices to keep.
    Returns:
        A :class:`Plan`. Raises ``ValueError`` (model untouched) on a bad layer index or keep-vector.
    """
    lay, prefix, layers = _find_layers(model)
    cuts: list[Cut] = []
    for i, vec in _layer_items(keep, len(layers)):
        I = layers[i].get_submodule(lay.down).in_features
        index = _keep_index(vec, I, f"keep[{i}]")
        for up in lay.up:
            cuts += _rows(f"{prefix}.{i}.{up}", layers[i].get_submodule(up), index, I)
        cuts.append(Cut(f"{prefix}.{i}.{lay.down}", "weight", 1, index, I))
    return Plan(tuple(cuts))


def _kv_heads(heads: torch.Tensor, H: int, KV: int, what: str) -> torch.Tensor:
    """The key/value heads that kept query heads still use, under grouped-query attention.

    ``repeat_kv`` hands KV head j to the ``num_key_value_groups`` consecutive query heads
    j*g .. j*g+g-1 (Ainslie et al., "GQA", arXiv:2305.13245), one g for the whole layer. So each
    group must keep the same number g' of its query heads, or none (then its KV head goes too).
    """
    counts = torch.bincount(heads // (H // KV), minlength=KV)  # (KV,) kept query heads per group
    kept = counts.nonzero().flatten()
    if counts[kept].unique().numel() != 1:
        raise ValueError(f"{what}: with grouped-query attention ({H} query heads share {KV} key/value heads, "
                         f"{H // KV} per group) every group must keep the same number of its query heads or "
                         f"none; kept per group: {counts.tolist()}")
    return kept


def plan_heads(model: nn.Module, keep: Mapping[int, Keep]) -> Plan:
    """Plan to remove attention heads: ``head_dim`` rows of q/k/v (+ biases) per head and the
    matching columns of the output projection (o_proj, or BERT's ``attention.output.dense``).

    Under grouped-query attention a KV head goes when none of its query heads stays, and every
    group must keep the same number of query heads (see :func:`_kv_heads`).

    Args:
        model: a transformers Llama or BERT model.
        keep: layer index -> bool keep-vector (num_attention_heads,) or head indices to keep.
    Returns:
        A :class:`Plan`. Raises ``ValueError`` (model untouched) on bad input or a GQA violation.
    """
    lay, prefix, layers = _find_layers(model)
    cuts: list[Cut] = []
    for i, vec in _layer_items(keep, len(layers)):
        p, layer = f"{prefix}.{i}.", layers[i]
        d = _head_dim(layer.get_submodule(lay.attn))
        H, KV = layer.get_submodule(lay.q).out_features // d, layer.get_submodule(lay.k).out_features // d
        heads = _keep_index(vec, H, f"keep[{i}]")
        q_rows, kv_rows = _blocks(heads, d), _blocks(_kv_heads(heads, H, KV, f"keep[{i}]"), d)
        cuts += _rows(p + lay.q, layer.get_submodule(lay.q), q_rows, H * d)
        for name in (lay.k, lay.v):
            cuts += _rows(p + name, layer.get_submodule(name), kv_rows, KV * d)
        cuts.append(Cut(p + lay.o, "weight", 1, q_rows, H * d))
    return Plan(tuple(cuts))


def _widths(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer widths read from the module shapes: heads, KV heads (Llama), FFN neurons."""
    lay, _, layers = _find_layers(model)
    out: dict[str, list[int]] = {"num_attention_heads": [], "num_key_value_heads": [], "intermediate_size": []}
    for layer in layers:
        d = _head_dim(layer.get_submodule(lay.attn))
        out["num_attention_heads"].append(layer.get_submodule(lay.q).out_features // d)
        out["num_key_value_heads"].append(layer.get_submodule(lay.k).out_features // d)
        out["intermediate_size"].append(layer.get_submodule(lay.down).in_features)
    if "num_key_value_heads" not in lay.fields:
        del out["num_key_value_heads"]  # BERT: always one KV head per head
    return out


def _sync_(model: nn.Module) -> None:
    """Make module attributes and ``model.config`` agree with the (new) tensor shapes."""
    lay, _, layers = _find_layers(model)
    for layer in layers:
        attn, q, k = (layer.get_submodule(n) for n in (lay.attn, lay.q, lay.k))
        if hasattr(attn, "num_key_value_groups"):  # Llama: repeat_kv reads it
            attn.num_key_value_groups = q.out_features // k.out_features
            layer.mlp.intermediate_size = layer.get_submodule(lay.down).in_features
        else:  # BERT
            attn.num_attention_heads, attn.all_head_size = q.out_features // _head_dim(attn), q.out_features
    config, widths = model.config, _widths(model)
    odd = {f for f, v in widths.items() if len(set(v)) > 1 or (f not in lay.fields and v[0] != getattr(config, f))}
    heads = {"num_attention_heads", "num_key_value_heads"} & set(widths)  # go together, or not at all
    if odd & heads or not _accepts(config, {f: widths[f][0] for f in heads}):
        odd |= heads
    for field in set(widths) - odd:
        setattr(config, field, widths[field][0])
    if odd:
        config.pruned_widths = {f: widths[f] for f in sorted(odd)}
    elif hasattr(config, "pruned_widths"):
        del config.pruned_widths


def _accepts(config, values: dict) -> bool:
    """Whether the config's own validation (run by ``save_pretrained``) accepts these values."""
    trial = copy.deepcopy(config)
    for field, value in values.items():
        setattr(trial, field, value)
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:  # transformers wraps the ValueError in huggingface_hub's StrictDataclassClassValidationError
        return False
    return True


# ----------------------------------------------------------------------------- applying a plan
def _check_plan(model: nn.Module, plan: Plan) -> None:
    for cut in plan.cuts:
        try:
            t = getattr(model.get_submodule(cut.module), cut.tensor, None)
        except AttributeError:
            raise ValueError(f"plan: the model has no module {cut.module!r}; make the plan on this model") from None
        if not isinstance(t, torch.Tensor) or t.dim() <= cut.dim or t.shape[cut.dim] != cut.size:
            raise ValueError(f"plan: {cut.module}.{cut.tensor} should have size {cut.size} along dim {cut.dim}, "
                             f"got {None if t is None else tuple(t.shape)}; a plan applies once, to a model "
                             f"shaped like the one it was made on")


def _refresh(module: nn.Module) -> None:
    """Size attributes of a Linear / Conv / BatchNorm from its tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _CONVS):
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif isinstance(module, _NORMS):
        module.num_features = module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]


@torch.no_grad()
def remove_(model: nn.Module, plan: Plan) -> nn.Module:
    """Physically remove what ``plan`` drops, in place: tensors are sliced (new Parameters, so
    rebuild any optimizer), size attributes updated; for Llama/BERT the head attributes and the
    config too (see the module docstring for widths the config cannot hold).

    Args:
        model: the model the plan was made on (or a copy of it).
        plan: from :func:`plan_channels`, :func:`plan_neurons`, :func:`plan_heads`, or their sum.
    Returns:
        ``model``, smaller. Raises ``ValueError`` before any change if the plan does not fit.
    """
    _check_plan(model, plan)
    for cut in plan.cuts:
        module = model.get_submodule(cut.module)
        old = getattr(module, cut.tensor)
        new = old.detach().index_select(cut.dim, cut.index.to(old.device)).clone()
        setattr(module, cut.tensor, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
    for name in {cut.module for cut in plan.cuts}:
        _refresh(model.get_submodule(name))
    if getattr(getattr(model, "config", None), "model_type", None) in _LAYOUTS:
        _sync_(model)
    return model


@torch.no_grad()
def structural_mask_(model: nn.Module, plan: Plan) -> nn.Module:
    """Zero, in place and without changing any shape, every parameter entry ``plan`` drops:
    producer rows and biases, BatchNorm gamma and beta, consumer columns (buffers such as
    running statistics stay). Outputs then equal those of ``remove_(copy, plan)``.

    Args:
        model: the model the plan was made on (or a copy of it).
        plan: as for :func:`remove_`.
    Returns:
        ``model``. Raises ``ValueError`` before any change if the plan does not fit.
    """
    _check_plan(model, plan)
    for cut in plan.cuts:
        t = getattr(model.get_submodule(cut.module), cut.tensor)
        if isinstance(t, nn.Parameter):
            drop = torch.ones(cut.size, dtype=torch.bool)
            drop[cut.index] = False
            t.index_fill_(cut.dim, drop.nonzero().flatten().to(t.device), 0.0)
    return model


def drop_layers_(model: nn.Module, keep: Keep) -> nn.Module:
    """Remove whole transformer blocks in place and renumber the kept ones.

    Every kept submodule with a ``layer_idx`` (the attention's index into the KV cache) gets its
    new position; ``config.num_hidden_layers``, ``config.layer_types`` (if set) and
    ``config.pruned_widths`` follow.

    Args:
        model: a transformers Llama or BERT model.
        keep: bool keep-vector (num_hidden_layers,) or indices of the blocks to keep.
    Returns:
        ``model``. Raises ``ValueError`` before any change on a bad keep-vector.
    """
    _, prefix, layers = _find_layers(model)
    index = _keep_index(keep, len(layers), "keep").tolist()
    parent, _, attr = prefix.rpartition(".")
    kept = nn.ModuleList(layers[i] for i in index)
    setattr(model.get_submodule(parent), attr, kept)
    for j, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    config = model.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in index]
    _sync_(model)
    return model


def load_pruned(path: str | Path) -> nn.Module:
    """Load a ``save_pretrained`` folder of a pruned Llama/BERT model, in eval mode.

    Without ``config.pruned_widths`` this is ``from_pretrained``. With it, the model is built from
    the config, cut to the stored per-layer widths (first heads of the first KV groups, first
    neurons: only shapes matter) and filled from the folder's safetensors.
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    widths = getattr(config, "pruned_widths", None)
    if not widths:
        return cls.from_pretrained(path).eval()
    model = cls(config)
    remove_(model, _plan_from_widths(model, widths))
    state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    model.to({t.dtype for t in state.values() if t.is_floating_point()}.pop())
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.state_dict().items() if n not in missing}
    untied = [n for n in missing if model.state_dict()[n].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the pruned widths: missing {untied}, unexpected {unexpected}")
    return model.eval()


def _plan_from_widths(model: nn.Module, widths: Mapping[str, Sequence[int]]) -> Plan:
    """A plan that cuts a freshly built model to per-layer ``widths`` (config.pruned_widths)."""
    lay, _, layers = _find_layers(model)
    if any(len(v) != len(layers) for v in widths.values()):
        raise ValueError(f"config.pruned_widths must list {len(layers)} layers per field, got {dict(widths)}")
    heads, neurons = {}, {}
    for i, layer in enumerate(layers):
        if "intermediate_size" in widths:
            neurons[i] = torch.arange(widths["intermediate_size"][i])
        if "num_attention_heads" in widths:
            d = _head_dim(layer.get_submodule(lay.attn))
            g = layer.get_submodule(lay.q).out_features // layer.get_submodule(lay.k).out_features  # built group size
            h = widths["num_attention_heads"][i]
            kv = widths.get("num_key_value_heads", widths["num_attention_heads"])[i]
            heads[i] = torch.tensor([j * g + r for j in range(kv) for r in range(h // kv)])  # h // kv per group
    return (plan_heads(model, heads) if heads else Plan(())) + (plan_neurons(model, neurons) if neurons else Plan(()))


# ----------------------------------------------------------------------------- Torch-Pruning
def _torch_pruning():
    try:
        import torch_pruning
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("Torch-Pruning is not installed: pip install torch-pruning==1.6.1") from err
    return torch_pruning


def torch_pruning_remove_(model: nn.Module, keep: Mapping[str, Keep], example_inputs: torch.Tensor) -> nn.Module:
    """The surgery of ``remove_(model, plan_channels(model, keep))`` done by Torch-Pruning 1.6:
    its ``DependencyGraph`` traces ``model(example_inputs)`` and ``get_pruning_group(...).prune()``
    removes the dropped indices of each named Conv/Linear with everything coupled to them.

    Returns:
        ``model``, pruned in place. Raises ``ValueError`` (as :func:`plan_channels`) first.
    """
    tp = _torch_pruning()
    plan_channels(model, keep)  # same checks and messages as ours, before any change
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    names = dict(model.named_modules())
    for key, vec in keep.items():
        module = names[key] if key in names else names[key.removesuffix(".weight")]
        drop = torch.ones(module.weight.shape[0], dtype=torch.bool)
        drop[_keep_index(vec, len(drop), key)] = False
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        if drop.any():
            graph.get_pruning_group(module, fn, idxs=drop.nonzero().flatten().tolist()).prune()
    return model


def torch_pruning_l2_(model: nn.Module, ratio: float, example_inputs: torch.Tensor,
                      ignored_layers: Sequence[nn.Module] = ()) -> nn.Module:
    """Torch-Pruning's own loop: ``MetaPruner`` keeps ``int(C * (1 - ratio))`` output channels of
    every Conv/Linear not in ``ignored_layers`` (note the rounding: ``prune.channel_masks`` removes
    ``round(ratio * C)``), dropping those whose own filter has the smallest L2 norm
    (``MagnitudeImportance(p=2, group_reduction="first", normalizer=None)``; its default instead
    averages the squared norms over the whole coupled group: filter, BatchNorm, next layer's inputs). ``ratio`` counts channels, so
    parameters shrink by about 1-(1-ratio)^2. Put the classifier in ``ignored_layers`` or it loses
    classes.

    Args:
        model: a model Torch-Pruning can trace with ``model(example_inputs)``.
        ratio: share of channels removed per layer, in [0, 1).
        example_inputs: e.g. one input batch of shape (1, 1, 28, 28).
        ignored_layers: modules whose outputs must stay (the classifier).

    Returns:
        ``model``, pruned in place.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio is the share of channels removed, in [0, 1); got {ratio}")
    tp = _torch_pruning()
    importance = tp.importance.MagnitudeImportance(p=2, group_reduction="first", normalizer=None)
    tp.pruner.MetaPruner(model, example_inputs, importance, pruning_ratio=ratio,
                         ignored_layers=list(ignored_layers)).step()
    return model
