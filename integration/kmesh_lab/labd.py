"""`kmesh-plugin lab up | down | status`: a lab that keeps running in the background, driven
with the real kubectl.

``lab up`` starts this module as a daemon (its own session, so the terminal may close) and
returns once the lab is up, printing the kubeconfig. The daemon owns a
:class:`~kmesh_lab.cluster.Lab` and runs its controllers (Deployment controller, scheduler,
kubelets, EndpointSlice controller) on a thread of their own whenever the API server's revision
moves (:class:`Controllers`).

**Writes are answered once acted on.** The lab's API server holds the answer to a write by
anyone but the lab itself (kubectl) until the controllers have acted on it and every agent has
applied the result (the lab's ``converge``): ``kubectl apply`` of a Deployment returns with its
pods running and in every node's maps, ``kubectl delete deployment`` once its pods are gone
from them, ``kubectl label node`` once every agent recomputed. The seed document's next command
then sees the cluster the previous one made, every time. A real cluster answers at once and
converges a moment later (``kubectl rollout status`` and ``kubectl wait`` are how to wait
there; both work here too). A failed controller pass is retried (backoff from
:data:`RETRY_FIRST` to :data:`RETRY_MAX`) and the write waits on; a write no pass could
finish within :data:`WRITE_TIMEOUT`, or one held when the lab stops, is answered with an error
(the object is stored; the error and the daemon's log say why the cluster did not act on it).

``lab down`` stops the daemon (SIGTERM: it removes its lab) and then removes whatever any lab
on this machine left behind, as before. ``lab status`` says which lab runs, with its nodes,
agents and kubeconfig.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kmesh_lab import kind
from kmesh_lab.apiserver import ApiError
from kmesh_lab.cluster import (
    ENROLMENTS,
    RUNNER_STOP_TIMEOUT,
    SOURCES,
    STATE_ROOT,
    Lab,
    alive,
    runner_alive,
    teardown_all,
    teardown_left_by,
)
from kmesh_lab.kube import LabError

WRITE_TIMEOUT = 120.0  # the longest a kubectl write waits for the controllers
RETRY_FIRST, RETRY_MAX = 0.2, 5.0  # a failed pass is retried after this, doubling to the max
# How long the daemon's stop waits for a controller pass in flight (it may be waiting on the
# agents, CONVERGE_TIMEOUT) before it removes the lab anyway; see RUNNER_STOP_TIMEOUT.
STOP_JOIN = 30.0
UP_TIMEOUT = 300.0  # compile the datapath, start the agents, converge
IDLE_POLL = 1.0  # a pass also runs this often when nothing woke the controllers
READY = "READY "
LOG_NAME = "labd.log"


class Controllers:
    """The lab's controllers on a thread: a pass (reconcile, then converge) whenever the API
    server's revision is past the last one acted on, retried with a backoff while it fails.
    :meth:`wait_for` is the write barrier."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._cond = threading.Condition()
        self._settled = 0  # every write up to this revision has been acted on
        self._failure: str | None = None  # why the last pass failed, until one succeeds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.passes = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="lab-controllers", daemon=True)

    def start(self, settled: int | None = None) -> None:
        """``settled``: the revision the lab was converged at (default: now)."""
        self._settled = self.lab.api.revision if settled is None else settled
        self.lab.write_barrier = self.wait_for
        self._thread.start()

    def stop(self) -> None:
        """Release every held write at once (answered with an error) and wake the thread; a
        pass in flight is waited for at most :data:`STOP_JOIN`."""
        self.lab.write_barrier = None
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_JOIN)
            if self._thread.is_alive():
                log(f"a controller pass still runs after {STOP_JOIN:.0f} s; stopping anyway")

    def wait_for(self, revision: int) -> None:
        """Return once a pass that saw ``revision`` succeeded. Failed passes are retried and
        the write waits on, so a hiccup costs kubectl a moment, not a wrong answer; if none
        succeeds within WRITE_TIMEOUT (or the lab stops), the write is answered with an
        error: its object is stored, but a kubectl user is better told that the cluster did
        not act on it (and why) than handed a success the next command contradicts."""
        self._wake.set()
        with self._cond:
            self._cond.wait_for(
                lambda: self._settled >= revision or self._stop.is_set(), WRITE_TIMEOUT)
            if self._settled >= revision:
                return
            failure = self._failure
        where = self.lab.state / "logs" / LOG_NAME
        if self._stop.is_set():
            raise ApiError(503, f"the kmesh lab is stopping: this write (revision {revision}) "
                           "was stored but not acted on", "ServiceUnavailable")
        log(f"a write (revision {revision}) was not acted on within {WRITE_TIMEOUT:.0f} s; "
            "answered with an error")
        if failure is not None:
            raise ApiError(500, f"stored, but the kmesh lab's controllers could not act on it "
                           f"within {WRITE_TIMEOUT:.0f} s (still retrying): {failure}; see "
                           f"{where}", "InternalError")
        raise ApiError(504, f"stored, but the kmesh lab's controllers did not act on it within "
                       f"{WRITE_TIMEOUT:.0f} s; see {where}", "Timeout")

    def _run(self) -> None:
        retry = 0.0  # after a failed pass: the wait before the next attempt
        while not self._stop.is_set():
            if retry:
                self._stop.wait(retry)  # not sooner, however many writes wake us
            else:
                self._wake.wait(IDLE_POLL)
            self._wake.clear()
            revision = self.lab.api.revision
            if revision <= self._settled or self._stop.is_set():
                continue
            self.passes += 1
            try:
                self.lab.reconcile()
                self.lab.converge()
            except Exception as e:  # the daemon outlives a failed pass: it is retried
                self.failures += 1
                retry = min(RETRY_MAX, retry * 2 or RETRY_FIRST)
                log(f"controller pass failed (retry in {retry:.1f} s):\n"
                    f"{traceback.format_exc()}")
                with self._cond:
                    self._failure = f"{type(e).__name__}: {e}"
                continue
            retry = 0.0
            with self._cond:
                self._settled = revision
                self._failure = None
                self._cond.notify_all()
            if self.lab.api.revision != revision:
                self._wake.set()  # its own writes: one more pass finds the fixed point


