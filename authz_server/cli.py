"""``authz-server``: serve, validate, explain.

    authz-server serve --policies PATH [--listen HOST:PORT] ...
    authz-server validate PATH
    authz-server explain --policies PATH --request FILE
    authz-server demo
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from authz_server.settings import add_options

EXIT_INVALID = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    demo = commands.add_parser("demo", help="run the local mesh demo: real Envoy gateways and sidecars, mTLS, "
                               "a JWT issuer, scripted requests, a table of results")
    demo.add_argument("--workdir", default=".demo", help="where certificates, configs and logs go [.demo]")
    demo.add_argument("--keep-running", action="store_true", help="after the script, keep the mesh up until Ctrl-C")
    demo.add_argument("--log-level", default="WARNING", type=str.upper, help="server log level [WARNING]")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "validate":
        return validate(args.path)
    if args.command == "demo":
        from authz_server.demo.run import run_demo

        return run_demo(Path(args.workdir), keep_running=args.keep_running)
    if not args.policies:
        print("error: --policies (or AUTHZ_POLICIES) is required", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "explain":
        return asyncio.run(explain(args))
    return serve(args, argv)


def validate(path: str) -> int:
    from authz_server.policy.loader import load_policies

    policy_set = load_policies(path)
    for issue in policy_set.issues:
        print(issue)
    errors = len(policy_set.errors)
    summary = (f"{len(policy_set.authorization_policies)} AuthorizationPolicies, "
               f"{len(policy_set.request_authentications)} RequestAuthentications, "
               f"{errors} errors, {len(policy_set.warnings)} warnings")
    print(("OK: " if not errors else "INVALID: ") + summary, file=sys.stderr)
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
    await app.prefetch()
    result = await run_explain(check_request, app.store.engine(), app.authorizer, app.context)
    print(result.text)
    return 0


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    import os

    workers = args.workers or os.cpu_count() or 1
    if workers > 1:
        from authz_server.workers import Supervisor

        return Supervisor(argv, workers, args.metrics_listen, args.grace_period).run()
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_USAGE

    from authz_server.app import App
    from authz_server.grpc_api.server import AuthzGrpcServer
    from authz_server.grpc_api.tls import RotatingCertificates

    try:
        tls = RotatingCertificates(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (OSError, ValueError) as exc:
        print(f"error: TLS: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        app = App(args)
        endpoint = None
        if args.metrics_listen:
            from prometheus_client import REGISTRY

            from authz_server.observability.http_endpoint import OpsEndpoint

            endpoint = OpsEndpoint(args.metrics_listen, REGISTRY, app.readiness)
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
