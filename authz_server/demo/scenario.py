"""The demo's scripted requests: what each sends, what it must get, and which policy decided.

A request goes through the real Envoys, so its status is what Istio's proxies would answer. The
*why* comes from the authz server itself: each proxy hop that checked the request is described
to the server over the Diagnostics ``Explain`` RPC — as that proxy sends it, call metadata
included — which runs the same authenticator and engine as a live Check. The first hop that
denies decided; otherwise the last hop did. Explain's status (and policy header) is compared
with the real one, so a disagreement shows instead of a misleading reason.
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
from .topology import INGRESS_ID, ROLES, SERVER_SIDECARS, SERVICE_HOST, SLEEP_ID, Mesh, Role

INGRESS_HOST = "www.example.com"
ALLOWED_HOST = "api.allowed.example"
BLOCKED_HOST = "api.blocked.example"
ADMIN_HOST = ROLES["admin-api"].host
LEGACY_HOST = ROLES["legacy"].host
CLAIM_HEADER = "x-jwt-group"
POLICY_HEADER = "x-ext-authz-policy"
CLIENT_ADDRESS = "127.0.0.2"
BANNED_ADDRESS = "127.0.0.3"
"""Loopback addresses standing for two clients on the internet (the demo bans the second)."""

Entry = Literal["lb", "sleep", "outside"]
"""Where a request enters: a client on the internet (the load balancer in front of the ingress
gateway), the sleep app's sidecar (mTLS onwards), or a caller outside the mesh talking plaintext
straight to a server sidecar (PERMISSIVE)."""

_HOPS = {"ingress": "ingress gateway", "egress": "egress gateway",
         **{name: f"{name} sidecar" for name in SERVER_SIDECARS}}
_HOST_ROLE = {ROLES[name].host: name for name in SERVER_SIDECARS}


@dataclass(frozen=True)
class Hop:
    """A proxy on a request's path that calls the authz server, and what it sees there."""

    name: str
    role: Role
    #: the peer's SPIFFE id ("" for plaintext or a client without certificate)
    source: str
    #: the proxy's own certificate identity on that connection ("" for plaintext)
    destination: str
    #: X-Forwarded-For as the proxy passes it to ext_authz (None: none)
    xff: str | None = None

    def document(self, step: "Step") -> str:
        """The Explain request document (``examples/request.yaml`` format) for *step* at this
        hop: what Envoy puts in the CheckRequest plus the call metadata the chart's EnvoyFilter
        adds — so the one server explains each hop for the workload it really decides for."""
        headers: dict[str, str | list[str]] = dict(step.headers)
        if step.entry == "lb":
            headers["x-forwarded-proto"] = "https"
        if self.xff is not None:
            headers["x-forwarded-for"] = self.xff
        merge = self.role.merge
        destination: dict[str, object] = {"principal": self.destination}
        if merge is not None:
            destination["labels"] = dict(self.role.workload.labels)
        return yaml.safe_dump({
            "method": step.method,
            "host": step.host,
            "path": step.path,
            "headers": headers,
            # The gateway's peer is the load balancer (its appended XFF entry is what counts).
            "source": {"principal": self.source, "address": "127.0.0.1"},
            "destination": destination,
            "metadata": dict(merge.metadata()) if merge is not None else {},
            "encode_raw_headers": merge is not None,
        })


@dataclass(frozen=True)
class Step:
    """One scripted request and what it must produce."""

    entry: Entry
    method: str
    path: str
    credential: str
    expected: int
    host: str = SERVICE_HOST
    headers: Mapping[str, str | list[str]] = field(default_factory=dict)
    #: the ALLOW policy whose rule explains a "no ALLOW policy matched" deny
    focus: str | None = None
    #: headers the upstream must see (a value) or must not see (None) when allowed
    upstream: Mapping[str, str | None] = field(default_factory=dict)
    #: the client's own address (``lb`` entries; another loopback address is another client)
    source: str = CLIENT_ADDRESS

    @property
    def target(self) -> str:
        """The role the request is for once inside the mesh (a server sidecar or the egress)."""
        return "httpbin" if self.entry == "lb" else _HOST_ROLE.get(self.host, "egress")

    @property
    def hops(self) -> tuple[Hop, ...]:
        """The checking hops in path order, each as that proxy sees the request."""
        target = ROLES[self.target]
        if self.entry == "lb":
            sent = self.headers.get("x-forwarded-for")
            xff = ", ".join([*([sent] if isinstance(sent, str) else sent or []), self.source, "127.0.0.1"])
            return (Hop(_HOPS["ingress"], ROLES["ingress"], "", INGRESS_HOST, xff),
                    Hop(_HOPS["httpbin"], target, INGRESS_ID, target.spiffe or "", xff))
        if self.entry == "outside":
            return (Hop(_HOPS[self.target], target, "", ""),)
        return (Hop(_HOPS[self.target], target, SLEEP_ID, target.spiffe or ""),)

    @property
    def label(self) -> str:
        """``client->ingress GET /x``, ``sleep->httpbin GET /x``, ``outside->admin-api GET /x``."""
        if self.entry == "lb":
            client = "banned client" if self.source == BANNED_ADDRESS else "client"
            return f"{client}->ingress {self.method} {self.path}"
        target = self.target if self.target != "egress" else self.host
        return f"{self.entry}->{target} {self.method} {self.path}"


