"""What every lesson parameter accepts, in one place: read by the runner before it starts anything,
and by each notebook's first cell after its parameters (so Jupyter, papermill and nbmake users
get the same message).

A specification is a small object per parameter (:class:`Int`, :class:`Number`, :class:`Choice`,
:class:`Flag`, :class:`Text`, :class:`Device`, :class:`Source`, :class:`ListOf`) that says what it
accepts in words and finds what is wrong with a value. ``LESSONS`` maps each notebook stem to its
parameters' specifications and ``RULES`` to the few checks that involve two parameters. This module
imports nothing heavy (no torch), so the check costs milliseconds.

    >>> check("03_gptq", {"calibration_samples": -5, ...})
    ParameterError: lesson 03_gptq: calibration_samples = -5 is not accepted; it takes an integer >= 1
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lessons_lib import hub
from lessons_lib.checks import is_int, is_number


class ParameterError(ValueError):
    """A lesson parameter outside what the lesson accepts (raised before any work starts)."""


@dataclass(frozen=True)
class Int:
    """An integer (not a bool) in ``[minimum, maximum]`` (None: unbounded)."""

    minimum: int | None = None
    maximum: int | None = None

    def describe(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"an integer from {self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"an integer >= {self.minimum}"
        return "an integer" if self.maximum is None else f"an integer <= {self.maximum}"

    def accepts(self, value: Any) -> bool:
        return is_int(value) and (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum)


@dataclass(frozen=True)
class Number:
    """A finite int or float in an interval; ``open_low``/``open_high`` exclude the ends."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a number {'>' if self.open_low else '>='} {self.low:g}"
        return (f"a number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")

    def accepts(self, value: Any) -> bool:
        if not is_number(value) or not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    options: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def accepts(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)


@dataclass(frozen=True)
class Flag:
    """True or False."""

    def describe(self) -> str:
        return "True or False"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Text:
    """A non-empty string (a folder, a label)."""

    what: str = "a non-empty string"

    def describe(self) -> str:
        return self.what

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value.strip() != ""


@dataclass(frozen=True)
class Device:
    """Where to run: "auto", "cpu", "cuda" or "cuda:N" (whether a GPU exists is checked later)."""

    def describe(self) -> str:
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


@dataclass(frozen=True)
class Source:
    """Where a model comes from: "zoo" (embedded, offline), a hub id, or a folder with a saved model.

    Only the form is checked here; whether a hub id can be loaded (cached or online) is
    :func:`lessons_lib.hub.check_source`'s job, which the runner calls before starting a lesson.
    """

    def describe(self) -> str:
        return "'zoo' (the embedded model), a hub id such as 'facebook/opt-125m', or a folder holding a saved model"

    def accepts(self, value: Any) -> bool:
        return hub.well_formed(value)


@dataclass(frozen=True)
class ListOf:
    """A non-empty list (or tuple) whose every item the ``item`` specification accepts."""

    item: Any
    min_length: int = 1

    def describe(self) -> str:
        return f"a list of at least {self.min_length}, each {self.item.describe()}"

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) >= self.min_length
                and all(self.item.accepts(v) for v in value))


@dataclass(frozen=True)
class Rule:
    """A check involving several parameters: ``holds(values)`` must be True."""

    names: tuple[str, ...]
    holds: Callable[[Mapping[str, Any]], bool]
    text: str


# Every lesson has these (the runner sets quick and results_dir).
COMMON = {"quick": Flag(), "device": Device(), "seed": Int(0), "results_dir": Text("a folder path")}
POSITIVE = Number(0, open_low=True)