def log(line: str) -> None:
    # Until READY, stdout is `lab up`'s pipe: if `lab up` is gone, a log line must not end
    # what is logging (the clean-up of a failed start); print(READY) itself still fails.
    with contextlib.suppress(BrokenPipeError):
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


# --- the daemon ------------------------------------------------------------------------------


def serve(nodes: Mapping[str, Mapping[str, str | None]], *, source: str, enrolment: str,
          verbose: bool) -> int:
    """The daemon: start the lab, say READY on stdout (the pipe ``lab up`` reads), move the
    output to the lab's log, run until SIGTERM/SIGINT, remove the lab. A signal during the
    start ends the start at once (`lab up` timed out or was interrupted)."""
    stop = threading.Event()
    starting = threading.Event()
    starting.set()

    def on_signal(*_: object) -> None:
        stop.set()
        if starting.is_set():  # interrupt lab.start(): the finally below removes what it made
            starting.clear()
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    lab = Lab(nodes, printer=log, source=source, enrolment=enrolment,
              log_level="debug" if verbose else "info")
    controllers = Controllers(lab)
    try:
        try:
            lab.start()
            settled = lab.api.revision  # converged up to here
            lab.mark_up()
        finally:
            starting.clear()
        info = up_info(lab)
        print(READY + json.dumps(info), flush=True)
        logfile = os.open(lab.state / "logs" / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                          0o600)
        os.dup2(logfile, 1)
        os.dup2(logfile, 2)
        os.close(logfile)
        # Only now: `lab up` closes the pipe once it has READY, so a controller's log line
        # before the dup2 above could have hit a closed pipe.
        controllers.start(settled)
        log(f"lab {lab.id} up; kubeconfig {lab.kubeconfig}")
        stop.wait()
        log("stopping")
        return 0
    except KeyboardInterrupt:
        log("stopped while starting")
        return 1
    except Exception as e:
        log(f"lab up failed: {e}")
        if not isinstance(e, LabError):
            traceback.print_exc()
        return 1
    finally:
        controllers.stop()
        lab.close()


