"""The interface every cluster source implements (a manifest directory, the Kubernetes API).

A source delivers *batches* of events. The first batch it marks ``synced`` holds the complete
initial state: only then may the agent remove datapath entries that the source does not know,
so a restarting agent never deletes frontends before it has heard of every Service.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from kmesh_plugin.model.objects import KubeObject, ObjectKey


@dataclass(frozen=True)
class Event:
    """An object appeared or changed (``obj`` set) or went away (``obj`` None)."""

    key: ObjectKey
    obj: KubeObject | None


@dataclass
class Batch:
    events: list[Event] = field(default_factory=list)
    synced: bool = False  # the source has delivered its complete initial state
    revision: str | None = None  # the source's revision after these events, if it has one
    errors: list[str] = field(default_factory=list)  # problems found; last good state kept


class Source(abc.ABC):
    """Start, then call ``next_batch`` repeatedly; ``close`` when done."""

    kind: str = "source"

    def check(self) -> None:  # noqa: B027 - optional: most sources have nothing to check
        """Check what can be checked without side effects (config files, credentials), so
        the agent fails before it touches the kernel; raise a KmeshError naming the culprit."""

    @abc.abstractmethod
    def start(self) -> None:
        """Connect or open; raise a KmeshError naming the culprit if that is impossible."""

    @abc.abstractmethod
    def next_batch(self, timeout: float) -> Batch | None:
        """Wait up to ``timeout`` seconds for changes; None if nothing happened."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release watches, sockets and threads."""

    def describe(self) -> dict[str, object]:
        """What status output shows about this source."""
        return {"kind": self.kind}
