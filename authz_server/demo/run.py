"""``authz-server demo``: the local mesh, the example policies and a scripted tour, on loopback.

Starts a local IdP (:mod:`.idp`), the apps (httpbin, admin-api, legacy) and an "external"
stand-in, ONE authz server on the policies of ``examples/demo`` — as one release serves a whole
mesh: no static workload flags, every Check says which proxy sent it — and the mesh of real Envoys
(:mod:`.topology`); then sends the requests of :mod:`.scenario` and prints who decided each one. Every child is stopped on the way out, whether
the script ends, fails, or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import logging
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import envoy_config as ec
from .idp import IdentityProvider
from .pki import make_ca
from .processes import ProcessError, ProcessGroup, exit_on_sigterm, free_port
from .report import render
from .scenario import ADMIN_HOST, ALLOWED_HOST, BLOCKED_HOST, INGRESS_HOST, LEGACY_HOST, Explainer, run_step, script
from .topology import SERVER_SIDECARS, SERVICE_HOST, Mesh, start_mesh
from .upstream import EchoUpstream

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"
"""The checked-in policy templates (``$issuer``, ``$jwks_uri`` are filled in per run)."""

@dataclass(frozen=True)
class Demo:
    """A running demo: the mesh, the IdP and the authz server's port."""

    workdir: Path
    mesh: Mesh
    idp: IdentityProvider
    server_port: int


def run_demo(workdir: Path | None, keep_running: bool) -> int:
    """Run the demo in *workdir*; 0 when every request got what it expected (status, and the
    headers that must or must not reach the upstream).

    Without a *workdir* the demo works in a temporary directory, removed at the end unless the
    demo failed (its logs are then worth reading). Ctrl-C returns 130; SIGTERM exits with 143
    (``SystemExit``); both after stopping everything.
    """
    if workdir is not None:
        return _run_demo(Path(workdir).resolve(), keep_running)
    temporary = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    failed = False
    try:
        code = _run_demo(temporary, keep_running)
        failed = code not in (0, 130)
        return code
    finally:
        if failed:
            print(f"logs kept in {temporary}", file=sys.stderr)
        else:  # passed, interrupted or terminated: nothing worth keeping
            shutil.rmtree(temporary, ignore_errors=True)


