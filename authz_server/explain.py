"""Explain one request offline: the decision, the policy and rule behind it, and why.

The request description (YAML/JSON) is turned into a real CheckRequest (plus the calling proxy's
``x-authz-*`` call metadata) and goes through the same adapter and authorizer as a live Check,
so what ``explain`` says is what the server does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import yaml
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.authorizer import Authorizer, Verdict
from authz_server.engine.compiler import CompiledPolicy
from authz_server.engine.engine import PolicyEngine, WorkloadView
from authz_server.engine.request import RequestAttributes
from authz_server.engine.scope import destination_service
from authz_server.grpc_api.check_request import RequestContextSettings, to_attributes
from authz_server.grpc_api.workload_identity import BadProxyMetadata, Metadata, proxy_identity

REQUEST_FIELDS = ("method", "host", "path", "headers", "source", "destination", "sni", "metadata",
                  "encode_raw_headers")


class RequestDescriptionError(ValueError):
    """The request description is not usable; the message says which field and why."""


def check_request_from_description(doc: Any) -> CheckRequest:
    """Build the CheckRequest Envoy would send for a described request.

    Fields: ``method``, ``host``, ``path`` (with query), ``headers`` (name: value or list of
    values, joined with ``,`` as Envoy does), ``source: {principal, address, port}``,
    ``destination: {principal, address, port, labels}``, ``sni``; ``encode_raw_headers: true``
    sends the headers value by value (``header_map``), as Envoy does with that filter option.
    """
    if not isinstance(doc, Mapping):
        raise RequestDescriptionError("request description must be an object")
    unknown = set(doc) - set(REQUEST_FIELDS)
    if unknown:
        raise RequestDescriptionError(f"unknown fields {sorted(unknown)} (expected {', '.join(REQUEST_FIELDS)})")
    raw_headers = doc.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise RequestDescriptionError("headers must be an object: name -> value or list of values")
    method = str(doc.get("method", "GET"))
    host = str(doc.get("host", ""))
    path = str(doc.get("path", "/"))
    values: dict[str, list[str]] = {}
    for name, value in raw_headers.items():
        values[str(name).lower()] = [str(v) for v in (value if isinstance(value, list) else [value])]
    values.update({":method": [method], ":path": [path], ":authority": [host]})
    headers = {name: ",".join(vs) for name, vs in values.items()}
    http = AttributeContext.HttpRequest(method=method, host=host, path=path,
                                        scheme=headers.get("x-forwarded-proto", "http"), protocol="HTTP/1.1")
    if doc.get("encode_raw_headers"):
        http.header_map.headers.extend(HeaderValue(key=k, raw_value=v.encode()) for k, vs in values.items() for v in vs)
    else:
        http.headers.update(headers)
    source = _peer(doc.get("source") or {}, "source")
    destination = _peer(doc.get("destination") or {}, "destination")
    attrs = AttributeContext(source=source, destination=destination, request=AttributeContext.Request(http=http))
    if doc.get("sni"):
        attrs.tls_session.sni = str(doc["sni"])
    return CheckRequest(attributes=attrs)


def _peer(raw: Any, name: str) -> AttributeContext.Peer:
    if not isinstance(raw, Mapping):
        raise RequestDescriptionError(f"{name} must be an object")
    unknown = set(raw) - {"principal", "address", "port", "labels"}
    if unknown:
        raise RequestDescriptionError(f"{name}: unknown fields {sorted(unknown)}")
    peer = AttributeContext.Peer(principal=str(raw.get("principal") or ""))
    if raw.get("address"):
        try:
            port = int(raw.get("port") or 0)
        except (TypeError, ValueError):
            raise RequestDescriptionError(f"{name}.port must be a number") from None
        peer.address.CopyFrom(Address(socket_address=SocketAddress(address=str(raw["address"]), port_value=port)))
    labels = raw.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise RequestDescriptionError(f"{name}.labels must be an object")
    peer.labels.update({str(k): str(v) for k, v in labels.items()})
    return peer


def metadata_from_description(doc: Any) -> Metadata:
    """The description's ``metadata`` (name: value): the gRPC metadata of the Check call, i.e. what
    the proxy's ``grpc_service.initial_metadata`` adds (``x-authz-workload-namespace``, ...)."""
    raw = doc.get("metadata") if isinstance(doc, Mapping) else None
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise RequestDescriptionError("metadata must be an object (name: value)")
    return tuple((str(k).lower(), str(v)) for k, v in raw.items())


@dataclass(frozen=True)
class DescribedCheck:
    """A described Check: the CheckRequest and the call metadata it arrives with."""

    request: CheckRequest
    metadata: Metadata = ()


