"""The outcome of one test, shared by the console report and the JUnit writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["pass", "fail", "error"]


@dataclass(frozen=True)
class Outcome:
    file: str
    name: str
    status: Status
    #: why it failed or errored, one line each
    problems: tuple[str, ...] = ()
    #: ``explain``'s account of the decision (empty when there was none)
    explanation: str = field(default="", repr=False)
