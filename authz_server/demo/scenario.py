"""The demo's scripted requests: what each sends, what it must get, and which policy decided.

A request goes through the real Envoys, so its status is what Istio's proxies would answer. The
*why* comes from the authz servers themselves: each proxy hop that checked the request is
described to that hop's server over the Diagnostics ``Explain`` RPC, which runs the same
authenticator and engine as a live Check. The first hop that denies decided; otherwise the last
hop did. Explain's status is compared with the real one, so a disagreement shows instead of a
misleading reason.
"""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping

import grpc
import yaml

from authz_server._proto import diagnostics_pb2, diagnostics_pb2_grpc

from .client import Reply, request
from .idp import IdentityProvider
from .topology import (
    EGRESS, EGRESS_ID, HTTPBIN, HTTPBIN_ID, INGRESS, INGRESS_ID, SERVICE_HOST, SLEEP_ID, Mesh,
)

INGRESS_HOST = "www.example.com"
ALLOWED_HOST = "api.allowed.example"
BLOCKED_HOST = "api.blocked.example"
CLAIM_HEADER = "x-jwt-group"
POLICY_HEADER = "x-ext-authz-policy"

Entry = Literal["ingress", "sleep"]
"""Where a request enters: a client outside (ingress gateway, TLS) or the sleep app's sidecar."""


@dataclass(frozen=True)
class Hop:
    """A proxy on a request's path that calls an authz server, as Envoy describes itself there."""

    name: str
    server: str
    destination: str
    labels: Mapping[str, str]

    def document(self, step: "Step", source: str) -> str:
        """The Explain request document (``examples/request.yaml`` format) for *step* at this hop."""
        headers = dict(step.headers)
        if step.entry == "ingress":
            headers["x-forwarded-proto"] = "https"
        return yaml.safe_dump(
            {
                "method": step.method,
                "host": step.host,
                "path": step.path,
                "headers": headers,
                "source": {"principal": source},
                "destination": {"principal": self.destination, "labels": dict(self.labels)},
            }
        )


INGRESS_HOP = Hop("ingress gateway", "gateway", INGRESS_HOST, INGRESS.labels)
HTTPBIN_HOP = Hop("httpbin sidecar", "sidecar", HTTPBIN_ID, HTTPBIN.labels)
EGRESS_HOP = Hop("egress gateway", "egress", EGRESS_ID, EGRESS.labels)


@dataclass(frozen=True)
class Step:
    """One scripted request and what it must produce."""

    entry: Entry
    method: str
    path: str
    credential: str
    expected: int
    host: str = SERVICE_HOST
    headers: Mapping[str, str] = field(default_factory=dict)
    #: the ALLOW policy whose rule explains a "no ALLOW policy matched" deny
    focus: str | None = None
    #: headers the upstream must see (a value) or must not see (None) when allowed
    upstream: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def hops(self) -> tuple[tuple[Hop, str], ...]:
        """The checking hops in path order, each with the peer identity it sees."""
        if self.entry == "ingress":
            return ((INGRESS_HOP, ""), (HTTPBIN_HOP, INGRESS_ID))
        if self.host == SERVICE_HOST:
            return ((HTTPBIN_HOP, SLEEP_ID),)
        return ((EGRESS_HOP, SLEEP_ID),)

    @property
    def label(self) -> str:
        """``ingress GET /x``, ``sleep->httpbin GET /x``, ``sleep->api.allowed.example GET /x``."""
        if self.entry == "ingress":
            return f"ingress {self.method} {self.path}"
        target = "httpbin" if self.host == SERVICE_HOST else self.host
        return f"sleep->{target} {self.method} {self.path}"


def script(idp: IdentityProvider) -> list[Step]:
    """The demo's requests, with tokens freshly minted by *idp*."""
    user = idp.mint({"group": "users"}, subject="alice")
    admin = idp.mint({"group": "admins"}, subject="root")
    expired = idp.mint({"group": "admins"}, subject="root", expires_in_s=-3600)
    forged = idp.mint({"group": "admins"}, subject="mallory", forged=True)

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    return [
        Step("ingress", "GET", "/headers", "JWT group=users", 200, INGRESS_HOST, bearer(user),
             upstream={CLAIM_HEADER: "users", "authorization": None}),
        Step("ingress", "GET", "/headers", "no token", 403, INGRESS_HOST, focus="foo/ingress-users"),
        Step("ingress", "GET", "/headers", "forged signature", 401, INGRESS_HOST, bearer(forged)),
        Step("ingress", "GET", "/headers", "expired JWT", 401, INGRESS_HOST, bearer(expired)),
        Step("ingress", "GET", "/admin/settings", "JWT group=users", 403, INGRESS_HOST, bearer(user),
             focus="foo/ingress-admins"),
        Step("ingress", "GET", "/admin/settings", "JWT group=admins", 200, INGRESS_HOST, bearer(admin),
             upstream={CLAIM_HEADER: "admins", "authorization": None}),
        Step("ingress", "GET", "/internal/metrics", "JWT group=admins", 403, INGRESS_HOST, bearer(admin)),
        Step("sleep", "GET", "/get", "mTLS sleep", 200),
        Step("sleep", "POST", "/post", "mTLS sleep", 403, focus="foo/sleep-reads"),
        Step("sleep", "GET", "/debug/vars", "mTLS sleep", 200),
        Step("sleep", "GET", "/v1", "mTLS sleep", 200, ALLOWED_HOST),
        Step("sleep", "GET", "/v1", "mTLS sleep", 403, BLOCKED_HOST, focus="istio-system/egress-allow-list"),
    ]


