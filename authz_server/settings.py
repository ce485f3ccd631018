"""Server settings: every command-line flag also comes from an ``AUTHZ_*`` environment variable.

One table (:data:`OPTIONS`) defines each setting once — flag, variable, default, parser and
help — so ``--help``, the environment and the README's configuration reference cannot drift.
Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from authz_server.engine.scope import WORKLOAD_KINDS


def parse_labels(text: str) -> dict[str, str]:
    """``app=x,version=v1`` -> {"app": "x", "version": "v1"}."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"invalid label {item!r}: expected key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``x-a=1,x-b=2`` -> ((x-a, 1), (x-b, 2)); header names lower-cased."""
    return tuple((k.lower(), v) for k, v in parse_labels(text).items())


def parse_listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    return text


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in text.split(","))))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if not value:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else positive_float(text)


def listen_or_off(text: str) -> str:
    return "" if text in ("", "off") else parse_listen(text)


def decision_log_target(text: str) -> str:
    if text not in ("stdout", "stderr", "off"):
        raise argparse.ArgumentTypeError(f"invalid decision log {text!r}: stdout, stderr or off")
    return text


def serving_layer(text: str) -> str:
    if text not in ("fast", "grpcio"):
        raise argparse.ArgumentTypeError(f"invalid serving layer {text!r}: fast or grpcio")
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {text!r}: one of {', '.join(LOG_LEVELS)}")
    return level


OTEL_INSTALL_HINT = "tracing needs the otel extra: pip install 'istio-ext-authz-server[otel]'"


def otel_endpoint(text: str) -> str:
    """An OTLP/gRPC collector URL; refused unless the otel extra is installed (one clear line)."""
    if not text:
        return ""
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"invalid OTLP endpoint {text!r}: expected http://HOST:PORT or https://HOST:PORT")
    try:
        found = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise argparse.ArgumentTypeError(OTEL_INSTALL_HINT)
    return text


def workload_kind(text: str) -> str:
    if text not in WORKLOAD_KINDS:
        raise argparse.ArgumentTypeError(f"invalid workload kind {text!r}: one of {', '.join(WORKLOAD_KINDS)}")
    return text


@dataclass(frozen=True)
class Option:
    dest: str
    help: str
    default: str
    parse: Callable[[str], Any] = str
    commands: tuple[str, ...] = ("serve", "explain")

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def env(self) -> str:
        return "AUTHZ_" + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("policies", "policy file or directory (YAML/JSON, multi-document; a ConfigMap volume works)", ""),
    Option("listen", "gRPC listen address (Authorization, Diagnostics, health, reflection)", "0.0.0.0:9000",
           parse_listen, ("serve", "health")),
    Option("root_namespace", "Istio root namespace: its policies apply mesh-wide", "istio-system"),
    Option("trust_domain", "mesh trust domain; 'cluster.local' in principals maps onto it", "cluster.local"),
    Option("trust_domain_aliases", "comma-separated trust domain aliases", "", parse_list),
    Option("num_trusted_proxies", "gateways: trusted proxies in front (gatewayTopology.numTrustedProxies), "
           "used to derive remote.ip from X-Forwarded-For", "0", non_negative_int),
    Option("workload_namespace", "namespace of the workload when Envoy's destination.principal does not say "
           "(sidecar-local, per-gateway deployments)", ""),
    Option("workload_labels", "labels of the workload (app=x,version=v1) when Envoy sends none", "", parse_labels),
    Option("workload_kind", "how policies attach: sidecar, gateway, k8s-gateway or waypoint (SPEC section 2); "
           "gateway kinds also use gateway X-Forwarded-For semantics", "sidecar", workload_kind),
    Option("policy_header", "response header naming the denying policy ('' disables)", "x-ext-authz-policy"),
    Option("ok_headers", "headers added upstream on every allow (x-a=1,x-b=2)", "", parse_headers),
    Option("fail_open", "allow when the server itself fails (malformed CheckRequest, internal error); "
           "policy denies are never affected", "false", parse_bool),
    Option("serving", "gRPC serving layer: fast (HTTP/2 on asyncio: Check, health, Diagnostics, reflection) "
           "or grpcio (adds Health/Watch, at several times the CPU per Check)", "fast", serving_layer,
           ("serve",)),
    Option("grace_period", "seconds to finish in-flight Checks on SIGTERM", "10", positive_float, ("serve",)),
    Option("workers", "worker processes sharing the gRPC port (SO_REUSEPORT); 0 = one per CPU this process may "
           "use (CPU affinity and cgroup quota)", "0",
           non_negative_int, ("serve",)),
    # Serving limits (both serving layers where they can express them; README "Operations").
    Option("max_message_bytes", "largest request message; raise above Envoy's maxRequestBytes when "
           "includeRequestBodyInCheck sends bodies", "262144", positive_int, ("serve",)),
    Option("max_concurrent_streams", "concurrent streams per HTTP/2 connection", "256", positive_int, ("serve",)),
    Option("max_header_list_bytes", "request header list per stream (HPACK size), grpcio's hard limit", "16384",
           positive_int, ("serve",)),
    Option("max_connections", "connections per worker process; more are refused with GOAWAY", "1024",
           positive_int, ("serve",)),
    Option("connection_idle_timeout", "seconds without a request before a connection is closed (0 = never)",
           "300", non_negative_float, ("serve",)),
    Option("min_ping_interval", "keepalive enforcement: PINGs closer than this without a request in between "
           "are strikes; a third closes the connection (0 = no enforcement)", "300", non_negative_float,
           ("serve",)),
    Option("connection_buffer_bytes", "fast layer: request bytes one connection may have buffered "
           "(its flow-control window)", "1048576", positive_int, ("serve",)),
    Option("process_buffer_bytes", "fast layer: request bytes all connections of a worker may have buffered",
           "67108864", positive_int, ("serve",)),
    Option("http2_max_control_frames", "fast layer: PING/SETTINGS ACKs and RST_STREAMs queued for a peer "
           "that does not read them", "1000", positive_int, ("serve",)),
    Option("http2_max_resets_per_second", "fast layer: RST_STREAMs of open streams per connection and second "
           "(rapid reset), bursts of 30 s worth", "33", positive_float, ("serve",)),
    Option("http2_max_continuations", "fast layer: CONTINUATION frames per header block", "8", positive_int,
           ("serve",)),
    Option("http2_max_glitches_per_second", "fast layer: frames that do no work per connection and second "
           "(unknown types, PRIORITY, empty DATA/CONTINUATION, ...), bursts of 30 s worth", "330",
           positive_float, ("serve",)),
    # Overload (both serving layers; README "Operations").
    Option("max_pending_checks", "Checks one worker takes on at once (queued, evaluating or waiting on a JWKS "
           "fetch); more are refused at once with RESOURCE_EXHAUSTED", "1000", positive_int, ("serve",)),
    Option("max_queue_delay", "fast layer: seconds a new Check may be expected to wait in the worker's queue "
           "(queued Checks times the recent cost per Check, or the oldest one's age); beyond, it is refused "
           "with RESOURCE_EXHAUSTED (0 = no bound)", "0.1", non_negative_float, ("serve",)),
    Option("metrics_listen", "HTTP address for /metrics, /healthz, /readyz ('off' disables)", "0.0.0.0:9090",
           listen_or_off, ("serve", "health")),
    Option("decision_log", "one JSON line per Check to stdout, stderr, or off", "stdout", decision_log_target,
           ("serve",)),
    Option("decision_log_allow_sample", "fraction of allowed Checks logged (denies are always logged)", "1.0",
           fraction, ("serve",)),
    Option("decision_log_query", "log the query string (sensitive parameters redacted)", "false", parse_bool,
           ("serve",)),
    Option("allow_empty_policies", "accept a policy set with no policy at all, which allows every request; "
           "without it such a set is invalid (not ready at start, last good set kept on reload)", "false",
           parse_bool, ("serve", "explain", "validate")),
    Option("dry_run_header", "response header carrying dry-run results to the client ('' = none)", ""),
    Option("reload_interval", "seconds between checks of the policy path for changes (0 = only on SIGHUP)", "2",
           non_negative_float, ("serve",)),
    Option("tls_cert", "PEM certificate chain for TLS on the gRPC listener ('' = plaintext)", "", str, ("serve",)),
    Option("tls_key", "PEM private key for --tls-cert", "", str, ("serve",)),
    Option("tls_client_ca", "PEM CA bundle: require and verify client certificates (mTLS)", "", str, ("serve",)),
    Option("jwt_leeway", "seconds of clock skew allowed for exp/nbf", "60", non_negative_int),
    Option("jwt_max_token_bytes", "tokens longer than this are rejected before parsing", "8192", non_negative_int),
    Option("jwks_ca_bundle", "CA bundle (PEM) to verify jwksUri/discovery HTTPS servers ('' = system CAs)", ""),
    Option("jwks_ttl", "seconds JWKS stay fresh when the IdP sends no Cache-Control max-age", "300", positive_float),
    Option("jwks_max_stale", "seconds the last good JWKS are kept while the IdP fails", "86400", positive_float),
    Option("jwks_refresh_min_interval", "minimum seconds between unknown-kid refreshes per issuer", "10",
           positive_float),
    Option("otel_endpoint", "OTLP/gRPC collector for an OpenTelemetry span per Check, joined to Envoy's trace "
           "(http://host:4317 plaintext, https:// TLS; '' = no tracing; needs pip install '.[otel]')", "",
           otel_endpoint, ("serve",)),
    Option("otel_sample_ratio", "fraction of Checks traced when the request carries no trace context "
           "(Envoy's sampling decision is always followed)", "1.0", fraction, ("serve",)),
    Option("log_level", "DEBUG, INFO, WARNING or ERROR", "INFO", log_level, ("serve", "explain", "validate", "health")),
)


def add_options(parser: argparse.ArgumentParser, command: str, environ: Mapping[str, str] | None = None) -> None:
    """Add the options of ``command``; defaults come from the environment when set there."""
    environ = os.environ if environ is None else environ
    for option in OPTIONS:
        if command not in option.commands:
            continue
        raw = environ.get(option.env, option.default)
        try:
            default = option.parse(raw)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{option.env}: {exc}")
        parser.add_argument(
            option.flag,
            dest=option.dest,
            default=default,
            type=option.parse,
            help=f"{option.help} [env {option.env}, default {option.default!r}]",
        )
