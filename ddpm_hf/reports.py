"""Tables a person and a script can both read: every report writes the same rows as CSV and as Markdown."""

from __future__ import annotations

import csv
import math


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows of one shape as CSV, the keys of the first row as the header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "–" if value is None else str(value)


def markdown_table(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows``; ``columns`` maps keys to headers (all keys of the first row by default).
    Numbers are right-aligned and printed with four significant decimals."""
    columns = columns or {key: key for key in rows[0]}
    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    # A column of numbers (some missing) is right-aligned.
    numeric = {key: any(is_number(r.get(key)) for r in rows) and all(is_number(r.get(key)) or r.get(key) is None for r in rows) for key in columns}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "|".join("---:" if numeric[k] else "---" for k in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(key)) for key in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str, intro: str, rows: list[dict], columns: dict[str, str] | None = None) -> None:
    with open(path, "w") as f:
        f.write(intro.rstrip() + "\n\n" + markdown_table(rows, columns))
