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

Cheap enough to stay on by default: a line is assembled directly from the verdict's fields (the
schema is fixed, so only strings need JSON escaping, done by the C encoder ``json.dumps`` itself
uses), and nothing is written on the event loop: a batch is handed to a writer thread every
``FLUSH_SECONDS`` or ``BATCH_BYTES``. A reader that stops reading (a blocked pipe) never stalls a
Check: past ``MAX_QUEUED_BYTES`` waiting to be written, batches are dropped, counted
(``authz_decision_log_dropped_lines_total``) and reported once the output moves again.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import random
import re
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Iterable
from urllib.parse import parse_qsl, urlencode

from authz_server.authorizer import Verdict
from authz_server.engine.request import IPAddress, RequestAttributes, Workload

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
#: a batch this large is handed to the writer without waiting for FLUSH_SECONDS
BATCH_BYTES = 64 * 1024
#: lines waiting for a blocked output beyond this are dropped (and counted), never buffered
MAX_QUEUED_BYTES = 16 * 1024 * 1024
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

_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _string(value: str | None) -> str:
    return "null" if value is None else _quote(value)


@functools.lru_cache(maxsize=4096)
def _ip_text(ip: IPAddress) -> str:
    """An address as a JSON string: formatting one costs more than the rest of the line; peers repeat."""
    return _quote(str(ip))


