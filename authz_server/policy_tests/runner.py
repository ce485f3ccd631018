"""``authz-server test PATH...``: run test files against their policy sets, offline.

Prints one line per test (PASS/FAIL/ERROR; a failure adds what differed and ``explain``'s
account of the decision), problems in test files and policy sets as one line each, then a
summary; exits non-zero when anything failed or could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from authz_server.explain import RequestDescriptionError
from authz_server.policy.issues import Issue
from authz_server.policy_tests.coverage import Coverage
from authz_server.policy_tests.junit import write_junit
from authz_server.policy_tests.offline import DeciderPool, OfflineDecider
from authz_server.policy_tests.outcome import Outcome
from authz_server.policy_tests.suite import Case, Suite, load_suites

EXIT_FAILED = 1


def policy_set_problems(decider: OfflineDecider, policies: Path) -> list[str]:
    """The lines to show when a policy set cannot be used (empty when it loaded)."""
    if decider.load.ok:
        return []
    return [f"policy set {policies} is invalid:", *(f"  {issue}" for issue in decider.load.errors)]


async def run_suites(suites: list[Suite], pool: DeciderPool, coverage: Coverage | None = None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for suite in suites:
        decider = pool.get(suite.policies, suite.settings, suite.jwks)
        broken = policy_set_problems(decider, suite.policies)
        if broken:
            outcomes += [Outcome(suite.file, case.name, "error", tuple(broken)) for case in suite.cases]
            continue
        if coverage is not None and decider.policy_set is not None:
            coverage.add_policy_set(decider.policy_set)
        for case in suite.cases:
            outcomes.append(await run_case(suite, case, decider, coverage))
    return outcomes


async def run_case(suite: Suite, case: Case, decider: OfflineDecider, coverage: Coverage | None) -> Outcome:
    try:
        result = await decider.decide(case.request)
    except RequestDescriptionError as exc:
        return Outcome(suite.file, case.name, "error", (f"request: {exc}",))
    if coverage is not None:
        coverage.record(decider.app.store.engine(), result.attrs, result.verdict)
    problems = case.expect.mismatches(result.verdict)
    return Outcome(suite.file, case.name, "fail" if problems else "pass", tuple(problems), result.text)


def report(outcomes: list[Outcome], out: TextIO) -> None:
    shown: set[tuple[str, ...]] = set()
    for outcome in outcomes:
        print(f"{outcome.status.upper():5} {outcome.file}: {outcome.name}", file=out)
        if outcome.status == "pass":
            continue
        if outcome.status == "error" and outcome.problems in shown:  # one broken policy set, many tests
            print(f"      {outcome.problems[0]} (listed above)", file=out)
            continue
        shown.add(outcome.problems)
        for problem in outcome.problems:
            print(f"      {problem}", file=out)
        if outcome.explanation:
            print("      why:", file=out)
            for line in outcome.explanation.splitlines():
                print(f"        {line}", file=out)


def _invalid_tests(issues: list[Issue]) -> list[Outcome]:
    """Problems in test files as errored tests, so a CI system shows them too."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for issue in issues:
        grouped.setdefault((issue.file, issue.document or "test file"), []).append(str(issue))
    return [Outcome(file, name, "error", tuple(problems)) for (file, name), problems in grouped.items()]


def run_tests(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The ``test`` command: every path's test files, a report, the exit status."""
    out = out or sys.stdout
    suites, issues = load_suites(args.paths)
    for issue in issues:
        print(f"ERROR {issue}", file=out)
    if args.policies:  # --policies / AUTHZ_POLICIES: test these policies instead of each file's
        suites = [Suite(s.file, Path(args.policies), s.settings, s.jwks, s.cases) for s in suites]
    coverage = Coverage() if args.coverage else None
    outcomes = asyncio.run(run_suites(suites, DeciderPool(args), coverage))
    report(outcomes, out)
    if args.junit:
        write_junit([*_invalid_tests(issues), *outcomes], Path(args.junit))
    if coverage is not None:
        print(coverage.summary(), file=out)
        for item in coverage.missed():
            print(f"  not exercised: {item.text}", file=out)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("pass", "fail", "error")}
    errors = counts["error"] + len(issues)
    print(f"{counts['pass']} passed, {counts['fail']} failed, {errors} errors", file=out)
    return EXIT_FAILED if counts["fail"] or errors or not outcomes else 0
