"""Deciding whether a compressed model may ship: a regression gate, a fallback, a picker.

A compression result is only useful if it keeps its quality within an agreed budget. The gate
follows the accuracy-control APIs of the quantization toolkits: a reference (baseline) metric, a
maximal drop, and whether that drop is absolute or relative to the baseline (NNCF's
``nncf.quantize_with_accuracy_control(..., max_drop=0.01, drop_type=DropType.ABSOLUTE)``,
github.com/openvinotoolkit/nncf; OpenVINO POT's AccuracyAware ``maximal_drop`` / ``drop_type``;
Intel Neural Compressor's ``accuracy_criterion: {relative: 0.01}``). Those toolkits fall back to
less aggressive settings (layers back in full precision) until the budget is met;
:func:`first_passing` does the same over a list of configurations you measured yourself.

- :class:`Metric` + :func:`check`: does one candidate stay within the budget of every metric?
  The allowed bound of a metric with baseline ``b`` and tolerance ``t`` is ``b - t`` (higher is
  better) or ``b + t`` (lower is better), or with ``t * |b|`` for a relative tolerance. A value
  exactly at the bound passes (up to floating-point rounding, see :data:`ROUNDING`).
- :func:`first_passing`: the first configuration, from most to least aggressive, that passes.
- :func:`pick`: the cheapest row of a table of measured options that meets a size budget, a
  quality tolerance and the hardware at hand.
- :func:`hardware_support`: the capability flags of this machine (no timing, no guessing).

Nothing meeting the budget is a normal outcome, not an error: the results say so, and name the
closest option and by how much it misses. Bad arguments raise ``ValueError`` at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import torch

from lessons_lib import session, sparse
from lessons_lib.checks import is_number, require

# Relative slack of the bound comparison: 0.8 - 0.1 is 0.7000000000000001 in binary floating
# point, and a candidate at 0.7 must still count as "exactly at the bound".
ROUNDING = 1e-9
DEFAULT_BASELINE_NAME = "fp32"


def _fmt(x: float) -> str:
    return f"{x:.6g}"


# ----------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Metric:
    """One quality metric of the gate and how much it may regress.

    Args:
        name: the key of the metric in the candidate and baseline mappings.
        higher_is_better: True for accuracy or cosine similarity, False for perplexity, error,
            latency.
        tolerance: the allowed regression, >= 0: in the metric's own units (``relative=False``,
            NNCF's ``DropType.ABSOLUTE``) or as a fraction of ``|baseline|`` (``relative=True``,
            ``DropType.RELATIVE``). 0 means "no worse than the baseline".
        relative: how ``tolerance`` is read (see above).
    """

    name: str
    higher_is_better: bool
    tolerance: float = 0.0
    relative: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and self.name != "", f"Metric.name must be a non-empty str, got {self.name!r}")
        require(isinstance(self.higher_is_better, bool),
                f"Metric.higher_is_better must be True or False, got {self.higher_is_better!r}")
        require(is_number(self.tolerance) and math.isfinite(self.tolerance) and self.tolerance >= 0,
                f"Metric.tolerance must be a finite number >= 0, got {self.tolerance!r}")
        require(isinstance(self.relative, bool), f"Metric.relative must be True or False, got {self.relative!r}")

    def slack(self, baseline: float) -> float:
        """How far the value may move the wrong way: ``tolerance`` or ``tolerance * |baseline|``."""
        return self.tolerance * abs(baseline) if self.relative else float(self.tolerance)

    def bound(self, baseline: float) -> float:
        """The worst value that still passes: ``baseline -/+ slack``."""
        return baseline - self.slack(baseline) if self.higher_is_better else baseline + self.slack(baseline)

    def describe(self) -> str:
        """The budget in words, e.g. "higher is better, at most 1% below the baseline"."""
        amount = f"{self.tolerance:.3g}" if not self.relative else f"{100 * self.tolerance:.3g}%"
        direction = "below" if self.higher_is_better else "above"
        return f"{'higher' if self.higher_is_better else 'lower'} is better, at most {amount} {direction} the baseline"


@dataclass(frozen=True)
class GateRow:
    """The verdict for one metric.

    Attributes:
        metric: its name.
        value: the candidate's value (may be NaN: a broken model fails, it does not raise).
        baseline: the reference value.
        bound: the worst value that passes.
        passed: value at or beyond the bound on the good side.
        violation: how far past the bound, as a fraction of ``|baseline|`` (of 1 when the baseline
            is 0); <= 0 when it passes (then minus the margin left), ``inf`` for NaN.
        reason: the comparison in words.
    """

    metric: str
    value: float
    baseline: float
    bound: float
    passed: bool
    violation: float
    reason: str

    def __post_init__(self) -> None:
        require(isinstance(self.metric, str) and self.metric != "", f"GateRow.metric must be a non-empty str, got {self.metric!r}")
        require(all(is_number(v) for v in (self.value, self.baseline, self.bound, self.violation)),
                "GateRow.value, baseline, bound and violation must be numbers")
        require(isinstance(self.passed, bool), f"GateRow.passed must be a bool, got {self.passed!r}")
        require(self.passed == (self.violation <= 0), "GateRow.passed must agree with violation <= 0")


@dataclass(frozen=True)
class GateResult:
    """The verdict of :func:`check`: ``passed`` only if every metric passed.

    Attributes:
        passed: every row passed.
        rows: one :class:`GateRow` per metric, in the order of the metrics given.
    """

    passed: bool
    rows: tuple[GateRow, ...]

    def __post_init__(self) -> None:
        require(len(self.rows) > 0 and all(isinstance(r, GateRow) for r in self.rows),
                "GateResult.rows must be a non-empty tuple of GateRow")
        require(self.passed == all(r.passed for r in self.rows), "GateResult.passed must equal all(row.passed)")

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the metrics that failed."""
        return tuple(r.metric for r in self.rows if not r.passed)

    @property
    def worst_violation(self) -> float:
        """The largest :attr:`GateRow.violation`: > 0 means fails, and by how much (comparable
        across metrics because each is a fraction of its baseline)."""
        return max(r.violation for r in self.rows)

    def __str__(self) -> str:
        head = "PASS" if self.passed else f"FAIL ({', '.join(self.failed)})"
        return head + "".join(f"\n  {r.reason}" for r in self.rows)


