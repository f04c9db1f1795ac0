"""The teacher zoo: train, save, verify and load the course's three teacher models.

Teachers (architectures and recipes in :mod:`lessons_lib.teachers`), stored in ``data/``:

- ``vision``: CNN on the MNIST snapshot -> ``vision_teacher.safetensors`` + ``vision_teacher.json``.
- ``lm``: 12-layer Llama causal LM on the CPython-docs corpus -> ``lm_teacher/`` (HF folder).
- ``moe``: 8-expert top-2 Mixtral causal LM on the same corpus -> ``moe_teacher/`` (HF folder).

Every file is recorded with its sha256 in ``data/manifest.json``, together with the metrics
measured right after training; :func:`load_teacher` checks the hashes before loading.

Rebuild from the repository root (``--steps N`` for a quick smoke build, ``--out DIR`` to write
elsewhere)::

    python -m lessons_lib.zoo build vision|lm|moe|all [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lessons_lib import data, evaluate, hub, moe, teachers, training
from lessons_lib.hub import SourceUnavailable  # noqa: F401  (raised by check_source / load_teacher)

TEACHERS = ("vision", "lm", "moe")
VISION_FILES = ("vision_teacher.safetensors", "vision_teacher.json")
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ChecksumError = data.ChecksumError


def _check_name(name: str) -> None:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; accepted: {', '.join(TEACHERS)}")


def rebuild_command(name: str) -> str:
    """The shell command that rebuilds teacher ``name`` into ``data/``."""
    return f"python -m lessons_lib.zoo build {name}"


def teacher_files(name: str) -> list[str]:
    """Paths (relative to the data folder) of the files that make up teacher ``name``."""
    _check_name(name)
    return list(VISION_FILES) if name == "vision" else [f"{name}_teacher/{f}" for f in HF_FILES]


def recipe(name: str) -> teachers.VisionConfig | teachers.CausalLMConfig:
    """The default config (architecture + training recipe) of teacher ``name``."""
    _check_name(name)
    return {"vision": teachers.VISION, "lm": teachers.LM, "moe": teachers.MOE}[name]


# ----------------------------------------------------------------------------- training
@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _augment(x: torch.Tensor, cfg: teachers.VisionConfig, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-max_rotate deg) and shift (+-max_shift px) of a batch (B, 1, H, W)."""
    B, H = x.size(0), x.size(-1)
    angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(cfg.max_rotate)  # (B,)
    shift = (torch.rand(B, 2, generator=g) * 2 - 1) * (2 * cfg.max_shift / H)  # (B, 2), in [-1, 1] units
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, align_corners=False)


def train_vision(cfg: teachers.VisionConfig, progress: bool = False) -> teachers.SmallCNN:
    """Train the vision teacher on the MNIST train split; keep the best weights on val.

    AdamW with weight decay on every parameter, warm-up + cosine rate, augmented batches; the
    validation accuracy is checked every ``cfg.eval_every`` steps and training stops after
    ``cfg.patience`` checks without a gain (:func:`training.run`'s ``on_step``).

    Args:
        cfg: recipe (see :class:`teachers.VisionConfig`).
        progress: show a tqdm bar.
    Returns:
        The trained model (eval mode) holding the weights of the best validation check.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    X, y = data.load_mnist("train")
    X_val, y_val = data.load_mnist("val")
    model = teachers.SmallCNN(**cfg.model_kwargs())

    def objective(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        model.train()
        loss = F.cross_entropy(model(_augment(batch[0], cfg, g)), batch[1])
        return loss, {}

    best = {"state": copy.deepcopy(model.state_dict()), "acc": -1.0, "bad_checks": 0}

    def keep_best(step: int, loss: float) -> bool:
        if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
            return False
        acc = evaluate.accuracy(model, X_val, y_val)
        if acc > best["acc"]:
            best.update(state=copy.deepcopy(model.state_dict()), acc=acc, bad_checks=0)
        else:
            best["bad_checks"] += 1
        return best["bad_checks"] >= cfg.patience

    batches = data.minibatches(X, y, batch_size=cfg.batch_size, generator=g)  # the augmentation draws from g too
    training.run(objective, batches, cfg.steps, lambda step: training.warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr),
                 model.parameters(), optimizer="adamw", weight_decay=cfg.weight_decay, on_step=keep_best,
                 progress=progress, desc="vision")
    model.load_state_dict(best["state"])
    return model.eval()


def train_causal_lm(cfg: teachers.CausalLMConfig, progress: bool = False) -> nn.Module:
    """Train a Llama/Mixtral teacher on random ``cfg.context``-token windows of the train split.

    Next-token cross-entropy (plus ``router_aux_loss_coef`` x load-balancing loss for Mixtral when
    the coefficient is > 0), AdamW with betas (0.9, 0.95) and weight decay on matrices only,
    warm-up + cosine schedule, gradient clipping at 1.0, all in :func:`training.run`.

    Returns:
        The trained ``PreTrainedModel`` in eval mode.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = data.lm_tokens("train")
    model = teachers.build_causal_lm(cfg, eot_id=data.load_tokenizer().token_to_id(data.EOT))
    aux = cfg.arch == "mixtral" and cfg.router_aux_loss_coef > 0

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = model(input_ids=x, labels=x, **({"output_router_logits": True} if aux else {})).loss
        return loss, {}

    model.train()
    windows = (x for x, _ in data.lm_windows(ids, cfg.context, cfg.batch_size, g))  # inputs (B, T); the model shifts labels
    training.run(objective, windows, cfg.steps, lambda step: training.warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr),
                 model.parameters(), optimizer="adamw", weight_decay=cfg.weight_decay, decays=training.matrices_only,
                 betas=(0.9, 0.95), grad_clip=1.0, progress=progress, desc=cfg.arch)
    return model.eval()