def _run_demo(workdir: Path, keep_running: bool) -> int:
    started = time.monotonic()
    with _sigterm_exits():
        try:
            with ExitStack() as stack:
                demo = _start(stack, workdir)
                print(f"mesh ready in {time.monotonic() - started:.1f}s; sending requests\n", flush=True)
                with Explainer(demo.server_port) as explainer:
                    outcomes = [run_step(step, demo.mesh, explainer) for step in script(demo.idp)]
                print(render(outcomes))
                _print_logs(workdir)
                ok = all(outcome.passed for outcome in outcomes)
                if keep_running:
                    _serve_until_interrupted(demo)
                print("stopping...", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted; everything stopped", flush=True)
            return 130
        except SystemExit:
            print("terminated; everything stopped", flush=True)
            raise
        except (ProcessError, FileNotFoundError) as exc:
            print(f"demo failed to start: {exc}", file=sys.stderr)
            return 1
    print(f"stopped cleanly; took {time.monotonic() - started:.1f}s")
    return 0 if ok else 1


def _start(stack: ExitStack, workdir: Path) -> Demo:
    """Start everything, each part registered on *stack* so it is stopped in reverse order."""
    print(f"authz-server demo: working in {workdir}", flush=True)
    group = stack.enter_context(ProcessGroup(workdir))
    idp = stack.enter_context(IdentityProvider(make_ca(workdir / "idp")))
    policies = render_policies(workdir / "policies", idp)
    apps = {name: stack.enter_context(EchoUpstream(name)).port for name in SERVER_SIDECARS}
    external = stack.enter_context(EchoUpstream("external"))
    port = free_port()
    group.start_authz_server(policies, port, ["--jwks-ca-bundle", str(idp.ca_path), "--grace-period", "1",
                                              "--log-level", _server_log_level()])
    mesh = start_mesh(
        group,
        ec.AuthzSettings(port=port),
        apps=apps,
        external_hosts={ALLOWED_HOST: external.port, BLOCKED_HOST: external.port},
        ingress_host=INGRESS_HOST,
    )
    return Demo(workdir, mesh, idp, port)


def render_policies(directory: Path, idp: IdentityProvider) -> Path:
    """Copy ``examples/demo/*.yaml`` into *directory* with this run's issuer and JWKS URI."""
    templates = sorted(EXAMPLES.glob("*.yaml"))
    if not templates:
        # Without them every request would be allowed by default and the tour would mislead.
        raise FileNotFoundError(f"no demo policies in {EXAMPLES}: run the demo from a source checkout")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    values = {"issuer": idp.issuer, "jwks_uri": idp.jwks_uri}
    for template in templates:
        text = string.Template(template.read_text()).substitute(values)
        (directory / template.name).write_text(text)
    return directory


def _server_log_level() -> str:
    """The CLI's ``--log-level`` (it configures the root logger) for the servers, too."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel())


def _print_logs(workdir: Path) -> None:
    names = " ".join(sorted(path.name for path in workdir.glob("*.log")))
    print(f"\nlogs: {workdir}/  ({names})")
    print(f"policies as loaded: {workdir / 'policies'}/", flush=True)


def _serve_until_interrupted(demo: Demo) -> None:
    """Print how to reach the mesh, then wait for Ctrl-C or SIGTERM."""
    mesh, workdir = demo.mesh, demo.workdir
    tokens = workdir / "tokens"
    tokens.mkdir(exist_ok=True)
    for name, group in (("user", "users"), ("admin", "admins")):
        path = tokens / f"{name}.jwt"
        path.touch(mode=0o600)
        path.write_text(demo.idp.mint({"group": group}, subject=name, expires_in_s=3600))
    ingress = f"http://127.0.0.1:{mesh.lb_port}"
    sleep = f"http://127.0.0.1:{mesh.sleep_sidecar_port}"
    print(f"""
The mesh keeps running; press Ctrl-C to stop it.
  load balancer    {ingress}  (in front of the ingress gateway, TLS with test CA {mesh.ca.cert_path})
  sleep's sidecar  {sleep}  (outbound; the Host header picks the service)
  IdP              {demo.idp.issuer}  (tokens valid 1 h in {tokens}/)
  authz server     127.0.0.1:{demo.server_port}  (gRPC; Diagnostics Explain on the same port; one for all proxies)
Try:
  curl -si -H 'host: {INGRESS_HOST}' -H "authorization: Bearer $(cat {tokens}/admin.jwt)" {ingress}/admin/settings
  curl -si -H 'host: {INGRESS_HOST}' -H "authorization: Bearer $(cat {tokens}/user.jwt)" {ingress}/admin/settings
  curl -si -H 'host: {SERVICE_HOST}' {sleep}/get
  curl -si -H 'host: {ADMIN_HOST}' -H 'x-role: user' -H 'x-role: admin' {sleep}/status
  curl -si -H 'host: {LEGACY_HOST}' {sleep}/get
  curl -si -H 'host: {BLOCKED_HOST}' {sleep}/
  (decision log, one line per Check with the workload: {demo.workdir / 'authz-server.log'})
""", flush=True)
    # Short sleeps: a signal may be delivered to another thread (the IdP's, the echo apps'), and
    # Python runs its handler only when the main thread next runs — a long sleep would delay
    # Ctrl-C or SIGTERM until it ended.
    while True:
        time.sleep(0.5)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While active, SIGTERM raises ``SystemExit`` (see :func:`exit_on_sigterm`) so the ``with``
    blocks tear down as on Ctrl-C, and SIGINT raises ``KeyboardInterrupt`` even when the demo
    was started with SIGINT ignored (as a shell does for background jobs); the previous handlers
    are restored afterwards. Only the main thread can handle signals, so elsewhere (a test's
    worker thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    exit_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
