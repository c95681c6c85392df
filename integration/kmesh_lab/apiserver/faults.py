"""Fault injection, for tests of a client's robustness: ``server.faults``.

* :meth:`Faults.fail`: the next ``n`` requests (optionally only those whose path matches a
  regular expression) answer an error Status (500 InternalError, 429 TooManyRequests, 503
  ServiceUnavailable, or any code), with a ``Retry-After`` header when given. Rules queue up
  in the order they were added; a request consumes the first rule it matches.
* :attr:`Faults.latency`: seconds added before every response.
* :meth:`Faults.compact`: every resourceVersion handed out so far leaves the history:
  watches and continue tokens from any of them get 410 Expired. The revision moves one
  step first (as etcd's does with any write elsewhere), so a fresh list gives a version a
  watch can start from.
* :meth:`Faults.drop_watches`: cut every open watch connection without ending its chunked
  body, as a crashed server or a broken network would.

Stopping, starting and restarting with a new history are the server's own methods.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .errors import ApiError


@dataclass
class _Failure:
    remaining: int
    status: int
    retry_after: int | None
    match: re.Pattern[str] | None


class Faults:
    def __init__(self, compact: Callable[[], int], drop_watches: Callable[[], int]) -> None:
        self._compact = compact
        self._drop_watches = drop_watches
        self._lock = threading.Lock()
        self._failures: list[_Failure] = []
        self.latency: float = 0.0

    def fail(self, n: int = 1, status: int = 500, retry_after: int | None = None,
             match: str | re.Pattern[str] | None = None) -> None:
        """The next ``n`` requests whose path matches ``match`` (all when None) fail."""
        if n < 1:
            raise ValueError("n must be at least 1")
        pattern = re.compile(match) if isinstance(match, str) else match
        with self._lock:
            self._failures.append(_Failure(n, status, retry_after, pattern))

    @property
    def pending(self) -> int:
        """How many injected failures are still to be answered."""
        with self._lock:
            return sum(f.remaining for f in self._failures)

    def clear(self) -> None:
        """No more injected failures and no latency."""
        with self._lock:
            self._failures.clear()
        self.latency = 0.0

    def compact(self) -> int:
        """Compact away every resourceVersion handed out so far; returns the new floor."""
        return self._compact()

    def drop_watches(self) -> int:
        """Cut every open watch connection; returns how many were cut."""
        return self._drop_watches()

    def take(self, path: str) -> ApiError | None:
        """The injected error this request answers, if any (consumes one)."""
        with self._lock:
            for failure in self._failures:
                if failure.match is None or failure.match.search(path):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    return errors.injected(failure.status, failure.retry_after)
        return None
