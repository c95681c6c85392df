"""kmesh-cni: the chained CNI plugin that enrols a pod's network namespace for the datapath.

ADD reads the pod netns's cookie, puts it in <pinDir>/maps/kmesh_enrolled (in enrolment mode
"cni" the connect programs translate only sockets of enrolled namespaces) and writes a state
record for the agent; it passes the prevResult through. DEL undoes that, CHECK verifies it, GC
drops what the runtime no longer lists, STATUS says whether the datapath is there.

The boundary: whatever the environment or stdin, the plugin prints exactly one JSON document
(a result or a spec error) or nothing (DEL, CHECK, GC and STATUS succeed silently), and exits 0
or 1. Every exception becomes an error result (code 100 for the unexpected); no traceback is
ever printed. Logs go to the conflist entry's logFile, else (warnings and errors) to stderr.

Imports are kept to what each command needs: this is a new process on every pod start and stop.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

from kmesh_plugin.cni import protocol
from kmesh_plugin.cni.protocol import CniError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); tools see the hints
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from kmesh_plugin.cni import spool


class Log:
    """One line per event: to the logFile if configured, else warnings and errors to stderr."""

    def __init__(self) -> None:
        self.fd = -1
        self.context = ""

    def use_file(self, path: object) -> None:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            if path not in (None, ""):
                self.write("WARN", f"ignoring logFile {path!r}: not an absolute path")
            return
        try:
            # O_NONBLOCK: a FIFO must not hang a pod start; only a regular file that is not
            # our stdout is used (the result JSON must be alone on stdout).
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC |
                         os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            self.write("WARN", f"cannot open logFile {path!r}: {exc.strerror}; logging to stderr")
            return
        st = os.fstat(fd)
        try:
            out = os.fstat(1)
            same = (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino)
        except OSError:
            same = False
        if not stat.S_ISREG(st.st_mode) or same:
            os.close(fd)
            self.write("WARN", f"ignoring logFile {path!r}: not a regular file of its own")
            return
        self.fd = fd

    def info(self, text: str) -> None:
        if self.fd >= 0:
            self.write("INFO", text)

    def warn(self, text: str) -> None:
        self.write("WARN", text)

    def error(self, text: str) -> None:
        self.write("ERROR", text)

    def write(self, level: str, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = f"{self.context}{text}".replace("\n", "\\n").replace("\r", "\\r")
        line = f"{stamp} kmesh-cni[{os.getpid()}] {level} {body}\n"
        data = line.encode("utf-8", "backslashreplace")
        for fd in (self.fd, 2) if self.fd >= 0 else (2,):
            try:
                os.write(fd, data)
                return
            except OSError:
                continue  # a closed stderr must not turn into an error of ours

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def main(argv: list[str] | None = None, *, environ: Mapping[str, str] | None = None,
         stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Run one CNI command; returns the exit status (0 success, 1 error).

    ``argv`` is ignored (CNI passes everything in the environment); ``environ``, ``stdin_fd``
    and ``stdout_fd`` let tests run the real entry point in-process."""
    env_vars = os.environ if environ is None else environ
    start = time.monotonic()
    log = Log()
    version = protocol.LATEST
    try:
        try:
            env = protocol.parse_env(env_vars)
            log.context = _context(env)
            if env.command == "VERSION" and _isatty(stdin_fd):
                data = b""  # a person typing `kmesh-cni` at a terminal: do not wait for them
            else:
                data = protocol.read_stdin(stdin_fd)
            if env.command == "VERSION":
                return _emit(stdout_fd, protocol.version_answer(data), log)
            conf = protocol.decode_config(data)
            log.use_file(conf.get("logFile"))
            if conf.get("cniVersion") in protocol.SUPPORTED_VERSIONS:
                version = conf["cniVersion"]  # errors from here on speak the request's version
            version = protocol.request_version(conf, env.command)
            protocol.check_name(conf)
            result = COMMANDS[env.command](env, conf, version, log)
        except BaseException as exc:  # the boundary: every failure becomes an error result
            err = as_cni_error(exc)
            log.error(f"code {err.code}: {err.msg}" + (f" ({err.details})" if err.details else ""))
            _emit(stdout_fd, protocol.error_document(err, version), log)
            return 1
        log.info(f"ok in {(time.monotonic() - start) * 1000:.1f} ms")
        return _emit(stdout_fd, result, log) if result is not None else 0
    except BaseException:  # even the error path failed (stdout gone): exit 1, say nothing
        return 1
    finally:
        log.close()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _context(env: protocol.Env) -> str:
    parts = [env.command]
    if env.container_id:
        parts.append(f"{env.container_id[:64]}/{env.ifname[:16]}")
    return " ".join(parts) + ": "


