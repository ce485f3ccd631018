"""The demo's results as a plain-text table: readable in any terminal, no colours, ASCII only.

One line per request (what was sent, what it should get, what it got), then indented lines
saying which hop and policy decided, why, and what reached the upstream — so a long reason
never widens the table.
"""

from __future__ import annotations

from typing import Sequence

from .scenario import Outcome

_HEADER = ("#", "request", "credential", "expect", "got", "")
_NUMERIC = {0, 3, 4}
_KEY_WIDTH = 10


def render(outcomes: Sequence[Outcome]) -> str:
    """The table, a rule under the header, and a one-line summary."""
    rows = [
        (
            str(index), outcome.step.label, outcome.step.credential, str(outcome.step.expected),
            str(outcome.status or "-"), "ok" if outcome.passed else "FAIL",
        )
        for index, outcome in enumerate(outcomes, 1)
    ]
    widths = [max(len(row[i]) for row in (_HEADER, *rows)) for i in range(len(_HEADER))]
    indent = " " * (2 + widths[0] + 2)
    lines = [_line(_HEADER, widths), _line(tuple("-" * w for w in widths), widths)]
    for row, outcome in zip(rows, outcomes):
        details = [("decided by", outcome.decided_by)]
        if outcome.why:
            details.append(("why", outcome.why))
        details.extend(outcome.notes)
        lines.append(_line(row, widths))
        lines.extend(f"{indent}{key.ljust(_KEY_WIDTH)}  {text}" for key, text in details)
    failed = sum(not outcome.passed for outcome in outcomes)
    lines.append("")
    summary = f"{len(outcomes) - failed}/{len(outcomes)} requests as expected"
    lines.append(summary + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """Text cells left-aligned, numbers (#, expect, got) right-aligned."""
    padded = [
        cell.rjust(width) if i in _NUMERIC else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, widths))
    ]
    return "  " + "  ".join(padded).rstrip()