def _check_scores(scores: object, what: str) -> None:
    require(isinstance(scores, Mapping), f"{what} must be a mapping of metric name -> number, got {type(scores).__name__}")


def _check_metrics(metrics: object) -> tuple[Metric, ...]:
    require(isinstance(metrics, Sequence) and not isinstance(metrics, str) and len(metrics) > 0
            and all(isinstance(m, Metric) for m in metrics),
            f"metrics must be a non-empty sequence of Metric, got {metrics!r}")
    names = [m.name for m in metrics]
    require(len(set(names)) == len(names), f"metrics must have distinct names, got {names}")
    return tuple(metrics)


def _require_names(metrics: Sequence[Metric], scores: Mapping[str, float], what: str) -> None:
    missing = [m.name for m in metrics if m.name not in scores]
    require(not missing, f"metric(s) {missing} missing from {what}; {what} has: {sorted(map(str, scores)) or 'nothing'}")


def _row(metric: Metric, value: object, baseline: object) -> GateRow:
    require(is_number(baseline) and math.isfinite(baseline),
            f"baseline[{metric.name!r}] must be a finite number, got {baseline!r}")
    require(is_number(value), f"candidate[{metric.name!r}] must be a number, got {value!r}")
    value, baseline = float(value), float(baseline)
    bound = metric.bound(baseline)
    scale = abs(baseline) or 1.0
    budget = f"baseline {_fmt(baseline)}, {metric.describe()}"
    if math.isnan(value):
        return GateRow(metric.name, value, baseline, bound, False, math.inf, f"{metric.name} is NaN: fails ({budget})")
    past = (bound - value) if metric.higher_is_better else (value - bound)  # > 0: on the wrong side
    if past > 0 and math.isclose(value, bound, rel_tol=ROUNDING, abs_tol=ROUNDING * scale):
        past = 0.0  # exactly at the bound, up to rounding
    passed = past <= 0
    op = (">=" if metric.higher_is_better else "<=") if passed else ("<" if metric.higher_is_better else ">")
    verdict = "passes" if passed else f"fails by {_fmt(past)}"
    return GateRow(metric.name, value, baseline, bound, passed, past / scale,
                   f"{metric.name} {_fmt(value)} {op} bound {_fmt(bound)}: {verdict} ({budget})")


