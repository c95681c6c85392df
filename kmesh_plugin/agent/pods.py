"""The pods kmesh-cni set up on this node, followed from its state directory.

kmesh-cni leaves one record per attachment in <cni.state_dir>/pods. :meth:`PodWatch.poll`
rereads the directory when its mtime changes (every record is renamed into place or
unlinked, which always bumps it) and fires ``kmesh_pod_enrolled`` / ``kmesh_pod_removed``
for the pods that became ours and those that stopped being ours.

Who enrols. With no ``cni.namespace_selector`` kmesh-cni enrols every pod itself, during the
runtime's ADD, so its first connect is already ours; the agent only follows. With a selector,
ADD only records the pod and the agent, the one core writer of maps, makes kmesh_enrolled hold
exactly the cookies of the recorded pods whose Namespace labels match: checked on every poll,
so a pod is enrolled within one poll of its ADD or of its Namespace's labels changing, and
un-enrolled when they stop matching. That runs under kmesh-cni's state lock, so a DEL is never
interleaved with it. A hook that fails is logged and never undoes an enrolment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from kmesh_plugin.cni import spool
from kmesh_plugin.datapath import records, syscall
from kmesh_plugin.errors import KmeshError
from kmesh_plugin.model.selector import Selector
from kmesh_plugin.model.views import NodeInfo, PodInfo
from kmesh_plugin.plugins import Plugins

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (containerId, ifname): what CNI names an attachment by
LOCK_TIMEOUT = 0.05  # s: a poll that finds kmesh-cni holding the lock tries again next time
NO_FLAGS = records.ENROLMENT.pack({"flags": 0, "pad": 0})


def pod_info(rec: spool.PodRecord) -> PodInfo:
    return PodInfo(namespace=rec.pod_namespace, name=rec.pod_name,
                   container_id=rec.container_id, netns=Path(rec.netns), ips=tuple(rec.ips))


class PodWatch:
    def __init__(self, state_dir: Path, plugins: Plugins,
                 node: Callable[[], NodeInfo] | None = None, *,
                 selector: Selector | None = None,
                 enrolled: syscall.Map | None = None,
                 namespace_labels: Callable[[str], Mapping[str, str] | None] | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        """``node``: this node as the hooks see it (the agent sets it to its own view).
        ``selector``, ``enrolled`` (the kmesh_enrolled map) and ``namespace_labels`` (None
        for a Namespace the agent has not seen): the agent enrols by Namespace labels (see
        the module docstring), once ``ready()`` (the agent's first complete sync): before
        it, every Namespace is unknown and nothing may be taken away."""
        if selector is not None and (enrolled is None or namespace_labels is None):
            raise ValueError("a namespace selector needs the enrolled map and the labels")
        self.state_dir = state_dir
        self.plugins = plugins
        self.node = node
        self.selector = selector
        self.enrolled = enrolled
        self.namespace_labels = namespace_labels
        self.ready = ready
        self.recorded: dict[Key, spool.PodRecord] = {}  # every record in the directory
        self.pods: dict[Key, spool.PodRecord] = {}  # those that are ours
        self._seen: tuple[int, int] | None = None  # (inode, mtime_ns) of the pods directory
        self._read_once = False
        self._bad: set[str] = set()  # malformed files already reported
        self._failing = ""  # the last map or lock error, logged once

    def poll(self) -> int:
        """Fire the hooks for what changed since the last call; returns how many fired."""
        changed = self._reread()
        if self.selector is None:
            if not changed:
                return 0
            return self._settle(dict(self.recorded))
        return self._enrol_by_selector()

    def _reread(self) -> bool:
        try:
            st = os.stat(spool.pods_dir(self.state_dir))
            seen: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            seen = None  # no pod yet (or the directory went: every pod is gone)
        if seen == self._seen and self._read_once:
            return False
        self._seen, self._read_once = seen, True
        self.recorded = {rec.key: rec
                         for rec in spool.read_records(self.state_dir, self._report_bad)}
        return True

    def _settle(self, ours: dict[Key, spool.PodRecord]) -> int:
        fired = 0
        for key in self.pods.keys() - ours.keys():
            fired += self._fire("kmesh_pod_removed", self.pods.pop(key))
        for key, rec in ours.items():
            if self.pods.get(key) != rec:
                self.pods[key] = rec
                fired += self._fire("kmesh_pod_enrolled", rec)
        return fired

    def _enrol_by_selector(self) -> int:
        assert self.selector is not None and self.enrolled is not None
        assert self.namespace_labels is not None
        if self.ready is not None and not self.ready():
            return 0  # the Namespaces are not known yet: change nothing
        try:
            with spool.StateLock(self.state_dir, LOCK_TIMEOUT):
                self._reread()  # under the lock: no ADD or DEL half-way
                # Read every time, not cached: kmesh-cni's DEL and GC remove cookies too.
                have = {records.U64.unpack(k)[0] for k in self.enrolled.keys()}
                ours = {}
                for key, rec in self.recorded.items():
                    labels = self.namespace_labels(rec.pod_namespace)
                    if labels is None:  # a Namespace not (yet) seen: keep what it has
                        if rec.netns_cookie in have:
                            ours[key] = rec
                    elif self.selector.matches(labels):
                        ours[key] = rec
                want = {rec.netns_cookie for rec in ours.values()}
                # Deletes first: when the map is full, they make the room the adds need.
                for cookie in sorted(have - want):
                    self.enrolled.delete(records.U64.pack(cookie))
                for cookie in sorted(want - have):
                    self.enrolled.update(records.U64.pack(cookie), NO_FLAGS)
        except (OSError, KmeshError) as e:  # BpfError, LockTimeout, a state dir problem
            if str(e) != self._failing:
                self._failing = str(e)
                log.warning("cannot enrol pods by namespace selector yet: %s", e,
                            extra={"selector": self.selector.text})
            return 0
        if self._failing:
            self._failing = ""
            log.info("pods are enrolled by namespace selector again")
        return self._settle(ours)

    def _fire(self, hook: str, rec: spool.PodRecord) -> int:
        pod = pod_info(rec)
        log.info("pod %s", "enrolled" if hook == "kmesh_pod_enrolled" else "removed",
                 extra={"pod": f"{rec.pod_namespace}/{rec.pod_name}",
                        "container": rec.container_id, "netns_cookie": rec.netns_cookie})
        # Plugins.notify logs and swallows a plugin's exception, naming the plugin.
        if self.node is not None:
            self.plugins.notify(hook, pod=pod, node=self.node())
        return 1

    def _report_bad(self, path: str, reason: str) -> None:
        if path not in self._bad:
            self._bad.add(path)
            log.warning("skipping malformed CNI state file", extra={"file": path,
                                                                     "reason": reason})

    def status(self) -> dict[str, object]:
        return {"state_dir": str(self.state_dir), "pods": len(self.pods),
                "recorded": len(self.recorded),
                "namespace_selector": self.selector.text if self.selector else None,
                "problem": self._failing or None}
