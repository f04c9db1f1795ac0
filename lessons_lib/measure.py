"""Measuring size, speed and memory in a way a careful engineer would trust.

The three classic mistakes this module avoids (lesson 00 shows each one happening):
1. Timing the first call: it includes lazy initialisation, allocator growth, kernel selection and
   (with ``torch.compile``) compilation. We run ``warmup`` calls first and never time them.
2. Timing asynchronous work: CUDA kernels are queued and return at once. We synchronise the
   device before starting and before stopping the clock.
3. Reporting one number or the mean: timings are skewed by interrupts and other processes. We
   repeat, and report the median with the interquartile range.
"""
from __future__ import annotations

import io
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _tensor_bytes(obj: Any) -> int:
    """Bytes held by a tensor (quantized ones included) or a nested tuple/list of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or, for a tensor subclass that
    wraps others (torchao's ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``...: the PyTorch
    ``__tensor_flatten__`` protocol), its inner tensors, recursively."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()``: weights, buffers, quantized weights.

    Tied tensors (same storage) are counted once. Quantized modules from ``torch.ao`` keep their
    weights in packed form; their state_dict exposes them as quantized tensors (1 byte per int8
    element, plus their per-channel scale and zero-point tensors), which this counts. torchao's
    quantized weights are tensor subclasses: their inner tensors (codes, scales, zero points)
    are counted.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for value in model.state_dict().values():
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in (leaf for v in tensors if isinstance(v, torch.Tensor) for leaf in _plain_tensors(v)):
            key = (t.untyped_storage().data_ptr(), t.numel()) if not t.is_quantized else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            total += _tensor_bytes(t)
            if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += _tensor_bytes((t.q_per_channel_scales(), t.q_per_channel_zero_points()))
    return total


def serialized_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: what the model costs on disk, overheads included."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def path_bytes(path: str | Path) -> int:
    """Size of a file, or of every file under a folder (e.g. a ``save_pretrained`` output)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    raise FileNotFoundError(f"no file or folder at {path}")


def synchronize(device: torch.device | str) -> None:
    """Wait until all queued work on ``device`` has finished (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Repeated wall-clock measurements of one callable, in milliseconds."""

    times_ms: tuple[float, ...] = field(repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the spread of the middle half of the runs."""
        if len(self.times_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q3 - q1

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    def __str__(self) -> str:
        return f"{self.median_ms:.3g} ms median (IQR {self.iqr_ms:.2g} ms, min {self.min_ms:.3g} ms, n={len(self.times_ms)})"


def benchmark(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones, device-synchronised.

    Args:
        fn: the work to time, with its inputs already prepared (a closure or lambda).
        device: where ``fn`` runs; CUDA is synchronised before and after every timed call.
        warmup: untimed calls first (>= 0).
        repeats: timed calls (>= 1).
        max_seconds: stop repeating early once this much time was spent timing (at least one run).
    Returns:
        A :class:`Timing` with every run's time.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
        if max_seconds is not None and spent >= max_seconds:
            break
    return Timing(tuple(times))


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, rounds: int = 5,
                device: torch.device | str = "cpu", warmup: int = 1) -> dict[str, Timing]:
    """Time several callables in turns, so that a change in the machine's load hits them alike.

    Each callable gets ``warmup`` untimed calls, then ``rounds`` rounds in which every callable in
    turn is timed ``max(1, repeats // rounds)`` times with :func:`benchmark`. Compare the medians
    of the result (ratios between them are what interleaving protects; lesson 00 shows why one
    set of timings cannot reveal load).

    Args:
        fns: name -> the work to time (inputs prepared, as for :func:`benchmark`).
        repeats: timed calls per callable in all (about; rounded down to a multiple of ``rounds``).
        rounds: how many times to alternate (>= 1).
        device: where the work runs (CUDA is synchronised around every timed call).
        warmup: untimed calls of each callable first (>= 0).
    Returns:
        name -> :class:`Timing` of all its timed calls, in the order of ``fns``.
    """
    if not fns or repeats < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need at least one callable, repeats >= 1, rounds >= 1 and warmup >= 0, "
                         f"got {len(fns)} callables, repeats={repeats}, rounds={rounds}, warmup={warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, tuple[float, ...]] = {name: () for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += benchmark(fn, device, warmup=0, repeats=max(1, repeats // rounds)).times_ms
    return {name: Timing(t) for name, t in times.items()}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu", interval_s: float = 0.001,
                      read_rss: Callable[[], int] = _rss_bytes) -> int:
    """Extra memory at the peak of ``fn()`` above what was in use when it started.

    On CUDA this is exact: ``torch.cuda.max_memory_allocated`` after a reset. On CPU it is the
    resident set size that ``read_rss()`` reports (default: this process's), sampled every
    ``interval_s`` by a thread: a peak shorter than the interval can be missed, and freed memory
    the allocator keeps still counts. (The course runner passes a reader that sums the kernel
    processes it started.)
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = read_rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, read_rss())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, read_rss())
    return peak - base


def flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Floating-point operations of one forward pass ``model(*inputs, **kwargs)`` (no autograd).

    Counted by PyTorch's ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
    products and convolutions only, a multiply-add as 2: a Linear(in, out) on (B, in) costs
    2*B*in*out; a Conv2d costs 2*B*C_out*H_out*W_out*(C_in/groups)*k_h*k_w. Bias additions,
    normalisation, activations and pooling are not counted. The count is what the arithmetic
    costs, not what it takes: sparse or masked weights still count in full (lesson 06).

    Returns:
        The total FLOPs, an ``int``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())