def check(candidate: Mapping[str, float], baseline: Mapping[str, float], metrics: Sequence[Metric]) -> GateResult:
    """Check a candidate's metrics against the baseline's, each within its :class:`Metric` budget.

    Args:
        candidate: metric name -> value of the compressed model (extra keys are ignored).
        baseline: metric name -> value of the reference model.
        metrics: what to check; each name must be in both mappings.
    Returns:
        A :class:`GateResult`; NaN candidate values fail (a diverged model is a result, not an error).
    Raises:
        ValueError: a metric missing from either mapping (the message lists the names present),
            duplicate metric names, a non-numeric value or a non-finite baseline.

    Example: accuracy 0.975 against a baseline of 0.985 with ``Metric("accuracy", True, 0.01)``
    passes (bound 0.975); 0.974 fails by 0.001.
    """
    metrics = _check_metrics(metrics)
    _check_scores(candidate, "candidate")
    _check_scores(baseline, "baseline")
    _require_names(metrics, candidate, "candidate")
    _require_names(metrics, baseline, "baseline")
    rows = tuple(_row(m, candidate[m.name], baseline[m.name]) for m in metrics)
    return GateResult(all(r.passed for r in rows), rows)


# ----------------------------------------------------------------------------- fallback
@dataclass(frozen=True)
class Fallback:
    """The outcome of :func:`first_passing`.

    Attributes:
        chosen: name of the first configuration that passed, or None if none did.
        tried: (name, :class:`GateResult`) of every configuration checked, in order (all of them
            when none passed; up to and including the chosen one otherwise).
        fell_back: how many configurations failed before the chosen one (all, if none passed).
        closest: when none passed, the one with the smallest worst-case violation
            (:attr:`GateResult.worst_violation`); None otherwise.
    """

    chosen: str | None
    tried: tuple[tuple[str, GateResult], ...]
    fell_back: int
    closest: str | None = None

    def __post_init__(self) -> None:
        require(len(self.tried) > 0, "Fallback.tried must not be empty")
        require((self.chosen is None) != (self.closest is None), "Fallback: exactly one of chosen and closest is set")
        expected = len(self.tried) - (self.chosen is not None)
        require(self.fell_back == expected, f"Fallback.fell_back must be {expected}, got {self.fell_back}")

    @property
    def passed(self) -> bool:
        """Whether any configuration met the budget."""
        return self.chosen is not None

    @property
    def result(self) -> GateResult:
        """The gate result of the chosen configuration, or of the closest one when none passed."""
        return dict(self.tried)[self.chosen if self.chosen is not None else self.closest]

    def __str__(self) -> str:
        if self.passed:
            return f"chose {self.chosen!r} after {self.fell_back} fallback(s)"
        return (f"none of the {len(self.tried)} configurations meets the budget; closest: {self.closest!r} "
                f"({self.result})")


def first_passing(configs: Sequence[tuple[str, Mapping[str, float]]], baseline: Mapping[str, float],
                  metrics: Sequence[Metric]) -> Fallback:
    """The first configuration that passes the gate, trying them from most to least aggressive.

    Args:
        configs: (name, metrics of that configuration), ordered most aggressive first (e.g.
            int4, int8 per-tensor, int8 per-channel, fp16).
        baseline, metrics: as for :func:`check`.
    Returns:
        A :class:`Fallback`. If none passes it says so (``chosen`` None) and names the closest
        one; it does not raise.
    Raises:
        ValueError: empty configs, duplicate or non-str names, or any config lacking a metric
            (all are checked before any gate runs).
    """
    metrics = _check_metrics(metrics)
    require(isinstance(configs, Sequence) and len(configs) > 0,
            "configs must be a non-empty sequence of (name, metrics) pairs, most aggressive first")
    for item in configs:
        require(isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0] != "",
                f"each config must be a (name: str, metrics: mapping) pair, got {item!r}")
        _check_scores(item[1], f"config {item[0]!r}")
        _require_names(metrics, item[1], f"config {item[0]!r}")
    names = [name for name, _ in configs]
    require(len(set(names)) == len(names), f"config names must be distinct, got {names}")
    _check_scores(baseline, "baseline")
    _require_names(metrics, baseline, "baseline")
    tried: list[tuple[str, GateResult]] = []
    for name, scores in configs:
        result = check(scores, baseline, metrics)
        tried.append((name, result))
        if result.passed:
            return Fallback(name, tuple(tried), len(tried) - 1)
    closest = min(tried, key=lambda t: t[1].worst_violation)[0]  # first of equals: the most aggressive
    return Fallback(None, tuple(tried), len(tried), closest)


