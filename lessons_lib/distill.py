"""Knowledge distillation: a small student learns from a trained teacher's soft labels.

- Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531: the
  student matches the teacher's softened distribution softmax(z / T); the soft term is multiplied
  by T^2 so that its gradients keep their size when T changes (section 2 of the paper).
- Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv:1412.6550: a teacher layer (the
  "hint") guides a student layer through a learned regressor when their widths differ.
- Sanh et al., "DistilBERT", arXiv:1910.01108: a student with every other layer of BERT,
  initialised from those teacher layers, keeps 97% of its quality with 60% of its parameters.

Phases: build a student (:func:`vision_student`, :func:`lm_student`), wrap it with its teacher in
a :class:`Distiller` (the objective), then :func:`train` it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import evaluate, training
from lessons_lib.checks import is_int, is_number, require
from lessons_lib.teachers import SmallCNN

INITS = ("copy", "random")
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")  # "model.layers.3.mlp..." -> 3


def _check_objective(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1 = the plain softmax, 2-8 is typical), got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (1 = labels only, 0 = teacher only), got {alpha!r}")


@dataclass(frozen=True)
class DistillConfig:
    """The objective and the training recipe of one run (AdamW, warm-up, cosine decay to 10%).

    temperature: T > 0 softens both distributions. alpha in [0, 1] weighs the hard-label CE and
    1 - alpha the soft term (1: the student alone; 0: no labels needed). feature_weight >= 0 weighs
    the hint losses. ignore_index marks label positions without a target (no CE, no KL there).
    """

    temperature: float = 2.0
    alpha: float = 0.5
    feature_weight: float = 0.0
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float | None = 1.0  # None: no clipping
    ignore_index: int = -100

    def __post_init__(self) -> None:



        require(is_number(self.temperature), f"temperature must be a number > 0, e.g. 2.0, got {self.temperature!r}")
        require(is_number(self.alpha), f"alpha must be a number in [0, 1], e.g. 0.5, got {self.alpha!r}")
        _check_objective(self.temperature, self.alpha)
        require(is_number(self.feature_weight) and self.feature_weight >= 0,
              f"feature_weight must be a number >= 0 (0 = no hint losses), e.g. 1.0, got {self.feature_weight!r}")
        require(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, e.g. 200, got {self.steps!r}")
        require(is_number(self.lr) and self.lr > 0, f"lr must be a number > 0, e.g. 1e-3, got {self.lr!r}")
        require(is_number(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay must be a number >= 0 (0 = none), e.g. 0.01, got {self.weight_decay!r}")
        require(is_int(self.warmup) and 0 <= self.warmup, f"warmup must be an int >= 0 (steps; 0 = none), e.g. 20, got {self.warmup!r}")
        require(self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
              f"grad_clip must be a number > 0 or None (no clipping), e.g. 1.0, got {self.grad_clip!r}")
        require(is_int(self.ignore_index), f"ignore_index must be an int (label value without a target), e.g. -100, got {self.ignore_index!r}")


# ----------------------------------------------------------------------------- losses
def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over rows.

    On these 2-D (N, C) inputs this is ``nn.KLDivLoss(reduction="batchmean")``, which sums and
    divides by the first dimension only. On a language model's raw (B, T, V) logits ``batchmean``
    would divide by B alone, i.e. return T (sequence length) times the per-token KL: flatten to
    (B*T, V) first, as :func:`kd_loss` does. The default ``reduction="mean"`` divides by every
    element, rows and classes, which makes the soft term C (or V) times too small.

    Args: student_logits, teacher_logits (N, C); temperature T > 0. Returns: a scalar tensor.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, C)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, C)
    return temperature**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            temperature: float = 2.0, alpha: float = 0.5, mask: torch.Tensor | None = None,
            ignore_index: int = -100) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T).

    Hinton et al. (arXiv:1503.02531), section 2. Every position (an image, or a token of a
    sequence) counts once: (B, T, V) logits are flattened to (B*T, V) rows, and both terms average
    over the rows kept, i.e. those with ``labels != ignore_index`` and ``mask`` true.

    Args:
        student_logits: (B, C) or (B, T, V).
        teacher_logits: same shape; may be None only when alpha = 1.
        labels: (B,) or (B, T) class ids; may be None only when alpha = 0.
        temperature: T > 0.
        alpha: weight of the hard-label term, in [0, 1].
        mask: optional bool (B,) or (B, T): positions to keep.
        ignore_index: label value of positions to skip.
    Returns: a scalar tensor.
    Example (teacher 3:1 on two classes, student undecided, so KL = 0.75 ln 1.5 + 0.25 ln 0.5):
        >>> round(float(kd_loss(torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]]), alpha=0.0, temperature=1.0)), 4)
        0.1308
    """
    _check_objective(temperature, alpha)
    C = student_logits.size(-1)
    s = student_logits.reshape(-1, C)  # (N, C), N = B or B*T
    if labels is None and alpha > 0:
        raise ValueError(f"labels=None needs alpha=0 (teacher only), got alpha={alpha}")
    if teacher_logits is None and alpha < 1:
        raise ValueError(f"teacher_logits=None needs alpha=1 (labels only), got alpha={alpha}")
    if teacher_logits is not None and teacher_logits.size(-1) != C:
        raise ValueError(f"student and teacher must share the vocabulary/classes: got {C} and "
                         f"{teacher_logits.size(-1)} logits; distil between models with the same tokenizer")
    for name, other in (("teacher_logits", teacher_logits), ("labels", labels), ("mask", mask)):
        if other is not None and other.numel() != s.numel() // (C if name != "teacher_logits" else 1):
            raise ValueError(f"{name} {tuple(other.shape)} does not match logits {tuple(student_logits.shape)}")
    keep = torch.ones(len(s), dtype=torch.bool, device=s.device)  # (N,)
    if labels is not None:
        y = labels.reshape(-1).to(s.device)  # (N,)
        keep &= y != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1).to(device=s.device, dtype=torch.bool)
    if not keep.any():
        raise ValueError("every position is masked or ignored: nothing to learn from")
    loss = s.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(s[keep].float(), y[keep])
    if alpha < 1:
        t = teacher_logits.reshape(-1, C).to(s.device)  # (N, C)
        loss = loss + (1 - alpha) * soft_loss(s[keep], t[keep], temperature)
    return loss


