"""The chart's Grafana dashboard and PrometheusRule: valid, firing when they should, and built
only on metrics the real server exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.demo.idp import IdentityProvider
from authz_server.demo.pki import make_ca
from authz_server.demo.processes import ManagedProcess, ProcessGroup, free_port
from authz_server.explain import check_request_from_description
from chart_validation import render

DATA = Path(__file__).resolve().parent / "data"
RELEASE_JOB = "authz-istio-ext-authz"  # the Service name for release "authz": the rules' job selector
METRIC = re.compile(r"\b(authz_[a-z0-9_]+)")


def monitoring_objects(values: dict | None = None) -> tuple[dict, dict]:
    objs, _ = render({"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}, **(values or {})})
    [rule] = [o for o in objs if o["kind"] == "PrometheusRule"]
    [dashboard] = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    return dashboard, rule


def dashboard_json(configmap: dict) -> dict:
    return json.loads(configmap["data"]["istio-ext-authz.json"])


def panel_exprs(dashboard: dict) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"] if p["type"] != "row"}


def rule_exprs(rule: dict) -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: run `make sysdeps` (Debian package prometheus)"
    return path


def test_dashboard_and_rules_are_off_by_default() -> None:
    objs, _ = render({})
    assert not [o for o in objs if o["kind"] == "PrometheusRule"]
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_is_what_the_grafana_sidecar_picks_up() -> None:
    configmap, _ = monitoring_objects({"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                                            "annotations": {"grafana_folder": "Istio"}}})
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Istio"}
    dashboard = dashboard_json(configmap)
    assert dashboard["uid"] == "istio-ext-authz"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job"}
    exprs = panel_exprs(dashboard)
    assert all(exprs.values()), "every panel queries something"
    for title in ("Decisions by result and reason", "Deny reasons", "Deciding policies (top 10)",
                  "Check latency (server side)", "JWT outcomes by issuer", "JWKS key age", "JWKS fetches",
                  "Token-cache hit ratio", "Policy reloads", "Dry-run would-be denials", "Worker restarts"):
        assert title in exprs
    assert all('job=~"$job"' in e for es in exprs.values() for e in es)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_rules_pass_promtool_check_and_fire_as_their_unit_tests_say(tmp_path: Path) -> None:
    _, rule = monitoring_objects()
    assert rule["metadata"]["name"] == RELEASE_JOB
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(DATA / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    check = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    unit = subprocess.run([promtool(), "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DATA / "alerts_test.yaml").read_text()))
    assert tested == set(rule_exprs(rule)), "every alert has a unit test"


def test_rule_thresholds_selector_and_labels_come_from_values() -> None:
    _, rule = monitoring_objects({"prometheusRule": {
        "enabled": True, "selector": 'namespace="sec",service="authz"', "labels": {"release": "kps"},
        "additionalLabels": {"team": "security"},
        "thresholds": {"jwksKeyAgeSeconds": 600, "failClosedPerSecond": 1, "p99LatencySeconds": 0.1}}})
    assert rule["metadata"]["labels"]["release"] == "kps"
    exprs = rule_exprs(rule)
    assert all('{namespace="sec",service="authz"' in e for e in exprs.values())
    assert exprs["AuthzJwksKeysStale"].endswith("> 600")
    assert exprs["AuthzFailClosedErrors"].endswith("> 1")
    assert exprs["AuthzCheckLatencyHigh"].endswith("> 0.1")
    for r in rule["spec"]["groups"][0]["rules"]:
        assert r["labels"]["team"] == "security" and r["labels"]["severity"] in ("warning", "critical")


# ----------------------------------------------------------------------- the real server


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.1)


def exported(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def checks_counted(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("authz_checks_total{"))


def check(principal: str | None = "spiffe://cluster.local/ns/foo/sa/sleep", method: str = "GET", path: str = "/get",
          headers: dict | None = None, destination: bool = True) -> CheckRequest:
    return check_request_from_description({
        "method": method, "host": "httpbin.foo:8000", "path": path, "headers": headers or {},
        "source": {"principal": principal or "", "address": "10.0.0.5", "port": 40000},
        "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin" if destination else "",
                        "address": "10.0.1.10", "port": 80},
    })


class Running:
    def __init__(self, supervisor: ManagedProcess, grpc_port: int, ops_port: int, policies: Path) -> None:
        self.supervisor, self.policies = supervisor, policies
        self.grpc_address, self.ops_port = f"127.0.0.1:{grpc_port}", ops_port

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.ops_port}/metrics")[1]


POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{issuer}", jwksUri: "{jwks_uri}"}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: readers, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/foo/sa/sleep"]}}}}]
    to: [{{operation: {{methods: ["GET"]}}}}]
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-debug
  namespace: foo
  annotations: {{istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/debug/*"]}}}}]}}]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Two workers after a known sequence: allows, denies, dry-run, JWTs (a JWKS over HTTPS),
    an unknown workload, a malformed CheckRequest, a rejected reload and a killed worker."""
    tmp = tmp_path_factory.mktemp("monitoring")
    with IdentityProvider(make_ca(tmp / "ca")) as idp, ProcessGroup(tmp / "logs") as group:
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "p.yaml").write_text(POLICIES.format(issuer=idp.issuer, jwks_uri=idp.jwks_uri))
        grpc_port, ops_port = free_port(), free_port()
        supervisor = group.start_authz_server(policies, grpc_port, [
            "--workers", "2", "--metrics-listen", f"127.0.0.1:{ops_port}", "--jwks-ca-bundle", str(idp.ca_path),
            "--reload-interval", "0.2", "--decision-log", "off"])
        running = Running(supervisor, grpc_port, ops_port, policies)
        wait_for(lambda: http_get(f"http://127.0.0.1:{ops_port}/readyz")[0] == 200, what="readiness")
        token = idp.mint()
        sequence = (check(), check(method="POST"), check(path="/debug/vars"),
                    check(principal=None, method="POST", headers={"authorization": f"Bearer {token}"}),
                    check(principal=None, method="POST", headers={"authorization": f"Bearer {token}"}),
                    check(destination=False), CheckRequest())
        with grpc.insecure_channel(running.grpc_address) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for request in sequence:
                stub.Check(request, timeout=10)
        # A worker writes its counts at the end of the event-loop pass that answered: a SIGKILL
        # can land in between, so the sequence is seen counted before a worker is killed.
        wait_for(lambda: checks_counted(running.metrics()) >= len(sequence), what="the Checks counted")
        (policies / "broken.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
        workers = [int(p) for p in Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read_text().split()]
        os.kill(workers[0], signal.SIGKILL)
        yield running


def test_every_metric_the_dashboard_and_alerts_use_is_exported(server: Running) -> None:
    configmap, rule = monitoring_objects()
    used = {name for exprs in panel_exprs(dashboard_json(configmap)).values() for e in exprs for name in METRIC.findall(e)}
    used |= {name for e in rule_exprs(rule).values() for name in METRIC.findall(e)}
    assert len(used) >= 14
    wait_for(lambda: used <= exported(server.metrics()), what="every metric exported")
    text = server.metrics()
    for sample in ('reason="unknown_workload_namespace"', 'reason="malformed_request"', 'result="denied"',
                   'authz_jwt_total{issuer="https://127.0.0.1', 'authz_jwks_fetches_total{issuer="https://127.0.0.1'):
        assert sample in text
    wait_for(lambda: re.search(r"^authz_worker_restarts_total 1\.0$", server.metrics(), re.M) is not None,
             what="the killed worker counted")
    wait_for(lambda: re.search(r"^authz_policy_last_reload_success 0\.0$", server.metrics(), re.M) is not None,
             what="the rejected reload shown")


def test_a_real_prometheus_scrapes_the_server_and_evaluates_the_alerts(server: Running, tmp_path: Path) -> None:
    """Prometheus (Debian's package) scrapes /metrics as job ``authz-istio-ext-authz`` and runs
    the chart's rules: all evaluate cleanly, and the ones the traffic here calls for go pending."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run `make sysdeps` (Debian package prometheus)"
    _, rule = monitoring_objects()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{"job_name": RELEASE_JOB, "static_configs": [{"targets": [f"127.0.0.1:{server.ops_port}"]}]}],
    }))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("prometheus", [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                    ready=lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, timeout_s=60)
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)

            def pending() -> set[str]:
                stub.Check(check(destination=False), timeout=10)  # keep unknown-workload denials coming
                alerts = json.loads(http_get(f"{api}/alerts")[1] or "{}").get("data", {}).get("alerts", [])
                return {a["labels"]["alertname"] for a in alerts if a["state"] in ("pending", "firing")}

            while not {"AuthzUnknownWorkloadDenials", "AuthzPolicyReloadFailing"} <= pending():
                assert time.monotonic() < deadline, f"alerts not pending in time: {pending()}"
                time.sleep(0.5)
        groups = json.loads(http_get(f"{api}/rules")[1])["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == set(rule_exprs(rule))
        assert {name: r["health"] for name, r in rules.items() if r["health"] != "ok"} == {}
        targets = json.loads(http_get(f"{api}/targets")[1])["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