# ----------------------------------------------------------------------------- picker
@dataclass(frozen=True)
class Pick:
    """The outcome of :func:`pick`.

    Attributes:
        chosen: the cheapest row meeting every constraint (a copy), or None.
        rejected: (name, why) for every row that misses a constraint, in table order.
        closest: when nothing fits, the name of the row that misses by least; None otherwise.
        miss: how the closest row misses, in words ("" when a row was chosen).
        shortfall: the closest row's largest miss as a fraction of the limit it misses
            (bytes over the budget / budget, quality loss past the tolerance / |baseline|);
            ``inf`` when it lacks hardware; 0 when a row was chosen.
    """

    chosen: Mapping[str, object] | None
    rejected: tuple[tuple[str, str], ...]
    closest: str | None = None
    miss: str = ""
    shortfall: float = 0.0

    def __post_init__(self) -> None:
        require((self.chosen is None) == (self.closest is not None), "Pick: exactly one of chosen and closest is set")
        require(is_number(self.shortfall) and self.shortfall >= 0, f"Pick.shortfall must be >= 0, got {self.shortfall!r}")
        require((self.chosen is None) or (self.miss == "" and self.shortfall == 0), "Pick: a chosen row has no miss")

    @property
    def found(self) -> bool:
        """Whether some row met every constraint."""
        return self.chosen is not None

    def __str__(self) -> str:
        if self.found:
            return f"chose {self.chosen!r}"
        return f"no option meets the constraints; closest: {self.closest!r}, which misses: {self.miss}"


def _needs(row: Mapping[str, object], name: str) -> frozenset[str]:
    needs = row.get("needs", ())
    require(isinstance(needs, Collection) and not isinstance(needs, str) and all(isinstance(n, str) for n in needs),
            f"row {name!r}: 'needs' must be a collection of str such as {{'cuda', 'bf16'}}, got {needs!r}")
    return frozenset(needs)


