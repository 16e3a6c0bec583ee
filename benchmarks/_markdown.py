"""Markdown tables as the benchmark scripts print them (and docs/benchmarks.md holds them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(value) -> str:
    """A figure as printed: a float to three decimals, ``None`` (nothing to score) as ``-``."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def print_markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
