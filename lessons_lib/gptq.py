"""GPTQ: post-training weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323 (Algorithm 1). For a Linear layer with weight
W (rows = outputs, cols = inputs) and calibration inputs X (cols, N), GPTQ picks quantized Q to
minimise ||W X - Q X||^2. Each row is independent and shares the Hessian H = 2 X X^T / N. The
Optimal Brain Surgeon update (Hassibi & Stork 1993; Frantar et al. 2022, "Optimal Brain
Compression", arXiv:2208.11580) quantizes one column q at a time and spreads its error onto the
columns not yet quantized:

    err = (w_q - quant(w_q)) / [H^-1]_qq          W[:, q:] -= err [H^-1]_{q, q:}

GPTQ's three ideas: quantize columns in a fixed order for all rows; take the rows of H^-1 from the
upper Cholesky factor of H^-1 (numerically stable, computed once); apply updates lazily in blocks
of ``block_size`` columns. Options: groups of ``group_size`` input columns with their own scale and
zero point; "act-order" (columns by decreasing H_qq), with group parameters fixed from the
original column order before reordering (so groups stay contiguous in memory); dead inputs
(H_qq = 0) get weight 0.

Group parameters without act-order (``GPTQConfig.group_rule``): a group's scale and zero point
are fixed when the column pass reaches its first column c. "reference" (the default) takes them
from the weights as they were at the start of the lazy block that contains c: every earlier
block's updates, none of this block's. That is what the authors' code (IST-DASLab/gptq,
``fasterquant``) and GPTQModel do, so the result depends on ``block_size`` whenever a group starts
inside a block (e.g. groups of 64 with blocks of 128). "updated" takes them from the weights as
updated so far inside the block (this module's rule before issue 16; the columns of the group
beyond the block are still at the block's start). The two agree when every group starts a block
(``group_size`` a multiple of ``block_size``) and for one group per row.

Worked example (2x2): with strongly correlated inputs, RTN makes both output errors add up while
GPTQ lets the second column cancel the first column's error; see ``notebooks/03_gptq.ipynb``.

The model driver :func:`sequential_` (blocks in order, Hessians from the already processed blocks)
is not specific to quantization: :mod:`lessons_lib.sparsegpt` prunes with it. It walks the blocks
of Hugging Face causal LMs and of BERT-style encoders such as all-MiniLM-L6-v2 (one driver, a
table of layouts: :data:`LAYOUTS`), calls each block with the arguments the model gave the first
one (attention mask included), counts only real tokens when the calibration batch is padded, and
works on the model's device (Hessians, column loop and activations; see :func:`sequential_`). With an
:class:`Offload` it keeps only the block being processed (and its calibration activations) on the
compute device and every other block on the CPU or on disk, so a model larger than the GPU is
quantized block by block (the reference implementation, IST-DASLab/gptq ``llama.py``, moves one
layer at a time to the GPU in the same way; Accelerate's "big model inference" offloads to disk).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from lessons_lib import prune, quantize
from lessons_lib.checks import is_int, is_number, require

BITS = (2, 3, 4, 8)
GROUP_RULES = ("reference", "updated")  # where a group's scale and zero point come from (see GPTQConfig)
STORES = ("cpu", "disk")  # where the blocks not being processed wait (see Offload)


@dataclass(frozen=True)
class GPTQConfig:
    """How to quantize Linear weights with GPTQ (or RTN). Invalid values raise ``ValueError``.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: input columns per (scale, zero point); None = one per output row.
        symmetric: zero point fixed at the middle of the code range, 2^(bits-1), with all 2^bits codes
            in use (as the reference quantizer of IST-DASLab/gptq); False: asymmetric, GPTQ's default.
        damp_ratio: dampening lambda = damp_ratio * mean(diag H), added to the diagonal.
        block_size: columns per lazy block update (the paper's B = 128).
        act_order: quantize columns by decreasing Hessian diagonal. Groups are then "static": every
            group's scale and zero point come from the original weights before any update, in the
            original column order (the reference code's and GPTQModel's ``static_groups=True``).
            Their default with act-order (``static_groups=False``) forms groups of consecutive
            *permuted* columns, which needs a group index per column (``g_idx``) that
            :class:`QuantizedWeight` and :mod:`lessons_lib.packing` do not store.
        group_rule: without act-order, where a group's scale and zero point come from when the
            pass reaches its first column c. "reference": the weights as they were at the start of
            the lazy block containing c (earlier blocks' updates included, this block's not), as
            IST-DASLab/gptq and GPTQModel do. "updated": the weights as updated so far, up to the
            end of c's block (the columns beyond it as at the block's start). Only "reference" is
            accepted with ``act_order`` (groups are static there, see above).
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    damp_ratio: float = 0.01
    block_size: int = 128
    act_order: bool = False
    group_rule: str = "reference"

    def __post_init__(self) -> None:
        require(is_int(self.bits) and self.bits in BITS, f"bits must be one of {BITS}, got {self.bits!r}")
        require(self.group_size is None or (is_int(self.group_size) and self.group_size >= 1),
              f"group_size must be None (per output row) or a positive int such as 128, got {self.group_size!r}")
        require(isinstance(self.symmetric, bool), f"symmetric must be True or False, got {self.symmetric!r}")
        require(is_number(self.damp_ratio) and 0 <= self.damp_ratio < 1,
              f"damp_ratio must be a number in [0, 1), e.g. 0.01, got {self.damp_ratio!r}")
        require(is_int(self.block_size) and self.block_size >= 1, f"block_size must be a positive int, e.g. 128, got {self.block_size!r}")
        require(isinstance(self.act_order, bool), f"act_order must be True or False, got {self.act_order!r}")
        require(isinstance(self.group_rule, str) and self.group_rule in GROUP_RULES,
                f"group_rule must be one of {GROUP_RULES}, got {self.group_rule!r}")
        require(not (self.act_order and self.group_rule == "updated"),
                "group_rule='updated' needs act_order=False: with act_order the groups are static (their scale and "
                "zero point come from the original weights); use group_rule='reference' or act_order=False")

    def quant_config(self) -> quantize.QuantConfig:
        """The per-row min-max quantizer applied to one group of columns."""
        return quantize.QuantConfig(bits=self.bits, symmetric=self.symmetric, granularity="per_channel", axis=0)

    def check_width(self, cols: int) -> None:
        check_group_size(self.group_size, cols)