class FeatureHint(nn.Module):
    """Hint loss of FitNets (Romero et al., arXiv:1412.6550) between two named layers' outputs.

    Args: student_module, teacher_module: names in ``named_modules()``; student_dim, teacher_dim:
    their channel widths; channel_dim: 1 for conv maps (B, C, H, W), -1 for (B, T, D).
    ``proj`` (FitNets' learned regressor, linear over channels) maps student to teacher width; the
    identity when they agree. Loss: mean (proj(s) - t)^2 / mean t^2, a scalar free of the layer's scale.
    """

    def __init__(self, student_module: str, teacher_module: str, student_dim: int, teacher_dim: int,
                 channel_dim: int = -1) -> None:
        super().__init__()
        self.student_module, self.teacher_module = student_module, teacher_module
        self.student_dim, self.teacher_dim, self.channel_dim = student_dim, teacher_dim, channel_dim
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        s = student_features.movedim(self.channel_dim, -1)  # (..., C_s)
        t = teacher_features.movedim(self.channel_dim, -1).float()  # (..., C_t)
        if s.shape[-1] != self.student_dim or t.shape[-1] != self.teacher_dim or s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"hint {self.student_module}->{self.teacher_module} expects widths "
                             f"{self.student_dim}->{self.teacher_dim}, got {tuple(s.shape)} and {tuple(t.shape)}")
        return F.mse_loss(self.proj(s.float()), t) / t.pow(2).mean().clamp_min(1e-12)


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during the forward passes inside the block."""
    modules, found = dict(model.named_modules()), {}
    if missing := [n for n in names if n not in modules]:
        raise ValueError(f"no module named {missing} in {type(model).__name__}; e.g. {list(modules)[1:6]}")
    hook = lambda name: lambda m, i, out: found.__setitem__(name, out[0] if isinstance(out, tuple) else out)  # noqa: E731
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class Distiller(nn.Module):
    """The objective of one run: ``distiller(batch) -> (loss, parts)`` (parts: floats to log).

    A batch is ``(x, labels)``, or ``(x, labels, teacher_logits)`` with the teacher's logits
    computed once beforehand ("offline" distillation: valid when inputs are not augmented; saves
    the teacher's forward pass, which for a small student costs more than its own training step).
    Args: student maps x (B, ...) to logits (B, C) or (B, T, V) (or an object with ``.logits``);
    teacher the same, or None (then alpha = 1 or precomputed logits, and no hints); config gives
    temperature, alpha and feature_weight (> 0 exactly when there are hints).
    Parameters: the student's and the hints' projections. The teacher is kept outside the module
    tree (never trained, never saved), in eval mode, and runs under ``torch.no_grad``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, config: DistillConfig = DistillConfig(),
                 hints: Sequence[FeatureHint] = ()) -> None:
        super().__init__()
        if teacher is None and hints:
            raise ValueError("hints need a teacher to read features from; pass teacher=...")
        if bool(hints) != (config.feature_weight > 0):
            raise ValueError(f"hints and feature_weight > 0 go together; got {len(hints)} hints, "
                             f"feature_weight={config.feature_weight}")
        self.student, self.hints, self.config = student, nn.ModuleList(hints), config
        self._teacher = (teacher.eval(),) if teacher is not None else (None,)  # a tuple: not a submodule

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.student.parameters()).device
        x, labels, *cached = (t.to(device) for t in batch)
        cfg = self.config
        if cfg.alpha < 1 and self.teacher is None and not cached:
            raise ValueError("alpha < 1 needs a teacher or batches (x, labels, teacher_logits); use alpha=1 to train alone")
        with _capture(self.student, [h.student_module for h in self.hints]) as s_feats:
            s_logits = evaluate.logits(self.student(x))
        t_logits, t_feats = (cached[0] if cached else None), {}
        if self.teacher is not None and (self.hints or (cfg.alpha < 1 and not cached)):
            with torch.no_grad(), _capture(self.teacher, [h.teacher_module for h in self.hints]) as t_feats:
                live = evaluate.logits(self.teacher(x))
            t_logits = live if t_logits is None else t_logits
        loss = kd_loss(s_logits, t_logits, labels, cfg.temperature, cfg.alpha, ignore_index=cfg.ignore_index)
        parts = {"task": loss.item()}
        if self.hints:
            hint = sum(h(s_feats[h.student_module], t_feats[h.teacher_module]) for h in self.hints) / len(self.hints)
            loss = loss + cfg.feature_weight * hint
            parts["feature"] = hint.item()
        parts["loss"] = loss.item()
        return loss, parts


