"""Rule indexing: which rules of a policy group can match a request, without trying them all.

Envoy's RBAC tries every policy in turn; so does a plain scan here, which makes a Check cost grow
with every policy in the workload's scope. At compile time each rule gets its **index options**:
necessary conditions of the form "the request's value of attribute A hits one of these keys"
(an exact value, a prefix, a suffix, presence, a CIDR). A ``when`` condition with values is one;
so is an attribute every ``from`` (or every ``to``) entry constrains, with their keys united.
Per group (the DENY policies of a workload, its ALLOW policies, ...) each rule is filed under its
most selective option — the one whose keys the fewest other rules share — and a rule without
any (``notValues`` only, ``serviceAccounts``, globbed namespaces) under the scan list, tried for
every request.

A Check then looks its attribute values up — one hash probe per exact value, one per distinct
prefix or suffix length, one per distinct CIDR length — and tries the candidate rules **in the
group's order** with their full compiled test. The index only ever narrows: every rule that can
match is a candidate (a key is necessary, never sufficient), so the first matching policy and
rule, dry-run results and audit ids are exactly those of the plain scan, which small groups keep
(below :data:`INDEX_MIN_RULES` a scan is cheaper than the look-ups).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from authz_server.engine import matchers
from authz_server.engine.attributes import CompileEnv, extractor
from authz_server.engine.request import RequestAttributes
from authz_server.policy.model import FieldMatch, Rule
from authz_server.policy.vocabulary import is_path_template

if TYPE_CHECKING:
    from authz_server.engine.compiler import CompiledPolicy, CompiledRule

#: groups with fewer rules than this are scanned: a handful of tests beats the look-ups
INDEX_MIN_RULES = 4

#: ``(attribute, params)``, plus ``iss``/``sub`` for the two sides of a request principal
Space = tuple[str, tuple[str, ...]]
#: ``("=", value)``, ``("^", prefix)``, ``("$", suffix)``, ``("*",)`` presence,
#: ``("net", version, prefix length, network as int)``
Key = tuple[Any, ...]
PRESENT: Key = ("*",)


@dataclass(frozen=True, slots=True)
class Option:
    """A necessary condition of one rule: the request's value in ``space`` hits one of ``keys``."""

    space: Space
    keys: frozenset[Key]


# --- compile time: the options of a rule ------------------------------------------------------

def rule_options(rule: Rule, env: CompileEnv) -> tuple[Option, ...]:
    """Every necessary condition of ``OR(from) AND OR(to) AND AND(when)`` the index can key on."""
    options = [o for f in rule.conditions for o in field_options(f, env)]
    for clauses in (rule.sources, rule.operations):
        if clauses is not None:
            options.extend(_common([[o for f in clause for o in field_options(f, env)] for clause in clauses]))
    return tuple(options)


def _common(per_clause: list[list[Option]]) -> list[Option]:
    """Spaces every clause of an OR constrains, each with the union of the clauses' keys."""
    if not per_clause:
        return []  # ``from: []`` never matches: the rule is scanned, and fails its test
    spaces = set.intersection(*({o.space for o in options} for options in per_clause))
    return [
        Option(space, frozenset().union(*(o.keys for options in per_clause for o in options if o.space == space)))
        for space in sorted(spaces)
    ]


def field_options(field: FieldMatch, env: CompileEnv) -> list[Option]:
    """The options one field offers: none without positive values or for what cannot be keyed."""
    if not field.values:
        return []
    attribute, values = field.attribute, field.values
    space: Space = (attribute, field.params)
    if attribute in _STRING_SPACES:
        return [Option(space, _string_keys(matchers.string_patterns(values, ignore_case=attribute == "request.host")))]
    if attribute == "request.path":
        plain = matchers.string_patterns(v for v in values if not is_path_template(v))
        templates = tuple(matchers.template_literal_prefix(v) for v in values if is_path_template(v))
        return [Option(space, _string_keys(matchers.StringPatterns(
            plain.exact, plain.prefixes + templates, plain.suffixes, plain.presence)))]
    if attribute == "source.principal":
        return [Option(space, _string_keys(matchers.principal_patterns(values, env.trust_domains)))]
    if attribute == "source.namespace":
        # regex `.*/ns/<ns>/.*`: keyed by the segments after "/ns/", unless the value globs or spans segments
        if any("*" in v or "/" in v for v in values):
            return []
        return [Option(space, frozenset(("=", v) for v in values))]
    if attribute == "destination.port":
        return [Option(space, frozenset(("=", int(v)) for v in values))]
    if attribute in _NETWORK_ATTRIBUTES:
        return [Option(space, frozenset(
            ("net", n.version, n.prefixlen, int(n.network_address)) for n in matchers.parse_networks(values)))]
    if attribute == "request.auth.principal":
        sides = [matchers.request_principal_parts(v) for v in values]
        return [Option((attribute, (name,)), frozenset().union(*(_string_keys(s[i]) for s in sides)))
                for i, name in enumerate(("iss", "sub"))]
    return []