LESSONS: dict[str, dict[str, Any]] = {
    "00_orientation": COMMON | {"timing_repeats": Int(3), "batch_size": Int(1, 512)},
    "01_precision_formats": COMMON | {
        "lm_source": Source(), "quick_images": Int(1, 1000), "quick_lm_blocks": Int(1), "latency_repeats": Int(1),
        "matmul_size": Int(16, 8192)},
    "02_int8_quantization": COMMON | {
        "threads": Int(0), "n_sentences": Int(2), "batch_size": Int(1), "timing_repeats": Int(1),
        "probe_batches": Int(1), "calibration_batch_size": Int(1), "calibration_batches": ListOf(Int(1))},
    "03_gptq": COMMON | {
        "lm_source": Source(), "calibration_samples": Int(1), "calibration_seeds": Int(2), "group_size": Int(1),
        "eval_blocks": Int(1), "eval_window": Int(2), "run_gptqmodel": Flag(), "rule_bits": ListOf(Choice((2, 3, 4, 8))),
        "minilm_calibration": Int(8), "minilm_test": Int(8), "minilm_bits": ListOf(Choice((2, 3, 4, 8)), min_length=1), "timing_repeats": Int(1)},
    "04_quantization_aware_training": COMMON | {
        "qat_steps": Int(1), "batch_size": Int(1), "lr": POSITIVE, "warmup_steps": Int(0), "decay_every": Int(1),
        "calibration_images": Int(1), "low_bits": Int(2, 8), "comparison_seeds": Int(1), "no_warmup_lr": POSITIVE,
        "lm_bits": Choice((2, 3, 4, 8)), "lm_qat_steps": Int(3), "lm_lr": POSITIVE, "lm_val_blocks": Int(2)},
    "05_knowledge_distillation": COMMON | {
        "vision_width": Number(0, 1, open_low=True), "vision_train_images": Int(1), "vision_steps": Int(1),
        "vision_seeds": Int(2), "temperatures": ListOf(POSITIVE), "alphas": ListOf(Number(0, 1)),
        "feature_weight": Number(0), "lm_steps": Int(1), "lm_temperature": POSITIVE, "lm_val_blocks": Int(1),
        "minilm_steps": Int(1)},
    "06_pruning": COMMON | {
        "threads": Int(0), "sparsities": ListOf(Number(0, 1, open_high=True)), "high_sparsity": Number(0, 1, open_high=True),
        "fine_tune_steps": Int(10), "batch_size": Int(1), "channel_ratio": Number(0, 1, open_high=True),
        "csr_sparsities": ListOf(Number(0, 1, open_high=True)), "timing_repeats": Int(1),
        "minilm_sentences": Int(64), "minilm_recovery_steps": Int(1), "lm_drop_layers": Int(1, 11), "random_drops": Int(1),
        "lm_heal_steps": Int(1), "lm_val_blocks": Int(1)},
    "07_importance_criteria": COMMON | {
        "threads": Int(0), "score_samples": Int(64), "score_seeds": Int(1), "sparsities": ListOf(Number(0, 1, open_high=True)),
        "hessian_probes": Int(1), "tiny_probes": ListOf(Int(1), min_length=2), "fine_tune_steps": Int(10), "batch_size": Int(1),
        "channel_ratio": Number(0, 1, open_low=True, open_high=True), "snip_sparsities": ListOf(Number(0, 1, open_high=True)),
        "snip_steps": Int(10), "lm_calibration": Int(8), "lm_hessian_probes": Int(1), "lm_val_blocks": Int(1)},
    "08_moe_pruning": COMMON | {
        "threads": Int(0), "calibration_windows": Int(8), "val_blocks": Int(1), "keep_counts": ListOf(Int(2, 8)),
        "random_draws": Int(1), "usage_sizes": ListOf(Int(1)), "base_ratio": Number(0, 1, open_high=True),
        "router_sparsities": ListOf(Number(0, 1, open_high=True)), "betas": ListOf(Number(0, 1)), "w4_group_size": Choice((8, 16, 32, 64, 128)),
        "timing_repeats": Int(1)},
    "09_best_practices": COMMON | {
        "threads": Int(0), "lm_val_blocks": Int(8), "gptq_calibration": Int(8), "student_steps": Int(1), "minilm_sentences": Int(32),
        "pipeline_neurons": Int(0, 447), "recovery_steps": Int(0), "timing_repeats": Int(1), "eval_draws": Int(1), "ppl_tolerance": Number(0)},
    "10_scaling_up": COMMON | {
        "threads": Int(1), "distill_steps": Int(3), "batch_size": Int(2), "block": Int(2, 128), "student_layers": Int(1, 12),
        "timing_repeats": Int(1), "qat_steps": Int(2), "qat_block": Int(2, 128)},
}

