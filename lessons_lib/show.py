"""What the notebooks show: tables of results.

The only module of the library that displays anything; everything else returns values. In a
notebook :func:`table` renders through IPython; outside one (a terminal, a script) it prints the
same Markdown text.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def markdown_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows of cells as a Markdown table; cells are written with ``str`` (format numbers first).

    >>> print(markdown_table([["fp32", 1.0], ["int8", "0.25"]], ["format", "bytes vs fp32"]))
    | format | bytes vs fp32 |
    |---|---|
    | fp32 | 1.0 |
    | int8 | 0.25 |
    """
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row {i} has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> None:
    """Display rows as a Markdown table: rendered in Jupyter, printed as Markdown text elsewhere."""
    text = markdown_table(rows, header)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None  # type: ignore[assignment]
    if get_ipython is None or get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))


def verdict(ok: bool) -> str:
    """A target's verdict for a lesson's targets table: "met", or "**missed**" in bold."""
    return "met" if ok else "**missed**"