def _string_keys(split: matchers.StringPatterns) -> frozenset[Key]:
    if split.presence:
        return frozenset([PRESENT])
    return frozenset([*(("=", e) for e in split.exact), *(("^", p) for p in split.prefixes),
                      *(("$", s) for s in split.suffixes)])


# --- request time: the values a request offers to each space ----------------------------------

def _one(value: Any) -> tuple[Any, ...]:
    return (value,)


def _strings(value: Any) -> tuple[str, ...]:
    """A claim: a string, or the strings of a list (numbers, objects, ... never match)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str))
    return ()


def _namespace_segments(principal: str) -> list[str]:
    """Every ``<ns>`` with ``/ns/<ns>/`` somewhere in the peer URI: what a namespace regex can hit."""
    found, start = [], principal.find("/ns/")
    while start >= 0:
        end = principal.find("/", start + 4)
        if end < 0:
            break
        found.append(principal[start + 4:end])
        start = principal.find("/ns/", start + 1)
    return found


_STRING_SPACES = frozenset({
    "request.host", "request.method", "connection.sni", "request.headers", "request.auth.claims",
    "request.auth.audiences", "request.auth.presenter",
})
_NETWORK_ATTRIBUTES = frozenset({"source.ip", "remote.ip", "destination.ip"})
_VALUES: dict[str, Callable[[Any], Iterable[Any]]] = {
    "request.host": lambda v: (v.lower(),),
    "request.headers": lambda v: v,
    "request.auth.claims": _strings,
    "request.auth.audiences": _strings,
    "request.auth.presenter": _strings,
    "source.namespace": _namespace_segments,
}


def _space_reader(space: Space) -> Callable[[RequestAttributes], Iterable[Any] | None]:
    """The request's values in one space (``None`` when the attribute is absent)."""
    attribute, params = space
    if attribute == "request.auth.principal":
        read = extractor(attribute, ())
        if params == ("iss",):
            return lambda req: None if (v := read(req)) is None else (v[0],)
        return lambda req: None if (v := read(req)) is None or v[1] is None else (v[1],)
    read = extractor(attribute, params)
    values = _VALUES.get(attribute, _one)
    return lambda req: None if (v := read(req)) is None else values(v)


class _ValueSpace:
    """One attribute's buckets: exact values hashed, prefixes and suffixes hashed per length."""

    __slots__ = ("read", "exact", "present", "_prefixes", "_suffixes", "prefix_tables", "suffix_tables")

    def __init__(self, space: Space) -> None:
        self.read = _space_reader(space)
        self.exact: dict[Any, list[int]] = {}
        self.present: list[int] = []
        self._prefixes: dict[int, dict[str, list[int]]] = {}
        self._suffixes: dict[int, dict[str, list[int]]] = {}
        #: (length, {prefix of that length: rules}), filled by :meth:`freeze`
        self.prefix_tables: tuple[tuple[int, dict[str, list[int]]], ...] = ()
        self.suffix_tables: tuple[tuple[int, dict[str, list[int]]], ...] = ()

    def add(self, key: Key, seq: int) -> None:
        kind = key[0]
        if kind == "=":
            self.exact.setdefault(key[1], []).append(seq)
        elif kind == "*":
            self.present.append(seq)
        else:
            table = self._prefixes if kind == "^" else self._suffixes
            table.setdefault(len(key[1]), {}).setdefault(key[1], []).append(seq)

    def freeze(self) -> None:
        self.prefix_tables = tuple(sorted(self._prefixes.items()))
        self.suffix_tables = tuple(sorted(self._suffixes.items()))

    def collect(self, req: RequestAttributes, out: set[int]) -> None:
        values = self.read(req)
        if values is None:
            return
        exact, prefixes, suffixes = self.exact, self.prefix_tables, self.suffix_tables
        seen = False
        for value in values:
            seen = True
            hit = exact.get(value)
            if hit:
                out.update(hit)
            for length, table in prefixes:
                hit = table.get(value[:length])
                if hit:
                    out.update(hit)
            for length, table in suffixes:
                hit = table.get(value[len(value) - length:])
                if hit:
                    out.update(hit)
        if seen and self.present:
            out.update(self.present)


