"""``authz-server``: serve, validate, explain.

    authz-server serve --policies PATH [--listen HOST:PORT] ...
    authz-server validate PATH
    authz-server explain --policies PATH --request FILE
    authz-server health
    authz-server test PATH... [--junit FILE] [--coverage]
    authz-server diff --from OLD --to NEW --requests FILE...
    authz-server demo
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import io
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from authz_server.settings import add_options, log_level
from authz_server.startup import StartupError

if TYPE_CHECKING:
    from authz_server.grpc_api.tls import RotatingCertificates
    from authz_server.observability.http_endpoint import OpsEndpoint

log = logging.getLogger(__name__)

EXIT_INVALID = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the full usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="authz-server",
        description="Envoy ext_authz (v3 gRPC) server that decides Istio AuthorizationPolicy and "
        "RequestAuthentication as Istio would. Every option also reads an AUTHZ_* environment variable.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC authorization server")
    add_options(serve, "serve")
    validate = commands.add_parser("validate", help="check policy files; print every problem")
    validate.add_argument("path", help="policy file or directory")
    add_options(validate, "validate")
    explain = commands.add_parser("explain", help="evaluate one described request offline and say why")
    explain.add_argument("--request", required=True, help="request description (YAML or JSON; '-' for stdin)")
    add_options(explain, "explain")
    health = commands.add_parser("health", help="exit 0 when the local server is alive (container health checks): "
                                 "/healthz on --metrics-listen, else gRPC health on --listen")
    add_options(health, "health")
    test = commands.add_parser("test", help="run policy tests (YAML files with kind: PolicyTest) offline")
    test.add_argument("paths", nargs="+", metavar="PATH", help="test file, or directory searched for test files")
    test.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML")
    test.add_argument("--coverage", action="store_true",
                      help="list every policy rule and from/to/when entry no test exercised")
    add_options(test, "explain")
    diff = commands.add_parser("diff", help="decide the same requests under two policy sets; print what changes")
    add_options(diff, "explain")
    diff.add_argument("--from", dest="policies", metavar="OLD", default=argparse.SUPPRESS,
                      help="the policy set in force (same as --policies)")
    diff.add_argument("--to", required=True, metavar="NEW", help="the policy set to roll out")
    diff.add_argument("--requests", nargs="+", required=True, metavar="FILE",
                      help="test files or request descriptions (explain's format)")
    demo = commands.add_parser("demo", help="run the local mesh demo: real Envoy gateways and sidecars, mTLS, "
                               "a JWT issuer, scripted requests, a table of results")
    demo.add_argument("--workdir", default="", help="where certificates, configs and logs go, kept afterwards "
                      "[a temporary directory, removed at the end]")
    demo.add_argument("--keep-running", action="store_true", help="after the script, keep the mesh up until Ctrl-C")
    demo.add_argument("--log-level", default="WARNING", type=log_level, help="server log level [WARNING]")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user-facing failure is one line on stderr and a non-zero exit."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a process hangs.
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):  # stderr not a file
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=getattr(logging, args.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args, argv)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug still ends in one line; the traceback is at DEBUG
        log.debug("unexpected failure", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc} (rerun with --log-level DEBUG for the traceback)",
              file=sys.stderr)
        return EXIT_INVALID


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "validate":
        return validate(args.path, args.allow_empty_policies)
    if args.command == "health":
        from authz_server.healthcheck import check

        healthy, detail = check(args.metrics_listen, args.listen)
        print(("healthy: " if healthy else "unhealthy: ") + detail, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else EXIT_INVALID
    if args.command == "demo":
        try:
            from authz_server.demo.run import run_demo
        except ModuleNotFoundError as exc:  # the [demo] extra (envoy-data-plane) is not installed
            missing = (exc.name or "a module").partition(".")[0]
            print(f"authz-server demo: {missing} is missing: pip install 'istio-ext-authz-server[demo]'",
                  file=sys.stderr)
            return EXIT_INVALID
        return run_demo(Path(args.workdir) if args.workdir else None, keep_running=args.keep_running)
    if args.command == "test":
        from authz_server.policy_tests.runner import run_tests

        return run_tests(args)
    if args.command == "diff":
        from authz_server.policy_tests.diff import run_diff

        return run_diff(args)
    if not args.policies:
        raise StartupError("--policies (or AUTHZ_POLICIES) is required")
    if args.command == "explain":
        return asyncio.run(explain(args))
    return serve(args, argv)


def validate(path: str, allow_empty: bool = False) -> int:
    from authz_server.policy.loader import load_policies

    policy_set = load_policies(path, allow_empty)
    for issue in policy_set.issues:
        print(issue)
    errors = len(policy_set.errors)
    summary = (f"{len(policy_set.authorization_policies)} AuthorizationPolicies, "
               f"{len(policy_set.request_authentications)} RequestAuthentications, "
               f"{errors} errors, {len(policy_set.warnings)} warnings")
    print(("OK: " if not errors else "INVALID: ") + summary)
    return EXIT_INVALID if errors else 0


async def explain(args: argparse.Namespace) -> int:
    from authz_server.app import App
    from authz_server.explain import RequestDescriptionError, explain as run_explain, parse_request_description

    try:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
        check_request = parse_request_description(text)
    except (OSError, RequestDescriptionError) as exc:
        print(f"error: {args.request}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    app = App(args)
    if not app.reload().ok:
        print(f"error: {args.policies}: policy set invalid (run `authz-server validate`)", file=sys.stderr)
        return EXIT_INVALID
    # No JWKS prefetch: explain stays offline unless the request carries a token whose issuer's
    # keys must be fetched to verify it (then that one fetch happens, bounded by the rule's timeout).
    result = await run_explain(check_request, app.store.engine(), app.authorizer, app.context)
    print(result.text)
    return 0


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the configuration, claim the port, then serve (one process or supervised workers)."""
    import os

    from authz_server.startup import check_bindable, claim_port, usable_cpus

    worker = "AUTHZ_WORKER_ID" in os.environ  # started by our supervisor, which checked it all
    if not Path(args.policies).exists():
        raise StartupError(f"--policies {args.policies}: no such file or directory (AUTHZ_POLICIES)")
    tls = _tls(args)
    workers = args.workers or usable_cpus()
    guard = None if worker else claim_port(args.listen)
    try:
        if not worker:
            check_bindable(args.listen, "--listen", reuse_port=True)
        if workers > 1:
            from authz_server.policy.handover import LastGoodPolicies
            from authz_server.workers import Supervisor

            policies = LastGoodPolicies(args.policies, args.allow_empty_policies, args.reload_interval)
            return Supervisor(argv, workers, args.metrics_listen, args.grace_period, policies).run()
        return _serve_one(args, tls)
    finally:
        if guard is not None:
            guard.release()


