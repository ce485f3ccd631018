"""Value matchers: Istio's string convention and every variant of it (SPEC 3.1-3.4, 4.2)."""

from __future__ import annotations

import ipaddress
import random
import re
import subprocess
import sys

import pytest

from authz_server.engine import matchers


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("abc", "abc", True),
        ("abc", "abcd", False),
        ("abc*", "abc", True),  # a prefix matches itself
        ("abc*", "abcdef", True),
        ("abc*", "xabc", False),
        ("*abc", "abc", True),  # a suffix matches itself
        ("*abc", "xxabc", True),
        ("*abc", "abcx", False),
        ("*", "x", True),
        ("*", "", False),  # presence is regex .+ outside headers and hosts
        ("a*c", "a*c", True),  # a middle star is literal
        ("a*c", "abc", False),
        ("ABC", "abc", False),  # case-sensitive
    ],
)
def test_string_convention(pattern: str, value: str, expected: bool) -> None:
    assert matchers.string_matcher([pattern])(value) is expected


def test_any_of_several_patterns() -> None:
    test = matchers.string_matcher(["/a", "/b/*", "*.json"])
    assert [test(v) for v in ("/a", "/b/x", "/x.json", "/c")] == [True, True, True, False]


def test_headers_and_hosts_treat_empty_values_as_present() -> None:
    assert matchers.string_matcher(["*"], empty_is_present=True)("")


def test_host_matching_ignores_case() -> None:
    test = matchers.string_matcher(["Example.COM", "*.Example.org"], ignore_case=True)
    assert test("example.com") and test("API.EXAMPLE.ORG") and not test("example.org")


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("cluster.local/ns/foo/sa/sleep", "spiffe://cluster.local/ns/foo/sa/sleep", True),
        ("cluster.local/ns/foo/sa/sleep", "spiffe://cluster.local/ns/foo/sa/sleepy", False),
        ("cluster.local/ns/foo/*", "spiffe://cluster.local/ns/foo/sa/x", True),
        ("*/sa/sleep", "spiffe://cluster.local/ns/bar/sa/sleep", True),
        ("*/sa/sleep", "other://x/sa/sleep", False),  # the suffix must follow the scheme
        ("*", "spiffe://anything", True),
        # a value already carrying the scheme gets a second one and never matches
        ("spiffe://cluster.local/ns/foo/sa/sleep", "spiffe://cluster.local/ns/foo/sa/sleep", False),
    ],
)
def test_principals_get_spiffe_prefixed(pattern: str, value: str, expected: bool) -> None:
    assert matchers.principal_matcher([pattern], ("cluster.local",))(value) is expected


def test_principals_follow_trust_domain_and_aliases() -> None:
    test = matchers.principal_matcher(["cluster.local/ns/foo/sa/sleep"], ("corp.example", "old.example"))
    assert test("spiffe://corp.example/ns/foo/sa/sleep")
    assert test("spiffe://old.example/ns/foo/sa/sleep")
    assert not test("spiffe://cluster.local/ns/foo/sa/sleep")  # not a trust domain of this mesh
    assert not test("spiffe://evil.example/ns/foo/sa/sleep")


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("foo", "spiffe://cluster.local/ns/foo/sa/x", True),
        ("foo", "spiffe://cluster.local/ns/foobar/sa/x", False),
        ("foo-*", "spiffe://cluster.local/ns/foo-1/sa/x", True),
        ("*-prod", "spiffe://cluster.local/ns/team-prod/sa/x", True),
        ("a*c", "spiffe://cluster.local/ns/abbc/sa/x", True),  # in namespaces every * is a glob
        ("f.o", "spiffe://cluster.local/ns/fxo/sa/x", False),  # dots are literal
    ],
)
def test_namespaces_are_globs_over_the_peer_uri(pattern: str, value: str, expected: bool) -> None:
    assert matchers.namespace_matcher([pattern])(value) is expected


def test_service_accounts_use_istio_regex() -> None:
    test = matchers.service_account_matcher(["foo/sleep"])
    assert test("spiffe://cluster.local/ns/foo/sa/sleep")
    assert not test("spiffe://cluster.local/ns/foo/sa/sleeper")
    assert not test("spiffe://cluster.local/ns/bar/sa/sleep")


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("corp.example", "spiffe://corp.example/ns/a/sa/b", True),
        ("corp.example", "spiffe://corp.example.evil/ns/a/sa/b", False),
        ("corp*", "spiffe://corp-east/ns/a/sa/b", True),
        ("*.example", "spiffe://corp.example/ns/a/sa/b", True),
        ("*", "spiffe://x/ns/a/sa/b", True),
    ],
)
def test_trust_domains(pattern: str, value: str, expected: bool) -> None:
    assert matchers.trust_domain_matcher([pattern])(value) is expected


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/api/{*}/info", "/api/v1/info", True),
        ("/api/{*}/info", "/api/v1/v2/info", False),  # {*} is exactly one segment
        ("/api/{*}/info", "/api//info", False),  # ... of at least one character
        ("/files/{**}", "/files/a/b/c.txt", True),
        ("/files/{**}", "/files/", True),  # zero or more
        ("/files/{**}", "/other/a", False),
        ("/a/{*}/b/{**}", "/a/x/b/y/z", True),
    ],
)
def test_path_templates(pattern: str, path: str, expected: bool) -> None:
    assert matchers.path_matcher([pattern])(path) is expected