class _NetworkSpace:
    """One address attribute's CIDR buckets: the address masked once per distinct prefix length."""

    __slots__ = ("read", "_tables", "tables")

    def __init__(self, space: Space) -> None:
        self.read = extractor(*space)
        #: version -> {host bits: {network >> host bits: rules}}
        self._tables: dict[int, dict[int, dict[int, list[int]]]] = {4: {}, 6: {}}
        #: the same as tuples, filled by :meth:`freeze`
        self.tables: dict[int, tuple[tuple[int, dict[int, list[int]]], ...]] = {4: (), 6: ()}

    def add(self, key: Key, seq: int) -> None:
        _, version, length, network = key
        shift = (32 if version == 4 else 128) - length
        self._tables[version].setdefault(shift, {}).setdefault(network >> shift, []).append(seq)

    def freeze(self) -> None:
        self.tables = {version: tuple(sorted(t.items())) for version, t in self._tables.items()}

    def collect(self, req: RequestAttributes, out: set[int]) -> None:
        ip = self.read(req)
        if ip is None:
            return
        self._hit(self.tables[ip.version], int(ip), out)
        if ip.version == 6 and ip.ipv4_mapped is not None:  # the matcher may test it as IPv4
            self._hit(self.tables[4], int(ip.ipv4_mapped), out)

    @staticmethod
    def _hit(tables: Sequence[tuple[int, dict[int, list[int]]]], address: int, out: set[int]) -> None:
        for shift, table in tables:
            hit = table.get(address >> shift)
            if hit:
                out.update(hit)


# --- groups ------------------------------------------------------------------------------------

Hit = tuple["CompiledPolicy", int]


class ScanGroup:
    """An ordered list of policies tried one after the other: the reference semantics."""

    __slots__ = ("policies",)

    def __init__(self, policies: Sequence[CompiledPolicy]) -> None:
        self.policies = tuple(policies)

    def first(self, req: RequestAttributes) -> Hit | None:
        """The first policy with a matching rule, and its first matching rule."""
        for policy in self.policies:
            rule = policy.first_match(req)
            if rule is not None:
                return policy, rule
        return None

    def every(self, req: RequestAttributes) -> list[Hit]:
        """Every policy with a matching rule (in order), each with its first matching rule."""
        hits = []
        for policy in self.policies:
            rule = policy.first_match(req)
            if rule is not None:
                hits.append((policy, rule))
        return hits


class IndexedGroup:
    """The same answers as :class:`ScanGroup`, trying only the rules the index cannot rule out."""

    __slots__ = ("entries", "spaces", "scan")

    def __init__(self, policies: Sequence[CompiledPolicy]) -> None:
        #: every rule in group order: (policy position, policy, rule)
        self.entries: list[tuple[int, CompiledPolicy, CompiledRule]] = [
            (position, policy, rule) for position, policy in enumerate(policies) for rule in policy.rules
        ]
        shared = Counter((o.space, key) for _, _, rule in self.entries for o in rule.options for key in o.keys)
        spaces: dict[Space, _ValueSpace | _NetworkSpace] = {}
        scan: list[int] = []
        for seq, (_, _, rule) in enumerate(self.entries):
            if not rule.options:
                scan.append(seq)
                continue
            best = min(rule.options, key=lambda o: sum(shared[(o.space, key)] for key in o.keys))
            space = spaces.get(best.space)
            if space is None:
                kind = _NetworkSpace if best.space[0] in _NETWORK_ATTRIBUTES else _ValueSpace
                space = spaces[best.space] = kind(best.space)
            for key in best.keys:
                space.add(key, seq)
        for space in spaces.values():
            space.freeze()
        self.spaces = tuple(spaces.values())
        self.scan = tuple(scan)

    def candidates(self, req: RequestAttributes) -> list[int]:
        """Positions of the rules that may match, in group order."""
        found: set[int] = set(self.scan)
        for space in self.spaces:
            space.collect(req, found)
        return sorted(found)

    def first(self, req: RequestAttributes) -> Hit | None:
        entries = self.entries
        for seq in self.candidates(req):
            _, policy, rule = entries[seq]
            if rule.test(req):
                return policy, rule.index
        return None

    def every(self, req: RequestAttributes) -> list[Hit]:
        entries, hits, last = self.entries, [], -1
        for seq in self.candidates(req):
            position, policy, rule = entries[seq]
            if position != last and rule.test(req):
                hits.append((policy, rule.index))
                last = position
        return hits


def rule_group(policies: Sequence[CompiledPolicy], indexed: bool | None = None) -> ScanGroup | IndexedGroup:
    """A group for *policies*: indexed when large enough (or when *indexed* forces either way)."""
    if indexed is None:
        indexed = sum(len(p.rules) for p in policies) >= INDEX_MIN_RULES
    return IndexedGroup(policies) if indexed else ScanGroup(policies)

