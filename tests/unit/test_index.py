"""The rule index decides exactly as the plain scan: same policy, same rule, same dry-run and audit.

The differential test draws random policy sets (every field and ``when`` key, values and
notValues, prefixes, suffixes, presence, globs, templates, CIDRs of both families, dry-run and
AUDIT policies) and random requests from the same small vocabularies, so that rules often match,
often almost match, and sometimes several match at once; it compares the indexed groups against a
plain scan on every pair. Seeded: every run draws the same pairs.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from authz_server.engine.compiler import compile_policy
from authz_server.engine.decide import WorkloadPolicies
from authz_server.engine.engine import MeshSettings, PolicyEngine
from authz_server.engine.index import IndexedGroup, ScanGroup, rule_group
from authz_server.engine.request import RequestAttributes, RequestAuth, Workload, parse_ip
from authz_server.policy.loader import PolicySet, parse_documents

TRUST_DOMAINS = ["cluster.local", "other.td"]
NAMESPACES = ["foo", "bar", "team-1", "istio-system"]
ACCOUNTS = ["sleep", "client", "admin"]
HOSTS = ["a.example.com", "b.example.com", "a.example.com:8080", "api.test", "API.Test"]
PATHS = ["/", "/a", "/a/b", "/a/b/c", "/api/v1/users", "/api/v2/users/42", "/admin", "/admin/x", "/b.json"]
TEMPLATES = ["/api/{*}/users", "/api/{**}", "/{*}", "/a/{*}/c", "/{**}", "/admin/{*}"]
METHODS = ["GET", "POST", "PUT", "DELETE", "get"]
PORTS = ["80", "443", "8080", "9000"]
IPS = ["10.0.0.1", "10.0.1.7", "10.1.2.3", "192.168.1.10", "127.0.0.1", "::1", "2001:db8::5", "::ffff:10.0.0.1"]
CIDRS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.1.0/24", "10.0.0.1", "192.168.0.0/16", "0.0.0.0/0", "::/0",
         "2001:db8::/32", "::ffff:10.0.0.0/104", "::1", "10.1.2.3/32"]
ISSUERS = ["https://idp.a", "https://idp.b", "idp-c"]
SUBJECTS = ["alice", "bob", "svc-1"]
CLAIMS = ["admin", "dev", "ops", "team-1"]
HEADERS = ["x-tenant", "x-env", "user-agent"]
HEADER_VALUES = ["t1", "t2", "prod", "curl/8", "t1,t2"]
SNIS = ["a.example.com", "b.test"]


def pattern(rng: random.Random, base: str) -> str:
    """Istio's four modes over a value of the vocabulary (or an unrelated one)."""
    roll = rng.random()
    if roll < 0.45:
        return base
    if roll < 0.62:
        return base[: rng.randrange(len(base))] + "*"
    if roll < 0.79:
        return "*" + base[rng.randrange(1, len(base) + 1):]
    if roll < 0.84:
        return "*"
    return base + "-other"


def patterns(rng: random.Random, pool: list[str], most: int = 3) -> list[str]:
    return [pattern(rng, rng.choice(pool)) for _ in range(rng.randint(1, most))]


def principal(rng: random.Random) -> str:
    return f"{rng.choice(TRUST_DOMAINS)}/ns/{rng.choice(NAMESPACES)}/sa/{rng.choice(ACCOUNTS)}"


def principal_patterns(rng: random.Random) -> list[str]:
    values = patterns(rng, [principal(rng) for _ in range(3)])
    return values + (["spiffe://" + principal(rng)] if rng.random() < 0.1 else [])


def request_principal_patterns(rng: random.Random) -> list[str]:
    forms = [lambda: f"{rng.choice(ISSUERS)}/{rng.choice(SUBJECTS)}", lambda: f"{rng.choice(ISSUERS)}/*",
             lambda: f"*/{rng.choice(SUBJECTS)}", lambda: "*", lambda: rng.choice(ISSUERS),
             lambda: f"{rng.choice(ISSUERS)}*", lambda: f"*{rng.choice(SUBJECTS)}",
             lambda: pattern(rng, f"{rng.choice(ISSUERS)}/{rng.choice(SUBJECTS)}")]
    return [rng.choice(forms)() for _ in range(rng.randint(1, 3))]


