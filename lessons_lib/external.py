"""Thin, quiet wrappers around the maintained tools that lessons compare their from-scratch code with.

Each wrapper calls the tool's public API exactly as its documentation shows, and only adds what
a notebook needs: the same inputs as ours, and the tool's console output captured (GPTQModel
prints thousands of progress lines) and returned instead of printed.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def gptqmodel_quantize(
    model_dir: str | Path,
    calibration: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    act_order: bool = False,
    damp_ratio: float = 0.01,
    symmetric: bool = False,
    batch_size: int = 8,
) -> tuple[nn.Module, str]:
    """Quantize a Hugging Face model folder with GPTQModel (the maintained successor of AutoGPTQ).

    Args:
        model_dir: a causal-LM folder with config, weights and tokenizer.
        calibration: token ids (n_samples, T), the same set our GPTQ gets.
        bits, group_size, act_order, damp_ratio, symmetric: as :class:`lessons_lib.gptq.GPTQConfig`
            (group_size None = one group per row, GPTQModel's -1; act_order = its ``desc_act``).
        batch_size: calibration sequences per forward pass.
    Returns:
        (the quantized ``transformers`` model, reloaded from GPTQModel's saved checkpoint, in the
        dtype GPTQModel chose (bfloat16 on CPU); GPTQModel's captured console output).
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))  # needed on 2-core machines
    log = io.StringIO()
    workdir = tempfile.mkdtemp(prefix="gptqmodel-")  # it writes log files into the current folder
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), contextlib.chdir(workdir):
        from gptqmodel import GPTQModel, QuantizeConfig

        # act_group_aware (GPTQModel's own group-aware reordering, absent from the paper) is off so
        # that both implementations run the same algorithm; it also requires groups.
        config = QuantizeConfig(bits=bits, group_size=group_size or -1, desc_act=act_order,
                                damp_percent=damp_ratio, sym=symmetric, act_group_aware=False)
        model = GPTQModel.load(str(Path(model_dir).resolve()), config, device="cpu")
        rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calibration]
        model.quantize(rows, batch_size=batch_size)
        # The model left in memory after quantize() is not meant for inference (GPTQModel offloads
        # weights to disk while it works): save it and load it back, as its documentation does.
        # The plain-torch kernel accepts any group size (the CPU int4 kernel wants 32..256).
        model.save(str(Path(workdir) / "quantized"))
        model = GPTQModel.load(str(Path(workdir) / "quantized"), device="cpu", backend="torch")
    return model.model.eval(), log.getvalue()