def up_info(lab: Lab) -> dict[str, Any]:
    return {"id": lab.id, "pid": os.getpid(), "kubeconfig": str(lab.kubeconfig),
            "api": lab.api.url, "nodes": list(lab.initial_nodes), "state": str(lab.state),
            "source": lab.source, "enrolment": lab.enrolment}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kmesh_lab.labd")
    p.add_argument("--nodes-json", required=True)
    p.add_argument("--source", choices=SOURCES, default="kubernetes")
    p.add_argument("--enrolment", choices=ENROLMENTS, default="cni")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    return serve(json.loads(args.nodes_json), source=args.source, enrolment=args.enrolment,
                 verbose=args.verbose)


# --- the commands ----------------------------------------------------------------------------


def load_nodes(path: Path) -> dict[str, dict[str, str | None]]:
    """A YAML mapping of node name -> labels, bare or under ``nodes:`` (a scenario file does)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except Exception as e:  # unreadable or not YAML: name the file
        raise LabError(f"{path}: cannot read the nodes: {type(e).__name__}: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("nodes"), dict):
        raw = raw["nodes"]
    if not isinstance(raw, dict) or not raw:
        raise LabError(f"{path}: must map node names to their labels (bare or under 'nodes:')")
    nodes: dict[str, dict[str, str | None]] = {}
    for name, labels in raw.items():
        if not isinstance(name, str) or not kind.NODE_NAME.match(name):
            raise LabError(f"{path}: node {name!r}: a node name is a DNS subdomain")
        if labels is not None and not isinstance(labels, dict):
            raise LabError(f"{path}: nodes.{name}: labels must be a mapping")
        nodes[name] = {str(k): None if v is None else str(v) for k, v in (labels or {}).items()}
    return nodes


def running_up() -> dict[str, Any] | None:
    """The lab `lab up` started, if its daemon lives."""
    if not STATE_ROOT.is_dir():
        return None
    for state in sorted(STATE_ROOT.iterdir()):
        try:
            record = json.loads((state / "lab.json").read_text())
        except (OSError, ValueError):
            continue
        if record.get("up") and runner_alive(record):
            return record
    return None


def cmd_up(nodes_file: Path | None, *, source: str, enrolment: str, verbose: bool) -> int:
    lock = _take_up_lock()
    try:
        current = running_up()
        if current is not None or lock is None:
            print("kmesh-plugin lab up: " + (
                f"lab {current['id']} is already up (pid {current['pid']}, kubeconfig "
                f"{current['kubeconfig']}); `kmesh-plugin lab down` first" if current else
                f"another `kmesh-plugin lab up` is starting a lab (it holds {STATE_ROOT}); "
                "`kmesh-plugin lab status` says when it is up"), file=sys.stderr)
            return 1
        nodes = load_nodes(nodes_file) if nodes_file is not None else kind.worker_nodes()
        # The daemon inherits the lock and holds it as long as it lives.
        daemon = subprocess.Popen(_daemon_argv(nodes, source, enrolment, verbose),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  pass_fds=(lock,))
        try:
            return _await_ready(daemon, verbose)
        except BaseException:  # Ctrl-C while it starts
            _stop_daemon(daemon)
            raise
    finally:
        if lock is not None:
            os.close(lock)


def _take_up_lock() -> int | None:
    """An exclusive flock on the state root (the directory itself, so nothing is left behind),
    or None if another `lab up` or its daemon holds it: one `lab up` lab at a time, even when
    two start together (the check of running labs alone races)."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(STATE_ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _daemon_argv(nodes: Mapping[str, Mapping[str, str | None]], source: str, enrolment: str,
                 verbose: bool) -> list[str]:
    return [sys.executable, "-m", "kmesh_lab.labd", "--nodes-json", json.dumps(nodes),
            "--source", source, "--enrolment", enrolment, *(["-v"] if verbose else [])]


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    """End a daemon that is not up: SIGTERM ends its start and it removes what it made; one
    still running after RUNNER_STOP_TIMEOUT (stuck) is SIGKILLed with its process group, and
    whatever it or a crash left is removed here."""
    daemon.terminate()
    try:
        daemon.wait(RUNNER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"kmesh-plugin lab up: the daemon (pid {daemon.pid}) did not stop within "
              f"{RUNNER_STOP_TIMEOUT:.0f} s; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    if daemon.stdout is not None:
        daemon.stdout.close()
    for line in teardown_left_by(daemon.pid):
        print(f"kmesh-plugin lab up: {line}", file=sys.stderr)


def _await_ready(daemon: subprocess.Popen[bytes], verbose: bool) -> int:
    """Relay the daemon's start-up until it says READY (0) or ends or times out (1)."""
    assert daemon.stdout is not None
    deadline = time.monotonic() + UP_TIMEOUT
    said: list[str] = []
    buffer = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([daemon.stdout], [], [], left)[0]:
            print(f"kmesh-plugin lab up: the lab was not up within {UP_TIMEOUT:.0f} s; "
                  "stopping it:\n" + "\n".join(said[-20:]), file=sys.stderr)
            _stop_daemon(daemon)
            return 1
        chunk = os.read(daemon.stdout.fileno(), 65536)
        if not chunk:  # the daemon ended before it was up: it removed what it made
            print("kmesh-plugin lab up: failed:\n" + "\n".join(said[-20:]), file=sys.stderr)
            _stop_daemon(daemon)
            return 1
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith(READY):
                info = json.loads(line[len(READY):])
                daemon.stdout.close()
                print(f"lab {info['id']} up: nodes {', '.join(info['nodes'])} (pid {info['pid']};"
                      f" log {Path(info['state']) / 'logs' / LOG_NAME})")
                print(f"kubeconfig: {info['kubeconfig']}")
                print(f"export KUBECONFIG={info['kubeconfig']}")
                return 0
            said.append(line)
            if verbose:
                print(line, flush=True)


def cmd_down() -> int:
    for line in teardown_all() or ["nothing to remove"]:
        print(line)
    return 0


def cmd_status(output: str = "text") -> int:
    record = running_up()
    if record is None:
        print("no lab is up (kmesh-plugin lab up starts one)" if output == "text"
              else json.dumps({"up": False}))
        return 1
    agents = {node: {"pid": pid, "alive": alive(int(pid))}
              for node, pid in (record.get("agents") or {}).items()}
    healthy = all(a["alive"] for a in agents.values()) and len(agents) == len(
        record.get("nodes") or agents)
    view = {"up": True, "healthy": healthy, **{k: record.get(k) for k in (
        "id", "pid", "api", "kubeconfig", "source", "enrolment", "nodes")}, "agents": agents}
    if output == "json":
        print(json.dumps(view, indent=1))
    else:
        print(f"lab {view['id']} up (pid {view['pid']}), API server {view['api']}, "
              f"{view['source']} source, {view['enrolment']} enrolment")
        print(f"export KUBECONFIG={view['kubeconfig']}")
        for node in view["nodes"] or agents:
            agent = agents.get(node)
            state = "no agent" if agent is None else (
                f"agent pid {agent['pid']} {'running' if agent['alive'] else 'DEAD'}")
            print(f"  node {node}: {state} (kmesh-plugin status --node {node})")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
