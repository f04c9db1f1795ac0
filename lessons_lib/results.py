"""Recording a lesson's key numbers to ``<results_dir>/<lesson>.json``.

File format (one per lesson)::

    {"lesson": "02_int8_quantization", "device": "cpu", "quick": true,
     "parameters": {...the notebook's parameters...},
     "machine": {...lessons_lib.session.machine_info()...},
     "metrics": {"minilm_int8_cosine": 0.991, ...}}

Metric values are numbers (int, float, bool) or short strings (a module name). Non-finite floats
are stored as the strings "inf", "-inf" and "nan" so the file stays standard JSON.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

_LESSON_RE = re.compile(r"^\d\d_[a-z0-9_]+$")
_METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _plain(value: Any, name: str) -> int | float | bool | str:
    """Turn a metric value into a JSON-safe scalar, refusing anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}; record a single number")
        value = value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)  # 'inf', '-inf', 'nan'
    raise TypeError(f"metric {name!r} must be a number, bool or string, got {type(value).__name__}")


def _jsonable(obj: Any) -> Any:
    """Parameters as JSON: literals pass through, anything else becomes its repr."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return repr(obj)


def record(
    lesson: str,
    metrics: Mapping[str, Any],
    *,
    parameters: Mapping[str, Any],
    results_dir: str | Path,
    device: torch.device | str,
    quick: bool,
    machine: Mapping[str, Any] | None = None,
) -> Path:
    """Write a lesson's metrics to ``<results_dir>/<lesson>.json`` and return the path.

    The file is written to a temporary name and renamed, so a crash never leaves half a file or
    destroys the previous one.

    Args:
        lesson: the notebook's stem, e.g. "00_orientation".
        metrics: name -> number (or short string), under the names the lesson's issue gives.
        parameters: the notebook's parameter values for this run.
        results_dir: the notebook's ``results_dir`` parameter; created if missing.
        device: the device the lesson ran on.
        quick: whether the quick (default) variant ran.
        machine: optional facts from :func:`lessons_lib.session.machine_info`.
    """
    if not _LESSON_RE.match(lesson):
        raise ValueError(f"lesson must be a notebook stem like '00_orientation', got {lesson!r}")
    if not metrics:
        raise ValueError("metrics is empty: a lesson must record at least one measured number")
    clean: dict[str, int | float | bool | str] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _METRIC_RE.match(name):
            raise ValueError(f"metric names must be identifiers like 'fp32_acc', got {name!r}")
        clean[name] = _plain(value, name)
    payload = {
        "lesson": lesson,
        "device": str(device),
        "quick": bool(quick),
        "parameters": _jsonable(dict(parameters)),
        "machine": _jsonable(dict(machine or {})),
        "metrics": clean,
    }
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{lesson}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{lesson}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read one lesson's results file back."""
    return json.loads(Path(path).read_text())


def load_all(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``<lesson>.json`` under ``results_dir``, keyed by lesson, in lesson order."""
    out = {}
    for path in sorted(Path(results_dir).glob("[0-9][0-9]_*.json")):
        data = load(path)
        out[data.get("lesson", path.stem)] = data
    return out