def namespace_patterns(rng: random.Random) -> list[str]:
    return [rng.choice([rng.choice(NAMESPACES), "te*", "*-1", "*", "f*o", "foo/sa", rng.choice(NAMESPACES)])
            for _ in range(rng.randint(1, 2))]


def path_patterns(rng: random.Random) -> list[str]:
    return [rng.choice(TEMPLATES) if rng.random() < 0.3 else pattern(rng, rng.choice(PATHS))
            for _ in range(rng.randint(1, 3))]


def cidrs(rng: random.Random) -> list[str]:
    return rng.sample(CIDRS, rng.randint(1, 3))


SOURCE_FIELDS = {
    "principals": principal_patterns,
    "requestPrincipals": request_principal_patterns,
    "namespaces": namespace_patterns,
    "trustDomains": lambda rng: patterns(rng, TRUST_DOMAINS, 2),
    "ipBlocks": cidrs,
    "remoteIpBlocks": cidrs,
}
OPERATION_FIELDS = {
    "hosts": lambda rng: patterns(rng, HOSTS),
    "ports": lambda rng: rng.sample(PORTS, rng.randint(1, 2)),
    "methods": lambda rng: patterns(rng, METHODS),
    "paths": path_patterns,
}
CONDITIONS = {
    "source.principal": principal_patterns,
    "source.namespace": namespace_patterns,
    "source.ip": cidrs,
    "remote.ip": cidrs,
    "destination.ip": cidrs,
    "destination.port": lambda rng: rng.sample(PORTS, rng.randint(1, 2)),
    "connection.sni": lambda rng: patterns(rng, SNIS),
    "request.auth.principal": request_principal_patterns,
    "request.auth.audiences": lambda rng: patterns(rng, CLAIMS),
    "request.auth.presenter": lambda rng: patterns(rng, CLAIMS),
    "request.auth.claims[group]": lambda rng: patterns(rng, CLAIMS),
    "request.auth.claims[nested][role]": lambda rng: patterns(rng, CLAIMS),
    "request.headers[x-tenant]": lambda rng: patterns(rng, HEADER_VALUES),
    "request.headers[User-Agent]": lambda rng: patterns(rng, HEADER_VALUES),
    "source.serviceAccount": lambda rng: [rng.choice(["foo/sleep", "sleep", "bar/admin"])],
}


def clause(rng: random.Random, fields: dict[str, Any]) -> dict[str, list[str]]:
    body: dict[str, list[str]] = {}
    for name in rng.sample(sorted(fields), rng.randint(1, 3)):
        spelling = name if rng.random() < 0.75 else "not" + name[0].upper() + name[1:]
        body[spelling] = fields[name](rng)
    if fields is SOURCE_FIELDS and rng.random() < 0.05 and not any(k.lower().endswith(("principals", "namespaces")) for k in body):
        body["serviceAccounts"] = [rng.choice(["foo/sleep", "sleep"])]
    return body


def rule(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < 0.6:
        out["from"] = [{"source": clause(rng, SOURCE_FIELDS)} for _ in range(rng.choice([1, 1, 2]))]
    if rng.random() < 0.6:
        out["to"] = [{"operation": clause(rng, OPERATION_FIELDS)} for _ in range(rng.choice([1, 1, 2]))]
    if rng.random() < 0.5:
        out["when"] = []
        for key in rng.sample(sorted(CONDITIONS), rng.randint(1, 2)):
            values = CONDITIONS[key](rng)
            out["when"].append({"key": key, "notValues" if rng.random() < 0.2 else "values": values})
    return out


def policy(rng: random.Random, index: int) -> dict[str, Any]:
    action = rng.choice(["ALLOW", "ALLOW", "DENY", "AUDIT"])
    metadata: dict[str, Any] = {"name": f"p{index}", "namespace": "foo"}
    if rng.random() < 0.15:
        metadata["annotations"] = {"istio.io/dry-run": "true"}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": metadata,
            "spec": {"action": action, "rules": [rule(rng) for _ in range(rng.randint(1, 3))]}}