def check_group_size(group_size: int | None, cols: int) -> None:
    """Raise ``ValueError`` unless ``group_size`` (None = one group per row) divides ``cols``."""
    if group_size is not None and cols % group_size:
        raise ValueError(f"group_size={group_size} must divide the input width {cols}; "
                         f"use a divisor of {cols} or group_size=None")


@dataclass
class QuantizedWeight:
    """Result for one weight matrix (rows, cols).

    Attributes:
        qweight: integer codes (rows, cols), uint8, in the original column order.
        scale: float32 (rows, n_groups); n_groups = cols // group_size, or 1 per row.
        zero_point: int32 (rows, n_groups), in the unsigned code range [0, 2^bits - 1].
        bits, group_size: as configured.
        loss: sum over rows and columns of the OBS loss (w - q)^2 / (2 [H^-1]_qq) (0 for RTN).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int | None
    loss: float = 0.0

    def dequantize(self) -> torch.Tensor:
        """W_hat = scale * (q - zero), float32 (rows, cols)."""
        return dequantize_codes(self.qweight, self.scale, self.zero_point, self.group_size)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """scale * (q - zero_point) with per-group parameters (rows, n_groups) broadcast over columns."""
    repeat = q.shape[1] if group_size is None else group_size
    s = scale.float().repeat_interleave(repeat, dim=1)  # (rows, cols)
    z = zero_point.float().repeat_interleave(repeat, dim=1)  # (rows, cols)
    return s * (q.float() - z)


class HessianAccumulator:
    """H = 2 X^T X / N over every input row seen so far, updated one batch at a time.

    The running form H <- H * n / (n + m) + 2 X_m^T X_m / (n + m) equals the batch computation on
    all N rows at once (checked in the tests); it never stores X. ``dtype`` float32 (the
    reference implementation's choice) is fast; float64 is for exact checks.

    ``device``: where H lives. None: on the device of the first inputs added (torch's default until then);
    a device: there, and later inputs are moved to it.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0
        self._follow_inputs = device is None

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x (..., in_features), e.g. (B, T, C) activations entering a Linear."""
        if self._follow_inputs and self.n == 0 and self.H.device != x.device:
            self.H = self.H.to(x.device)
        x = x.detach().reshape(-1, self.H.shape[0]).to(self.H.device, self.H.dtype)  # (m, C)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H += x.T @ x  # (C, C)


def _qparams(w: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (rows,) and unsigned zero point (rows,) for columns w (rows, k)."""
    qc = config.quant_config()
    scale, zero = quantize.compute_qparams(w, qc)
    return scale, zero - qc.qmin  # shift signed symmetric codes into the unsigned range


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column w (rows,) with per-row parameters."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, scale * (q - zero)


def rtn(W: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Round-to-nearest with the same quantizer: the baseline GPTQ must beat."""
    W = W.detach().float()
    config.check_width(W.shape[1])
    gs = config.group_size or W.shape[1]
    codes, scales, zeros = [], [], []
    for g in range(0, W.shape[1], gs):
        scale, zero = _qparams(W[:, g : g + gs], config)
        q, _ = _quant(W[:, g : g + gs], scale[:, None], zero[:, None].float(), config.bits)
        codes.append(q), scales.append(scale), zeros.append(zero)
    return QuantizedWeight(torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1),
                           config.bits, config.group_size)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded for a while, then restore the thread count.

    GPTQ's column loop is thousands of tiny operations; for those, synchronising two threads
    costs more than the arithmetic (measured: 60x slower on a busy 2-core machine). For CPU work
    only: see :func:`_one_thread_on`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_thread_on(device: torch.device | str) -> contextlib.AbstractContextManager:
    """:func:`_one_thread` when the work runs on the CPU; nothing (torch's threads untouched) elsewhere."""
    return _one_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext()


def gptq(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Quantize W (rows, cols) given the Hessian H (cols, cols) of its inputs: Algorithm 1.

    Everything runs on W's device (H is moved there); on the CPU, single-threaded.

    Returns:
        A :class:`QuantizedWeight` on W's device; ``dequantize()`` gives the GPTQ weight in the
        original order.
    """
    with _one_thread_on(W.device), torch.no_grad():
        return _gptq(W, H, config)


def _gptq(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    W = W.detach().float().clone()  # (rows, cols)
    rows, cols = W.shape
    config.check_width(cols)
    H = H.detach().to(W.device, torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = cols // config.group_size if config.group_size else 1
    device = W.device  # every tensor of the algorithm lives where the weight does
    scale = torch.zeros(rows, n_groups, device=device)
    zero = torch.zeros(rows, n_groups, dtype=torch.int32, device=device)
    if config.group_size is None:
        scale[:, 0], zero[:, 0] = _qparams(W, config)
    elif config.act_order:  # static groups: fixed from the original order before reordering
        for g in range(n_groups):
            scale[:, g], zero[:, g] = _qparams(W[:, g * config.group_size : (g + 1) * config.group_size], config)
    perm = torch.argsort(torch.diag(H), descending=True) if config.act_order else torch.arange(cols, device=device)
    order = perm.tolist()  # the original column of each step, read once (no device sync per column)
    W, H = W[:, perm], H[perm][:, perm]
    H += config.damp_ratio * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros(rows, cols, device=device)
    losses = torch.zeros(cols, device=device)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (rows, B), (B, B)
        Err1 = torch.zeros_like(W1)
        current = None  # the group whose parameters s_g, z_g hold (read once per group, not per column)
        for i in range(i2 - i1):
            col = order[i1 + i]  # original column index
            g = col // config.group_size if config.group_size else 0
            if config.group_size and not config.act_order and col % config.group_size == 0:
                if config.group_rule == "reference":  # W[:, i1:] still holds the values of the block's start
                    upcoming = W[:, col : col + config.group_size]
                else:  # "updated": this block's columns as updated so far
                    upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : config.group_size]
                scale[:, g], zero[:, g] = _qparams(upcoming, config)
                current = None
            if g != current:
                s_g, z_g, current = scale[:, g], zero[:, g].float(), g
            w, d = W1[:, i], Hinv1[i, i]
            q, w_hat = _quant(w, s_g, z_g, config.bits)
            Q[:, i1 + i] = q
            err = (w - w_hat) / d  # (rows,)
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]  # OBS update inside the block
            Err1[:, i] = err
        losses[i1:i2] = (Err1**2).sum(0) / 2  # (w - w_hat)^2 / (2 d^2) per column, the OBS loss
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns
    codes = torch.empty_like(Q)
    codes[:, perm] = Q  # back to the original column order
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, config.bits, config.group_size, float(losses.sum()))


# ----------------------------------------------------------------------------- the model driver
class Layout(NamedTuple):
    """Where a Hugging Face model keeps its transformer blocks, and how the driver calls it."""

    path: str  # attribute path of the nn.ModuleList of blocks
    models: str  # which models use it (for messages)
    call: tuple[tuple[str, Any], ...] = ()  # extra keyword arguments of the model call


# The first layout whose path leads to a non-empty nn.ModuleList wins. Decoders are called with
# use_cache=False (no key/value cache to build); encoders take no extra argument.
LAYOUTS = (
    Layout("model.layers", "Llama, Mistral, Qwen, Mixtral", (("use_cache", False),)),
    Layout("model.decoder.layers", "OPT", (("use_cache", False),)),
    Layout("gpt_neox.layers", "GPT-NeoX, Pythia", (("use_cache", False),)),
    Layout("encoder.layer", "BERT-style encoders: BertModel, e.g. all-MiniLM-L6-v2"),
    Layout("bert.encoder.layer", "BERT with a task head, e.g. BertForSequenceClassification"),
)


def model_layout(model: nn.Module) -> tuple[Layout, nn.ModuleList]:
    """The :data:`LAYOUTS` entry of ``model`` and its blocks.

    Raises ``ValueError`` naming the supported layouts when none fits. (GPT-2 keeps its weights in
    transposed ``Conv1D`` modules, not ``nn.Linear``; it is not supported.)
    """
    for layout in LAYOUTS:
        obj = model
        for attr in layout.path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return layout, obj
    supported = "; ".join(f"{layout.path} ({layout.models})" for layout in LAYOUTS)
    raise ValueError(f"no transformer blocks found in {type(model).__name__}: the supported layouts are {supported}")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face causal LM or BERT-style encoder (see
    :data:`LAYOUTS`): Llama/Mistral/Qwen/Mixtral ``model.layers``, OPT ``model.decoder.layers``,
    GPT-NeoX/Pythia ``gpt_neox.layers``, BertModel (all-MiniLM-L6-v2) ``encoder.layer``, BERT with
    a task head ``bert.encoder.layer``. Raises ``ValueError`` naming these when none fits."""
    return model_layout(model)[1]


decoder_layers = transformer_blocks  # the older name, kept for the lessons that use it


def fitting_group_size(model: nn.Module, largest: int) -> int:
    """The largest power of two <= ``largest`` that divides the input width of every block Linear.

    A model whose MLP is 448 wide cannot use groups of 128; this returns 64 for it.
    """
    widths = {m.in_features for block in transformer_blocks(model) for m in block.modules() if isinstance(m, nn.Linear)}
    if not widths:
        raise ValueError("the transformer blocks contain no nn.Linear layers to quantize")
    size = 1 << (max(1, largest).bit_length() - 1)
    while any(w % size for w in widths):
        size //= 2
    return size


Calibration = torch.Tensor | Mapping[str, torch.Tensor] | tuple  # what sequential_ and quantize_model_ accept
_CALIBRATION_FORMS = ("token ids (n_samples, T); a dict or BatchEncoding with input_ids (n_samples, T) and optionally "
                      "attention_mask and token_type_ids of the same shape; or a tuple (input_ids, attention_mask)")


def _calibration_columns(calibration: Any, desc: str) -> dict[str, torch.Tensor]:
    """The calibration data as model keyword arguments, each (n_samples, T), checked."""
    if isinstance(calibration, torch.Tensor):
        columns = {"input_ids": calibration}
    elif isinstance(calibration, (tuple, list)) and 1 <= len(calibration) <= 2:
        columns = dict(zip(("input_ids", "attention_mask"), calibration))
    elif isinstance(calibration, Mapping) and "input_ids" in calibration:
        columns = dict(calibration)
    else:
        raise ValueError(f"{desc} needs calibration data: {_CALIBRATION_FORMS}; got {type(calibration).__name__}")
    ids = columns["input_ids"]
    require(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel() > 0 and not ids.is_floating_point(),
            f"{desc} needs calibration data: {_CALIBRATION_FORMS}, n_samples >= 1; got input_ids "
            f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    for name, value in columns.items():
        require(isinstance(value, torch.Tensor) and value.shape == ids.shape,
                f"calibration {name!r} must be a tensor of the shape of input_ids {tuple(ids.shape)}, got "
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    mask = columns.get("attention_mask")
    if mask is not None:
        require(bool(((mask == 0) | (mask == 1)).all()) and bool(mask.any(dim=1).all()),
                "calibration attention_mask must hold 1 (real token) or 0 (padding), with at least one real token per sample")
    return columns


def _calibration_batches(columns: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` samples on ``device``, as keyword arguments of the model call.

    With an attention mask, each batch is cut after its last real token (:func:`prune.trimmed_batches`):
    a tokenizer pads every sample to the longest of the whole calibration set, and those columns
    cost forward passes and add nothing (padding never enters the Hessians). Sorting the samples by
    length before calling the driver leaves the least padding.
    """
    if "attention_mask" in columns:
        batches = prune.trimmed_batches(columns, batch_size)
    else:
        batches = [{name: value[i : i + batch_size] for name, value in columns.items()} for i in range(0, len(columns["input_ids"]), batch_size)]
    return [{name: value.to(device) for name, value in batch.items()} for batch in batches]


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's real (not padding) tokens as a bool mask (b, T); None when there is no padding."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()


def _input_device(model: nn.Module) -> torch.device:
    """Where the model reads its token ids: the device of its input embeddings (or first parameter)."""
    embeddings = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(model.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


class _Captured(Exception):
    """Raised by the hook that records the first block's inputs, to stop the forward pass."""


def _first_block_inputs(model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]],
                        call: dict[str, Any] | None = None) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments of ``block``'s call, one (args, kwargs) per batch: the
    hidden states and whatever else the model passes (attention mask, rotary embeddings, ...)."""
    captured = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, **(call or {}))
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with new hidden states, whether they were passed by position or by name."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_hessians(block: nn.Module, group: dict[str, nn.Linear], inputs: list,
                    real_tokens: list[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """The Hessian of every Linear in ``block`` from its calibration inputs.

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator: a first forward
    pass finds which ones do. ``real_tokens``: per call in ``inputs``, None or a bool mask (b, T)
    of the tokens that count (padding does not): a Linear's input (b, T, C) then adds only its
    masked rows. A Linear whose input does not start with (b, T) (an MoE expert reading routed
    tokens) cannot be matched to the mask: ``ValueError``.
    """
    first_input: dict[str, torch.Tensor] = {}

    # Keep the input tensors themselves, not only their addresses: a tensor freed during the pass
    # (the attention norm's output, say) can hand its memory to a later input (o_proj's), and two
    # different inputs would then look like one. That made o_proj share gate/up's Hessian on some
    # blocks, depending on the allocator: a machine-dependent loss of GPTQ accuracy.
    def remember(name: str):
        def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:  # returns None: output unchanged
            first_input.setdefault(name, inp[0])
        return hook

    hooks = [m.register_forward_hook(remember(n)) for n, m in group.items()]
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    owner: dict[int, str] = {}  # input tensor (all still alive, so their ids are distinct) -> first reader
    for name, tensor in first_input.items():
        owner.setdefault(id(tensor), name)
    acc = {name: HessianAccumulator(group[name].in_features, device=group[name].weight.device) for name in set(owner.values())}
    keep: list[torch.Tensor | None] = [None]  # the real tokens of the call being run

    def add(name: str):
        def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0]
            if keep[0] is not None:
                if x.shape[:2] != keep[0].shape:
                    raise ValueError(f"{name!r} reads inputs of shape {tuple(x.shape)}, which cannot be matched to the padding "
                                     f"mask {tuple(keep[0].shape)}: calibrate this model on unpadded sequences (no attention_mask)")
                x = x[keep[0]]  # (real tokens, C)
            acc[name].add(x)
        return hook

    hooks = [group[n].register_forward_hook(add(n)) for n in acc]
    try:
        for j, (args, kwargs) in enumerate(inputs):
            keep[0] = real_tokens[j] if real_tokens is not None else None
            block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {name: acc[owner[id(first_input[name])]].H for name in group}


def block_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per transformer block (see :func:`transformer_blocks`), its ``nn.Linear`` layers: full module
    name -> module, in module order. Embeddings, the LM head and BERT's pooler are outside the
    blocks, so never listed.

    Raises ``ValueError`` if the model has no supported blocks or they hold no ``nn.Linear``.
    """
    blocks = transformer_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    linears = [{names[id(m)]: m for m in block.modules() if isinstance(m, nn.Linear)} for block in blocks]
    if not any(linears):
        raise ValueError("the transformer blocks contain no nn.Linear layers to quantize or prune")
    return linears


Process = Callable[[str, nn.Linear, torch.Tensor | None], Any]  # (name, linear, H) -> a result


@dataclass(frozen=True)
class Offload:
    """Where :func:`sequential_` works when the model does not fit the compute device.

    Only the block being processed, its calibration activations and Hessians, and the modules
    outside the blocks (embeddings, final norm, head: run once, to capture block 0's inputs) are
    on ``device``; every other block waits in ``store``:

    - "cpu": in CPU memory; a block moves to ``device`` for its turn and back after it.
    - "disk": as one safetensors file per block in ``folder`` (its tensors freed: "meta"); a block
      is read onto ``device`` for its turn and written back, processed, after it. At the end every
      block is read back into CPU memory; the files stay in ``folder`` (the processed blocks).

    After the walk the blocks are on the CPU, the rest of the model where it was, and what
    ``process`` returned has been moved to the CPU. On one device (``device="cpu"``) the result is
    that of the in-memory walk, bit for bit.

    Args:
        device: the compute device, e.g. "cuda", "cuda:1" or "cpu".
        store: "cpu" or "disk".
        folder: the folder of the block files; required for "disk", not accepted for "cpu".
    """

    device: str = "cuda"
    store: str = "cpu"
    folder: str | Path | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.device, (str, torch.device)), f"device must be a device name such as 'cuda', 'cuda:1' or 'cpu', got {self.device!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be a device name such as 'cuda', 'cuda:1' or 'cpu', got {self.device!r}") from None
        require(self.store in STORES, f"store must be one of {STORES}, got {self.store!r}")
        require(self.store != "disk" or isinstance(self.folder, (str, Path)),
                f"store='disk' needs folder, the folder for one file per block, got {self.folder!r}")
        require(self.store != "cpu" or self.folder is None, f"folder is only for store='disk', got folder={self.folder!r} with store='cpu'")

    def check(self) -> None:
        """Raise ``ValueError`` unless this machine has ``device`` and ``folder`` can be a folder."""
        dev = torch.device(self.device)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {self.device!r}: {torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                             "CUDA device(s) visible here; use one of them or device='cpu'")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device!r}")
        if self.folder is not None and Path(self.folder).exists() and not Path(self.folder).is_dir():
            raise ValueError(f"folder {str(self.folder)!r} is a file; pass a folder (made if missing)")


def _move(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with its tensors on ``device``: tensors, dataclasses (e.g. QuantizedWeight), lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class _BlockStore:
    """The offloading of :func:`sequential_` (see :class:`Offload`): a context manager that moves
    the modules outside the blocks to the compute device and the blocks to their store, brings one
    block at a time to the device (:meth:`fetch`, :meth:`release`), and puts everything back."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, offload: Offload) -> None:
        self.model, self.blocks, self.offload = model, list(blocks), offload
        self.device = torch.device(offload.device)
        self.folder = Path(offload.folder) if offload.folder is not None else None
        self.on_device: set[int] = set()  # blocks now on the compute device
        self.outside: list[tuple[nn.Module, str, str, torch.device]] = []  # (module, kind, name, home device)

    def _path(self, i: int) -> Path:
        return self.folder / f"block_{i:04d}.safetensors"  # type: ignore[operator]

    def _write(self, i: int) -> None:
        from safetensors.torch import save_file

        block = self.blocks[i]
        tensors = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        save_file({n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}, str(self._path(i)))
        block.to("meta")  # frees the block's memory; its values are in the file

    def _read(self, i: int, device: torch.device) -> None:
        from safetensors.torch import load_file

        block = self.blocks[i]
        block.to_empty(device=device)
        values = load_file(str(self._path(i)), device=str(device))
        for name, t in {**dict(block.named_parameters()), **dict(block.named_buffers())}.items():
            t.data.copy_(values[name])

    def __enter__(self) -> "_BlockStore":
        block_modules = {id(m) for block in self.blocks for m in block.modules()}
        for module in self.model.modules():
            if id(module) in block_modules:
                continue
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None:
                        self.outside.append((module, kind, name, t.device))
        self._move_outside(to_home=False)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        for i, block in enumerate(self.blocks):
            if self.offload.store == "disk":
                self._write(i)
            else:
                block.to("cpu")
        return self

    def _move_outside(self, to_home: bool) -> None:
        for module, kind, name, home in self.outside:
            t = getattr(module, kind)[name]
            target = home if to_home else self.device
            if kind == "_parameters":
                t.data = t.data.to(target)  # the same Parameter object: ties (embedding = head) survive
            else:
                getattr(module, kind)[name] = t.to(target)

    def fetch(self, i: int) -> None:
        if self.offload.store == "disk":
            self._read(i, self.device)
        else:
            self.blocks[i].to(self.device)
        self.on_device.add(i)

    def release(self, i: int) -> None:
        if self.offload.store == "disk":
            self._write(i)
        else:
            self.blocks[i].to("cpu")
        self.on_device.discard(i)

    def __exit__(self, *exc: object) -> None:
        for i, block in enumerate(self.blocks):
            if i in self.on_device:  # interrupted during its turn: keep what it holds
                block.to("cpu")
            elif self.offload.store == "disk":
                self._read(i, torch.device("cpu"))
        self.on_device.clear()
        self._move_outside(to_home=True)


@torch.no_grad()
def sequential_(
    model: nn.Module,
    calibration: Calibration | None,
    process: Process,
    batch_size: int = 8,
    needs_hessian: bool = True,
    progress: bool = False,
    desc: str = "blocks",
    offload: Offload | None = None,
) -> dict[str, Any]:
    """Walk the transformer blocks in order and hand every block Linear, with its Hessian, to ``process``.

    The sequential scheme of GPTQ (arXiv:2210.17323, section 4) and SparseGPT (arXiv:2301.00774,
    section 3): block i's Hessians H = 2 X^T X / N come from the outputs of blocks 0..i-1 *as
    ``process`` left them*, so a block compensates the errors of the ones before it. Within a block,
    every Hessian is taken before any Linear of the block is processed; Linears reading the same
    tensor (q/k/v, gate/up) share one H (the same tensor object). After ``process`` has run on the
    whole block, the calibration inputs go through the block again to feed the next one.

    Each block is called with the arguments the model itself gave block 0 for that batch (captured
    once): the hidden states, replaced by the previous block's outputs, and the rest as they were
    (attention mask, rotary embeddings, ...). With an ``attention_mask`` that has padding, the
    Hessians count the real tokens only (N = their number): padding rows never enter H.

    Where the work runs: without ``offload``, on the device of the model's input embeddings (the
    calibration data is moved there; the Hessians are made on each Linear's device). On the CPU,
    torch is kept single-threaded during the walk (tiny operations; see :func:`_one_thread`).

    Args:
        model: a Hugging Face causal LM or BERT-style encoder (see :data:`LAYOUTS`), in eval mode,
            on one device (or anywhere, with ``offload``).
        calibration: token ids (n_samples, T); or a dict / ``BatchEncoding`` with ``input_ids`` and
            optionally ``attention_mask`` (1 = real token, 0 = padding), ``token_type_ids``, all
            (n_samples, T); or a tuple (input_ids, attention_mask). The dict's entries are passed
            to the model by name. May be None when ``needs_hessian`` is False.
        process: called once per block Linear as ``process(name, linear, H)``, block by block, in
            module order; H is float32 (in_features, in_features), or None without ``needs_hessian``.
            It may change ``linear.weight`` in place (the next blocks then see the change).
        batch_size: calibration sequences per forward pass.
        needs_hessian: False skips every forward pass (round-to-nearest, magnitude pruning).
        progress: show a progress bar over blocks, labelled ``desc``.
        desc: the progress bar's label, also used in error messages.
        offload: None (everything stays where it is), or an :class:`Offload`: only the block being
            processed and its activations on ``offload.device``, the other blocks on the CPU or
            on disk, so that a model larger than the device is processed block by block.
            ``process`` then sees the Linear and H on that device; its results are moved to the CPU.
    Returns:
        Full module name -> what ``process`` returned for it.
    Raises:
        ValueError: no supported blocks (the message lists :data:`LAYOUTS`), no Linear in them, no
            or malformed calibration when it is needed, or an offload device this machine lacks;
            raised before ``process`` is first called.
    """
    from tqdm.auto import tqdm

    layout, blocks = model_layout(model)
    linears = block_linears(model)
    require(is_int(batch_size) and batch_size >= 1, f"batch_size must be a positive int, e.g. 8, got {batch_size!r}")
    columns = _calibration_columns(calibration, desc) if needs_hessian else {}
    if offload is not None:
        if not isinstance(offload, Offload):
            raise ValueError(f"offload must be None or a gptq.Offload(device, store, folder), got {offload!r}")
        offload.check()
    device = torch.device(offload.device) if offload is not None else _input_device(model)
    results: dict[str, Any] = {}
    store = _BlockStore(model, blocks, offload) if offload is not None else contextlib.nullcontext()
    with _one_thread_on(device), store:  # CPU: small block-sized operations, threads cost more than they give
        batches = _calibration_batches(columns, batch_size, device) if needs_hessian else []
        real_tokens = [_real_tokens(batch) for batch in batches]
        inputs = _first_block_inputs(model, blocks[0], batches, dict(layout.call)) if needs_hessian else []
        del batches
        for i, (block, group) in enumerate(tqdm(list(zip(blocks, linears)), desc=desc, disable=not progress)):
            if offload is not None:
                store.fetch(i)
            H = _block_hessians(block, group, inputs, real_tokens) if needs_hessian else dict.fromkeys(group)
            for name, m in group.items():
                results[name] = process(name, m, H[name])
            if needs_hessian:  # the next block sees this block's processed outputs
                outputs = [block(*args, **kwargs) for args, kwargs in inputs]
                inputs = [_with_hidden(a, k, o[0] if isinstance(o, tuple) else o) for (a, k), o in zip(inputs, outputs)]
            if offload is not None:
                del H
                store.release(i)
                for name in group:
                    results[name] = _move(results[name], "cpu")
    return results


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    calibration: Calibration | None,
    config: GPTQConfig,
    method: str = "gptq",
    batch_size: int = 8,
    progress: bool = False,
    offload: Offload | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every Linear inside the transformer blocks of a causal LM or a BERT-style encoder,
    block by block, in place.

    Sequential, as in the paper (see :func:`sequential_`): block i's Hessians come from the outputs
    of blocks 0..i-1 *already quantized*, so each block compensates the errors of the ones before
    it. Embeddings, the LM head and BERT's pooler stay in full precision. Weights are replaced by
    their dequantized values (use :mod:`lessons_lib.packing` to store the integer codes for real).
    The work runs on the model's device (see :func:`sequential_`).

    Example (all-MiniLM-L6-v2, calibrated on padded sentences; padding does not count)::

        model, tokenizer = data.load_minilm()
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
        gptq.quantize_model_(model, batch, gptq.GPTQConfig(bits=4, group_size=64))
        # or: gptq.quantize_model_(model, (batch["input_ids"], batch["attention_mask"]), config)
        # RTN needs no data: gptq.quantize_model_(model, None, config, method="rtn")

    Args:
        model: a Hugging Face causal LM or BERT-style encoder (see :data:`LAYOUTS`), in eval mode.
        calibration: token ids (n_samples, T), a dict / ``BatchEncoding`` (``input_ids`` and
            optionally ``attention_mask``, ``token_type_ids``), or a tuple (input_ids,
            attention_mask); see :func:`sequential_`. None (or anything) for "rtn": not read.
        config: bits, groups, act-order, ...
        method: "gptq" or "rtn" (round-to-nearest, same quantizer, no calibration needed).
        batch_size: calibration sequences per forward pass.
        progress: show a progress bar over blocks.
        offload: quantize a model larger than the GPU block by block (see :class:`Offload` and
            :func:`sequential_`); None keeps everything where it is.
    Returns:
        Module name -> :class:`QuantizedWeight`, for every quantized Linear, on its weight's
        device (on the CPU with ``offload``).
    Raises:
        ValueError: an unknown method, a group size that does not divide a Linear's width, or
            what :func:`sequential_` raises; before any weight changes.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not isinstance(config, GPTQConfig):
        raise ValueError(f"config must be a gptq.GPTQConfig, got {type(config).__name__}")
    for group in block_linears(model):  # every check before the first weight changes
        for m in group.values():
            config.check_width(m.in_features)

    def process(name: str, linear: nn.Linear, H: torch.Tensor | None) -> QuantizedWeight:
        qw = gptq(linear.weight, H, config) if method == "gptq" else rtn(linear.weight, config)
        linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))
        return qw

    return sequential_(model, calibration, process, batch_size, needs_hessian=method == "gptq",
                       progress=progress, desc=method, offload=offload)
