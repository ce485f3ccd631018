"""Attribute name -> how to read it from a request and how to compile its values.

This is the Python form of Istio's generator table (SPEC section 11): each attribute knows
its extractor and its matcher, and ``from``/``to``/``when`` all go through here. An extractor
returns ``None`` when the attribute is absent; :func:`compile_field` turns that into "positive
values fail, notValues pass", Envoy's RBAC rule for missing attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from authz_server.engine import matchers
from authz_server.engine.request import RequestAttributes
from authz_server.policy.model import FieldMatch

RequestTest = Callable[[RequestAttributes], bool]
Extractor = Callable[[RequestAttributes], Any]


@dataclass(frozen=True, slots=True)
class CompileEnv:
    """Mesh settings that change what a policy value means."""

    #: mesh trust domain first, then aliases; ``cluster.local`` in policies maps onto these.
    trust_domains: tuple[str, ...] = ("cluster.local",)


def compile_field(field: FieldMatch, env: CompileEnv) -> RequestTest:
    """``AND(OR(values), NOT(OR(notValues)))`` over one attribute of the request."""
    extract, build = _registry(field.attribute, field.params)
    positive = build(field.values, env) if field.values else None
    negative = build(field.not_values, env) if field.not_values else None

    if positive is not None and negative is not None:
        def test(req: RequestAttributes) -> bool:
            value = extract(req)
            return value is not None and positive(value) and not negative(value)
    elif positive is not None:
        def test(req: RequestAttributes) -> bool:
            value = extract(req)
            return value is not None and positive(value)
    elif negative is not None:
        def test(req: RequestAttributes) -> bool:
            value = extract(req)
            return value is None or not negative(value)
    else:
        def test(req: RequestAttributes) -> bool:
            return True
    return test


Builder = Callable[[Sequence[str], CompileEnv], Callable[[Any], bool]]


def extractor(attribute: str, params: tuple[str, ...]) -> Extractor:
    """How to read one attribute of a request (``None`` when absent): for tests and the rule index."""
    return _registry(attribute, params)[0]


def _registry(attribute: str, params: tuple[str, ...]) -> tuple[Extractor, Builder]:
    if attribute == "request.headers":
        return _header_extractor(params[0]), lambda v, env: _header_values_test(matchers.string_matcher(v, empty_is_present=True))
    if attribute == "request.auth.claims":
        return _claim_extractor(params), lambda v, env: _claim_test(v)
    if attribute == "experimental.envoy.filters":
        # Filter metadata is never part of Istio's CheckRequest: always absent.
        return (lambda req: None), lambda v, env: (lambda value: False)
    return _SIMPLE[attribute]


def _header_extractor(name: str) -> Extractor:
    """Every value of a header: one by one when Envoy sent them so, else the joined value.

    Envoy >= 1.40's RBAC matches a repeated header value by value; the CheckRequest normally
    carries them joined with ``,`` and then the joined value is all there is to match.
    """
    def extract(req: RequestAttributes) -> tuple[str, ...] | None:
        if req.header_values is not None:
            return req.header_values.get(name)
        value = req.headers.get(name)
        return None if value is None else (value,)
    return extract


def _header_values_test(test: matchers.StrTest) -> Callable[[tuple[str, ...]], bool]:
    return lambda values: any(test(v) for v in values)


def _claim_extractor(path: Sequence[str]) -> Extractor:
    def extract(req: RequestAttributes) -> Any:
        if req.auth is None:
            return None
        value: Any = req.auth.claims
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value
    return extract


def _claim_test(patterns: Sequence[str]) -> Callable[[Any], bool]:
    """A string claim matching any pattern, or a list with >= 1 such string (SPEC 4.1).

    Numbers, booleans, objects and nulls never match: ``values: ["42"]`` vs ``42`` is false.
    """
    test = matchers.string_matcher(patterns)

    def match(value: Any) -> bool:
        if isinstance(value, str):
            return test(value)
        if isinstance(value, list):
            return any(isinstance(item, str) and test(item) for item in value)
        return False
    return match


def _request_principal(req: RequestAttributes) -> tuple[str, str | None] | None:
    auth = req.auth
    return None if auth is None else (auth.issuer, auth.subject)


def _claim(name: str) -> Extractor:
    return lambda req: None if req.auth is None else req.auth.claims.get(name)


def _pattern(v: Sequence[str], env: CompileEnv) -> Callable[[str], bool]:
    return matchers.string_matcher(v)


def _host(v: Sequence[str], env: CompileEnv) -> Callable[[str], bool]:
    return matchers.string_matcher(v, ignore_case=True, empty_is_present=True)


def _method(v: Sequence[str], env: CompileEnv) -> Callable[[str], bool]:
    return matchers.string_matcher(v, empty_is_present=True)


def _ports(v: Sequence[str], env: CompileEnv) -> Callable[[int], bool]:
    return frozenset(int(p) for p in v).__contains__


_SIMPLE: dict[str, tuple[Extractor, Builder]] = {
    "source.principal": (lambda r: r.source_principal, lambda v, env: matchers.principal_matcher(v, env.trust_domains)),
    "source.namespace": (lambda r: r.source_principal, lambda v, env: matchers.namespace_matcher(v)),
    "source.serviceAccount": (lambda r: r.source_principal, lambda v, env: matchers.service_account_matcher(v)),
    "source.trustDomain": (lambda r: r.source_principal, lambda v, env: matchers.trust_domain_matcher(v)),
    "source.ip": (lambda r: r.source_ip, lambda v, env: matchers.ip_matcher(v)),
    "remote.ip": (lambda r: r.remote_ip, lambda v, env: matchers.ip_matcher(v)),
    "destination.ip": (lambda r: r.destination_ip, lambda v, env: matchers.ip_matcher(v)),
    "destination.port": (lambda r: r.destination_port, _ports),
    "connection.sni": (lambda r: r.sni, _pattern),
    "request.host": (lambda r: r.host, _host),
    "request.method": (lambda r: r.method, _method),
    "request.path": (lambda r: r.path, lambda v, env: matchers.path_matcher(v)),
    "request.auth.principal": (_request_principal, lambda v, env: matchers.request_principal_matcher(v)),
    "request.auth.audiences": (_claim("aud"), lambda v, env: _claim_test(v)),
    "request.auth.presenter": (_claim("azp"), lambda v, env: _claim_test(v)),
}
