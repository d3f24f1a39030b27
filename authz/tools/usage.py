"""Help-text conventions shared by authz's command lines (``authz``, the generators'
``python -m`` forms and ``python -m authz.stack``): the ``exit codes:`` epilog, kept line by line by
``argparse.RawDescriptionHelpFormatter``, and descriptions wrapped to match."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Final

__all__ = ["command_parser", "exit_codes", "paragraph"]

_WIDTH: Final = 79


def paragraph(text: str) -> str:
    """``text`` wrapped at 79 columns: a description for a parser that uses
    ``argparse.RawDescriptionHelpFormatter`` (which prints it as given)."""
    return textwrap.fill(text, _WIDTH)


def exit_codes(codes: Sequence[tuple[int, str]]) -> str:
    """An argparse epilog listing ``codes`` (exit code, meaning) under ``exit codes:``, one
    ``  N  meaning`` entry each, wrapped at 79 columns; print it with
    ``argparse.RawDescriptionHelpFormatter`` (which keeps these line breaks)."""
    lines = ["exit codes:"]
    for code, meaning in codes:
        lines += textwrap.wrap(
            meaning, _WIDTH, initial_indent=f"  {code}  ", subsequent_indent=" " * 5
        )
    return "\n".join(lines)


def command_parser(
    prog: str,
    summary: str,
    codes: Sequence[tuple[int, str]],
    *,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """A top-level parser under ``prog``: ``summary`` as its :func:`paragraph` description,
    ``codes`` as its :func:`exit_codes` epilog, the options of ``parents`` (parent parsers
    without ``--help``)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=paragraph(summary),
        epilog=exit_codes(codes),
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