def _tls(args: argparse.Namespace) -> RotatingCertificates | None:
    """The listener's certificates, loaded once now so that a bad file fails the start."""
    from authz_server.grpc_api.tls import RotatingCertificates

    if bool(args.tls_cert) != bool(args.tls_key):
        raise StartupError("--tls-cert and --tls-key (AUTHZ_TLS_CERT, AUTHZ_TLS_KEY) go together")
    if args.tls_client_ca and not args.tls_cert:
        raise StartupError("--tls-client-ca needs --tls-cert and --tls-key (TLS on the listener)")
    if not args.tls_cert:
        return None
    try:
        tls = RotatingCertificates(args.tls_cert, args.tls_key, args.tls_client_ca)
        tls.ssl_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise StartupError(f"--tls-cert/--tls-key/--tls-client-ca: {exc}") from None
    return tls


def _serve_one(args: argparse.Namespace, tls: RotatingCertificates | None) -> int:
    from authz_server.app import App
    from authz_server.grpc_api.server import AuthzGrpcServer

    endpoint = _ops_endpoint(args)

    async def run() -> int:
        app = App(args)
        if endpoint is not None:
            endpoint.attach(app.readiness)
            endpoint.start()
        try:
            return await AuthzGrpcServer(app, args.listen, args.grace_period, tls, args.serving).run()
        finally:
            if endpoint is not None:
                endpoint.stop()

    try:
        import uvloop  # optional (pip install .[fast]): a faster event loop
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


def _ops_endpoint(args: argparse.Namespace) -> OpsEndpoint | None:
    """The single process's metrics/health port, bound now so a busy port fails the start."""
    if not args.metrics_listen:
        return None
    from prometheus_client import REGISTRY

    from authz_server.observability.http_endpoint import OpsEndpoint

    return OpsEndpoint.bind(args.metrics_listen, REGISTRY)
