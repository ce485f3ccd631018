"""Problems found while loading policies: where (file, document, field) and what.

Every loader and validator reports through :class:`IssueCollector` instead of raising, so
``authz-server validate`` can print *all* problems at once and a bad reload can be rejected
whole while the last good policy set keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem: ``file: kind/namespace/name: field.path: message``."""

    file: str
    document: str
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        where = ": ".join(part for part in (self.file, self.document, self.field) if part)
        return f"{prefix}{where}: {self.message}"


@dataclass(slots=True)
class IssueCollector:
    """Collects issues for one document; ``scoped`` hands out a view with a field prefix."""

    file: str = ""
    document: str = ""
    prefix: str = ""
    issues: list[Issue] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        self.issues.append(Issue(self.file, self.document, self._join(path), message, "error"))

    def warning(self, path: str, message: str) -> None:
        self.issues.append(Issue(self.file, self.document, self._join(path), message, "warning"))

    def scoped(self, path: str) -> IssueCollector:
        """A collector writing into the same list, with ``path`` prepended to every field."""
        return IssueCollector(self.file, self.document, self._join(path), self.issues)

    def _join(self, path: str) -> str:
        if not self.prefix:
            return path
        if not path:
            return self.prefix
        return self.prefix + (path if path.startswith("[") else "." + path)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]
