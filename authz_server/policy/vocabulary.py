"""The attributes an AuthorizationPolicy can talk about, and what values each accepts.

``from.source``/``to.operation`` fields and ``when`` keys are two spellings of the same
attributes (Istio's model/generator split, SPEC section 11): ``principals`` is
``source.principal``, ``ports`` is ``destination.port`` and so on. Both the validator and the
engine's compiler key everything by the attribute name defined here, so they cannot disagree on
what a field means.
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum


class ValueKind(Enum):
    """How the values of an attribute are written and validated."""

    PATTERN = "pattern"  # exact, prefix*, *suffix, * (presence)
    IP = "ip"  # IP address or CIDR
    PORT = "port"  # decimal 0-65535
    PATH = "path"  # pattern, or an Envoy uri_template with {*} / {**}
    SERVICE_ACCOUNT = "service-account"  # sa or ns/sa, no wildcards


#: attribute name -> value kind. Keys of request.headers[...] / request.auth.claims[...] /
#: experimental.envoy.filters.* are recognised by :func:`when_key_attribute`.
ATTRIBUTE_KINDS: dict[str, ValueKind] = {
    "source.principal": ValueKind.PATTERN,
    "source.namespace": ValueKind.PATTERN,
    "source.serviceAccount": ValueKind.SERVICE_ACCOUNT,
    "source.trustDomain": ValueKind.PATTERN,
    "source.ip": ValueKind.IP,
    "remote.ip": ValueKind.IP,
    "request.auth.principal": ValueKind.PATTERN,
    "request.auth.audiences": ValueKind.PATTERN,
    "request.auth.presenter": ValueKind.PATTERN,
    "destination.ip": ValueKind.IP,
    "destination.port": ValueKind.PORT,
    "connection.sni": ValueKind.PATTERN,
    # Operation-only attributes (no `when` spelling):
    "request.host": ValueKind.PATTERN,
    "request.method": ValueKind.PATTERN,
    "request.path": ValueKind.PATH,
    # Parametrised `when` keys; the parameter travels separately.
    "request.headers": ValueKind.PATTERN,
    "request.auth.claims": ValueKind.PATTERN,
    "experimental.envoy.filters": ValueKind.PATTERN,
}

#: `from.source` field -> attribute (the not* forms are derived).
SOURCE_FIELDS: dict[str, str] = {
    "principals": "source.principal",
    "requestPrincipals": "request.auth.principal",
    "namespaces": "source.namespace",
    "serviceAccounts": "source.serviceAccount",
    "trustDomains": "source.trustDomain",
    "ipBlocks": "source.ip",
    "remoteIpBlocks": "remote.ip",
}

#: `to.operation` field -> attribute.
OPERATION_FIELDS: dict[str, str] = {
    "hosts": "request.host",
    "ports": "destination.port",
    "methods": "request.method",
    "paths": "request.path",
}

#: `when` keys that name an attribute directly (parametrised keys are parsed separately).
PLAIN_WHEN_KEYS = frozenset(
    {
        "source.principal",
        "source.namespace",
        "source.serviceAccount",
        "source.trustDomain",
        "source.ip",
        "remote.ip",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)

#: Identity attributes Istio forbids in CUSTOM policies (the provider runs before authn).
CUSTOM_FORBIDDEN_ATTRIBUTES = frozenset(
    {
        "source.principal",
        "source.namespace",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims",
    }
)

_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIMS_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_FILTER_KEY = re.compile(r"^experimental\.envoy\.filters\.([a-z0-9_.]+)\[([^\[\]]+)\]$")


def when_key_attribute(key: str) -> tuple[str, tuple[str, ...]] | None:
    """Split a ``when`` key into (attribute, parameters), or ``None`` when Istio rejects it.

    ``request.headers[X-Foo]`` -> ("request.headers", ("x-foo",)): Envoy lower-cases header
    names. ``request.auth.claims[a][b]`` -> ("request.auth.claims", ("a", "b")): a claim path;
    ``[a.b]`` and ``[https://x/y]`` are single names.
    """
    if key in PLAIN_WHEN_KEYS:
        return key, ()
    if m := _HEADER_KEY.match(key):
        return "request.headers", (m.group(1).lower(),)
    if m := _CLAIMS_KEY.match(key):
        return "request.auth.claims", tuple(m.group(1)[1:-1].split("]["))
    if m := _FILTER_KEY.match(key):
        return "experimental.envoy.filters", (m.group(1), m.group(2))
    return None


def value_problem(kind: ValueKind, value: str) -> str | None:
    """Why ``value`` is not a valid value of ``kind`` (``None`` when it is)."""
    if value == "":
        return "empty string is not allowed"
    if kind is ValueKind.IP:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"invalid IP address or CIDR {value!r}"
    elif kind is ValueKind.PORT:
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            return f"invalid port {value!r}: must be a decimal number 0-65535"
    elif kind is ValueKind.SERVICE_ACCOUNT:
        if "*" in value:
            return f"wildcard is not allowed in service account {value!r}"
        if value.count("/") > 1:
            return f"service account {value!r} must be 'name' or 'namespace/name'"
        if any(part == "" for part in value.split("/")):
            return f"service account {value!r} has an empty part"
    elif kind is ValueKind.PATH:
        return path_template_problem(value)
    return None


def is_path_template(value: str) -> bool:
    """Istio switches a path to Envoy's uri_template matcher when it uses ``{*}``/``{**}``."""
    return "{*}" in value or "{**}" in value


def path_template_problem(value: str) -> str | None:
    """Istio/Envoy uri_template rules: ``{*}`` and ``{**}`` whole segments, ``{**}`` last."""
    if not is_path_template(value):
        if "{" in value or "}" in value:
            return f"invalid path {value!r}: only {{*}} and {{**}} are supported as operators"
        return None
    if not value.startswith("/"):
        return f"invalid path template {value!r}: must start with '/'"
    segments = value[1:].split("/")
    operators = [i for i, seg in enumerate(segments) if seg in ("{*}", "{**}")]
    for i, seg in enumerate(segments):
        if i not in operators and any(c in seg for c in "*{}"):
            return f"invalid path template {value!r}: segment {seg!r} mixes an operator with text"
    doubles = [i for i in operators if segments[i] == "{**}"]
    if doubles and doubles[-1] != operators[-1] or len(doubles) > 1:
        return f"invalid path template {value!r}: {{**}} must be the last operator"
    return None
