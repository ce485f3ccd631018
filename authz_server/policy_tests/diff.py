"""``authz-server diff --from OLD --to NEW --requests FILE...``: what a policy change changes.

Every request is decided under both policy sets (offline, as ``test`` does) and only those whose
decision, HTTP status or deciding policy/rule differ are printed: the pre-rollout check that
complements dry-run. Request files are test files (each test's request, named by the test) or
request descriptions in ``explain``'s format, one per YAML document or a list of them.
Exit status as diff(1): 0 nothing changes, 1 something does, 2 trouble.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TextIO

import yaml

from authz_server.authorizer import Verdict
from authz_server.explain import RequestDescriptionError
from authz_server.policy.issues import Issue
from authz_server.policy.loader import TEST_KIND
from authz_server.policy_tests.offline import DeciderPool, IssuerKeys, Settings
from authz_server.policy_tests.requests import RequestSpec, parse_request_spec
from authz_server.policy_tests.runner import policy_set_problems
from authz_server.policy_tests.suite import parse_file

EXIT_CHANGED = 1
EXIT_TROUBLE = 2


@dataclass(frozen=True)
class NamedRequest:
    file: str
    name: str
    request: RequestSpec
    settings: Settings = ()
    jwks: IssuerKeys | None = None


@dataclass(frozen=True)
class Change:
    request: NamedRequest
    before: Verdict
    after: Verdict


def outcome(verdict: Verdict) -> tuple[bool, int, str, int | None]:
    """What counts as a change: the decision, the status, the deciding policy and rule."""
    return verdict.allowed, verdict.http_status, verdict.policy, verdict.rule


def describe(verdict: Verdict) -> str:
    decided = f" by {verdict.policy} rule[{verdict.rule}]" if verdict.policy else ""
    return f"{'ALLOW' if verdict.allowed else 'DENY'} (HTTP {verdict.http_status}) {verdict.reason}{decided}"


def load_requests(paths: list[str], issues: list[Issue]) -> list[NamedRequest]:
    requests: list[NamedRequest] = []
    for raw in paths:
        path = Path(raw)
        try:
            text = path.read_text(encoding="utf-8")
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            issues.append(Issue(raw, "", "", f"cannot read requests: {exc}"))
            continue
        if any(isinstance(d, Mapping) and d.get("kind") == TEST_KIND for d in documents):
            for suite in parse_file(path, issues):
                requests += [NamedRequest(suite.file, case.name, case.request, suite.settings, suite.jwks)
                             for case in suite.cases]
            continue
        items: list[Any] = [item for d in documents for item in (d if isinstance(d, list) else [d])]
        for index, item in enumerate(items):
            try:
                requests.append(NamedRequest(raw, f"request[{index}]", parse_request_spec(item)))
            except RequestDescriptionError as exc:
                issues.append(Issue(raw, f"request[{index}]", "", str(exc)))
    return requests


async def changes(pool: DeciderPool, old: str, new: str, requests: list[NamedRequest],
                  issues: list[Issue]) -> list[Change]:
    found = []
    for named in requests:
        before_set = pool.get(old, named.settings, named.jwks)
        after_set = pool.get(new, named.settings, named.jwks)
        try:
            # One CheckRequest (one token) for both sets: the same request, decided twice.
            check_request = named.request.check_request(pool.key, [*before_set.jwt_rules(), *after_set.jwt_rules()])
        except RequestDescriptionError as exc:
            issues.append(Issue(named.file, named.name, "request", str(exc)))
            continue
        before = (await before_set.decide_check_request(check_request)).verdict
        after = (await after_set.decide_check_request(check_request)).verdict
        if outcome(before) != outcome(after):
            found.append(Change(named, before, after))
    return found


def run_diff(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The ``diff`` command."""
    out = out or sys.stdout
    old = args.policies
    if not old:
        print("error: --from (or --policies / AUTHZ_POLICIES) is required", file=out)
        return EXIT_TROUBLE
    pool = DeciderPool(args)
    trouble = [line for path in (old, args.to) for line in policy_set_problems(pool.get(path), Path(path))]
    if trouble:
        print("\n".join(trouble), file=out)
        return EXIT_TROUBLE
    issues: list[Issue] = []
    requests = load_requests(args.requests, issues)
    found = asyncio.run(changes(pool, old, args.to, requests, issues))
    for issue in issues:
        print(f"ERROR {issue}", file=out)
    for change in found:
        print(f"CHANGED {change.request.file}: {change.request.name}", file=out)
        print(f"  before: {describe(change.before)}", file=out)
        print(f"  after:  {describe(change.after)}", file=out)
    print(f"{len(requests)} requests decided under {old} and {args.to}: {len(found)} changed", file=out)
    if issues:
        return EXIT_TROUBLE
    return EXIT_CHANGED if found else 0
