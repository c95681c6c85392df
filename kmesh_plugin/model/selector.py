"""Equality-based label selectors, as `kubectl -l` writes them: ``k=v``, ``k==v``, ``k!=v``,
``k`` (set), ``!k`` (unset), joined by commas (all must hold). Set-based ones (``in``,
``notin``) are refused with a clear message rather than half understood."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A label key (optional DNS prefix, then a name) and value, per Kubernetes' validation.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Selector:
    text: str
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def parse(text: str) -> Selector:
    """The selector ``text``; ValueError names the part that is wrong. "" selects everything."""
    reqs = []
    for part in (p.strip() for p in text.split(",")) if text.strip() else ():
        if " in " in f" {part} " or " notin " in f" {part} " or "(" in part:
            raise ValueError(f"{part!r}: set-based selectors (in, notin) are not supported")
        if "!=" in part:
            key, value = (x.strip() for x in part.split("!=", 1))
            op = "!="
        elif "=" in part:
            key, value = (x.strip() for x in part.split("==" if "==" in part else "=", 1))
            op = "="
        elif part.startswith("!"):
            key, value, op = part[1:].strip(), "", "!exists"
        else:
            key, value, op = part, "", "exists"
        if not _KEY.match(key):
            raise ValueError(f"{part!r}: {key!r} is not a label key")
        if not _VALUE.match(value):
            raise ValueError(f"{part!r}: {value!r} is not a label value")
        reqs.append(Requirement(key, op, value))
    return Selector(text, tuple(reqs))