def pick(table: Sequence[Mapping[str, object]], *, quality_key: str, cost_key: str, higher_is_better: bool,
         bytes_key: str = "bytes", max_bytes: float | None = None, max_quality_loss: float | None = None,
         relative: bool = False, hardware: Collection[str] | None = None, baseline: float | None = None,
         baseline_name: str = DEFAULT_BASELINE_NAME, name_key: str = "name") -> Pick:
    """The cheapest option (lowest ``row[cost_key]``) that fits the size, quality and hardware.

    Args:
        table: measured options, e.g. ``{"name": "int8", "accuracy": 0.984, "bytes": 1.2e6,
            "latency_ms": 3.1, "needs": {"cpu"}}``; ``needs`` (optional) lists the features the
            option requires.
        quality_key, cost_key: the row keys of quality and of cost (latency, bytes...); ties in
            cost go to the earlier row.
        higher_is_better: of the quality.
        bytes_key: the row key of the size, read when ``max_bytes`` is given.
        max_bytes: size budget (a row passes at exactly the budget); None: no budget.
        max_quality_loss: allowed quality loss versus the baseline, >= 0, in the quality's units
            (``relative=False``) or as a fraction of ``|baseline|``; None: no quality constraint.
        relative: how ``max_quality_loss`` is read.
        hardware: the features this machine has (e.g. ``hardware_support().features``); a row
            passes if its ``needs`` are a subset. None: no hardware filter.
        baseline: the reference quality; None: the quality of the row named ``baseline_name``.
        baseline_name: the reference row's name (default "fp32"), used when ``baseline`` is None.
        name_key: the row key of the option's name.
    Returns:
        A :class:`Pick`. When no row fits it names the closest and how it misses (not an error).
    Raises:
        ValueError: an empty table, a row without a needed key (the message lists the keys the
            row has), a negative budget or tolerance, a missing baseline row, bad ``needs``.
    """
    require(isinstance(table, Sequence) and len(table) > 0 and all(isinstance(r, Mapping) for r in table),
            "table must be a non-empty sequence of mappings (one per option)")
    require(isinstance(higher_is_better, bool), f"higher_is_better must be True or False, got {higher_is_better!r}")
    require(isinstance(relative, bool), f"relative must be True or False, got {relative!r}")
    for what, limit in (("max_bytes", max_bytes), ("max_quality_loss", max_quality_loss)):
        require(limit is None or (is_number(limit) and math.isfinite(limit) and limit >= 0),
                f"{what} must be None or a finite number >= 0, got {limit!r}")
    require(hardware is None or (isinstance(hardware, Collection) and not isinstance(hardware, str)
                                 and all(isinstance(h, str) for h in hardware)),
            f"hardware must be None or a collection of feature names such as {{'cpu', 'avx2'}}, got {hardware!r}")
    keys = [name_key, quality_key, cost_key] + ([bytes_key] if max_bytes is not None else [])
    for i, row in enumerate(table):
        missing = [k for k in keys if k not in row]
        require(not missing, f"row {i} lacks key(s) {missing}; it has: {sorted(map(str, row))}")
        for k in keys[1:]:  # a NaN quality (a broken model) is allowed: it fails the tolerance
            require(is_number(row[k]) and (k == quality_key or not math.isnan(row[k])),
                    f"row {row[name_key]!r}: {k} must be a number, got {row[k]!r}")
    names = [row[name_key] for row in table]
    require(len(set(map(str, names))) == len(names), f"option names must be distinct, got {names}")
    needs = [_needs(row, str(row[name_key])) for row in table]
    if max_quality_loss is not None and baseline is None:
        ref = [row for row in table if row[name_key] == baseline_name]
        require(len(ref) == 1, f"no baseline row named {baseline_name!r} (pass baseline=<value> or baseline_name=); "
                               f"rows: {names}")
        baseline = ref[0][quality_key]
    require(baseline is None or (is_number(baseline) and math.isfinite(baseline)),
            f"baseline must be None or a finite number, got {baseline!r}")

    rejected: list[tuple[str, str]] = []
    misses: list[tuple[float, str, str]] = []  # (shortfall, name, why), rows that miss
    fits: list[Mapping[str, object]] = []
    have = frozenset(hardware) if hardware is not None else None
    for row, need in zip(table, needs):
        why: list[str] = []
        worst = 0.0
        if have is not None and not need <= have:
            why.append(f"needs {sorted(need - have)} which this hardware lacks")
            worst = math.inf
        if max_bytes is not None and row[bytes_key] > max_bytes:
            over = row[bytes_key] - max_bytes
            why.append(f"{bytes_key} {_fmt(row[bytes_key])} is {_fmt(over)} over the budget {_fmt(max_bytes)}")
            worst = max(worst, over / (max_bytes or 1.0))
        if max_quality_loss is not None:
            metric = Metric(quality_key, higher_is_better, max_quality_loss, relative)
            verdict = _row(metric, row[quality_key], baseline)
            if not verdict.passed:
                loss = (baseline - row[quality_key]) if higher_is_better else (row[quality_key] - baseline)
                why.append(f"{quality_key} loss {_fmt(loss)} exceeds the tolerance {_fmt(metric.slack(baseline))} "
                           f"by {_fmt(abs(row[quality_key] - verdict.bound))} (baseline {_fmt(baseline)})")
                worst = max(worst, verdict.violation)
        if why:
            rejected.append((str(row[name_key]), "; ".join(why)))
            misses.append((worst, str(row[name_key]), "; ".join(why)))
        else:
            fits.append(row)
    if fits:
        return Pick(dict(min(fits, key=lambda r: r[cost_key])), tuple(rejected))
    shortfall, closest, why = min(misses, key=lambda m: m[0])  # first of equals
    return Pick(None, tuple(rejected), closest, why, shortfall)


# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class HardwareSupport:
    """What this machine can run, as flags reported by torch (nothing is timed or guessed).

    Attributes:
        device: the device asked about ("cpu" or "cuda:N").
        cpu_capability: the SIMD level torch's CPU kernels use ("DEFAULT", "AVX2", "AVX512", ...).
        cpu_bf16: the CPU has native bf16 dot products (AVX512-BF16 or AMX); without them torch
            still computes bf16 on CPU, by conversion, usually no faster than fp32.
        cpu_fp16: the CPU has native fp16 matrix instructions (AMX-FP16).
        cpu_vnni: the CPU has VNNI int8 dot products (what makes int8 GEMMs fast on x86).
        cuda_available: torch sees a CUDA GPU.
        gpu: its name, or None.
        cuda_capability: (major, minor) compute capability, or None.
        cuda_bf16: native bf16 arithmetic on the GPU: compute capability >= 8.0 (Ampere), the
            test of ``torch.cuda.is_bf16_supported(including_emulation=False)``.
        cuda_fp16: fp16 arithmetic on the GPU (every CUDA GPU torch supports).
        sparse_2_4: 2:4 semi-structured kernels can run (:func:`lessons_lib.sparse.semi_structured_available`).
        sparse_2_4_reason: why (not), in words.
        int8_engines: ``torch.backends.quantized.supported_engines`` (CPU int8 back-ends of
            ``torch.ao``), without "none".
    """

    device: str
    cpu_capability: str
    cpu_bf16: bool
    cpu_fp16: bool
    cpu_vnni: bool
    cuda_available: bool
    gpu: str | None
    cuda_capability: tuple[int, int] | None
    cuda_bf16: bool
    cuda_fp16: bool
    sparse_2_4: bool
    sparse_2_4_reason: str
    int8_engines: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        require(isinstance(self.device, str) and (self.device == "cpu" or self.device.startswith("cuda")),
                f"HardwareSupport.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        require(self.cuda_available or not (self.cuda_bf16 or self.cuda_fp16 or self.sparse_2_4),
                "HardwareSupport: CUDA features need cuda_available")
        require(all(isinstance(e, str) for e in self.int8_engines), "HardwareSupport.int8_engines must be str")

    @property
    def features(self) -> frozenset[str]:
        """Feature names for :func:`pick`'s ``hardware``, for the device asked about.

        CPU: "cpu", the lower-cased capability ("avx2"), "bf16" / "fp16" when native, "vnni",
        and "int8:<engine>" per torch.ao engine. CUDA: "cuda", "sm<major><minor>" ("sm80"),
        "fp16", "bf16" when supported, "2:4" when semi-structured kernels run.
        """
        if self.device == "cpu":
            out = {"cpu", self.cpu_capability.lower()} | {f"int8:{e}" for e in self.int8_engines}
            out |= {name for name, ok in (("bf16", self.cpu_bf16), ("fp16", self.cpu_fp16), ("vnni", self.cpu_vnni)) if ok}
            return frozenset(out)
        out = {"cuda"}
        if self.cuda_capability is not None:
            out.add(f"sm{self.cuda_capability[0]}{self.cuda_capability[1]}")
        out |= {name for name, ok in (("fp16", self.cuda_fp16), ("bf16", self.cuda_bf16), ("2:4", self.sparse_2_4)) if ok}
        return frozenset(out)


def _cpu_flag(name: str) -> bool:
    """A ``torch.cpu._is_*_supported`` flag (private torch API: False where this torch lacks it)."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


def hardware_support(device: torch.device | str = "cpu") -> HardwareSupport:
    """The capability flags of this machine for ``device`` ("cpu", "cuda" or "cuda:N").

    Reuses :func:`lessons_lib.session.machine_info` (CPU capability, GPU name) and
    :func:`lessons_lib.sparse.semi_structured_available` (2:4 kernels). Flags only: whether a
    format is *faster* here is a measurement (``lessons_lib.measure.interleaved``), not a flag.

    Raises:
        ValueError: a device that is not "cpu" / "cuda[:N]", or CUDA asked for where there is none
            (:func:`lessons_lib.session.pick_device`'s message).
    """
    require(isinstance(device, (str, torch.device)), f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    name = str(device)
    require(name == "cpu" or name == "cuda" or name.startswith("cuda:"),
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    dev = session.pick_device(name)
    info = session.machine_info(dev)
    cuda_ok = bool(info["cuda_available"])
    gpu_dev = dev if dev.type == "cuda" else (torch.device("cuda") if cuda_ok else None)
    capability = tuple(torch.cuda.get_device_capability(gpu_dev)) if gpu_dev is not None else None
    gpu = torch.cuda.get_device_name(gpu_dev) if gpu_dev is not None else None
    sparse_ok, sparse_reason = sparse.semi_structured_available(gpu_dev)
    return HardwareSupport(
        device=str(dev), cpu_capability=str(info["cpu_capability"]),
        cpu_bf16=_cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported"),
        cpu_fp16=_cpu_flag("_is_amx_fp16_supported"), cpu_vnni=_cpu_flag("_is_vnni_supported"),
        cuda_available=cuda_ok, gpu=gpu, cuda_capability=capability,
        cuda_bf16=capability is not None and capability[0] >= 8, cuda_fp16=cuda_ok,
        sparse_2_4=sparse_ok, sparse_2_4_reason=sparse_reason,
        int8_engines=tuple(e for e in torch.backends.quantized.supported_engines if e != "none"))