# ----------------------------------------------------------------------------- metrics
def teacher_metrics(name: str, model: nn.Module, max_tokens: int | None = None) -> dict:
    """The metrics recorded in the manifest, measured on the val and test splits.

    vision: accuracy on MNIST val and test. lm/moe: perplexity on corpus val and test in
    non-overlapping blocks of the model's context, the add-one unigram baseline on val, and
    (moe) the expert usage on val.

    Args:
        name: "vision", "lm" or "moe".
        model: the trained teacher.
        max_tokens: evaluate LMs on the first ``max_tokens`` tokens of each split only (quick
            smoke builds); None (default) uses the full splits. Recorded as ``val_tokens``.
    """
    _check_name(name)
    if name == "vision":
        return {split + "_accuracy": evaluate.accuracy(model, *data.load_mnist(split)) for split in ("val", "test")}
    context = model.config.max_position_embeddings
    train, val, test = data.lm_tokens("train"), data.lm_tokens("val")[:max_tokens], data.lm_tokens("test")[:max_tokens]
    metrics = {"val_perplexity": evaluate.perplexity(model, val, block_size=context),
               "test_perplexity": evaluate.perplexity(model, test, block_size=context),
               "unigram_val_perplexity": evaluate.unigram_perplexity(train, val, model.config.vocab_size),
               "block_size": context, "val_tokens": len(val), "test_tokens": len(test)}
    if name == "moe":
        metrics["expert_usage_val"] = moe.usage_summary(moe.expert_usage(model, val, block_size=context))
    return metrics


# ----------------------------------------------------------------------------- build / load
def build(name: str, steps: int | None = None, out: Path | None = None, progress: bool = False,
          eval_tokens: int | None = None) -> dict:
    """Train teacher ``name``, save it under ``out`` and return its manifest entry.

    Args:
        name: "vision", "lm" or "moe".
        steps: optimiser steps (default: the recipe's); a few steps make a quick smoke build.
        out: output folder (default: :func:`data.data_dir`). Training data always comes from
            :func:`data.data_dir`.
        progress: show tqdm bars.
        eval_tokens: LM metrics on this many tokens per split (see :func:`teacher_metrics`).
    Returns:
        The entry (files, config, metrics, params, bytes); pass it to :func:`record_build`.
    """
    cfg = recipe(name)
    cfg = dataclasses.replace(cfg, steps=steps) if steps is not None else cfg
    out = Path(out or data.data_dir())
    with _deterministic():
        if name == "vision":
            model = train_vision(cfg, progress)
            out.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), str(out / VISION_FILES[0]))
            (out / VISION_FILES[1]).write_text(json.dumps(cfg.model_kwargs(), indent=2) + "\n")
        else:
            model = train_causal_lm(cfg, progress)
            folder = out / f"{name}_teacher"
            model.save_pretrained(folder)
            tokenizer = data.load_hf_tokenizer()
            tokenizer.model_max_length = cfg.context
            tokenizer.save_pretrained(folder)
        metrics = teacher_metrics(name, model, max_tokens=eval_tokens)
    files = teacher_files(name)
    return {"files": files, "config": dataclasses.asdict(cfg), "metrics": metrics,
            "params": sum(p.numel() for p in model.parameters()),
            "bytes": sum((out / f).stat().st_size for f in files), "torch": torch.__version__}


