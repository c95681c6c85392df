"""What a strategy decides: a routing preference and a mode (SPEC.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kmesh_plugin.model.locality import Scope


class Mode(StrEnum):
    FAILOVER = "failover"  # best non-empty tier, uniformly at random inside it
    STRICT = "strict"  # tier 0 only; none eligible -> connect refused
    RANDOM = "random"  # no preference: every eligible endpoint alike


@dataclass(frozen=True)
class Strategy:
    """A strategy's decision for one Service.

    ``name`` identifies the strategy (``PreferClose``, ``Local``, a third party's name);
    ``reason`` says which field or annotation made it apply, for logs and ``explain``.
    ``preference`` is ignored in RANDOM mode; a strategy that answers
    ``kmesh_endpoint_tiers`` itself may leave it empty.
    """

    name: str
    mode: Mode
    preference: tuple[Scope, ...] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        if len(self.preference) > 7:
            raise ValueError(f"strategy {self.name}: at most 7 scopes, got {self.preference}")


NO_STRATEGY = Strategy("none", Mode.RANDOM, (), "no strategy applies: random over all")


@dataclass(frozen=True)
class Claim:
    """A plugin's answer to ``kmesh_strategy_claim``: it takes the Service with ``strategy``.

    The claim with the highest ``priority`` wins. Built-ins use the ``PRIORITY_*`` constants
    of ``kmesh_plugin.hookspecs``; a third party claims before them with a higher number.
    ``warning`` is logged once per Service and text (e.g. an unknown annotation value).
    """

    strategy: Strategy
    priority: int
    warning: str | None = None
    plugin: str = field(default="", compare=False)  # filled in by the core
