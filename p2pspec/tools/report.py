"""Benchmark reports' tables in docs/benchmarks.md, each between a pair of markers
(`<!-- NAME-table:begin -->` ... `<!-- NAME-table:end -->`) that its benchmark rewrites."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_table"]


def write_table(markdown: Path, name: str, table: str) -> bool:
    """Put `table` between the NAME markers of `markdown`; False (nothing written) where
    the file or its markers are missing."""
    begin, end = f"<!-- {name}-table:begin -->", f"<!-- {name}-table:end -->"
    if not markdown.is_file():
        return False
    text = markdown.read_text()
    if begin not in text or end not in text:
        return False
    start, stop = text.index(begin) + len(begin), text.index(end)
    markdown.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    return True
