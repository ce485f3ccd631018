"""The command line: validate lists every problem, explain says why, settings come from env too."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from authz_server.cli import build_parser, main
from authz_server.settings import OPTIONS, add_options, parse_labels

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [300.1.1.1]}}]
    to: [{operation: {ports: ["99999"]}}]
"""


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES / "policies")]) == 0
    out = capsys.readouterr()
    assert "OK: 2 AuthorizationPolicies, 1 RequestAuthentications, 0 errors" in out.out  # results on stdout
    assert out.err == ""


def test_validate_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    assert main(["validate", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    prefix = f"{tmp_path / 'bad.yaml'}: AuthorizationPolicy/foo/bad: spec.rules[0]."
    assert lines == [
        f"{prefix}from[0].source.ipBlocks[0]: invalid IP address or CIDR '300.1.1.1'",
        f"{prefix}to[0].operation.ports[0]: invalid port '99999': must be a decimal number 0-65535",
        "INVALID: 1 AuthorizationPolicies, 0 RequestAuthentications, 2 errors, 0 warnings",
    ]


def test_explain_prints_decision_policy_and_reasons(capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    code = main(["explain", "--policies", str(EXAMPLES / "policies"), "--request", str(EXAMPLES / "request.yaml")])
    out = capsys.readouterr().out
    assert code == 0
    # offline: the request carries no token, so no JWKS fetch was tried (and none warned about)
    assert [r.getMessage() for r in caplog.records if "JWKS" in r.getMessage()] == []
    assert "decision: ALLOW (HTTP 200)" in out
    assert "policy:   foo/allow-sleep-and-admins rule[0]" in out
    assert "rule[1]: no match: no from entry matched (failed: from[0].source.requestPrincipals)" in out


def test_explain_rejects_a_bad_request_description(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "r.yaml"
    request.write_text("method: GET\nbody: x\n")
    assert main(["explain", "--policies", str(EXAMPLES / "policies"), "--request", str(request)]) == 2
    assert "unknown fields ['body']" in capsys.readouterr().err


def test_every_option_reads_its_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, "serve", {"AUTHZ_WORKLOAD_LABELS": "app=x,version=v1", "AUTHZ_NUM_TRUSTED_PROXIES": "2",
                                  "AUTHZ_LISTEN": "127.0.0.1:7000"})
    args = parser.parse_args([])
    assert args.workload_labels == {"app": "x", "version": "v1"}
    assert args.num_trusted_proxies == 2 and args.listen == "127.0.0.1:7000"
    assert parser.parse_args(["--num-trusted-proxies", "3"]).num_trusted_proxies == 3  # flag wins


def test_help_documents_every_serve_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        if "serve" in option.commands:
            assert option.flag in text and option.env in text


def test_bad_environment_value_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        add_options(parser, "serve", {"AUTHZ_WORKLOAD_KIND": "pod"})
    assert "AUTHZ_WORKLOAD_KIND: invalid workload kind 'pod'" in capsys.readouterr().err


def test_labels_syntax() -> None:
    assert parse_labels(" app=x , version=v1 ") == {"app": "x", "version": "v1"}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_labels("app")


def test_readme_documents_every_option() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [o.flag for o in OPTIONS if o.flag not in readme or o.env not in readme]
    assert not missing, f"README configuration reference lacks {missing}"


def test_explain_shows_absent_addresses_as_dashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = tmp_path / "r.yaml"
    request.write_text("method: GET\nhost: h\npath: /\ndestination: {principal: spiffe://cluster.local/ns/foo/sa/x}\n")
    assert main(["explain", "--policies", str(EXAMPLES / "policies"), "--request", str(request)]) == 0
    out = capsys.readouterr().out
    assert "ip=- remote.ip=-" in out and "None" not in out


def test_demo_without_the_demo_extra_says_what_to_install() -> None:
    """The demo's typed Envoy configs need envoy-data-plane (the [demo] extra): one line, no traceback."""
    code = ("import sys; sys.modules['envoy_data_plane'] = None\n"
            "from authz_server.cli import main; sys.exit(main(['demo']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "authz-server demo: envoy_data_plane is missing: pip install 'istio-ext-authz-server[demo]'\n"


def test_the_server_never_loads_the_typed_envoy_api() -> None:
    """envoy-data-plane is for the demo and tests only: the serving path and every other command
    import and run without it (so the image, built without the [demo] extra, lacks nothing)."""
    code = ("import sys; sys.modules['envoy_data_plane'] = sys.modules['betterproto2'] = None\n"
            "import authz_server.app, authz_server.grpc_api.fast_server, authz_server.grpc_api.server\n"
            "from authz_server.cli import main\n"
            f"sys.exit(main(['validate', {str(EXAMPLES / 'policies')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
