"""One training loop on any number of processes: launch lesson 05's LM distillation or lesson 04's
LM QAT fine-tune data-parallel, with :func:`lessons_lib.training.run` under Hugging Face Accelerate.

    python -m lessons_lib.scale distill --processes 2            # CPU: 2 processes over gloo
    python -m lessons_lib.scale qat --processes 2 --steps 10
    python -m lessons_lib.scale distill --processes 8 --config configs/accelerate/ddp.yaml   # 8 GPUs
    python -m lessons_lib.scale distill --processes 8 --config configs/accelerate/fsdp.yaml

Without ``--config`` the launcher is ``torchrun`` (``python -m torch.distributed.run --standalone``):
on the CPU every process gets an ``Accelerator(cpu=True)`` and they talk over gloo; on GPUs
(``--device cuda``, or ``auto`` where one is visible) over NCCL. With ``--config`` (an Accelerate
config file, e.g. those in ``configs/accelerate/``) the launcher is ``accelerate launch`` and the
config chooses DDP or FSDP, mixed precision, ... Every process builds the same model from the same
seed and draws the same *global* batches; :func:`lessons_lib.training.run` gives each process its
own rows of every batch and averages the gradients, which is the single-process optimisation
(data parallelism with averaged gradients: Goyal et al., "Accurate, Large Minibatch SGD",
arXiv:1706.02677, section 2; PyTorch's DDP notes; Accelerate's "Add Accelerate to your code").
The main process alone writes ``weights.safetensors`` and ``summary.json`` into ``--out``.

What is trained (small defaults: a 2-process CPU run takes well under a minute):

- ``distill``: lesson 05's "every other layer, KD" student: 6 of the zoo LM's 12 layers
  (:func:`lessons_lib.distill.lm_student`, init "copy"), teacher-only KD (alpha 0) at temperature
  2, AdamW with warm-up then cosine decay, gradient clipping at 1 (:func:`distill.train`'s recipe).
- ``qat``: lesson 04's LM QAT: the zoo LM with weight-only fake quantization of its decoder layers
  (:func:`lessons_lib.qat.prepare_`, ``bits``), AdamW with warm-up then step decay
  (:func:`qat.fine_tune`'s recipe). Weight-only, so no activation ranges are tracked per process.

Every argument, and what the machine can run, is checked before any process starts (bad values
raise ``ValueError`` naming the option and what it accepts). The API: :class:`ScaleConfig` (what
to train), :class:`LaunchConfig` (how to launch), :func:`plan`, :func:`launch`, :func:`train` (the
body of each process; without an accelerator it is the lessons' own single-process code path) and
:func:`load_weights`. Each launch's ``summary.json`` also holds the main process's step times
(``step_seconds``) and, with several processes, the time of one all-reduce of the trained
parameters' gradient (``allreduce_seconds``). For lesson 10: :func:`samples_per_second`,
:func:`max_relative_difference`, :func:`training_step` (one step timed in this process),
:func:`scaling_estimate` (its explorer), and :func:`qat_sliced` with :func:`quantized_codes`
(why data-parallel QAT drifts further from the one-process run than float training does).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lessons_lib.checks import is_int, is_number, require

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

TASKS = ("distill", "qat")
DEVICES = ("auto", "cpu", "cuda")
QAT_BITS = (2, 3, 4, 8)
# distributed_type values an Accelerate config may hold here: DDP or FSDP on the GPUs of one node.
CONFIG_TYPES = ("MULTI_GPU", "FSDP")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
WEIGHTS_FILE, SUMMARY_FILE, PLAN_FILE = "weights.safetensors", "summary.json", "plan.json"
WORKER_FLAG = "--worker"  # the hidden entry point of each launched process
# Each task's defaults that differ between tasks: lesson 05 trains its copied student at 1e-3,
# lesson 04 fine-tunes the LM with QAT at 1e-4.
DEFAULT_LR = {"distill": 1e-3, "qat": 1e-4}


@dataclass(frozen=True)
class ScaleConfig:
    """What each process trains; the same on every process. Invalid values raise ``ValueError``.

    Args:
        task: "distill" (lesson 05's LM student) or "qat" (lesson 04's LM QAT).
        steps: optimiser steps.
        batch_size: windows per *global* batch, split evenly over the processes.
        block: tokens per window (at most the zoo LM's context, 128).
        lr: peak learning rate; None = the lesson's (distill 1e-3, qat 1e-4).
        seed: seeds the initial weights and the batches (the same on every process).
        student_layers: distill: the student's depth (the teacher has 12).
        temperature: distill: the KD temperature (alpha is 0: the teacher's soft labels only).
        bits: qat: weight bits, one of 2, 3, 4, 8.
        threads: torch CPU threads per launched process (set by the launch, not by :func:`train`).
    """

    task: str = "distill"
    steps: int = 20
    batch_size: int = 8
    block: int = 64
    lr: float | None = None
    seed: int = 0
    student_layers: int = 6
    temperature: float = 2.0
    bits: int = 4
    threads: int = 1

    def __post_init__(self) -> None:
        require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        require(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, e.g. 20, got {self.steps!r}")
        require(is_int(self.batch_size) and self.batch_size >= 1,
                f"batch_size must be an int >= 1 (windows per global batch), e.g. 8, got {self.batch_size!r}")
        require(is_int(self.block) and 2 <= self.block <= 128,
                f"block must be an int in [2, 128] (tokens per window; the zoo LM's context is 128), got {self.block!r}")
        require(self.lr is None or (is_number(self.lr) and self.lr > 0),
                f"lr must be a number > 0 or None (the lesson's: {DEFAULT_LR}), got {self.lr!r}")
        require(is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        require(is_int(self.student_layers) and 1 <= self.student_layers <= 12,
                f"student_layers must be an int in [1, 12] (layers copied from the 12-layer teacher), got {self.student_layers!r}")
        require(is_number(self.temperature) and self.temperature > 0,
                f"temperature must be a number > 0, e.g. 2.0, got {self.temperature!r}")
        require(is_int(self.bits) and self.bits in QAT_BITS, f"bits must be one of {QAT_BITS}, got {self.bits!r}")
        require(is_int(self.threads) and self.threads >= 1, f"threads must be an int >= 1 (per process), got {self.threads!r}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.task] if self.lr is None else float(self.lr)


@dataclass(frozen=True)
class LaunchConfig:
    """How to launch: ``processes`` (an int >= 1), ``device`` ("auto", "cpu" or "cuda") and
    ``config_file`` (an Accelerate config for GPUs, or None for ``torchrun``). What the machine
    can run is checked by :func:`plan`, not here. Invalid values raise ``ValueError``."""

    processes: int = 2
    device: str = "auto"
    config_file: Path | None = None

    def __post_init__(self) -> None:
        require(is_int(self.processes) and self.processes >= 1,
                f"--processes must be an int >= 1, got {self.processes!r}")
        require(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        require(self.config_file is None or isinstance(self.config_file, (str, Path)),
                f"--config must be a path to an Accelerate config file or None, got {self.config_file!r}")


@dataclass(frozen=True)
class Plan:
    """A checked launch: the resolved device, the launcher and its command line."""

    device: str
    launcher: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks
def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def read_accelerate_config(path: str | Path, device: str) -> dict:
    """Read an Accelerate config file (YAML or JSON) and check it fits this launcher and machine.

    Args:
        path: the file.
        device: the resolved device, "cpu" or "cuda".
    Returns:
        The config as a dict.
    Raises:
        ValueError naming ``--config``: a missing or unreadable file, a ``distributed_type``
        outside :data:`CONFIG_TYPES` (GPU DDP, FSDP), more than one machine, or any config on the
        CPU (an FSDP config above all: on the CPU the launcher is torchrun, with no config).
    """
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ValueError(f"--config: no such file {str(path)!r}; pass an Accelerate config file, e.g. one of "
                         f"{[str(CONFIG_DIR / n) for n in shipped]}, or leave --config out (torchrun)")
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {path} is not valid YAML/JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config: {path} must hold a mapping of Accelerate settings (e.g. distributed_type: MULTI_GPU)")
    kind = str(config.get("distributed_type"))
    if kind not in CONFIG_TYPES:
        raise ValueError(f"--config: distributed_type {kind!r} in {path} is not supported here; accepted: {CONFIG_TYPES}")
    if str(config.get("num_machines", 1)) != "1":
        raise ValueError(f"--config: {path} asks for num_machines={config.get('num_machines')}; this launcher runs one node (num_machines: 1)")
    if device == "cpu":
        why = ("FSDP shards a model over GPUs" if kind == "FSDP" else
               "accelerate launch starts several CPU processes only through mpirun")
        raise ValueError(f"--config: {path} is a GPU config (distributed_type {kind}) but this run is on the CPU "
                         f"({'no GPU is visible' if _visible_gpus() == 0 else '--device cpu'}); {why}: on the CPU "
                         "leave --config out (torchrun over gloo)")
    return config


def plan(config: ScaleConfig, launch_config: LaunchConfig, out: str | Path) -> Plan:
    """Check that this machine can run the launch, and build its command line. Starts nothing.

    Raises:
        ValueError naming the option: ``--device cuda`` without a visible GPU; ``--processes``
        above the CPU cores (``os.cpu_count()``) on the CPU or the visible GPUs on GPUs; a global
        batch that ``--processes`` does not divide; a bad ``--config`` (see
        :func:`read_accelerate_config`); an ``--out`` that is a file.
    """
    from lessons_lib import optional

    if not optional.available("accelerate"):
        raise ValueError(optional.missing_message("accelerate", "python -m lessons_lib.scale"))
    gpus = _visible_gpus()
    device = launch_config.device
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise ValueError(f"--device cuda: no GPU is visible here; accepted: {DEVICES} ('auto' or 'cpu' run on the CPU)")
    n = launch_config.processes
    if device == "cpu":
        cores = os.cpu_count() or 1
        if n > cores:
            raise ValueError(f"--processes {n}: this machine has {cores} CPU core(s); accepted: 1 to {cores} on the CPU")
    elif n > gpus:
        raise ValueError(f"--processes {n}: {gpus} GPU(s) visible; accepted: 1 to {gpus} (one process per GPU)")
    if config.batch_size % n:
        raise ValueError(f"--batch-size {config.batch_size} cannot be split evenly over --processes {n}: "
                         f"use a multiple of {n}, so that the global batch is the same whatever the number of processes")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; pass a folder (made if missing)")
    worker = ["-m", "lessons_lib.scale", WORKER_FLAG, str(out.resolve())]
    env = {"OMP_NUM_THREADS": str(config.threads)}
    if launch_config.config_file is not None:
        read_accelerate_config(launch_config.config_file, device)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config.config_file),
                   "--num_processes", str(n), *worker]
        return Plan(device, "accelerate launch", command, env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(n),
               *worker]
    return Plan(device, "torchrun", command, env)


# ----------------------------------------------------------------------------- what each process runs
def _lm_loss(output: Any, targets: Any) -> Any:
    """Next-token cross-entropy over every position: lesson 04's ``lm_loss``."""
    import torch.nn.functional as F

    return F.cross_entropy(output.logits.flatten(0, 1), targets.flatten())


def _prepare_qat_(model: "nn.Module", bits: int) -> None:
    """Lesson 04's LM QAT set-up: fake-quantized weights (``bits``) in every decoder-layer Linear."""
    from lessons_lib import qat

    qat.prepare_(model, qat.weight_config(bits), None, layers=[n for n in qat.quantizable_layers(model) if ".layers." in n])


def _qat_schedule(steps: int):
    """Lesson 04's LM QAT learning-rate factor: a tenth of the steps warm-up, decay by 10x at two thirds."""
    from lessons_lib import training

    return training.warmup_step_decay(steps, steps // 10, max(1, 2 * steps // 3))


def train(config: ScaleConfig, accelerator: "Accelerator | None" = None,
          on_step: Callable[[int, float], Any] | None = None) -> tuple["nn.Module", dict[str, list[float]]]:
    """Build the task's model and train it; the body of every launched process.

    Without ``accelerator`` this is the lessons' own single-process path (``distill.train``,
    ``qat.fine_tune``), unchanged. With one, the same recipe goes through
    ``training.run(..., accelerator=accelerator)`` with the objective as a module
    (``distill.Distiller``, ``training.Supervised``), so that gradients are averaged over processes.

    Args:
        on_step: with an accelerator only: ``training.run``'s hook, called as ``on_step(step, loss)``
            after each optimiser step (the launched processes time their steps with it; a return
            value of True stops training).

    Returns:
        The trained model (the distilled student, or the fake-quantized LM) and the history.
    """
    import torch

    from lessons_lib import data, distill, qat, session, training, zoo

    require(on_step is None or (accelerator is not None and callable(on_step)),
            "on_step needs an accelerator (the single-process path is the lessons' own distill.train / qat.fine_tune)")

    session.seed_everything(config.seed)
    teacher = zoo.load_teacher("lm")
    ids = data.lm_tokens("train")
    batches = data.lm_windows(ids, config.block, config.batch_size, torch.Generator().manual_seed(config.seed))
    lr, steps = config.learning_rate, config.steps
    if config.task == "distill":
        student = distill.lm_student(teacher, config.student_layers, init="copy")
        cfg = distill.DistillConfig(temperature=config.temperature, alpha=0.0, steps=steps, lr=lr, warmup=steps // 10)
        if accelerator is not None:
            teacher.to(accelerator.device)  # outside the objective's module tree: prepare() does not move it
        objective = distill.Distiller(student, teacher, cfg)
        if accelerator is None:
            return student, distill.train(objective, batches, cfg, desc="distill")
        objective.train()  # as distill.train
        history = training.run(objective, batches, cfg.steps,
                               lambda step: training.warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr),
                               list(objective.parameters()), optimizer="adamw", weight_decay=cfg.weight_decay,
                               grad_clip=cfg.grad_clip, on_step=on_step, desc="distill", accelerator=accelerator)
        return student, history
    model = teacher
    _prepare_qat_(model, config.bits)
    schedule = _qat_schedule(steps)
    if accelerator is None:
        return model, qat.fine_tune(model, batches, steps, lr, schedule, loss_fn=_lm_loss, optimizer="adamw", desc="QAT")
    model.train()  # as qat.fine_tune
    history = training.run(training.Supervised(model, _lm_loss), batches, steps, lambda step: lr * schedule(step),
                           [p for p in model.parameters() if p.requires_grad], optimizer="adamw", desc="QAT",
                           on_step=on_step, accelerator=accelerator)
    model.eval()
    return model, history


def load_weights(out: str | Path) -> dict:
    """The trained model's state dict that a launch wrote to ``out`` (tensors on the CPU)."""
    from safetensors.torch import load_file

    path = Path(out) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {out}: run `python -m lessons_lib.scale ... --out {out}` first")
    return load_file(str(path))


def allreduce_seconds(numel: int, device: Any = "cpu", repeats: int = 5) -> float | None:
    """The median wall time of one all-reduce (sum) of ``numel`` float32 values over the processes
    of the current ``torch.distributed`` group: what data-parallel training sends every step for a
    model of ``numel`` trained parameters (DDP sends it in buckets, partly while ``backward`` still
    runs). Every process of the group must call it (it is a collective). None without a group of
    two or more processes. ``repeats`` timed calls follow one untimed warm-up call."""
    import torch
    import torch.distributed as dist

    require(is_int(numel) and numel >= 1, f"numel must be an int >= 1 (trained parameters), got {numel!r}")
    require(is_int(repeats) and repeats >= 1, f"repeats must be an int >= 1, got {repeats!r}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    x = torch.ones(numel, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()  # start together: time the all-reduce, not a late partner
        start = time.perf_counter()
        dist.all_reduce(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _worker(out: Path) -> int:
    """One launched process: train (timing each step), time one all-reduce of the gradient, then
    the main process saves; tear the process group down."""
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file

    recorded = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
    config = ScaleConfig(**recorded["config"])
    torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=recorded["device"] == "cpu")
    try:
        stamps: list[float] = []
        start = time.perf_counter()
        model, history = train(config, accelerator, on_step=lambda step, loss: stamps.append(time.perf_counter()))
        seconds = time.perf_counter() - start
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        reduce_seconds = allreduce_seconds(trained, accelerator.device)  # every process: a collective
        state = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
        if accelerator.is_main_process:
            # clones: a tied embedding and head share one tensor, which safetensors refuses to save twice
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
            summary = {"task": config.task, "processes": accelerator.num_processes, "device": recorded["device"],
                       "distributed_type": getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type)), "launcher": recorded["launcher"],
                       "train_seconds": seconds, "steps": len(history.get("lr", [])),
                       "final_loss": history["loss"][-1] if history.get("loss") else None, "history": history,
                       "config": asdict(config), "torch_threads": torch.get_num_threads(),
                       # between consecutive steps' ends: steps - 1 values, the first step (warm-up) left out
                       "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
                       "trained_parameters": trained, "allreduce_seconds": reduce_seconds}
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
        accelerator.wait_for_everyone()  # nobody leaves while the main process still writes
    finally:
        # Destroy the process group before the interpreter exits: a gloo group still alive at exit
        # can abort the process (SIGABRT) while its threads are torn down.
        accelerator.end_training()
    return 0


# ----------------------------------------------------------------------------- what a launch measured (lesson 10)
def max_relative_difference(a: dict, b: dict) -> float:
    """max over the tensors of two state dicts with the same names of ``||a - b|| / ||b||``
    (float tensors compared; the measure of ``tests/test_scale.py``)."""
    require(set(a) == set(b), f"the state dicts name different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for k, y in b.items():
        if y.is_floating_point():
            x, y = a[k].detach().double().cpu(), y.detach().double().cpu()
            worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return worst


def samples_per_second(summary: dict) -> float:
    """The training loop's throughput in a launch's summary: global batch / median step time
    (the steps after the first; startup, model loading and the first step are left out)."""
    steps = summary.get("step_seconds") or []
    require(len(steps) >= 1, "the summary has no step_seconds (a launch of 2 or more steps records them)")
    return summary["config"]["batch_size"] / statistics.median(steps)


def training_step(config: ScaleConfig, device: str = "cpu") -> Callable[[int], float]:
    """One optimiser step of the task's recipe in this process, as a function of how many rows of a
    fixed global batch it trains on: ``step(rows)`` runs the forward and backward passes on the
    first ``rows`` windows (``rows`` divides ``config.batch_size``), clips (distill) and steps
    AdamW, and returns the loss. What each of N launched processes computes per step is
    ``step(batch_size // N)``, without the all-reduce: lesson 10 times it at 1 and 2 processes' shares.
    The model trains as it is timed (the learning rate is the peak one throughout). ``device``: where
    the models and the batch are ("cpu", "cuda", ...)."""
    import torch

    from lessons_lib import data, distill, qat, session, training, zoo

    session.seed_everything(config.seed)
    teacher = zoo.load_teacher("lm").to(device)
    batch = tuple(t.to(device) for t in next(data.lm_windows(data.lm_tokens("train"), config.block, config.batch_size,
                                                             torch.Generator().manual_seed(config.seed))))
    grad_clip, weight_decay = None, 0.0
    if config.task == "distill":
        student = distill.lm_student(teacher, config.student_layers, init="copy").to(device)
        cfg = distill.DistillConfig(temperature=config.temperature, alpha=0.0, steps=config.steps, lr=config.learning_rate)
        objective: Any = distill.Distiller(student, teacher, cfg)
        grad_clip, weight_decay = cfg.grad_clip, cfg.weight_decay
    else:
        _prepare_qat_(teacher, config.bits)
        objective = training.Supervised(teacher, _lm_loss)
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=weight_decay)

    def step(rows: int) -> float:
        require(is_int(rows) and rows >= 1 and config.batch_size % rows == 0,
                f"rows must be an int that divides batch_size={config.batch_size}, got {rows!r}")
        loss, _ = objective(training.shard_batch(batch, 0, config.batch_size // rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return float(loss.detach())

    return step


def qat_sliced(config: ScaleConfig, slices: int, fake_quant: bool = True) -> tuple["nn.Module", dict[str, list[float]]]:
    """Lesson 04's LM QAT (``config.task == "qat"``) in this process, with each batch's loss the mean
    of the losses of its ``slices`` equal row slices (:func:`training.shard_batch`): the gradient is
    then the average of the slices' gradients, the arithmetic of ``slices`` data-parallel processes
    without launching any (only the all-reduce's own summation order is missing). ``slices=1`` is
    the one-process arithmetic. ``fake_quant=False`` runs the same fine-tune with fake quantization
    switched off (``set_quantization(False)``): the float model. The recipe is :func:`train`'s.

    Returns:
        The model (eval mode) and the history.
    """
    import torch

    from lessons_lib import data, qat, session, training, zoo

    require(config.task == "qat", f"qat_sliced trains lesson 04's QAT: config.task must be 'qat', got {config.task!r}")
    require(is_int(slices) and slices >= 1 and config.batch_size % slices == 0,
            f"slices must be an int >= 1 that divides batch_size={config.batch_size}, got {slices!r}")
    require(isinstance(fake_quant, bool), f"fake_quant must be True or False, got {fake_quant!r}")
    session.seed_everything(config.seed)
    model = zoo.load_teacher("lm")
    ids = data.lm_tokens("train")
    batches = data.lm_windows(ids, config.block, config.batch_size, torch.Generator().manual_seed(config.seed))
    _prepare_qat_(model, config.bits)
    if not fake_quant:
        for m in model.modules():
            if isinstance(m, qat.QAT_TYPES):
                m.set_quantization(False)
    steps, lr = config.steps, config.learning_rate
    schedule = _qat_schedule(steps)
    objective = _sliced(training.Supervised(model, _lm_loss), slices)
    model.train()
    history = training.run(objective, batches, steps, lambda step: lr * schedule(step),
                           [p for p in model.parameters() if p.requires_grad], optimizer="adamw", desc="QAT")
    model.eval()
    return model, history


def _sliced(objective: "nn.Module", slices: int) -> "nn.Module":
    """``objective``'s loss as the mean of its losses on ``slices`` equal row slices of each batch."""
    from torch import nn

    from lessons_lib import training

    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.objective = objective

        def forward(self, batch: Any) -> tuple[Any, dict[str, float]]:
            parts = [self.objective(training.shard_batch(batch, i, slices)) for i in range(slices)]
            loss = sum(p[0] for p in parts) / slices
            return loss, {key: sum(p[1][key] for p in parts) / slices for key in parts[0][1]}

    return Sliced()


def quantized_codes(model: "nn.Module") -> dict:
    """The integer codes of every fake-quantized weight of a QAT-prepared model (name -> int tensor):
    the weights its integer version would store (whether or not fake quantization is on)."""
    from lessons_lib import qat, quantize

    codes = {}
    for name, m in model.named_modules():
        if isinstance(m, qat.QAT_TYPES):
            w = m.weight.detach()
            scale, zero = quantize.compute_qparams(w, m.weight_fq.config)
            codes[name] = quantize.quantize(w, scale, zero, m.weight_fq.config)
    require(bool(codes), "the model has no QAT layers: prepare it with qat.prepare_ first")
    return codes


def scaling_estimate(step_full: float, step_part: float, allreduce: float, batch_size: int, processes: int,
                     global_batch: int, measured: float | None = None) -> dict[str, Any]:
    """Lesson 10's explorer: the training loop's throughput on ``processes`` data-parallel processes,
    each with a core (or GPU) of its own, predicted from three of this machine's measurements.

    Measured: the one-process step time at ``batch_size`` (``step_full``) and at ``batch_size / 2``
    (``step_part``), and one all-reduce of the gradient over 2 processes (``allreduce``). Model: a
    step on ``b`` samples takes ``fixed + per_sample * b`` (the line through the two measured points,
    ``fixed`` clipped to [0, ``step_full``]); with ``N`` processes each computes ``global_batch / N`` samples, then
    the gradient is all-reduced. A ring all-reduce moves ``2 (N - 1) / N`` gradients per process, so
    it takes ``allreduce * 2 (N - 1) / N`` (the measured time at N = 2), never overlapped with
    ``backward`` (DDP overlaps part of it, so this is pessimistic there, and optimistic where the
    processes share cores or other work competes for them).

    Args:
        measured: the speedup measured with 2 processes at ``batch_size``, shown next to the
            prediction in that one setting ("-" elsewhere).
    Returns:
        One row: step seconds, samples/s, speedup over one process at the same global batch, the
        share of the step spent in the all-reduce, the parallel efficiency (speedup / N), and the
        measured speedup where there is one.
    """
    require(all(is_number(v) and v > 0 for v in (step_full, step_part)), "step_full and step_part must be numbers > 0 (seconds)")
    require(is_number(allreduce) and allreduce >= 0, f"allreduce must be a number >= 0 (seconds), got {allreduce!r}")
    require(is_int(batch_size) and batch_size >= 2 and batch_size % 2 == 0, f"batch_size must be an even int >= 2, got {batch_size!r}")
    require(is_int(processes) and processes >= 1, f"processes must be an int >= 1, got {processes!r}")
    require(is_number(global_batch) and global_batch >= processes,
            f"global_batch must be a number >= processes ({processes}): each process needs a sample, got {global_batch!r}")
    fixed = min(max(0.0, 2 * step_part - step_full), step_full)  # noisy timings: 0 <= fixed <= step_full
    per_sample = (step_full - fixed) / batch_size

    def comm(n: int) -> float:
        return allreduce * 2 * (n - 1) / n

    t, t1 = fixed + per_sample * global_batch / processes + comm(processes), fixed + per_sample * global_batch
    here = measured if measured is not None and processes == 2 and global_batch == batch_size else None
    return {"step s": t, "samples/s": global_batch / t, "speedup": t1 / t, "all-reduce share": comm(processes) / t,
            "efficiency": t1 / t / processes, "measured speedup": "-" if here is None else float(here)}


def scaling_figure(step_full: float, step_part: float, allreduce: float, batch_size: int, processes: int,
                   global_batch: int, measured: float | None = None) -> Any:
    """Lesson 10: :func:`scaling_estimate`'s speedup against the number of processes at
    ``global_batch``, with the ideal (N), the chosen ``processes`` marked and, at
    ``global_batch == batch_size``, the speedup measured with 2 processes (``measured``)."""
    from matplotlib.figure import Figure  # not pyplot: nothing left open

    counts = [n for n in sorted({1, 2, 4, 8, 16, 32, 64, processes}) if n <= global_batch]
    speedups = [scaling_estimate(step_full, step_part, allreduce, batch_size, n, global_batch)["speedup"] for n in counts]
    fig = Figure(figsize=(7, 3.5), layout="tight")
    ax = fig.subplots()
    ax.plot(counts, counts, "k:", label="ideal (N)")
    ax.plot(counts, speedups, "o-", label=f"predicted, global batch {global_batch:g}")
    ax.plot([processes], [speedups[counts.index(processes)]], "s", markersize=11, fillstyle="none", color="C1",
            label=f"{processes} process{'es' if processes > 1 else ''}")
    if measured is not None and global_batch == batch_size:
        ax.plot([2], [measured], "x", markersize=10, color="C3", label="measured here, 2 processes")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_yticks(counts, [str(n) for n in counts])
    ax.set(xlabel="processes (each with its own core or GPU)", ylabel="speedup over 1 process",
           title="Data-parallel speedup predicted from this machine's measurements")
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- the launcher
def launch(config: ScaleConfig, launch_config: LaunchConfig, out: str | Path, quiet: bool = True) -> dict:
    """Check everything (:func:`plan`), then run the launch and wait for it.

    Args:
        config: what to train; launch_config: how; out: the folder that receives ``plan.json``,
        ``weights.safetensors`` and ``summary.json`` (made if missing, after every check).
        quiet: capture the launcher's own output (shown only if the launch fails).
    Returns:
        The summary the main process wrote, plus ``wall_seconds`` (the whole launch) and ``out``.
    Raises:
        ValueError before anything starts (see :func:`plan`); RuntimeError if a process fails.
    """
    checked = plan(config, launch_config, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, SUMMARY_FILE):  # never report an earlier run's files as this one's
        (out / name).unlink(missing_ok=True)
    record = {"config": asdict(config), "processes": launch_config.processes, "device": checked.device,
              "launcher": checked.launcher, "config_file": None if launch_config.config_file is None else str(launch_config.config_file),
              "command": checked.command}
    (out / PLAN_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    start = time.perf_counter()
    done = subprocess.run(checked.command, env={**os.environ, **checked.env}, capture_output=quiet, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = ((done.stdout or "") + (done.stderr or ""))[-4000:] if quiet else "(see the output above)"
        raise RuntimeError(f"{checked.launcher} exited with status {done.returncode}: {tail}")
    if not (out / SUMMARY_FILE).is_file():
        raise RuntimeError(f"{checked.launcher} finished but the main process wrote no {SUMMARY_FILE} in {out}")
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    return {**summary, "wall_seconds": wall, "out": str(out)}


def _parser() -> argparse.ArgumentParser:
    defaults = ScaleConfig()
    parser = argparse.ArgumentParser(prog="python -m lessons_lib.scale",
                                     description="Train lesson 05's LM student or lesson 04's LM QAT data-parallel.")
    parser.add_argument("task", choices=TASKS, help="distill: lesson 05's 12 -> 6 layer LM student; qat: lesson 04's LM QAT")
    parser.add_argument("--processes", type=int, default=2, help="processes (CPU cores, or GPUs); default 2")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: GPUs if any are visible, else the CPU")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"an Accelerate config file for GPUs (DDP or FSDP), e.g. in {CONFIG_DIR}; default: torchrun")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per global batch")
    parser.add_argument("--block", type=int, default=defaults.block, help="tokens per window")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: the lesson's, {DEFAULT_LR})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--student-layers", type=int, default=defaults.student_layers, help="distill: student depth")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="distill: KD temperature")
    parser.add_argument("--bits", type=int, default=defaults.bits, help="qat: weight bits")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads per process")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/scale/<task>-<time>)")
    parser.add_argument("--verbose", action="store_true", help="show the launcher's and the processes' own output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (2 for bad input, reported before any process starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        if len(argv) != 2:
            raise SystemExit(f"usage: python -m lessons_lib.scale {WORKER_FLAG} OUT_DIR (started by the launcher)")
        return _worker(Path(argv[1]))
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = ScaleConfig(task=args.task, steps=args.steps, batch_size=args.batch_size, block=args.block, lr=args.lr,
                             seed=args.seed, student_layers=args.student_layers, temperature=args.temperature,
                             bits=args.bits, threads=args.threads)
        launch_config = LaunchConfig(processes=args.processes, device=args.device, config_file=args.config)
        out = args.out or Path("runs") / "scale" / f"{args.task}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        plan(config, launch_config, out)
    except ValueError as err:
        message = str(err)
        for name in ("steps", "batch_size", "block", "lr", "seed", "student_layers", "temperature", "bits", "threads"):
            if message.startswith(name + " "):  # name the command-line option
                message = "--" + name.replace("_", "-") + message[len(name):]
        parser.error(message)
    summary = launch(config, launch_config, out, quiet=not args.verbose)
    print(f"{config.task}: {summary['processes']} process(es) on {summary['device']} ({summary['distributed_type']}, "
          f"{summary['launcher']}), {summary['steps']} steps of {config.batch_size} x {config.block} tokens: "
          f"training {summary['train_seconds']:.1f} s, launch {summary['wall_seconds']:.1f} s; "
          f"final loss {summary['final_loss']:.4f}; weights in {Path(summary['out']) / WEIGHTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
