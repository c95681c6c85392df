"""Label and field selectors with the syntax and meaning of k8s.io/apimachinery.

Label selectors (``labels.Parse``): comma-separated requirements ``key``, ``!key``,
``key=v``, ``key==v``, ``key!=v``, ``key in (a,b)``, ``key notin (a,b)``, ``key>N``,
``key<N``. ``!=`` and ``notin`` also match objects without the key, as in Kubernetes.
Field selectors (``fields.ParseSelector``): ``field=v``, ``field==v``, ``field!=v`` joined
by commas, with ``\\`` escaping ``,``, ``=``, ``!`` and ``\\`` in values. Which fields may be
selected is the resource table's business; :meth:`FieldSelector.unsupported` names the
first one a kind does not offer.

Errors are :class:`SelectorError` (a ValueError); the server answers them 400 BadRequest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOKEN = re.compile(r"\s*(==|!=|=|!|\(|\)|,|>|<|[^\s,()=!<>]+)")


class SelectorError(ValueError):
    pass


def _check_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r}: "
                            "prefix part must be a lowercase RFC 1123 subdomain")
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        raise SelectorError(
            f"unable to parse requirement: invalid label key {key!r}: name part must consist "
            "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character"
        )


def _check_value(value: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise SelectorError(
            f"unable to parse requirement: invalid label value: {value!r}: a valid label "
            "must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "exists":
            return self.key in labels
        if op == "!":
            return self.key not in labels
        value = labels.get(self.key)
        if op in ("=", "in"):
            return value is not None and value in self.values
        if op in ("!=", "notin"):
            return value is None or value not in self.values
        if value is None:
            return False
        try:
            have, want = int(value), int(self.values[0])
        except ValueError:
            return False
        return have > want if op == "gt" else have < want


class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    def __init__(self, requirements: Iterable[Requirement] = ()) -> None:
        self.requirements = tuple(requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __repr__(self) -> str:
        return f"LabelSelector({self.requirements!r})"

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        text = (text or "").strip()
        if not text:
            return cls()
        tokens = _tokenize(text)
        requirements: list[Requirement] = []
        pos = 0

        def take() -> str:
            nonlocal pos
            if pos >= len(tokens):
                raise SelectorError(f"unable to parse requirement: unexpected end of {text!r}")
            pos += 1
            return tokens[pos - 1]

        def peek() -> str | None:
            return tokens[pos] if pos < len(tokens) else None

        while True:
            token = take()
            if token == "!":
                key = take()
                _check_key(key)
                requirements.append(Requirement(key, "!"))
            else:
                key = token
                if key in ("=", "==", "!=", "(", ")", ",", ">", "<"):
                    raise SelectorError(f"unable to parse requirement: found {key!r}, "
                                        f"expected a key in {text!r}")
                _check_key(key)
                op = peek()
                if op is None or op == ",":
                    requirements.append(Requirement(key, "exists"))
                elif op in ("=", "==", "!="):
                    take()
                    nxt = peek()
                    value = "" if nxt in (None, ",") else take()
                    _check_value(value)
                    requirements.append(Requirement(key, "!=" if op == "!=" else "=", (value,)))
                elif op in (">", "<"):
                    take()
                    value = take()
                    try:
                        int(value)
                    except ValueError:
                        raise SelectorError(
                            f"unable to parse requirement: for 'gt', 'lt' operators, the value "
                            f"must be an integer, got {value!r}") from None
                    requirements.append(Requirement(key, "gt" if op == ">" else "lt", (value,)))
                elif op in ("in", "notin"):
                    take()
                    if take() != "(":
                        raise SelectorError(f"unable to parse requirement: expected '(' after "
                                            f"{op!r} in {text!r}")
                    values: list[str] = []
                    while True:
                        nxt = take()
                        if nxt == ")":
                            break
                        if nxt == ",":
                            continue
                        _check_value(nxt)
                        values.append(nxt)
                    if not values:
                        raise SelectorError(f"unable to parse requirement: for 'in', 'notin' "
                                            f"operators, values set can't be empty: {text!r}")
                    requirements.append(Requirement(key, op, tuple(values)))
                else:
                    raise SelectorError(f"unable to parse requirement: found {op!r}, expected: "
                                        f"in, notin, =, ==, !=, gt, lt in {text!r}")
            nxt = peek()
            if nxt is None:
                break
            if take() != ",":
                raise SelectorError(f"unable to parse requirement: expected ',' in {text!r}")
        return cls(requirements)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise SelectorError(f"unable to parse requirement: {text!r}")
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    operator: str  # = or !=
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        equal = fields.get(self.field, "") == self.value
        return equal if self.operator == "=" else not equal


class FieldSelector:
    """A parsed field selector over string field values (a missing field is "")."""

    def __init__(self, requirements: Iterable[FieldRequirement] = ()) -> None:
        self.requirements = tuple(requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(r.matches(fields) for r in self.requirements)

    def unsupported(self, supported: Iterable[str]) -> str | None:
        allowed = set(supported)
        for r in self.requirements:
            if r.field not in allowed:
                return r.field
        return None

    def __repr__(self) -> str:
        return f"FieldSelector({self.requirements!r})"

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        text = text or ""
        if not text.strip():
            return cls()
        requirements = []
        for part in _split_unescaped_commas(text):
            term = _split_term(part)
            if term is None or not term[0].strip():
                raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
            name, op, value = term
            requirements.append(FieldRequirement(name.strip(), op, _unescape(value)))
        return cls(requirements)


def _split_unescaped_commas(text: str) -> list[str]:
    parts: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == ",":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _split_term(part: str) -> tuple[str, str, str] | None:
    """(field, "=" or "!=", raw value) at the first unescaped operator, as apimachinery does."""
    i = 0
    while i < len(part):
        if part[i] == "\\":
            i += 2
            continue
        for op, normal in (("!=", "!="), ("==", "="), ("=", "=")):
            if part.startswith(op, i):
                return part[:i], normal, part[i + len(op):]
        i += 1
    return None


def _unescape(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\":
            nxt = value[i + 1] if i + 1 < len(value) else ""
            if nxt not in ("\\", ",", "=", "!") or not nxt:
                raise SelectorError(f"invalid field selector: invalid escape sequence in {value!r}")
            out.append(nxt)
            i += 2
            continue
        if char in ",=!":
            raise SelectorError(f"invalid field selector: unescaped {char!r} in {value!r}")
        out.append(char)
        i += 1
    return "".join(out)


def format_label_selector(selector: Mapping[str, object] | None) -> str:
    """A ``metav1.LabelSelector`` (matchLabels, matchExpressions) as the selector string
    ``LabelSelectorAsSelector(s).String()`` gives: requirements sorted by key, ``""`` for
    none. An operator it does not know is a SelectorError."""
    if not selector:
        return ""
    terms: list[tuple[str, str]] = []
    labels = selector.get("matchLabels") or {}
    if isinstance(labels, Mapping):
        terms.extend((str(k), f"{k}={v}") for k, v in labels.items())
    expressions = selector.get("matchExpressions") or []
    for expr in expressions if isinstance(expressions, list) else ():
        if not isinstance(expr, Mapping):
            raise SelectorError("a matchExpressions entry must be an object")
        key, op = str(expr.get("key", "")), expr.get("operator")
        values = ",".join(sorted(str(v) for v in (expr.get("values") or [])))
        if op == "In":
            terms.append((key, f"{key} in ({values})"))
        elif op == "NotIn":
            terms.append((key, f"{key} notin ({values})"))
        elif op == "Exists":
            terms.append((key, key))
        elif op == "DoesNotExist":
            terms.append((key, f"!{key}"))
        else:
            raise SelectorError(f'"{op}" is not a valid label selector operator')
    return ",".join(text for _, text in sorted(terms, key=lambda t: t[0]))