# ----------------------------------------------------------------------------- training
def train(objective: Callable, batches: Iterable, config: DistillConfig,
          params: Iterable[nn.Parameter] | None = None, progress: bool = False, desc: str = "distill") -> dict[str, list[float]]:
    """Minimise ``objective(batch)[0]`` for ``config.steps`` AdamW steps (tqdm bar if ``progress``).

    Args: objective: a :class:`Distiller` or any callable ``batch -> (loss, parts)``; batches: at
    least ``config.steps`` of them; config: lr, weight_decay, linear warm-up then cosine decay to
    10%, grad_clip; params: what to optimise (default ``objective.parameters()``).
    Returns: history, each logged part (``loss``, ``task``, ``feature``...) and ``lr`` -> one float per step.
    """
    params = list(objective.parameters() if params is None else params)
    was_training = getattr(objective, "training", None)
    if isinstance(objective, nn.Module):
        objective.train()
    history = training.run(objective, batches, config.steps,
                           lambda step: training.warmup_cosine(step, config.steps, config.warmup, config.lr), params,
                           optimizer="adamw", weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                           progress=progress, desc=desc)
    if isinstance(objective, nn.Module):
        objective.train(bool(was_training))
    return history


# ----------------------------------------------------------------------------- students
def vision_student(teacher: SmallCNN, width: float = 0.5) -> SmallCNN:
    """A fresh :class:`SmallCNN` with every width scaled by ``width`` in (0, 1]. Parameters
    scale ~ width^2: 0.5 gives about a quarter of the teacher's, 0.7 about half."""
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1] (a student no wider than its teacher), got {width!r}")
    convs = [m for m in teacher.features if isinstance(m, nn.Conv2d)]
    hidden, head = teacher.classifier[1], teacher.classifier[-1]
    narrow = lambda c: max(1, round(c * width))  # noqa: E731
    return SmallCNN(channels=tuple(narrow(m.out_channels) for m in convs), hidden=narrow(hidden.out_features),
                         num_classes=head.out_features, in_channels=convs[0].in_channels)


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers a student copies: evenly spaced, first and last kept (12 -> 6: 0 2 4 7 9 11,
    DistilBERT's choice of one layer out of two, arXiv:1910.01108 section 3)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"layer-copy initialisation needs 1 <= student layers <= teacher layers "
                         f"({teacher_layers}), got {student_layers}; use init='random' for a deeper student")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [math.floor(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


def copy_layers_(student: nn.Module, teacher: nn.Module, layer_ids: Sequence[int] | None = None) -> list[int]:
    """Initialise ``student`` in place: its layer i <- teacher layer ``layer_ids[i]`` (default
    :func:`layer_map`); every other tensor (embeddings, final norm, head) copied as is. For Hugging
    Face models of one family and width with layers named ``layers.N``/``layer.N``/``h.N``.
    Returns the layer ids used."""
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    ids = layer_map(n_t, n_s) if layer_ids is None else list(layer_ids)
    if len(ids) != n_s or not all(0 <= i < n_t for i in ids):
        raise ValueError(f"layer_ids must give one teacher layer in 0..{n_t - 1} per student layer ({n_s}), got {ids}")
    if getattr(student.config, "vocab_size", None) != getattr(teacher.config, "vocab_size", None):
        raise ValueError(f"vocabularies differ: student {student.config.vocab_size}, teacher {teacher.config.vocab_size}")
    source = teacher.state_dict()
    new = {}
    for key, value in student.state_dict().items():
        m = _LAYER_KEY.search(key)
        src = key if m is None else key[: m.start(1)] + str(ids[int(m.group(1))]) + key[m.end(1) :]
        if src not in source or source[src].shape != value.shape:
            raise ValueError(f"cannot copy {src} into {key}: missing or another shape (copying needs equal widths)")
        new[key] = source[src]
    student.load_state_dict(new)
    return ids


def lm_student(teacher: nn.Module, num_layers: int, hidden_size: int | None = None, init: str = "copy") -> nn.Module:
    """A smaller model of the teacher's class (e.g. ``LlamaForCausalLM``, ``BertModel``) from its config.

    Args: num_layers: the student's depth; hidden_size: its width (default the teacher's; the MLP
    narrows in proportion); init: "copy" (every other teacher layer, :func:`copy_layers_`, needs
    the teacher's width) or "random" (seed torch first). Returns: the student, in train mode.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    config = copy.deepcopy(teacher.config)
    if init == "copy":
        layer_map(config.num_hidden_layers, num_layers)  # validates the depth
    config.num_hidden_layers = num_layers
    if hidden_size is not None and hidden_size != config.hidden_size:
        if init == "copy" or hidden_size % config.num_attention_heads:
            raise ValueError(f"a narrower student needs init='random' and hidden_size divisible by "
                             f"{config.num_attention_heads} heads, got {hidden_size}, init={init!r}")
        config.intermediate_size = round(config.intermediate_size * hidden_size / config.hidden_size)
        config.hidden_size = hidden_size
        if getattr(config, "head_dim", None):
            config.head_dim = hidden_size // config.num_attention_heads
    student = type(teacher)(config)
    if init == "copy":
        copy_layers_(student, teacher)
    return student.train()