def parse_request_description(text: str) -> DescribedCheck:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RequestDescriptionError(f"invalid YAML/JSON: {exc}") from None
    return DescribedCheck(check_request_from_description(doc), metadata_from_description(doc))


@dataclass(frozen=True)
class Explanation:
    verdict: Verdict
    text: str
    #: the request as authorization saw it (after jwt_authn set ``auth`` and changed headers)
    attrs: RequestAttributes


async def explain(
    check: DescribedCheck | CheckRequest,
    engine: PolicyEngine,
    authorizer: Authorizer,
    context: RequestContextSettings,
) -> Explanation:
    """Decide a described Check (a bare CheckRequest: one without call metadata)."""
    if isinstance(check, CheckRequest):
        check = DescribedCheck(check)
    try:
        attrs = to_attributes(check.request, context, proxy_identity(check.metadata))
    except BadProxyMetadata as exc:  # denied as a live Check would be
        verdict = authorizer.failure(exc.reason, str(exc), header=exc.reason)
        return Explanation(verdict, "\n".join(_verdict_lines(verdict)), to_attributes(check.request, context))
    verdict = await authorizer.check(attrs)
    return Explanation(verdict, render(verdict, attrs, engine), attrs)


def workload_view(attrs: RequestAttributes, engine: PolicyEngine) -> WorkloadView | None:
    """What applies to the request's workload (``None`` when its namespace is unknown)."""
    workload = attrs.workload
    if workload.namespace is None:
        return None
    service = destination_service(attrs.host, workload.namespace) if workload.kind == "waypoint" else None
    return engine.for_workload(workload, service)


def _verdict_lines(verdict: Verdict) -> list[str]:
    decision = "ALLOW" if verdict.allowed else "DENY"
    lines = [
        f"decision: {decision} (HTTP {verdict.http_status})",
        f"reason:   {verdict.reason}: {verdict.detail}",
    ]
    if verdict.policy:
        lines.append(f"policy:   {verdict.policy} rule[{verdict.rule}]")
    if verdict.body:
        lines.append(f"body:     {verdict.body}")
    return lines


def render(verdict: Verdict, attrs: RequestAttributes, engine: PolicyEngine) -> str:
    lines = _verdict_lines(verdict)
    workload = attrs.workload
    labels = "?" if workload.labels is None else ",".join(f"{k}={v}" for k, v in sorted(workload.labels.items())) or "-"
    lines.append(f"workload: namespace={workload.namespace or '?'} labels={labels} kind={workload.kind}")
    lines.append(f"request:  {attrs.method} {attrs.host}{attrs.raw_path} from {attrs.source_principal or 'no peer identity'}"
                 f" ip={attrs.source_ip or '-'} remote.ip={attrs.remote_ip or '-'}")
    if attrs.auth is not None:
        lines.append(f"jwt:      iss={attrs.auth.issuer} sub={attrs.auth.subject}")
    if verdict.reason.startswith("unknown_workload_"):
        lines.append("unscoped: " + ", ".join(f"{ref} (needs the workload's {what})" for what, ref in
                                              engine.for_workload(workload).unscoped))
    elif (view := workload_view(attrs, engine)) is not None:
        policies = view.policies
        for title, group in (("DENY", policies.deny), ("ALLOW", policies.allow), ("AUDIT", policies.audit),
                             ("dry-run DENY", policies.dry_deny), ("dry-run ALLOW", policies.dry_allow)):
            for policy in group:
                lines.extend(_policy_lines(title, policy, attrs))
    for result in verdict.dry_run:
        lines.append(f"dry-run:  {result.action.value} engine would have {result.engine_result}"
                     f" ({result.effective_policy_id or 'no rule matched'})")
    if verdict.upstream_headers:
        lines.append("upstream headers set: " + ", ".join(k for k, _ in verdict.upstream_headers))
    if verdict.remove_headers:
        lines.append("upstream headers removed: " + ", ".join(verdict.remove_headers))
    if verdict.remove_query_params:
        lines.append("upstream query parameters removed: " + ", ".join(verdict.remove_query_params))
    return "\n".join(lines)


def _policy_lines(title: str, compiled: CompiledPolicy, attrs: RequestAttributes) -> list[str]:
    policy = compiled.policy
    lines = [f"  {title} {policy.ref} ({policy.origin}):"]
    if not compiled.rules:
        lines.append("    no rules: never matches")
    for rule in compiled.rules:
        why = rule.mismatches(attrs)
        lines.append(f"    rule[{rule.index}]: " + ("MATCH" if not why else "no match: " + "; ".join(why)))
    return lines
