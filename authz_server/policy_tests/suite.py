"""Test files: find them, parse them, and report every problem as file, test, field, message.

A test file is YAML (or JSON) with a ``kind: PolicyTest`` document — it can sit in the policy
directory, the policy loader skips it::

    kind: PolicyTest
    policies: .                 # file or directory, relative to this file (default: its directory)
    settings:                   # optional, flag names: workload-kind, root-namespace, ...
      workload-kind: gateway
    jwks:                       # optional: public keys of your own test signers, per issuer
      https://idp.example: '{"keys": [...]}'
    tests:
    - name: sleep may read
      request: {method: GET, path: /get, source: {principal: spiffe://...}, ...}   # explain's format
      expect: {decision: allow, policy: foo/allow-sleep, rule: 0}
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from authz_server.explain import RequestDescriptionError
from authz_server.jwt.jwks import JwksError, parse_jwks
from authz_server.policy.issues import Issue, IssueCollector
from authz_server.policy.loader import POLICY_SUFFIXES, TEST_KIND
from authz_server.policy_tests.expectations import Expectation, parse_expectation
from authz_server.policy_tests.offline import FILE_SETTINGS, IssuerKeys, Settings
from authz_server.policy_tests.requests import RequestSpec, parse_request_spec

SUITE_FIELDS = ("kind", "policies", "settings", "jwks", "tests")
CASE_FIELDS = ("name", "request", "expect")


@dataclass(frozen=True)
class Case:
    name: str
    request: RequestSpec
    expect: Expectation


@dataclass(frozen=True)
class Suite:
    file: str
    policies: Path
    settings: Settings
    jwks: IssuerKeys
    cases: tuple[Case, ...]


def find_test_files(path: Path) -> list[Path]:
    """``path`` itself, or every YAML/JSON file below a directory holding a PolicyTest."""
    if not path.is_dir():
        return [path]
    found = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).parts
        if file.suffix in POLICY_SUFFIXES and file.is_file() and not any(p.startswith(".") for p in relative):
            text = _read(file)
            if f"kind: {TEST_KIND}" in text or f'"kind": "{TEST_KIND}"' in text:
                found.append(file)
    return found


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def load_suites(paths: list[str]) -> tuple[list[Suite], list[Issue]]:
    """Every suite of every path, and every problem found (a suite with one is left out)."""
    suites: list[Suite] = []
    issues: list[Issue] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            issues.append(Issue(raw, "", "", "no such file or directory"))
            continue
        files = find_test_files(path)
        if path.is_dir() and not files:
            issues.append(Issue(raw, "", "", f"no test file (YAML with kind: {TEST_KIND}) in this directory"))
        for file in files:
            suites += parse_file(file, issues)
    return suites, issues


def parse_file(file: Path, issues: list[Issue]) -> list[Suite]:
    name = str(file)
    try:
        documents = [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(Issue(name, "", "", f"cannot read: {exc}"))
        return []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        issues.append(Issue(name, "", "", f"invalid YAML: {where}{getattr(exc, 'problem', None) or exc}"))
        return []
    docs = [d for d in documents if isinstance(d, Mapping) and d.get("kind") == TEST_KIND]
    if not docs:
        issues.append(Issue(name, "", "kind", f"not a test file: no document with kind: {TEST_KIND}"))
        return []
    names: set[str] = set()
    suites = []
    for doc in docs:
        suite = _parse_suite(doc, file, IssueCollector(name, "", issues=issues), names)
        if suite is not None:
            suites.append(suite)
    return suites


def _parse_suite(doc: Mapping[str, Any], file: Path, report: IssueCollector, names: set[str]) -> Suite | None:
    before = len(report.errors)
    for key in doc:
        if key not in SUITE_FIELDS:
            report.error(str(key), f"unknown field (expected {', '.join(SUITE_FIELDS)})")
    policies = doc.get("policies", ".")
    if not isinstance(policies, str) or not policies:
        report.error("policies", "must be a path (relative to this file)")
        policies = "."
    policy_path = (file.parent / policies) if not Path(policies).is_absolute() else Path(policies)
    if not policy_path.exists():
        report.error("policies", f"{policy_path}: no such file or directory")
    settings = _settings(doc.get("settings"), report.scoped("settings"))
    jwks = _jwks(doc.get("jwks"), report.scoped("jwks"))
    raw_cases = doc.get("tests")
    if not isinstance(raw_cases, list) or not raw_cases:
        report.error("tests", "must be a non-empty list of tests")
        raw_cases = []
    cases = []
    for index, raw in enumerate(raw_cases):
        case = _parse_case(raw, index, report, names)
        if case is not None:
            cases.append(case)
    if len(report.errors) != before:
        return None
    return Suite(str(file), policy_path, settings, jwks, tuple(cases))


def _parse_case(raw: Any, index: int, report: IssueCollector, names: set[str]) -> Case | None:
    where = IssueCollector(report.file, f"tests[{index}]", issues=report.issues)
    if not isinstance(raw, Mapping):
        where.error("", "must be an object with name, request and expect")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        where.error("name", "required: a non-empty string")
        return None
    where.document = f"test {name!r}"
    if name in names:
        where.error("name", "duplicate test name in this file")
    names.add(name)
    before = len(where.errors)
    for key in raw:
        if key not in CASE_FIELDS:
            where.error(str(key), f"unknown field (expected {', '.join(CASE_FIELDS)})")
    request = None
    if "request" not in raw:
        where.error("request", "required: the request, in explain's request format")
    else:
        try:
            request = parse_request_spec(raw["request"])
        except RequestDescriptionError as exc:
            where.error("request", str(exc))
    if "expect" not in raw:
        where.error("expect", "required: the expected outcome")
        expect = None
    else:
        expect = parse_expectation(raw["expect"], where.scoped("expect"))
    if len(where.errors) != before or request is None or expect is None:
        return None
    return Case(name, request, expect)


def _settings(raw: Any, report: IssueCollector) -> Settings:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        report.error("", "must be an object: flag name (without --) -> value")
        return ()
    out = []
    for key, value in raw.items():
        option = FILE_SETTINGS.get(str(key))
        if option is None:
            report.error(str(key), f"unknown setting (expected one of {', '.join(sorted(FILE_SETTINGS))})")
            continue
        try:
            out.append((option.dest, option.parse(_as_text(value))))
        except argparse.ArgumentTypeError as exc:
            report.error(str(key), str(exc))
    return tuple(sorted(out, key=lambda item: item[0]))


def _as_text(value: Any) -> str:
    """YAML values in the spelling the flag takes: labels/headers as mappings, lists, booleans."""
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _jwks(raw: Any, report: IssueCollector) -> IssuerKeys:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        report.error("", "must be an object: issuer -> JWKS (JSON text or object)")
        return {}
    out: dict[str, tuple[Mapping[str, Any], ...]] = {}
    for issuer, document in raw.items():
        try:
            parse_jwks(document)
        except JwksError as exc:
            report.error(str(issuer), str(exc))
            continue
        keys = json.loads(document)["keys"] if isinstance(document, str) else document["keys"]
        out[str(issuer)] = tuple(keys)
    return out