def test_paths_mix_templates_and_plain_patterns() -> None:
    test = matchers.path_matcher(["/health", "/api/{*}"])
    assert test("/health") and test("/api/x") and not test("/api/x/y")


def test_ip_blocks_mask_host_bits_and_handle_ipv6() -> None:
    test = matchers.ip_matcher(["10.0.0.7/24", "2001:db8::/32", "192.0.2.1"])
    ip = ipaddress.ip_address
    assert test(ip("10.0.0.200"))
    assert not test(ip("10.0.1.1"))
    assert test(ip("2001:db8::1"))
    assert test(ip("192.0.2.1")) and not test(ip("192.0.2.2"))
    assert test(ip("::ffff:10.0.0.9"))  # an IPv4-mapped peer is its IPv4 address


@pytest.mark.parametrize(
    ("pattern", "iss", "sub", "expected"),
    [
        ("*", "https://a", "u", True),
        ("*", "https://a", None, False),  # no sub never matches
        ("https://a/u", "https://a", "u", True),
        ("https://a/*", "https://a", "anything", True),
        ("https://a/adm*", "https://a", "admin", True),
        ("*a/u", "https://a", "u", True),  # suffix on the issuer, exact sub
        ("*u", "https://a", "xu", True),  # no slash: suffix of the sub
        ("https://a*", "https://abc", "u", False),  # splits at '//': matches nothing
        ("a/b/c", "a", "b/c", False),  # a sub with '/' cannot be matched exactly
    ],
)
def test_request_principals_split_at_last_slash(pattern: str, iss: str, sub: str | None, expected: bool) -> None:
    assert matchers.request_principal_matcher([pattern])((iss, sub)) is expected


def _istio_service_account_regex(ns: str, sa: str) -> "re.Pattern[str]":
    return re.compile(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?", re.DOTALL)


def _istio_namespace_regex(pattern: str) -> "re.Pattern[str]":
    return re.compile(".*/ns/" + ".*".join(re.escape(p) for p in pattern.split("*")) + "/.*", re.DOTALL)


def test_service_accounts_and_namespaces_decide_as_istio_regexes() -> None:
    """The linear matchers agree with Istio's regexes on every string over a small alphabet
    built from the pieces that matter (``/``, ``ns``, ``sa``, the names)."""
    rng = random.Random(11)
    pieces = ["/", "ns", "sa", "foo", "b", "x", "spiffe://", "/ns/foo/", "sa/b", "\n"]
    sa_test, sa_regex = matchers.service_account_matcher(["foo/b"]), _istio_service_account_regex("foo", "b")
    ns_globs = ["foo", "f*o", "*o*", "fo*", "*"]
    ns_tests = [(matchers.namespace_matcher([g]), _istio_namespace_regex(g)) for g in ns_globs]
    for _ in range(20000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        if rng.random() < 0.5:
            value = "spiffe://" + value
        assert sa_test(value) is (sa_regex.fullmatch(value) is not None), value
        for test, regex in ns_tests:
            assert test(value) is (regex.fullmatch(value) is not None), value


def _finishes(matcher: str, pattern: str, value: str, within_s: float = 60.0) -> bool:
    """Runs one match in a child process: True if it finished (a generous bound; linear time
    takes microseconds, the old backtracking regexes minutes, and a regex never lets go of the
    GIL, so only a process can be given up on)."""
    code = f"from authz_server.engine import matchers; matchers.{matcher}([{pattern!r}])({value})"
    try:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=within_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_adversarial_principals_are_matched_without_backtracking() -> None:
    """Regression: a 72 KB principal took 1.8 s in serviceAccounts, a 2 KB one 3 s in a
    three-wildcard namespace glob."""
    assert _finishes("service_account_matcher", "foo/bar", "'spiffe://' + '/ns/foo/' * 40_000")
    assert _finishes("namespace_matcher", "f*o*o*x", "'spiffe://' + '/ns/fo' * 2_000")
