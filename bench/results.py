"""The goals every benchmark measures itself against, collected for `make bench`'s closing summary.

Each benchmark calls :func:`record` for every ratio or figure that has a goal; the records go, one JSON
object a line, to the file named by ``BENCH_RESULTS`` (when unset, nothing is collected and the benchmark
only prints its own table). ``python -m bench.results FILE`` prints the summary table of a run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def record(name: str, value: float, goal: float, unit: str, *, higher_is_better: bool = True) -> None:
    """Add one measured figure and its goal to this run's summary (if a summary is being collected)."""
    target = os.environ.get("BENCH_RESULTS")
    if not target:
        return
    row = {"name": name, "value": value, "goal": goal, "unit": unit, "higher_is_better": higher_is_better}
    with Path(target).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _shown(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.0f} %"
    if unit in ("ms", "s"):
        return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}".rstrip()


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = ["", "Summary of this run (each figure against its goal)", "", "| measurement | measured | goal | |"]
    lines.append("|---|---|---|---|")
    met = 0
    for row in rows:
        ok = row["value"] >= row["goal"] if row["higher_is_better"] else row["value"] <= row["goal"]
        met += ok
        sign = "≥" if row["higher_is_better"] else "≤"
        lines.append(
            f"| {row['name']} | {_shown(row['value'], row['unit'])} | {sign} {_shown(row['goal'], row['unit'])} "
            f"| {'met' if ok else 'NOT MET'} |"
        )
    lines.append("")
    lines.append(f"{met} of {len(rows)} goals met")
    return "\n".join(lines)


if __name__ == "__main__":
    results = Path(sys.argv[1])
    if not results.exists():
        raise SystemExit(f"no benchmark results at {results}")
    print(summary(results))