def policy_set(rng: random.Random, count: int) -> list:
    """Compiled random policies (JSON documents are YAML: the real loader and validator parse them)."""
    aps: list = []
    issues: list = []
    text = "\n---\n".join(json.dumps(policy(rng, i)) for i in range(count))
    parse_documents(text, "random.yaml", aps, [], issues)
    errors = [str(i) for i in issues if i.severity == "error"]
    assert not errors, errors
    env = MeshSettings(trust_domain="cluster.local", trust_domain_aliases=("other.td",)).compile_env
    return [compile_policy(p, env) for p in aps]


def request(rng: random.Random) -> RequestAttributes:
    def maybe(values: list[str], absent: float = 0.2) -> str | None:
        return None if rng.random() < absent else rng.choice(values)

    def ip() -> Any:
        return parse_ip(maybe(IPS))

    headers = {name: rng.choice(HEADER_VALUES) for name in rng.sample(HEADERS, rng.randint(0, 3))}
    header_values = None
    if rng.random() < 0.3:
        header_values = {k: tuple(v.split(",")) for k, v in headers.items()}
    auth = None
    if rng.random() < 0.7:
        claim = rng.choice([rng.choice(CLAIMS), rng.sample(CLAIMS, 2), 42, True, None, [1, rng.choice(CLAIMS)]])
        claims = {"iss": "x", "aud": rng.choice([rng.choice(CLAIMS), rng.sample(CLAIMS, 2)]),
                  "azp": rng.choice(CLAIMS), "nested": {"role": rng.choice(CLAIMS)}}
        if claim is not None:
            claims["group"] = claim
        auth = RequestAuth(rng.choice(ISSUERS), maybe(SUBJECTS), claims)
    source = None
    if rng.random() < 0.8:
        source = "spiffe://" + principal(rng) if rng.random() < 0.9 else "spiffe://td/ns/x/sa/y/ns/foo/z"
    return RequestAttributes(
        method=rng.choice(METHODS), host=rng.choice(HOSTS), path=rng.choice(PATHS + ["/api/v1/users/7", "/x"]),
        headers=headers, header_values=header_values, source_principal=source, source_ip=ip(), remote_ip=ip(),
        destination_ip=ip(), destination_port=int(rng.choice(PORTS)) if rng.random() < 0.9 else None,
        sni=maybe(SNIS, 0.5), auth=auth, workload=Workload("foo"),
    )


def groups(policies: WorkloadPolicies) -> tuple[ScanGroup | IndexedGroup, ...]:
    return policies._groups


@pytest.mark.parametrize("seed", range(8))
def test_index_decides_exactly_as_the_plain_scan(seed: int) -> None:
    rng = random.Random(seed)
    pairs = matched = 0
    while pairs < 12_500:
        compiled = policy_set(rng, rng.randint(4, 30))
        scan = WorkloadPolicies.split(compiled, indexed=False)
        indexed = WorkloadPolicies.split(compiled, indexed=True)
        assert all(isinstance(g, IndexedGroup) for g in groups(indexed))
        for _ in range(125):
            req = request(rng)
            expected = scan.decide(req)
            assert indexed.decide(req) == expected, (seed, pairs, req)
            for reference, candidate in zip(groups(scan), groups(indexed)):
                assert candidate.every(req) == reference.every(req), (seed, pairs, req)
            matched += expected.policy is not None or bool(expected.audited or expected.dry_run)
            pairs += 1
    # The draw must exercise matches, not only misses: a test that always misses proves nothing.
    assert matched > pairs // 4


def test_small_groups_are_scanned_large_ones_indexed() -> None:
    compiled = policy_set(random.Random(1), 40)
    assert isinstance(rule_group(compiled[:1]), ScanGroup)
    assert isinstance(rule_group(compiled), IndexedGroup)


def ap(rules: list[dict[str, Any]], name: str = "p") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "foo"}, "spec": {"rules": rules}}


def indexed_group(*rule_lists: list[dict[str, Any]]) -> IndexedGroup:
    aps: list = []
    issues: list = []
    parse_documents("\n---\n".join(json.dumps(ap(r, f"p{i}")) for i, r in enumerate(rule_lists)),
                    "t.yaml", aps, [], issues)
    assert not issues
    env = MeshSettings().compile_env
    return IndexedGroup([compile_policy(p, env) for p in aps])


def candidates(group: IndexedGroup, **attrs: Any) -> list[int]:
    return group.candidates(RequestAttributes(**attrs))


