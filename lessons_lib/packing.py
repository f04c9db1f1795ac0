"""Real low-bit storage: integer codes packed into bytes, and a Linear that unpacks on the fly.

``bits``-bit codes are packed as a little-endian bit stream along each row: 4-bit codes two per
byte (low nibble first), 3-bit codes eight per three bytes, 2-bit codes four per byte. Each group
of ``group_size`` inputs of each output row keeps a float16 scale and a ``bits``-bit zero point;
a group's zero points (one per output row) are packed the same way, along the outputs. That is the
storage cost of the GPTQ checkpoint formats (AutoGPTQ / GPTQModel: ``qweight`` and ``qzeros``
packed at ``bits`` into int32 words, ``scales`` in FP16), minus their ``g_idx`` (one int32 per
input column, which our contiguous groups do not need). A model saved with :func:`save_packed`
takes on disk what it takes in memory: the size you measure is the real one.

Example: a 4096 -> 4096 layer at 4 bits with groups of 128 stores 4096 * 4096 / 2 bytes of codes,
4096 * 32 * 2 bytes of scales and 32 * 4096 / 2 bytes of zero points (8.4 MB + 262 kB + 65.5 kB).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lessons_lib import gptq

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (rows, cols) in [0, 2^bits) into uint8 (rows, ceil(cols * bits / 8)).

    >>> pack_bits(torch.tensor([[1, 2, 15]], dtype=torch.uint8), 4).tolist()  # 0x21, 0x0F
    [[33, 15]]
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, cols), got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    rows, cols = codes.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)  # (rows, cols*bits)
    n_bytes = math.ceil(cols * bits / 8)
    stream = F.pad(stream, (0, n_bytes * 8 - cols * bits)).reshape(rows, n_bytes, 8)  # (rows, n_bytes, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (rows, n_bytes) -> codes uint8 (rows, cols)."""
    rows = packed.shape[0]
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(rows, -1)
    stream = stream[:, : cols * bits].reshape(rows, cols, bits)  # (rows, cols, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1).to(torch.uint8)


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored as packed ``bits``-bit codes with group scales.

    Buffers: ``qweight`` uint8 (out, ceil(in * bits / 8)), the codes packed along each row;
    ``scale`` float16 (out, n_groups); ``qzeros`` uint8 (n_groups, ceil(out * bits / 8)), the zero
    points packed at ``bits`` along the outputs (as GPTQ's ``qzeros``); optional ``bias`` float32
    (out,). The forward pass unpacks and dequantizes the whole weight, then multiplies: simple and
    exact, but not fast (fast kernels fuse the unpacking into the matmul; see the lesson's GPU section).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool) -> None:
        super().__init__()
        if bits not in gptq.BITS or isinstance(bits, bool):
            raise ValueError(f"bits must be one of {gptq.BITS}, got {bits!r}")
        gptq.check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        n_groups = in_features // group_size if group_size else 1
        self.register_buffer("qweight", torch.zeros(out_features, math.ceil(in_features * bits / 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(n_groups, math.ceil(out_features * bits / 8), dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, qw: gptq.QuantizedWeight) -> "PackedLinear":
        layer = cls(linear.in_features, linear.out_features, qw.bits, qw.group_size, linear.bias is not None)
        layer.qweight.copy_(pack_bits(qw.qweight, qw.bits))
        layer.scale.copy_(qw.scale.to(torch.float16))
        layer.qzeros.copy_(pack_bits(qw.zero_point.T.contiguous(), qw.bits))  # (n_groups, out) packed along out
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def zero_points(self) -> torch.Tensor:
        """The unpacked zero points, uint8 (out, n_groups)."""
        return unpack_bits(self.qzeros, self.bits, self.out_features).T  # (out, n_groups)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float32 (out, in)."""
        codes = unpack_bits(self.qweight, self.bits, self.in_features)  # (out, in)
        return gptq.dequantize_codes(codes, self.scale, self.zero_points(), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class PackedEmbedding(nn.Module):
    """An embedding table stored like :class:`PackedLinear` (row i = token i's vector, packed codes
    with per-row scales and zero points), dequantizing only the rows a batch looks up.

    Built by :func:`pack_tied_embeddings_` on the *same* buffers as the output head: a model whose
    input embeddings and output head are tied keeps one quantized table, stored once.
    """

    def __init__(self, head: PackedLinear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.bits, self.group_size = head.bits, head.group_size
        self.qweight, self.scale, self.qzeros = head.qweight, head.scale, head.qzeros  # shared, not copied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack_bits(self.qweight[flat], self.bits, self.embedding_dim)  # (n, dim)
        zeros = unpack_bits(self.qzeros, self.bits, self.num_embeddings).T[flat]  # (n, n_groups)
        rows = gptq.dequantize_codes(codes, self.scale[flat], zeros, self.group_size)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, tied to the output head"


def pack_tied_embeddings_(model: nn.Module, bits: int = 8, group_size: int | None = None) -> gptq.QuantizedWeight:
    """Round a Hugging Face model's tied embedding table to ``bits`` (per row, min-max: the table
    is read by index as well as multiplied, so GPTQ's Hessian does not apply to it) and store it
    once, packed, for both the input embeddings and the output head. In a small LM this table is
    a large share of the bytes, the more so once the decoder layers are quantized (lesson 09
    measures it). Returns the quantized table.

    Raises:
        ValueError: the model's input embeddings and output head are not the same tensor.
    """
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not (isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight):
        raise ValueError("pack_tied_embeddings_ needs a model whose input embeddings (nn.Embedding) and output head "
                         "(nn.Linear) share one weight (config.tie_word_embeddings=True); quantize an untied head "
                         "with pack_model_ instead")
    qw = gptq.rtn(head.weight.detach().float(), gptq.GPTQConfig(bits=bits, group_size=group_size))
    packed_head = PackedLinear.from_quantized(head, qw)
    model.set_output_embeddings(packed_head)
    model.set_input_embeddings(PackedEmbedding(packed_head))
    return qw


def pack_model_(model: nn.Module, quantized: dict[str, gptq.QuantizedWeight]) -> nn.Module:
    """Replace each named Linear by a :class:`PackedLinear` holding its quantized weight."""
    for name, qw in quantized.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        model.set_submodule(name, PackedLinear.from_quantized(linear, qw))
    return model


def save_packed(model: nn.Module, folder: str | Path) -> Path:
    """Save a packed Hugging Face model: its config, ``quantization.json`` and the tensors."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    packed = {n: {"in": m.in_features, "out": m.out_features, "bits": m.bits, "group_size": m.group_size,
                  "bias": m.bias is not None} for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    spec = {"format": "lessons_lib.packing", "modules": packed}
    if isinstance(model.get_input_embeddings(), PackedEmbedding):
        spec["tied_embeddings"] = True  # the input embeddings share the packed output head's buffers
    (folder / QUANT_FILE).write_text(json.dumps(spec, indent=1))
    save_model(model, str(folder / WEIGHTS_FILE))  # tied weights are stored once
    return folder


def load_packed(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_packed` (architecture from its config), in eval mode."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    saved = json.loads((folder / QUANT_FILE).read_text())
    for name, s in saved["modules"].items():
        model.set_submodule(name, PackedLinear(s["in"], s["out"], s["bits"], s["group_size"], s["bias"]))
    if saved.get("tied_embeddings"):
        model.set_input_embeddings(PackedEmbedding(model.get_output_embeddings()))
    load_model(model, str(folder / WEIGHTS_FILE))
    return model.eval()


# ----------------------------------------------------------------------------- fused int4 kernels
def tinygemm_weight(qw: gptq.QuantizedWeight, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a 4-bit :class:`gptq.QuantizedWeight` to the layout of PyTorch's int4 "tinygemm"
    kernel (``torch._weight_int4pack_mm``), which unpacks inside the matmul.

    tinygemm computes w = (q - 8) * scale + zero_float per group, so our integer zero point z maps
    to zero_float = scale * (8 - z). On CUDA the kernel takes codes packed two per byte (even
    column in the high nibble) and needs an input width that is a multiple of 1024 / inner tiles;
    on CPU it takes the unpacked int32 codes.

    Returns:
        (packed weight, scales_and_zeros bfloat16 (n_groups, out, 2)) on ``device``.
    """
    if qw.bits != 4 or qw.group_size is None:
        raise ValueError(f"tinygemm needs 4-bit weights with groups (e.g. group_size=128), got bits={qw.bits}, group_size={qw.group_size}")
    device = torch.device(device)
    scale = qw.scale.float()  # (out, n_groups)
    zero_float = scale * (8 - qw.zero_point.float())  # (out, n_groups)
    scales_and_zeros = torch.stack([scale, zero_float], dim=-1).transpose(0, 1).contiguous()  # (n_groups, out, 2)
    codes = qw.qweight.to(torch.int32)  # (out, in)
    if device.type == "cuda":
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)  # (out, in / 2)
        packed = torch._convert_weight_to_int4pack(nibbles, 8)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 8)
    return packed, scales_and_zeros.to(device=device, dtype=torch.bfloat16)


def tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x W^T with W in tinygemm layout; x (m, in) bfloat16 -> y (m, out) bfloat16."""
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