class DecisionLog:
    def __init__(
        self,
        stream: IO[str] | None = None,
        allow_sample_rate: float = 1.0,
        include_query: bool = False,
        sensitive_params: tuple[str, ...] = DEFAULT_SENSITIVE_PARAMS,
        worker: int | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.worker = worker
        self.stream = stream if stream is not None else sys.stdout
        #: called with the number of lines of each dropped batch, when it is dropped (a metric)
        self.on_drop = on_drop
        self._worker_field = "" if worker is None else f',"worker":{worker}'
        self._writer = _Writer(self.stream)
        self._pending_bytes = 0
        self._pending: list[str] = []
        self.allow_sample_rate = allow_sample_rate
        self.include_query = include_query
        self._fixed_params = frozenset(p.lower() for p in sensitive_params)
        self.sensitive_params = self._fixed_params
        self._last_flush = time.monotonic()
        self._workloads: dict[object, str] = {}

    def redact_params(self, names: Iterable[str]) -> None:
        """Also redact these query parameters: the token parameters (``fromParams``) of the policy
        set now loaded, replacing those of the previous one."""
        self.sensitive_params = self._fixed_params | {name.lower() for name in names}

    def record(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> None:
        if verdict.allowed and self.allow_sample_rate < 1.0 and random.random() >= self.allow_sample_rate:
            return
        line = self.encode(verdict, attrs, latency)
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= BATCH_BYTES or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the batch to the writer thread; never waits for the output."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        if not self._writer.submit("".join(lines), len(lines)) and self.on_drop is not None:
            self.on_drop(len(lines))

    def close(self, timeout: float = 5.0) -> None:
        """Flush and wait (bounded) until everything handed over is written: at shutdown."""
        self.flush()
        self._writer.drain(timeout)

    def encode(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> str:
        """The JSON line (newline included) for one Check."""
        rule = verdict.rule
        line = (
            f'{{"ts":{"%.3f" % time.time()},"decision":"{"allow" if verdict.allowed else "deny"}"'
            f',"status":{verdict.http_status},"reason":{_quote(verdict.reason)}'
            f',"policy":{_string(verdict.policy or None)},"rule":{"null" if rule is None else int(rule)}'
            f',"latency_ms":{"%.3f" % (latency * 1000)}{self._worker_field}'
        )
        if attrs is not None:
            source_ip = attrs.source_ip
            line += (
                f',"request_id":{_string(attrs.headers.get("x-request-id"))},"method":{_quote(attrs.method)}'
                f',"host":{_quote(attrs.host)},"path":{_quote(self._path(attrs))}'
                f',"workload":{self._workload(attrs.workload)}'
                f',"source_principal":{_string(attrs.source_principal)}'
                f',"source_ip":{_ip_text(source_ip) if source_ip else "null"}'
            )
        if verdict.request_principal:
            line += f',"request_principal":{_quote(verdict.request_principal)}'
        if verdict.jwt_result:
            line += (f',"jwt":{{"issuer":{_quote(verdict.jwt_issuer)},"result":{_quote(verdict.jwt_result)}'
                     f',"token_id":{_quote(verdict.token_id)}}}')
        if verdict.dry_run:
            line += ',"dry_run":[' + ",".join(
                f'{{"action":"{d.action.value}","result":{_quote(d.engine_result)}'
                f',"policy":{_string(d.effective_policy_id or None)}}}'
                for d in verdict.dry_run
            ) + "]"
        return line + "}\n"

    def entry(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> dict[str, object]:
        """One line as a dict: the same fields :meth:`encode` writes (for tests and tools)."""
        return json.loads(self.encode(verdict, attrs, latency))

    def _workload(self, workload: Workload) -> str:
        """``{namespace, kind, labels, labels_digest}`` as JSON, built once per identity. ``labels``
        is ``null`` when unknown and left out when too large (the digest still tells workloads apart)."""
        labels = None if workload.labels is None else frozenset(workload.labels.items())
        key = (workload.namespace, workload.kind, labels)
        text = self._workloads.get(key)
        if text is None:
            text = json.dumps(workload_entry(workload), separators=(",", ":"))
            if len(self._workloads) >= WORKLOAD_CACHE_SIZE:
                self._workloads.clear()
            self._workloads[key] = text
        return text

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


class _Writer:
    """A daemon thread writing handed-over batches, so a slow output never blocks the event loop."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._batches: collections.deque[tuple[str, int]] = collections.deque()
        self._queued_bytes = 0
        self._dropped = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, text: str, lines: int) -> bool:
        """Queue a batch; ``False`` (dropped) when too much is already waiting for the output."""
        with self._cond:
            if self._queued_bytes + len(text) > MAX_QUEUED_BYTES:
                self._dropped += lines
                return False
            self._batches.append((text, lines))
            self._queued_bytes += len(text)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._batches or self._busy) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            dropped, self._dropped = self._dropped, 0
        _warn_dropped(dropped)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._batches:
                    self._cond.wait()
                text, _ = self._batches.popleft()
                self._queued_bytes -= len(text)
                self._busy = True
                dropped, self._dropped = self._dropped, 0
            try:
                self._write(text)
            except (OSError, ValueError):  # a closed or broken output must not take the server down
                pass
            _warn_dropped(dropped)

    def _write(self, text: str) -> None:
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):
            self.stream.write(text)  # not a real file (tests, wrappers)
            self.stream.flush()
            return
        data = text.encode()
        run = _run_limit(fd)
        start, end = 0, len(data)
        while start < end:
            # runs of whole lines, each at most `run` bytes (a longer line goes alone)
            stop = end if end - start <= run else data.rfind(b"\n", start, start + run) + 1
            if stop <= start:
                stop = data.find(b"\n", start) + 1 or end
            view = memoryview(data)[start:stop]
            while view:
                view = view[os.write(fd, view):]
            start = stop


def _run_limit(fd: int) -> int:
    """How much one write may carry: ``PIPE_BUF`` into a pipe or socket (only such writes are atomic
    there, so workers sharing it never interleave inside a line); a whole batch into a regular file
    or a terminal, where the kernel serialises writes and fewer syscalls are cheaper."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return ATOMIC_WRITE
    return ATOMIC_WRITE if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else sys.maxsize


def _warn_dropped(dropped: int) -> None:
    """Said once the output moves again (or at shutdown), never while it is blocked."""
    if dropped:
        log.warning("decision log output was blocked: %d lines dropped", dropped)
