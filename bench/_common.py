"""Helpers shared by the bench scripts: percentiles, a rich table, JSON output."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(title: str, rows: list[dict[str, Any]], out: str, extra: dict[str, Any] | None = None) -> None:
    """Print ``rows`` as a table and write them (with machine info) to ``out`` as JSON."""
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="left" if col == rows[0] and False else "right")
    for row in rows:
        table.add_row(*(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=max(Console().width, 140)).print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"title": title, "machine": platform.platform(), "python": platform.python_version(), "rows": rows}
    path.write_text(json.dumps({**body, **(extra or {})}, indent=2))
    print(f"wrote {path}")