class Explainer:
    """Diagnostics clients for the authz servers, by the server names :class:`Hop` uses."""

    def __init__(self, ports: Mapping[str, int]) -> None:
        self._channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}

    def explain(self, server: str, document: str) -> diagnostics_pb2.ExplainResponse:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(self._channels[server])
        return stub.Explain(diagnostics_pb2.ExplainRequest(request_document=document), timeout=5)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Note = tuple[str, str]
"""A detail line under a result: a short key (``upstream``, ``dry-run``, ``WRONG``...) and text."""


@dataclass(frozen=True)
class Outcome:
    """What one step got, who decided and why, and whether that is what it expected."""

    step: Step
    reply: Reply
    hop: Hop
    verdict: diagnostics_pb2.ExplainResponse
    notes: tuple[Note, ...]
    passed: bool

    @property
    def status(self) -> int:
        """The HTTP status the proxies answered (0: the request itself failed)."""
        return self.reply.status

    @property
    def decided_by(self) -> str:
        """The deciding hop and the server's own sentence (``allowed by ALLOW policy ns/x rule[0]``)."""
        return f"{self.hop.name}: {self.verdict.reason.split(': ', 1)[-1]}"

    @property
    def why(self) -> str:
        """For a "no ALLOW policy matched" deny, why the step's focus policy did not match."""
        if not (self.step.focus and self.verdict.reason.startswith("no_allow_match")):
            return ""
        match = re.search(
            rf"^\s+ALLOW {re.escape(self.step.focus)} \(.*\):\n\s+(rule\[\d+\]): no match: (.*)$",
            self.verdict.text,
            flags=re.MULTILINE,
        )
        return f"{self.step.focus} {match.group(1)}: {match.group(2)}" if match else ""


def run_step(step: Step, mesh: Mesh, explainer: Explainer) -> Outcome:
    """Send *step* through the mesh, explain it at each hop, and judge it."""
    if step.entry == "ingress":
        port, tls = mesh.ingress_port, mesh.ingress_tls()
    else:
        port, tls = mesh.sleep_sidecar_port, None
    try:
        reply = request(port, step.path, method=step.method, host=step.host, headers=step.headers, tls=tls)
    except (OSError, http.client.HTTPException) as exc:
        reply = Reply(0, {}, f"request failed: {exc!r}".encode())
    hop, verdict = _decider(step, explainer)
    notes = _upstream(step, reply)
    notes.extend(
        ("dry-run", f"{d.action} policy {d.policy} {d.effect} ({d.rule}); not enforced")
        for d in verdict.dry_run if d.matched
    )
    if reply.status == 0:
        notes.append(("ERROR", reply.body.decode()))
    elif verdict.http_status != reply.status:
        notes.append(
            ("MISMATCH", f"explain says {verdict.http_status}, the proxies answered {reply.status}")
        )
    header = reply.headers.get(POLICY_HEADER)
    if header and verdict.policy and header != verdict.policy:
        notes.append(("MISMATCH", f"{POLICY_HEADER}: {header}, explain says {verdict.policy}"))
    passed = reply.status == step.expected and not any(key == "WRONG" for key, _ in notes)
    return Outcome(step, reply, hop, verdict, tuple(notes), passed)


def _decider(step: Step, explainer: Explainer) -> tuple[Hop, diagnostics_pb2.ExplainResponse]:
    """The first hop that denies, else the last one (each hop explained by its own server)."""
    for hop, source in step.hops:
        verdict = explainer.explain(hop.server, hop.document(step, source))
        if not verdict.allowed:
            break
    return hop, verdict


def _upstream(step: Step, reply: Reply) -> list[Note]:
    """What reached the upstream app (its name, the headers the step names), and any header
    that is not as the step expects (a ``WRONG`` note fails the step)."""
    if reply.status != 200 or not reply.headers.get("content-type", "").startswith("application/json"):
        return []
    echo = reply.json()
    seen = echo.get("headers", {})
    parts = [f"reached {echo.get('name')}"]
    wrong: list[Note] = []
    for name, wanted in step.upstream.items():
        got = seen.get(name)
        if got == wanted:
            parts.append(f"{name}: {got}" if got is not None else f"{name} removed")
        else:
            expectation = "absent" if wanted is None else repr(wanted)
            shown = got if got is None or len(got) <= 40 else got[:37] + "..."
            wrong.append(("WRONG", f"upstream header {name}: {shown!r}, expected {expectation}"))
    return [("upstream", ", ".join(parts)), *wrong]
