"""Architectures and build recipes of the teacher zoo (trained by :mod:`lessons_lib.zoo`).

- ``vision``: a small CNN for 28x28 digits, written so that eager-mode quantization works on it
  unchanged: Conv-BatchNorm-ReLU triples are separate modules at fusable names
  (``torch.ao.quantization.fuse_modules(model, SmallCNN.FUSE_GROUPS)``), ReLUs are modules,
  and wrapping it in ``torch.ao.quantization.QuantWrapper`` adds the quant/dequant stubs.
- ``lm``: a 12-layer Llama (Touvron et al., "LLaMA", arXiv:2302.13971) causal LM, tiny in width.
- ``moe``: a Mixtral (Jiang et al., "Mixtral of Experts", arXiv:2401.04088) sparse-MoE causal LM,
  8 experts, top-2 routing (Shazeer et al., arXiv:1701.06538), trained without the load-balancing
  loss of Switch Transformers (Fedus et al., arXiv:2101.03961) so expert usage stays uneven.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ARCHS = ("llama", "mixtral")


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU-MaxPool blocks, then a two-layer MLP head: the vision teacher's
    architecture, and, narrower, its students' (:func:`lessons_lib.distill.vision_student`).

    Args:
        channels: output channels of the three conv blocks.
        hidden: width of the hidden Linear layer of the head.
        num_classes: number of logits.
        in_channels: input channels (1 for grey digits).
    Shapes: input (B, in_channels, 28, 28) -> logits (B, num_classes). Each block halves the
    spatial size (28 -> 14 -> 7 -> 3).
    """

    FUSE_GROUPS = [["features.0", "features.1", "features.2"],
                   ["features.4", "features.5", "features.6"],
                   ["features.8", "features.9", "features.10"],
                   ["classifier.1", "classifier.2"]]

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64), hidden: int = 128,
                 num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must list 3 conv widths (FUSE_GROUPS assumes 3 blocks), got {channels}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 3 * 3, hidden), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))  # (B, 1, 28, 28) -> (B, C, 3, 3) -> (B, num_classes)


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """Architecture and training recipe of the vision teacher (AdamW, warm-up + cosine LR,
    early stopping).

    ``steps`` counts optimiser steps; the validation accuracy is checked every ``eval_every``
    steps and the best weights are kept; training stops after ``patience`` checks without gain.
    Augmentation: random affine (shift up to ``max_shift`` px, rotation up to ``max_rotate`` deg).
    """

    channels: tuple[int, ...] = (32, 64, 64)
    hidden: int = 128
    steps: int = 2200
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    max_shift: float = 2.0
    max_rotate: float = 10.0
    eval_every: int = 55
    patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, ("hidden", "steps", "batch_size", "lr", "eval_every", "patience"))
        if len(self.channels) != 3 or min(self.channels) <= 0:
            raise ValueError(f"channels must be 3 positive widths, e.g. (32, 64, 64); got {self.channels}")
        if self.max_shift < 0 or self.max_rotate < 0 or self.warmup < 0:
            raise ValueError("max_shift, max_rotate and warmup must be >= 0 (0 turns each off)")

    def model_kwargs(self) -> dict:
        return {"channels": list(self.channels), "hidden": self.hidden, "num_classes": 10, "in_channels": 1}


@dataclass(frozen=True)
class CausalLMConfig:
    """Architecture and training recipe of a Hugging Face causal-LM teacher.

    Training: random ``context``-token windows of the train split, AdamW, linear warm-up then
    cosine decay to 10% of ``lr``. For ``arch="mixtral"``, ``experts`` experts with ``top_k``
    routing; ``router_aux_loss_coef`` = 0 trains without the load-balancing loss. The three MoE
    fields are ignored for ``arch="llama"``.
    """

    arch: str = "llama"
    layers: int = 12
    hidden: int = 128
    intermediate: int = 448
    heads: int = 4
    context: int = 128
    vocab_size: int = 4096
    experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.0
    steps: int = 800
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        _check_positive(self, ("layers", "hidden", "intermediate", "heads", "context", "vocab_size",
                               "steps", "batch_size", "lr"))
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.arch == "mixtral" and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"need 1 <= top_k <= experts, got top_k={self.top_k}, experts={self.experts}")
        if self.warmup < 0 or self.router_aux_loss_coef < 0:
            raise ValueError("warmup and router_aux_loss_coef must be >= 0")

    def hf_config(self, eot_id: int = 0):
        """The ``LlamaConfig`` or ``MixtralConfig`` (tied embeddings, EOT as bos/eos/pad)."""
        from transformers import LlamaConfig, MixtralConfig

        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.heads, max_position_embeddings=self.context,
                      tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
                      pad_token_id=eot_id)
        if self.arch == "llama":
            return LlamaConfig(**common)
        return MixtralConfig(num_local_experts=self.experts, num_experts_per_tok=self.top_k,
                             router_aux_loss_coef=self.router_aux_loss_coef, **common)


def build_causal_lm(cfg: CausalLMConfig, eot_id: int = 0) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` / ``MixtralForCausalLM`` (seed it first)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    cls = LlamaForCausalLM if cfg.arch == "llama" else MixtralForCausalLM
    return cls(cfg.hf_config(eot_id))


VISION = VisionConfig()
LM = CausalLMConfig()
MOE = CausalLMConfig(arch="mixtral", layers=4, intermediate=160, experts=8, top_k=2, steps=1000)