def record_build(name: str, entry: dict, out: Path | None = None) -> dict:
    """Write teacher ``name``'s files (sha256, size) and ``entry`` into ``out/manifest.json``."""
    return data.update_manifest(Path(out or data.data_dir()), entry["files"], rebuild_command(name),
                                teachers={name: entry})


def check_source(name: str, source: str) -> None:
    """Refuse, at once and before any slow work, a teacher source that cannot be loaded here:
    :func:`lessons_lib.hub.check_source` for "lm" and "moe"; the vision teacher has only "zoo".

    Raises:
        ValueError: an unknown name, the vision teacher with a hub source, or a source of no
            accepted form.
        SourceUnavailable: a hub id that is not cached while the hub cannot be reached.
    """
    _check_name(name)
    if name == "vision" and source != "zoo":
        raise ValueError("the vision teacher has no hub source; use source='zoo'")
    hub.check_source(source)


def load_teacher(name: str, source: str = "zoo", directory: Path | None = None) -> nn.Module:
    """A teacher in eval mode, after checking its files against the sha256 manifest.

    Args:
        name: "vision", "lm" or "moe".
        source: "zoo" (our checkpoint, never touches the network) or, for "lm"/"moe", a Hugging
            Face hub id such as "facebook/opt-125m" (downloaded by ``from_pretrained``, or read from
            the local cache) or a folder holding a saved model; checked first by :func:`check_source`.
        directory: data folder holding the checkpoint and manifest (default :func:`data.data_dir`).
    Raises:
        ValueError: unknown name, a hub source for "vision", or a source of no accepted form.
        SourceUnavailable: a hub id that is neither cached nor reachable (the message says what to do).
        FileNotFoundError / ChecksumError: a missing or corrupt file (the message names the file
            and the rebuild command).
    """
    check_source(name, source)
    from transformers import AutoModelForCausalLM

    if source != "zoo":
        return AutoModelForCausalLM.from_pretrained(source).eval()
    directory = Path(directory or data.data_dir())
    for rel in teacher_files(name):
        data.verify_file(rel, directory, rebuild=rebuild_command(name))
    if name != "vision":
        return AutoModelForCausalLM.from_pretrained(directory / f"{name}_teacher").eval()
    model = teachers.SmallCNN(**json.loads((directory / VISION_FILES[1]).read_text()))
    model.load_state_dict(load_file(str(directory / VISION_FILES[0])))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m lessons_lib.zoo build NAME|all [--steps N] [--out DIR] [--threads N] [--eval-tokens N]``."""
    parser = argparse.ArgumentParser(prog="python -m lessons_lib.zoo", description="Build the teacher zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("build", help="train teachers and record them in manifest.json")
    cmd.add_argument("name", choices=[*TEACHERS, "all"])
    cmd.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    cmd.add_argument("--out", type=Path, default=None, help="output folder (default: the data folder)")
    cmd.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    cmd.add_argument("--eval-tokens", type=int, default=None, help="LM metrics on N tokens per split (smoke builds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in TEACHERS if args.name == "all" else (args.name,):
        start = time.perf_counter()
        entry = build(name, steps=args.steps, out=args.out, progress=True, eval_tokens=args.eval_tokens)
        entry["build_seconds"] = round(time.perf_counter() - start, 1)
        entry["threads"] = torch.get_num_threads()
        record_build(name, entry, args.out)
        print(f"{name}: {entry['params']:,} params, {entry['bytes']:,} bytes, "
              f"{entry['build_seconds']} s, metrics {json.dumps(entry['metrics'])[:400]}")


if __name__ == "__main__":
    main()
