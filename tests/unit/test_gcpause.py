"""The collector is off while any bulk phase runs, in any thread, and back as it was after."""

from __future__ import annotations

import gc
import threading

from kmesh_plugin import gcpause


def test_paused_nests_across_threads_and_restores_the_collector() -> None:
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def bulk() -> None:
        with gcpause.paused():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=bulk)
    worker.start()
    assert inside.wait(10)
    with gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the worker is still inside its phase
    release.set()
    worker.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_settle_freezes_the_survivors() -> None:
    before = gc.get_freeze_count()
    keep = [[] for _ in range(1000)]
    gcpause.settle()
    try:
        assert gc.get_freeze_count() >= before + len(keep)
    finally:
        gc.unfreeze()