def test_distinct_hosts_and_paths_leave_one_candidate() -> None:
    group = indexed_group(*([{"to": [{"operation": {"hosts": [f"h{i}.test"]}}]}] for i in range(50)),
                          *([{"to": [{"operation": {"paths": [f"/p{i}/*"]}}]}] for i in range(50)))
    assert candidates(group, host="H7.test", path="/") == [7]
    assert candidates(group, host="x", path="/p3/a") == [53]
    assert group.scan == ()


def test_a_namespace_is_a_candidate_wherever_its_segment_appears() -> None:
    group = indexed_group([{"from": [{"source": {"namespaces": ["foo"]}}]}],
                          [{"from": [{"source": {"namespaces": ["bar"]}}]}],
                          [{"from": [{"source": {"namespaces": ["b*"]}}]}])
    assert group.scan == (2,)  # a glob is not keyed: always tried
    assert candidates(group, source_principal="spiffe://td/ns/x/sa/y/ns/foo/z") == [0, 2]
    assert candidates(group, source_principal="spiffe://td/ns/bar") == [2]  # regex needs "/ns/bar/"


def test_an_ipv4_mapped_peer_finds_ipv4_ranges_and_cidr_lengths_are_respected() -> None:
    group = indexed_group([{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}],
                          [{"from": [{"source": {"ipBlocks": ["10.1.2.0/24", "2001:db8::/32"]}}]}])
    assert candidates(group, source_ip=parse_ip("::ffff:10.1.2.3")) == [0, 1]
    assert candidates(group, source_ip=parse_ip("10.9.9.9")) == [0]
    assert candidates(group, source_ip=parse_ip("2001:db8::1")) == [1]
    assert candidates(group, source_ip=None) == []


def test_a_rule_keyed_on_every_from_entry_is_filed_under_their_union() -> None:
    group = indexed_group([{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/x"]}},
                                     {"source": {"principals": ["cluster.local/ns/b/*"]}}]}],
                          [{"from": [{"source": {"principals": ["*"]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}])
    assert group.scan == (1,)  # its two entries constrain different attributes: nothing is necessary
    assert candidates(group, source_principal="spiffe://cluster.local/ns/b/sa/z") == [0, 1]
    assert candidates(group, source_principal="spiffe://cluster.local/ns/c/sa/z") == [1]


def test_templates_are_keyed_by_their_literal_prefix_and_claims_by_each_string() -> None:
    group = indexed_group([{"to": [{"operation": {"paths": ["/api/{*}/users"]}}]}],
                          [{"when": [{"key": "request.auth.claims[groups]", "values": ["ops"]}]}])
    auth = RequestAuth("iss", "sub", {"groups": [1, "dev", "ops"]})
    assert candidates(group, path="/api/v1/users", auth=auth) == [0, 1]
    assert candidates(group, path="/apx", auth=RequestAuth("iss", "sub", {"groups": 7})) == []


def test_a_reloaded_engine_has_the_recent_workloads_indexed_before_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n---\n".join(json.dumps(ap([{"to": [{"operation": {"paths": [f"/p{i}"]}}]}], f"p{i}")) for i in range(20))
    aps: list = []
    parse_documents(text, "t.yaml", aps, [], [])
    policy_set = PolicySet("t.yaml", tuple(aps), (), ())
    previous, current = PolicyEngine(policy_set), PolicyEngine(policy_set)
    workloads = [Workload("foo", {"app": f"a{i}"}) for i in range(3)]
    for workload in workloads:
        previous.for_workload(workload)
    current.warm_like(previous)
    monkeypatch.setattr(current, "_select", lambda *a: pytest.fail("selected while serving"))
    for workload in workloads:
        view = current.for_workload(workload)
        assert isinstance(view.policies._groups[1], IndexedGroup)
        assert view.policies.decide(RequestAttributes(path="/p7", workload=workload)).policy.name == "p7"


def test_warming_keeps_a_workload_whose_labels_are_unknown() -> None:
    policy_set = PolicySet("t.yaml", (), (), ())
    previous, current = PolicyEngine(policy_set), PolicyEngine(policy_set)
    unknown = Workload("foo", None)
    previous.for_workload(unknown)
    current.warm_like(previous)
    assert current.for_workload(unknown).policies.decide(RequestAttributes(workload=unknown)).allowed
