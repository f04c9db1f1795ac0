"""lessons_lib.show: the tables the notebooks display."""
import pytest

from lessons_lib import show


def test_markdown_table_by_hand_escapes_pipes_and_refuses_ragged_rows():
    text = show.markdown_table([[1, "a|b"], [2.5, "c\nd"]], ["n", "text"])
    assert text.splitlines() == ["| n | text |", "|---|---|", "| 1 | a\\|b |", "| 2.5 | c d |"]
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        show.markdown_table([[1, 2], [3]], ["a", "b"])


def test_table_displays_the_same_markdown(capsys):
    show.table([["x", 1]], ["name", "value"])  # outside a notebook IPython prints the plain-text repr
    assert "| x | 1 |" in capsys.readouterr().out


def test_verdict_words():
    assert show.verdict(True) == "met" and show.verdict(False) == "**missed**"
