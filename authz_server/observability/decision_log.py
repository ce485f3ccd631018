"""Decision log: one JSON line per Check, with what an auditor needs and nothing secret.

Logged: request id, decision, status, policy and rule, reason, the workload decided for
(namespace, kind, labels and their digest), peer and request principals, method, host, path
(query dropped unless configured, then with sensitive parameters redacted: a fixed list, every
token parameter the policies configure, and any value shaped like a JWT), latency, dry-run
results, a short digest of the token (never the token). Headers are
never logged, so Authorization, cookies and tokens cannot leak through here. Lines are
buffered and flushed at least every ``FLUSH_SECONDS`` so logging costs no syscall per Check;
each write is a run of whole lines no longer than ``PIPE_BUF``, so several worker processes
sharing one stdout pipe never interleave inside a line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import sys
import time
from typing import IO, Iterable
from urllib.parse import parse_qsl, urlencode

from authz_server.authorizer import Verdict
from authz_server.engine.request import RequestAttributes, Workload

FLUSH_SECONDS = 0.5
#: writes up to this size to a pipe are atomic (POSIX); 4096 on Linux
ATOMIC_WRITE = getattr(select, "PIPE_BUF", 512)
REDACTED = "REDACTED"
#: query parameters that carry credentials (Istio's default token parameter first)
DEFAULT_SENSITIVE_PARAMS = ("access_token", "token", "id_token", "code", "password", "secret", "api_key", "apikey")
#: header.payload[.signature] in base64url, the header starting with '{"' (``eyJ``)
_JWT_SHAPE = re.compile(r"\s*eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]*)?\s*")
#: a workload's labels are logged in full up to this many bytes of JSON, else only their digest
MAX_LOGGED_LABELS = 512
#: distinct workload identities whose log form is kept (a server sees a handful; cleared when full)
WORKLOAD_CACHE_SIZE = 1024


class DecisionLog:
    def __init__(
        self,
        stream: IO[str] | None = None,
        allow_sample_rate: float = 1.0,
        include_query: bool = False,
        sensitive_params: tuple[str, ...] = DEFAULT_SENSITIVE_PARAMS,
        worker: int | None = None,
    ) -> None:
        self.worker = worker
        self.stream = stream if stream is not None else sys.stdout
        self._pending: list[str] = []
        self.allow_sample_rate = allow_sample_rate
        self.include_query = include_query
        self._fixed_params = frozenset(p.lower() for p in sensitive_params)
        self.sensitive_params = self._fixed_params
        self._last_flush = time.monotonic()
        self._workloads: dict[object, dict[str, object]] = {}

    def redact_params(self, names: Iterable[str]) -> None:
        """Also redact these query parameters: the token parameters (``fromParams``) of the policy
        set now loaded, replacing those of the previous one."""
        self.sensitive_params = self._fixed_params | {name.lower() for name in names}

    def record(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> None:
        if verdict.allowed and self.allow_sample_rate < 1.0 and random.random() >= self.allow_sample_rate:
            return
        self._pending.append(json.dumps(self.entry(verdict, attrs, latency), separators=(",", ":")) + "\n")
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write buffered lines in chunks of whole lines, each chunk one atomic write."""
        self._last_flush = time.monotonic()
        lines, self._pending = self._pending, []
        chunk = ""
        try:
            for line in lines:
                if chunk and len(chunk) + len(line) > ATOMIC_WRITE:
                    self._write(chunk)
                    chunk = ""
                chunk += line
            if chunk:
                self._write(chunk)
        except (OSError, ValueError):  # a closed or broken stdout must not fail a Check
            pass

    def _write(self, text: str) -> None:
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):
            self.stream.write(text)  # not a real file (tests, wrappers)
            self.stream.flush()
            return
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]

    def entry(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> dict[str, object]:
        entry: dict[str, object] = {
            "ts": round(time.time(), 3),
            "decision": "allow" if verdict.allowed else "deny",
            "status": verdict.http_status,
            "reason": verdict.reason,
            "policy": verdict.policy or None,
            "rule": verdict.rule,
            "latency_ms": round(latency * 1000, 3),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if attrs is not None:
            entry.update(
                request_id=attrs.headers.get("x-request-id"),
                method=attrs.method,
                host=attrs.host,
                path=self._path(attrs),
                workload=self._workload(attrs.workload),
                source_principal=attrs.source_principal,
                source_ip=str(attrs.source_ip) if attrs.source_ip else None,
            )
        if verdict.request_principal:
            entry["request_principal"] = verdict.request_principal
        if verdict.jwt_result:
            entry["jwt"] = {"issuer": verdict.jwt_issuer, "result": verdict.jwt_result, "token_id": verdict.token_id}
        if verdict.dry_run:
            entry["dry_run"] = [
                {"action": d.action.value, "result": d.engine_result, "policy": d.effective_policy_id or None}
                for d in verdict.dry_run
            ]
        return entry

    def _workload(self, workload: Workload) -> dict[str, object]:
        """``{namespace, kind, labels, labels_digest}``, built once per identity. ``labels`` is
        ``null`` when unknown and left out when too large (the digest still tells workloads apart)."""
        labels = None if workload.labels is None else frozenset(workload.labels.items())
        key = (workload.namespace, workload.kind, labels)
        entry = self._workloads.get(key)
        if entry is None:
            entry = workload_entry(workload)
            if len(self._workloads) >= WORKLOAD_CACHE_SIZE:
                self._workloads.clear()
            self._workloads[key] = entry
        return entry

    def _path(self, attrs: RequestAttributes) -> str:
        if not self.include_query or attrs.raw_path == attrs.path:
            return attrs.path
        query = attrs.raw_path[len(attrs.path):].lstrip("?").split("#", 1)[0]
        pairs = [(k, REDACTED if k.lower() in self.sensitive_params or _JWT_SHAPE.fullmatch(v) else v)
                 for k, v in parse_qsl(query, keep_blank_values=True)]
        return f"{attrs.path}?{urlencode(pairs)}" if pairs else attrs.path


def workload_entry(workload: Workload) -> dict[str, object]:
    """The decision log's form of a workload identity (see :meth:`DecisionLog._workload`)."""
    entry: dict[str, object] = {"namespace": workload.namespace, "kind": workload.kind}
    if workload.labels is None:
        entry["labels"] = None
        return entry
    ordered = dict(sorted(workload.labels.items()))
    canonical = json.dumps(ordered, separators=(",", ":"))
    if len(canonical) <= MAX_LOGGED_LABELS:
        entry["labels"] = ordered
    entry["labels_digest"] = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return entry