def script(idp: IdentityProvider) -> list[Step]:
    """The demo's requests, with tokens freshly minted by *idp*."""
    user = idp.mint({"group": "users"}, subject="alice")
    admin = idp.mint({"group": "admins"}, subject="root")
    expired = idp.mint({"group": "admins"}, subject="root", expires_in_s=-3600)
    forged = idp.mint({"group": "admins"}, subject="mallory", forged=True)

    def bearer(token: str, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}", **extra}

    return [
        Step("lb", "GET", "/headers", "JWT group=users", 200, INGRESS_HOST, bearer(user),
             upstream={CLAIM_HEADER: "users", "authorization": None}),
        Step("lb", "GET", "/headers", "no token", 403, INGRESS_HOST, focus="foo/ingress-users"),
        Step("lb", "GET", "/headers", "forged signature", 401, INGRESS_HOST, bearer(forged)),
        Step("lb", "GET", "/headers", "expired JWT", 401, INGRESS_HOST, bearer(expired)),
        Step("lb", "GET", "/admin/settings", "JWT group=users", 403, INGRESS_HOST, bearer(user),
             focus="foo/ingress-admins"),
        Step("lb", "GET", "/admin/settings", "JWT group=admins", 200, INGRESS_HOST, bearer(admin),
             upstream={CLAIM_HEADER: "admins", "authorization": None}),
        Step("lb", "GET", "/internal/metrics", "JWT group=admins", 403, INGRESS_HOST, bearer(admin)),
        Step("lb", "GET", "/headers", "JWT, spoofed XFF", 200, INGRESS_HOST,
             bearer(user, **{"x-forwarded-for": BANNED_ADDRESS})),
        Step("lb", "GET", "/headers", "JWT group=users", 403, INGRESS_HOST, bearer(user), source=BANNED_ADDRESS),
        Step("sleep", "GET", "/get", "mTLS sleep", 200),
        Step("sleep", "POST", "/post", "mTLS sleep", 403, focus="foo/sleep-reads"),
        Step("sleep", "GET", "/debug/vars", "mTLS sleep", 200),
        Step("sleep", "GET", "/admin/users", "mTLS sleep", 200),
        Step("sleep", "GET", "/admin/users", "mTLS sleep", 403, ADMIN_HOST),
        Step("sleep", "GET", "/status", "x-role: user", 200, ADMIN_HOST, {"x-role": "user"}),
        Step("sleep", "GET", "/status", "x-role: user+admin", 403, ADMIN_HOST, {"x-role": ["user", "admin"]}),
        Step("outside", "GET", "/get", "plaintext", 403, focus="foo/sleep-reads"),
        Step("outside", "GET", "/status", "plaintext", 200, ADMIN_HOST),
        Step("sleep", "GET", "/get", "mTLS sleep", 403, LEGACY_HOST),
        Step("outside", "GET", "/get", "plaintext", 403, LEGACY_HOST),
        Step("sleep", "GET", "/v1", "mTLS sleep", 200, ALLOWED_HOST),
        Step("sleep", "GET", "/v1", "mTLS sleep", 403, BLOCKED_HOST, focus="istio-system/egress-allow-list"),
    ]


class Explainer:
    """A Diagnostics client for the authz server."""

    def __init__(self, port: int) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def explain(self, document: str) -> diagnostics_pb2.ExplainResponse:
        stub = diagnostics_pb2_grpc.DiagnosticsStub(self._channel)
        return stub.Explain(diagnostics_pb2.ExplainRequest(request_document=document), timeout=5)

    def close(self) -> None:
        self._channel.close()

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
        """The deciding hop and the server's own sentence (``allowed by ALLOW policy ns/x rule[0]``);
        an unknown identity keeps its reason code, the name it has in headers, logs and metrics."""
        code, _, sentence = self.verdict.reason.partition(": ")
        return f"{self.hop.name}: {self.verdict.reason if code.startswith('unknown_workload_') else sentence}"

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
    source = None
    if step.entry == "lb":
        port, source = mesh.lb_port, step.source
    elif step.entry == "outside":
        port = mesh.ports[step.target]
    else:
        port = mesh.sleep_sidecar_port
    try:
        reply = request(port, step.path, method=step.method, host=step.host, headers=step.headers, source=source)
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
    reason = verdict.reason.split(":", 1)[0]
    named = verdict.policy or (reason if reason.startswith("unknown_workload_") else "")
    if header and named and header != named:
        notes.append(("MISMATCH", f"{POLICY_HEADER}: {header}, explain says {named}"))
    passed = reply.status == step.expected and not any(key == "WRONG" for key, _ in notes)
    return Outcome(step, reply, hop, verdict, tuple(notes), passed)


def _decider(step: Step, explainer: Explainer) -> tuple[Hop, diagnostics_pb2.ExplainResponse]:
    """The first hop that denies, else the last one (each explained for its own workload)."""
    for hop in step.hops:
        verdict = explainer.explain(hop.document(step))
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
