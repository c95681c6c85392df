"""The pods kmesh-cni set up on this node, followed from its state directory.

kmesh-cni enrols a pod in the kernel itself, during the runtime's CNI ADD (so the pod's first
connect is already ours), and leaves one record per attachment in <cni.state_dir>/pods. The
agent only follows: :meth:`PodWatch.poll` rereads the directory when its mtime changes (every
record is renamed into place or unlinked, which always bumps it) and fires
``kmesh_pod_enrolled`` / ``kmesh_pod_removed`` for what came and went. Nothing here writes a
map: a hook that fails is logged and never undoes an enrolment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from kmesh_plugin.cni import spool
from kmesh_plugin.model.views import NodeInfo, PodInfo
from kmesh_plugin.plugins import Plugins

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (containerId, ifname): what CNI names an attachment by


def pod_info(rec: spool.PodRecord) -> PodInfo:
    return PodInfo(namespace=rec.pod_namespace, name=rec.pod_name,
                   container_id=rec.container_id, netns=Path(rec.netns), ips=tuple(rec.ips))


class PodWatch:
    def __init__(self, state_dir: Path, plugins: Plugins,
                 node: Callable[[], NodeInfo] | None = None) -> None:
        """``node``: this node as the hooks see it (the agent sets it to its own view)."""
        self.state_dir = state_dir
        self.plugins = plugins
        self.node = node
        self.pods: dict[Key, spool.PodRecord] = {}
        self._seen: tuple[int, int] | None = None  # (inode, mtime_ns) of the pods directory
        self._bad: set[str] = set()  # malformed files already reported

    def poll(self) -> int:
        """Fire the hooks for what changed since the last call; returns how many fired."""
        try:
            st = os.stat(spool.pods_dir(self.state_dir))
            seen: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            seen = None  # no pod yet (or the directory went: every pod is gone)
        if seen == self._seen:
            return 0
        self._seen = seen
        now = {rec.key: rec for rec in spool.read_records(self.state_dir, self._report_bad)}
        fired = 0
        for key in self.pods.keys() - now.keys():
            fired += self._fire("kmesh_pod_removed", self.pods.pop(key))
        for key, rec in now.items():
            if self.pods.get(key) != rec:
                self.pods[key] = rec
                fired += self._fire("kmesh_pod_enrolled", rec)
        return fired

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
        return {"state_dir": str(self.state_dir), "pods": len(self.pods)}
