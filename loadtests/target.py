"""Start a variant's processes on loopback: its backend (server or no-op) and its Envoy.

Used by the benchmark (one target per variant, all up at once, loaded in turn) and on its own to
give Locust something to hit with one command::

    python -m loadtests.target            # authz-server + Envoy + echo upstream; prints env vars

It makes a fresh signing key and policy file in the work directory and writes a token pool there
(``tokens.txt``) that the locustfile reads, so nothing secret is ever committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from authz_server.demo import envoy_config as ec
from authz_server.demo.processes import (
    ProcessGroup, exit_on_sigterm, free_port, port_open,
)

from . import policy_mix, tokens
from .variants import Variant, envoy_config

SERVER_LOG_LEVEL = "WARNING"


@dataclass(frozen=True)
class Target:
    """A started variant: where Envoy listens, which pids to charge CPU to, how long start took."""

    variant: Variant
    envoy_port: int
    envoy_pid: int
    backend_pid: int | None
    authz_port: int | None
    #: seconds from starting the server to its gRPC health saying SERVING (policies loaded)
    ready_s: float | None = None
    #: the server's log (its stdout: the decision log when on)
    backend_log: Path | None = None
    #: the server's /metrics port (server variants)
    metrics_port: int | None = None


def server_args(workers: int, serving: str = "fast", decision_log: bool = False,
                metrics_port: int | None = None) -> list[str]:
    """Benchmark settings: quiet logs, *workers* processes, the serving layer, the decision log.

    Metrics stay on (as deployed), on a port of their own so several servers can run at once. The
    decision log is off unless asked for, then left at its defaults (stdout, every allow logged).
    """
    args = ["--workload-namespace", tokens.NAMESPACE, "--log-level", SERVER_LOG_LEVEL,
            "--metrics-listen", f"127.0.0.1:{metrics_port or free_port()}", "--workers", str(workers),
            "--serving", serving]
    return args if decision_log else [*args, "--decision-log", "off"]


def start_target(
    group: ProcessGroup,
    variant: Variant,
    key: tokens.SigningKey,
    policies: Path,
    *,
    upstream: ec.Upstream | None = None,
    authz: ec.AuthzSettings | None = None,
) -> Target:
    """Start *variant*'s backend (if any), then its Envoy; both ready on return. *authz*: the
    ext_authz filter and pool settings (its port is replaced by the backend's).

    A variant with more than one policy in scope gets its own policy file next to *policies*.
    """
    backend_pid = authz_port = metrics_port = ready_s = backend_log = None
    if variant.backend == "server":
        authz_port, metrics_port = free_port(), free_port()
        if variant.policies > 1:
            policies = policy_mix.write(key, variant.policies, policies.with_name(f"policies-{variant.name}.yaml"),
                                        variant.mix)
        started = time.monotonic()
        server = group.start_authz_server(
            policies, authz_port, server_args(variant.workers, variant.serving, variant.decision_log, metrics_port),
            name=f"{variant.name}-server", timeout_s=120,
            env={"PYTHONPATH": variant.source} if variant.source else None,
        )
        ready_s = time.monotonic() - started
        backend_pid, backend_log = server.pid, server.log_path
    elif variant.backend == "noop":
        authz_port = free_port()
        argv = [sys.executable, "-m", "loadtests.noop_server", "--listen", f"127.0.0.1:{authz_port}"]
        backend_pid = group.start(
            f"{variant.name}-backend", argv, ready=functools.partial(port_open, authz_port)
        ).pid
    envoy_port, admin_port = free_port(), free_port()
    config = envoy_config(
        variant, listen_port=envoy_port, admin_port=admin_port, authz_port=authz_port,
        jwks=key.jwks, upstream=upstream,
        authz=dataclasses.replace(authz, port=authz_port) if authz and authz_port else None,
    )
    envoy = group.start_envoy(f"{variant.name}-envoy", config)
    return Target(variant, envoy_port, envoy.pid, backend_pid, authz_port, ready_s, backend_log, metrics_port)


def main(argv: Sequence[str] | None = None) -> None:
    """Run authz-server + Envoy + the echo upstream until Ctrl-C, for Locust to load."""
    parser = argparse.ArgumentParser(description="Start a local Locust target: authz-server behind Envoy.")
    parser.add_argument("--workdir", type=Path, default=Path(".loadtest"), help="keys, tokens, logs [.loadtest]")
    parser.add_argument("--workers", type=int, default=1, help="authz-server worker processes [1]")
    parser.add_argument("--tokens", type=int, default=2000, help="allowed tokens to pre-mint [2000]")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    args.workdir.mkdir(parents=True, exist_ok=True)
    key = tokens.SigningKey.generate()
    policies = tokens.write_policies(key, args.workdir / "policies.yaml")
    token_file = args.workdir / "tokens.txt"
    tokens.write_tokens(key.pool(args.tokens, "locust"), token_file)
    denied_file = tokens.write_tokens([key.mint("locust-guest", group="guests")], args.workdir / "denied.txt")
    with ProcessGroup(args.workdir) as group:
        upstream_port = free_port()
        group.start_upstream("upstream", upstream_port)
        variant = Variant("locust", "server", args.workers)
        target = start_target(group, variant, key, policies, upstream=ec.Upstream(upstream_port))
        print("target up; in another shell:", flush=True)
        print(f"  export AUTHZ_GRPC_TARGET=127.0.0.1:{target.authz_port}")
        print(f"  export AUTHZ_HTTP_TARGET=http://127.0.0.1:{target.envoy_port}")
        print(f"  export AUTHZ_TOKEN_FILE={token_file.resolve()}")
        print(f"  export AUTHZ_DENIED_TOKEN_FILE={denied_file.resolve()}")
        print("Ctrl-C stops everything.", flush=True)
        try:
            while True:  # short sleeps: a signal taken by another thread waits for the main one
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
