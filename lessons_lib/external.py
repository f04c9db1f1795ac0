"""Thin, quiet wrappers around the maintained tools that lessons compare their from-scratch code with.

Each wrapper calls the tool's public API exactly as its documentation shows, and only adds what
a notebook needs: the same inputs as ours, the tool's console output captured (GPTQModel prints
thousands of progress lines) and returned instead of printed, and the tool's steps kept apart so
that a lesson can time the step it compares (quantization) without loading, compiling or saving.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class GPTQModelJob:
    """One GPTQModel quantization between its steps: :func:`gptqmodel_load`, then
    :func:`gptqmodel_run_` (the quantization step), then :func:`gptqmodel_export`.

    Attributes:
        model: GPTQModel's model wrapper (``.model`` is the ``transformers`` model).
        workdir: a private folder; GPTQModel writes log files into the current folder.
        log: everything the tool printed so far.
    """

    model: Any
    workdir: Path
    log: io.StringIO = field(default_factory=io.StringIO)


@contextlib.contextmanager
def _captured(job: GPTQModelJob) -> Iterator[None]:
    with contextlib.redirect_stdout(job.log), contextlib.redirect_stderr(job.log), contextlib.chdir(job.workdir):
        yield


def gptqmodel_load(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int | None = 128,
    act_order: bool = False,
    damp_ratio: float = 0.01,
    symmetric: bool = False,
) -> GPTQModelJob:
    """Load a Hugging Face model folder into GPTQModel (the maintained successor of AutoGPTQ),
    configured to quantize.

    Args:
        model_dir: a causal-LM folder with config, weights and tokenizer.
        bits, group_size, act_order, damp_ratio, symmetric: as :class:`lessons_lib.gptq.GPTQConfig`
            (group_size None = one group per row, GPTQModel's -1; act_order = its ``desc_act``).
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))  # needed on 2-core machines
    job = GPTQModelJob(model=None, workdir=Path(tempfile.mkdtemp(prefix="gptqmodel-")))
    with _captured(job):
        from gptqmodel import GPTQModel, QuantizeConfig

        # act_group_aware (GPTQModel's own group-aware reordering, absent from the paper) is off so
        # that both implementations run the same algorithm; it also requires groups.
        config = QuantizeConfig(bits=bits, group_size=group_size or -1, desc_act=act_order,
                                damp_percent=damp_ratio, sym=symmetric, act_group_aware=False)
        job.model = GPTQModel.load(str(Path(model_dir).resolve()), config, device="cpu")
    return job


def gptqmodel_run_(job: GPTQModelJob, calibration: torch.Tensor, batch_size: int = 8) -> None:
    """GPTQModel's quantization step alone (its ``quantize``), in place: the step to time.

    Args:
        job: from :func:`gptqmodel_load`, not yet quantized.
        calibration: token ids (n_samples, T), the same set our GPTQ gets.
        batch_size: calibration sequences per forward pass.
    """
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calibration]
    with _captured(job):
        job.model.quantize(rows, batch_size=batch_size)


def gptqmodel_export(job: GPTQModelJob) -> nn.Module:
    """Save the quantized model and load it back, as GPTQModel's documentation does.

    The model left in memory after ``quantize`` is not meant for inference (GPTQModel offloads
    weights to disk while it works). The plain-torch kernel accepts any group size (the CPU int4
    kernel wants 32..256).

    Returns:
        The quantized ``transformers`` model in eval mode, in the dtype GPTQModel chose
        (bfloat16 on CPU).
    """
    with _captured(job):
        from gptqmodel import GPTQModel

        job.model.save(str(job.workdir / "quantized"))
        reloaded = GPTQModel.load(str(job.workdir / "quantized"), device="cpu", backend="torch")
    return reloaded.model.eval()


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
    """All three steps: load, quantize, save and reload (arguments as in the step functions).

    Returns:
        (the quantized ``transformers`` model from :func:`gptqmodel_export`; GPTQModel's captured
        console output).
    """
    job = gptqmodel_load(model_dir, bits, group_size, act_order, damp_ratio, symmetric)
    gptqmodel_run_(job, calibration, batch_size)
    return gptqmodel_export(job), job.log.getvalue()
