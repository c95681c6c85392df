"""Bulk phases without Python's cyclic garbage collector.

A full sync decodes tens of megabytes of JSON into millions of small objects and builds a
model of a hundred thousand endpoints. Each allocation burst makes the collector walk every
live object again (gen 2 holds the whole model), which measured here was most of the time:
decoding 13.5 MB of EndpointSlices took 0.57 s with the collector and 0.18 s without, parsing
them 1.40 s and 0.65 s. None of these phases makes reference cycles (decoded JSON, frozen model
objects, records), so reference counting frees all their garbage anyway.

:func:`paused` turns the collector off while any thread is inside a bulk phase (the
reflectors list in their own threads while the agent reconciles), and back on when the last
one leaves. :func:`settle` runs after a full reconcile: ``gc.freeze()`` moves everything alive
(the model) out of the collector's sight, so later collections walk only what changed since.
It does not collect first: a full collection of that heap took 0.2 s here, and the phases make
no cycles, so there is nothing for it to find.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def settle() -> None:
    """Exempt what is alive now (long-lived state) from later collections."""
    with _lock:
        if _depth:
            return  # another bulk phase is running; the next settle will do it
        gc.freeze()
