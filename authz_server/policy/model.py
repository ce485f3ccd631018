"""The policy model: Istio's AuthorizationPolicy and RequestAuthentication, parsed and validated.

These are plain immutable values. They say *what* the operator wrote (with Istio's defaults
applied); the engine turns them into matchers. Field values keep Istio's spelling so messages
and ``explain`` output can quote them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from authz_server.jwt.rules import JwtRule


class Action(Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """How a policy attaches to workloads (SPEC section 2): a selector *or* targetRefs.

    ``selector is None`` and no targetRefs means "every workload of the namespace" (or of the
    mesh, in the root namespace).
    """

    selector: Mapping[str, str] | None
    target_refs: tuple[TargetRef, ...] = ()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a document came from, for messages: ``file`` and its index in the file."""

    file: str
    index: int

    def __str__(self) -> str:
        return f"{self.file}#{self.index}"


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """One field of a source/operation or one ``when`` condition.

    ``attribute`` is a name from :mod:`authz_server.policy.vocabulary`; ``params`` carries the
    header name or claim path of parametrised keys. ``label`` is how the policy spelled it
    (``from[0].source.principals``), for ``explain``.
    """

    attribute: str
    params: tuple[str, ...]
    values: tuple[str, ...]
    not_values: tuple[str, ...]
    label: str


@dataclass(frozen=True, slots=True)
class Rule:
    """``from`` (OR of sources), ``to`` (OR of operations), ``when`` (AND), all ANDed.

    ``sources``/``operations`` are ``None`` when omitted (no constraint); each source or
    operation is the AND of its fields.
    """

    sources: tuple[tuple[FieldMatch, ...], ...] | None
    operations: tuple[tuple[FieldMatch, ...], ...] | None
    conditions: tuple[FieldMatch, ...]


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: Action
    attachment: Attachment
    #: ``None`` when the spec had no ``rules`` (ALLOW: allow-nothing).
    rules: tuple[Rule, ...] | None
    provider: str | None
    dry_run: bool
    origin: Origin

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rule_id(self, index: int) -> str:
        """Istio's RBAC policy name for a rule, as in its logs and dry-run metadata."""
        return f"ns[{self.namespace}]-policy[{self.name}]-rule[{index}]"


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    namespace: str
    name: str
    attachment: Attachment
    jwt_rules: tuple[JwtRule, ...]
    origin: Origin

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


JsonObject = Mapping[str, Any]