# Smaller sizes that `make test` runs a lesson with (nbmake applies them right after the parameters
# cell, from the cell's ``nbmake.mock`` metadata, which tests/test_notebook_conventions.py keeps equal
# to this table; ``course.sync_test_sizes`` writes it). They cut what only makes numbers steadier
# (timing repeats, evaluation text, seeds) so the whole suite stays under 15 minutes on a 2-core CPU;
# every assertion of the lesson must still hold at them, which `make test` itself checks. The runner,
# papermill and Jupyter ignore them: `make course` runs the quick defaults.
TEST_SIZES: dict[str, dict[str, Any]] = {
    "02_int8_quantization": {"n_sentences": 64, "timing_repeats": 2, "calibration_batches": [1, 4, 32]},
    "03_gptq": {"calibration_samples": 64, "calibration_seeds": 2, "eval_blocks": 32, "rule_bits": [3], "minilm_bits": [3]},
    "04_quantization_aware_training": {"comparison_seeds": 1, "lm_val_blocks": 32},
    "05_knowledge_distillation": {"vision_seeds": 3, "lm_steps": 60, "lm_val_blocks": 24},
    "06_pruning": {"timing_repeats": 8, "lm_val_blocks": 24},
    "07_importance_criteria": {"score_seeds": 2, "lm_val_blocks": 16},
    "09_best_practices": {"timing_repeats": 2, "eval_draws": 3},
}

RULES: dict[str, tuple[Rule, ...]] = {
    "02_int8_quantization": (
        Rule(("n_sentences", "batch_size"), lambda v: v["n_sentences"] >= v["batch_size"],
             "n_sentences must be at least batch_size"),),
    "04_quantization_aware_training": (
        Rule(("warmup_steps", "qat_steps"), lambda v: v["warmup_steps"] < v["qat_steps"],
             "warmup_steps must be smaller than qat_steps"),),
    "07_importance_criteria": (
        Rule(("score_samples",), lambda v: v["score_samples"] % 64 == 0, "score_samples must be a multiple of 64 (batches of 64)"),
        Rule(("tiny_probes",), lambda v: list(v["tiny_probes"]) == sorted(set(v["tiny_probes"])),
             "tiny_probes must increase (the last is the probe count the target is checked at)"),
        Rule(("lm_calibration",), lambda v: v["lm_calibration"] % 8 == 0, "lm_calibration must be a multiple of 8 (batches of 8)")),
    "08_moe_pruning": (
        Rule(("calibration_windows",), lambda v: v["calibration_windows"] % 8 == 0, "calibration_windows must be a multiple of 8 (batches of 8)"),
        Rule(("usage_sizes", "calibration_windows"), lambda v: max(v["usage_sizes"]) <= v["calibration_windows"] // 8,
             "usage_sizes counts calibration batches of 8 windows: each must be at most calibration_windows // 8"),
        Rule(("betas",), lambda v: v["betas"][0] == 0 and v["betas"][-1] == 1 and list(v["betas"]) == sorted(set(v["betas"])),
             "betas must increase from 0 to 1 (the two ends are checked: 0 = no skipping, 1 = top-1 routing)")),
    "09_best_practices": (
        Rule(("gptq_calibration",), lambda v: v["gptq_calibration"] % 8 == 0, "gptq_calibration must be a multiple of 8 (batches of 8)"),),
    "10_scaling_up": (
        Rule(("batch_size",), lambda v: v["batch_size"] % 2 == 0, "batch_size must be even (the global batch is split over 2 processes)"),),
}


def _problem(stem: str, name: str, value: Any, spec: Any) -> str:
    return f"lesson {stem}: {name} = {value!r} is not accepted; it takes {spec.describe()}"


def problems(stem: str, values: Mapping[str, Any]) -> list[str]:
    """Everything wrong with ``values`` (name -> value) for lesson ``stem``; [] when all is well.

    Raises:
        KeyError: ``stem`` has no specification, or ``values`` lacks one of its parameters.
    """
    specs = LESSONS[stem]
    missing = [n for n in specs if n not in values]
    if missing:
        raise KeyError(f"lesson {stem}: no value for parameter(s) {missing}")
    found = [_problem(stem, n, values[n], s) for n, s in specs.items() if not s.accepts(values[n])]
    if not found:  # rules compare values of the right types only
        found = [f"lesson {stem}: {r.text} (got " + ", ".join(f"{n} = {values[n]!r}" for n in r.names) + ")"
                 for r in RULES.get(stem, ()) if not r.holds(values)]
    return found


def check(stem: str, values: Mapping[str, Any]) -> None:
    """Raise :class:`ParameterError` naming the lesson, each bad parameter, its value and what it
    accepts; a notebook calls ``params.check("NN_topic", globals())`` right after its parameters."""
    found = problems(stem, values)
    if found:
        raise ParameterError("\n".join(found))