def _emit(fd: int, document: Mapping[str, Any], log: Log) -> int:
    data = protocol.encode(document)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        log.error(f"cannot write the result to stdout: {exc.strerror}")
        return 1
    return 0


def as_cni_error(exc: BaseException) -> CniError:
    """Our error for any exception (code 100 names the type and where it was raised)."""
    if isinstance(exc, CniError):
        return exc
    # Our exception classes, looked up without importing: an exception can only be one of
    # them if its module was loaded, and the error path must not fail on an import.
    spool = sys.modules.get("kmesh_plugin.cni.spool")
    enrol = sys.modules.get("kmesh_plugin.cni.enrol")
    if spool is not None and isinstance(exc, spool.LockTimeout):
        return CniError(protocol.E_TRY_AGAIN, "another kmesh-cni holds the state lock",
                        str(exc))
    if enrol is not None and isinstance(exc, enrol.NetnsError):
        return CniError(protocol.E_NETNS, exc.strerror or str(exc))
    if enrol is not None and isinstance(exc, enrol.MapError):
        return CniError(protocol.E_DATAPATH, exc.strerror or str(exc))
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    text = str(exc)[:300]
    return CniError(protocol.E_INTERNAL, f"internal error: {type(exc).__name__}{where}", text)


class _StateErrors:
    """Turns an OSError of the state directory into code 103 (our subclasses pass through)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        from kmesh_plugin.cni import enrol, spool

        if not isinstance(exc, OSError):
            return
        if isinstance(exc, spool.LockTimeout | enrol.NetnsError | enrol.MapError):
            return
        raise CniError(protocol.E_STATE, f"{self.what}: {exc.strerror or exc}",
                       getattr(exc, "filename", "") or "") from None


# -- commands ------------------------------------------------------------------------------


def cmd_add(env: protocol.Env, conf: Mapping[str, Any], version: str, log: Log) -> dict[str, Any]:
    from kmesh_plugin.cni import enrol, spool

    pin_dir, state_dir = _dirs(conf)
    prev = protocol.required_prev_result(conf, "ADD")
    cookie = _pod_cookie(env.netns)
    rec = spool.PodRecord(
        env.container_id, env.ifname, env.netns, cookie,
        pod_namespace=env.args.get("K8S_POD_NAMESPACE", ""),
        pod_name=env.args.get("K8S_POD_NAME", ""),
        pod_uid=env.args.get("K8S_POD_UID", ""),
        ips=tuple(protocol.result_ips(prev, _is_ip)), cni_version=version,
        enrolled_at=time.time(), network=str(conf.get("name", "")),
    )
    if _by_agent(conf):
        with _StateErrors("state"), spool.StateLock(state_dir):
            spool.write_record(state_dir, rec)  # the agent enrols it, or not, from this
        log.info(f"recorded netns {env.netns} cookie {cookie} for the agent to enrol")
        return protocol.convert_result(prev, version)
    with enrol.EnrolledMap(pin_dir) as enrolled, _StateErrors("state"), \
            spool.StateLock(state_dir):
        old = _read_record(state_dir, env, log)
        # The record first, then the cookie: a cookie in the map always has a record (a crash
        # in between leaves a record DEL and GC clean up), never the other way round.
        spool.write_record(state_dir, rec)
        try:
            enrolled.add(cookie)
        except BaseException:
            if old is not None:
                spool.write_record(state_dir, old)
            else:
                spool.remove_record(state_dir, env.container_id, env.ifname)
            raise
        if old is not None and old.netns_cookie != cookie and \
                not _shared(state_dir, old.netns_cookie, rec.key):
            enrolled.remove(old.netns_cookie)  # ADD again without DEL, in a new netns
    log.info(f"enrolled netns {env.netns} cookie {cookie}")
    return protocol.convert_result(prev, version)


def cmd_del(env: protocol.Env, conf: Mapping[str, Any], version: str, log: Log) -> None:
    from kmesh_plugin.cni import enrol, spool

    pin_dir, state_dir = _dirs(conf)
    # prevResult is not used by DEL, and a DEL that fails stops the runtime's chain (bridge
    # and IPAM would not be torn down): not even a malformed one is an error here.
    with _StateErrors("state"), spool.StateLock(state_dir):
        rec = _read_record(state_dir, env, log)
        cookie = rec.netns_cookie if rec is not None else None
        if cookie is None and env.netns:
            # No record (a second DEL, or a lost state dir): if the netns is still there, its
            # cookie may still be enrolled; a cookie no record names is ours to remove.
            try:
                cookie = enrol.cookie_of_path(env.netns)
            except FileNotFoundError:
                cookie = None
            except Exception as exc:  # best effort: DEL must not fail on what it cannot see
                log.warn(f"cannot read the cookie of {env.netns}: {as_cni_error(exc).msg}")
                cookie = None
        if cookie is not None and not _shared(state_dir, cookie, (env.container_id,
                                                                   env.ifname)):
            try:
                with enrol.EnrolledMap(pin_dir) as enrolled:
                    # The cookie before the record: if this fails the record stays, and the
                    # runtime's retry of DEL finds it again.
                    if enrolled.remove(cookie):
                        log.info(f"removed cookie {cookie}")
            except enrol.MapError as exc:
                if exc.errno != errno.ENOENT:  # no datapath pinned: nothing is enrolled
                    raise
                log.info(f"no {enrol.MAP_ENROLLED} pinned under {pin_dir}; nothing to remove")
        spool.remove_record(state_dir, env.container_id, env.ifname)
    return None


def cmd_check(env: protocol.Env, conf: Mapping[str, Any], version: str, log: Log) -> None:
    from kmesh_plugin.cni import enrol, spool

    pin_dir, state_dir = _dirs(conf)
    protocol.required_prev_result(conf, "CHECK")
    with _StateErrors("state"):
        rec = spool.read_record(state_dir, env.container_id, env.ifname)
    if rec is None:
        raise CniError(protocol.E_NOT_ENROLLED, "attachment not enrolled",
                       f"no state record for {env.container_id}/{env.ifname}")
    with enrol.EnrolledMap(pin_dir) as enrolled:
        if not _by_agent(conf) and not enrolled.contains(rec.netns_cookie):
            raise CniError(protocol.E_NOT_ENROLLED, "netns cookie missing from kmesh_enrolled",
                           f"cookie {rec.netns_cookie} of {env.container_id}/{env.ifname}")
    try:
        cookie = enrol.cookie_of_path(env.netns)
    except FileNotFoundError:
        log.info(f"netns {env.netns} is gone; record and map agree")
        return None
    if cookie != rec.netns_cookie:
        raise CniError(protocol.E_NOT_ENROLLED, "netns cookie changed since ADD",
                       f"{env.netns} has cookie {cookie}, enrolled {rec.netns_cookie}")
    return None


def cmd_gc(env: protocol.Env, conf: Mapping[str, Any], version: str, log: Log) -> None:
    from kmesh_plugin.cni import enrol, spool

    pin_dir, state_dir = _dirs(conf)
    valid = _valid_attachments(conf)
    errors: list[str] = []
    network = str(conf.get("name", ""))
    with _StateErrors("state"), spool.StateLock(state_dir):
        records, bad = spool.scan(state_dir)
        # valid-attachments lists this network's attachments only: another network that
        # chains kmesh-cni (another runtime, a second conflist) keeps its own. A record
        # without a network name (an older kmesh-cni's) is kept: it cannot be judged.
        stale = [r for r in records if r.network == network and network
                 and r.key not in valid]
        keep = {r.netns_cookie for r in records if r not in stale}
        try:
            enrolled: enrol.EnrolledMap | None = enrol.EnrolledMap(pin_dir)
        except enrol.MapError as exc:
            enrolled = None
            if exc.errno != errno.ENOENT:
                # The cookies cannot be removed: keep their records too (a cookie always has
                # a record), and say why.
                errors.append(str(exc.strerror))
                stale = []
        try:
            for rec in stale:
                try:
                    if enrolled is not None and rec.netns_cookie not in keep:
                        enrolled.remove(rec.netns_cookie)
                    spool.remove_record(state_dir, rec.container_id, rec.ifname)
                    log.info(f"gc: removed {rec.container_id}/{rec.ifname}")
                except OSError as exc:
                    errors.append(f"{rec.container_id}/{rec.ifname}: {exc.strerror or exc}")
            # A crashed writer's temporaries: nobody can use them. Unreadable records are
            # left alone (a newer kmesh-cni's, say) and so is every cookie while any exists:
            # their cookies cannot be told apart from orphans.
            for path in spool.stale_temporaries(state_dir):
                try:
                    spool.remove_file(path)
                    log.warn(f"gc: removed a stale temporary file {path}")
                except OSError as exc:
                    errors.append(f"{path}: {exc.strerror or exc}")
            for path, reason in bad:
                log.warn(f"gc: left unreadable state file {path} ({reason})")
            # Cookies no record names (left by a crash between the two steps of ADD).
            if enrolled is not None and not bad:
                for cookie in enrolled.cookies():
                    if cookie not in keep:
                        try:
                            enrolled.remove(cookie)
                            log.info(f"gc: removed orphan cookie {cookie}")
                        except OSError as exc:
                            errors.append(f"cookie {cookie}: {exc.strerror or exc}")
        finally:
            if enrolled is not None:
                enrolled.close()
    if errors:
        raise CniError(protocol.E_STATE, f"GC finished with {len(errors)} error(s)",
                       "; ".join(errors)[:2000])
    return None


def cmd_status(env: protocol.Env, conf: Mapping[str, Any], version: str, log: Log) -> None:
    from kmesh_plugin.cni import enrol

    pin_dir = protocol.required_path(conf, "pinDir")
    try:
        enrol.EnrolledMap(pin_dir).close()
    except enrol.MapError as exc:
        raise CniError(protocol.E_NOT_AVAILABLE, "the kmesh datapath is not available",
                       exc.strerror or str(exc)) from None
    return None


COMMANDS = {"ADD": cmd_add, "CHECK": cmd_check, "DEL": cmd_del, "GC": cmd_gc,
            "STATUS": cmd_status}


# -- helpers -------------------------------------------------------------------------------


def _dirs(conf: Mapping[str, Any]) -> tuple[str, str]:
    return protocol.required_path(conf, "pinDir"), protocol.required_path(conf, "stateDir")


def _by_agent(conf: Mapping[str, Any]) -> bool:
    """``"enrol": "agent"`` (cni.namespace_selector is set): ADD only records the pod, and the
    agent enrols it if its Namespace matches. Absent or "cni": ADD enrols it."""
    mode = conf.get("enrol", "cni")
    if mode not in ("cni", "agent"):
        raise CniError(protocol.E_INVALID_CONFIG, "invalid network config",
                       f'"enrol" must be "cni" or "agent", got {str(mode)[:64]!r}')
    return mode == "agent"


def _pod_cookie(netns: str) -> int:
    from kmesh_plugin.cni import enrol

    try:
        fd = enrol.open_netns(netns)
    except FileNotFoundError:
        raise CniError(protocol.E_NETNS, "network namespace does not exist", netns) from None
    try:
        if enrol.same_netns(fd):
            raise CniError(protocol.E_NETNS, "CNI_NETNS is the plugin's own network namespace",
                           netns)
        return enrol.netns_cookie(fd, netns, fast=True)  # ADD: in every pod start's path
    finally:
        os.close(fd)


def _read_record(state_dir: str, env: protocol.Env, log: Log) -> spool.PodRecord | None:
    """The attachment's record; a malformed one is logged and treated as absent (it is
    replaced or removed by the caller)."""
    from kmesh_plugin.cni import spool

    try:
        return spool.read_record(state_dir, env.container_id, env.ifname)
    except ValueError as exc:
        log.warn(f"ignoring malformed state record: {exc}")
        return None


def _shared(state_dir: str, cookie: int, key: tuple[str, str]) -> bool:
    """Whether a record other than ``key`` enrols the same netns (then its cookie stays)."""
    from kmesh_plugin.cni import spool

    records, _bad = spool.scan(state_dir)
    return any(r.netns_cookie == cookie and r.key != key for r in records)


def _valid_attachments(conf: Mapping[str, Any]) -> set[tuple[str, str]]:
    """GC's list of attachments to keep. Missing or malformed is an invalid config: reading it
    as "keep nothing" would unenrol every pod."""
    key = "cni.dev/valid-attachments"
    items = conf.get(key)
    if not isinstance(items, list):
        raise CniError(protocol.E_INVALID_CONFIG, f"GC needs {key} (a list)",
                       f"got {type(items).__name__}")
    out: set[tuple[str, str]] = set()
    for item in items:
        cid = item.get("containerID") if isinstance(item, dict) else None
        ifname = item.get("ifname") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(protocol.E_INVALID_CONFIG,
                           f"{key}: every entry needs containerID and ifname strings",
                           repr(item)[:200])
        out.add((cid, ifname))
    return out


def _is_ip(text: str) -> bool:
    import socket

    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
