"""The ``kmesh-plugin`` command.

Exit codes: 0 success, 1 failure at run time (kernel, bpftool, source), 2 invalid
configuration or usage (the message names the file and key), 3 an unmet lab expectation.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmesh_plugin import config as config_mod
from kmesh_plugin import logs
from kmesh_plugin.errors import ConfigError, KmeshError
from kmesh_plugin.plugins import PluginError, Plugins

log = logging.getLogger("kmesh_plugin")

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
COMMANDS_GROUP = "kmesh_plugin.commands"
DEFAULT_CONFIG = Path("plugin.toml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"kmesh-plugin: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KmeshError as e:
        print(f"kmesh-plugin: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM (the lab maps it here); cleanups ran on the way out.
        print("kmesh-plugin: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _config_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", "-c", type=Path, default=None,
                        help="the node's plugin.toml (default: ./plugin.toml)")
    return parser


def _node_arg(parser: argparse.ArgumentParser, help: str) -> argparse.ArgumentParser:
    parser.add_argument("--node", metavar="NAME", help=help + "; without --config, the config "
                        "of the agent running for NAME on this machine")
    return parser


def _output_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return parser


def _parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
            extensions: bool = True) -> argparse.ArgumentParser:
    """The command line. ops.locate parses a running agent's argv with this same definition
    (its own ``parser_class``, which neither prints nor exits; no extensions, which only add
    other commands), so it reads ``--config`` exactly as the agent did."""
    p = parser_class(prog="kmesh-plugin", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(metavar="COMMAND")

    run = _config_arg(sub.add_parser("run", help="run the node agent"))
    run.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                     help="how long to wait for another agent holding the pin dir to exit "
                     "(an overlapping restart) before giving up; 0 fails at once "
                     "(default: 60)")
    run.set_defaults(func=cmd_run)

    check = _config_arg(
        sub.add_parser("check-config", help="validate plugin.toml and the enabled plugins"))
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="list installed strategy plugins")
    plugins.set_defaults(func=cmd_plugins)

    explain = _output_arg(_config_arg(
        sub.add_parser("explain", help="why a Service's connects go where they go")))
    explain.add_argument("service")
    explain.add_argument("-n", "--namespace", default="default")
    _node_arg(explain, "explain from this node's seat (default: the config's node)")
    explain.set_defaults(func=cmd_explain)

    dump = _output_arg(_config_arg(sub.add_parser("dump", help="the pinned maps, decoded")))
    _node_arg(dump, "the maps of this node's agent")
    dump.set_defaults(func=cmd_dump)

    status = _output_arg(_config_arg(
        sub.add_parser("status", help="agent health, links, map fill, last reconcile")))
    _node_arg(status, "the agent of this node")
    status.add_argument("--ready", action="store_true",
                        help="also exit 1 until the agent has synced with its source "
                        "(a readiness probe; liveness needs only a live agent)")
    status.set_defaults(func=cmd_status)

    dp = sub.add_parser("datapath", help="manage the pinned datapath")
    dp_sub = dp.add_subparsers(metavar="ACTION")
    build = _config_arg(
        dp_sub.add_parser("build", help="compile bpf/kmesh_lb.c for plugin.toml's capacities"))
    build.set_defaults(func=cmd_datapath_build)
    remove = _config_arg(
        dp_sub.add_parser("remove", help="detach the programs and remove every pin"))
    remove.set_defaults(func=cmd_datapath_remove)

    cni = sub.add_parser("cni", help="the chained CNI plugin kmesh-cni in the node's conflist")
    cni_sub = cni.add_subparsers(metavar="ACTION")
    cni_install = _config_arg(cni_sub.add_parser(
        "install", help="add kmesh-cni at the end of the conflist's plugins (cni.conflist, "
        "else the first *.conflist in cni.conf_dir) and write <cni.bin_dir>/kmesh-cni"))
    cni_install.set_defaults(func=cmd_cni_install)
    cni_uninstall = _config_arg(cni_sub.add_parser(
        "uninstall", help="remove kmesh-cni from the conflist and <cni.bin_dir>/kmesh-cni"))
    cni_uninstall.set_defaults(func=cmd_cni_uninstall)

    uninstall = _config_arg(sub.add_parser(
        "uninstall", help="detach the programs and remove every pin, compiled object and "
        "status file of this installation"))
    uninstall.add_argument("--force", action="store_true",
                           help="also while an agent still holds the pin dir")
    uninstall.set_defaults(func=cmd_uninstall)

    if extensions:
        _add_extensions(sub)
    return p


def _add_extensions(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Commands other distributions add (entry-point group ``kmesh_plugin.commands``): each
    entry point is a function that adds its subparsers. The core knows none of them by name;
    the lab (``kmesh-plugin lab``) is one, installed with the kmesh-lab distribution."""
    for ep in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken extension must not take the agent's CLI down
            print(f"kmesh-plugin: command extension {ep.name!r} ({ep.value}) failed to load: "
                  f"{e}", file=sys.stderr)


def _load_config(path: Path | None) -> config_mod.Config:
    return config_mod.load(DEFAULT_CONFIG if path is None else path)


def _located_config(args: argparse.Namespace, seat: bool = False) -> config_mod.Config:
    """--config if given, else with --node the config of that node's running agent (found
    through /proc, see ops.locate), else ./plugin.toml. ``seat``: --node with --config is
    the node to look from (explain), not a second way to name the config."""
    if args.config is None and args.node:
        from kmesh_plugin.ops.locate import config_for_node

        # The agent resolved its node name in its own environment ([node] name, else its
        # $NODE_NAME, else its host name), not in ours: the config is loaded with the name
        # the agent was found under, so status/dump/explain speak for that node.
        return config_mod.load(config_for_node(args.node), overrides={"node.name": args.node})
    cfg = _load_config(args.config)
    if args.node and not seat and args.node != cfg.node_name:
        raise ConfigError(cfg.path, "node.name", f"is {cfg.node_name!r}, not --node "
                          f"{args.node!r}: drop --config to find that node's agent")
    return cfg


def _load_plugins(cfg: config_mod.Config) -> Plugins:
    try:
        return Plugins.load(cfg.enabled)
    except PluginError as e:
        raise ConfigError(cfg.path, "strategies.enabled", str(e)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from kmesh_plugin.datapath import loader
    from kmesh_plugin.sources.factory import make_source

    cfg = _load_config(args.config)
    # The pin dir, build dir and cached object the agent would trust (exit 1 if it must not).
    loader.check_paths(cfg.pin_dir, cfg.build_dir, cfg.capacities)
    plugins = _load_plugins(cfg)
    try:
        make_source(cfg).check()
    except KmeshError as e:
        raise ConfigError(cfg.path, "source", str(e)) from None
    print(f"{cfg.path}: ok (node {cfg.node_name}, source {cfg.source_kind}, plugins "
          f"{', '.join(plugins.names) or 'none'})")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from kmesh_plugin.plugins import installed_plugins

    for name, ep in sorted(installed_plugins().items()):
        dist = ep.dist.name if ep.dist else "?"
        print(f"{name}\t{ep.value}\t({dist})")
    return 0


def _cni_parts(cfg: config_mod.Config, plugins: Plugins, datapath: Any,
               state: Any) -> dict[str, Any]:
    """In enrolment mode cni: follow kmesh-cni's records (and enrol by Namespace labels when
    cni.namespace_selector is set), and guard the conflist entry when cni.install says the
    agent owns it."""
    if cfg.enrolment != "cni":
        return {}
    from kmesh_plugin.agent.pods import PodWatch
    from kmesh_plugin.cni import conflist
    from kmesh_plugin.datapath import records
    from kmesh_plugin.model.selector import parse

    parts: dict[str, Any] = {}
    if cfg.cni_install:
        parts["housekeeping"] = lambda: conflist.ensure_installed(cfg)
    if cfg.cni_namespace_selector:
        def labels(namespace: str) -> dict[str, str] | None:
            ns = state.namespaces.get(namespace)
            if ns is not None:
                return dict(ns.labels)
            return {} if namespace == "" else None  # a pod without a namespace (podman)

        parts["pods"] = PodWatch(cfg.cni_state_dir, plugins,
                                 selector=parse(cfg.cni_namespace_selector),
                                 enrolled=datapath[records.MAP_ENROLLED],
                                 namespace_labels=labels)
    else:
        parts["pods"] = PodWatch(cfg.cni_state_dir, plugins)
    return parts


def cmd_run(args: argparse.Namespace) -> int:
    from kmesh_plugin.agent.agent import Agent
    from kmesh_plugin.agent.metrics import AgentMetrics
    from kmesh_plugin.agent.state import ClusterState
    from kmesh_plugin.agent.status import StatusFile
    from kmesh_plugin.datapath import loader, records
    from kmesh_plugin.datapath.bpftool import Bpftool
    from kmesh_plugin.hookspecs import StrategySettings
    from kmesh_plugin.sources.factory import make_source

    # Everything that can be checked is checked before the kernel is touched.
    cfg = _load_config(args.config)
    logs.setup(cfg.log_level, cfg.log_format)
    loader.check_paths(cfg.pin_dir, cfg.build_dir, cfg.capacities)
    plugins = _load_plugins(cfg)
    source = make_source(cfg)
    try:
        source.check()
    except KmeshError as e:
        raise ConfigError(cfg.path, "source", str(e)) from None
    # One agent per pin dir: held from here until this process exits. An agent still running
    # on it (a restart that overlaps the old pod) is waited for; meanwhile the pinned datapath
    # keeps translating. Taken before the metrics port, which the old agent still holds.
    timeout = loader.LOCK_TIMEOUT if args.lock_timeout is None else args.lock_timeout
    lock = loader.lock_pin_dir(cfg.pin_dir, timeout)
    metrics = None
    try:
        if cfg.metrics:  # bound before the maps are touched: a taken port changes nothing
            metrics = AgentMetrics(cfg.node_name)
            try:
                metrics.serve(cfg.metrics_address, cfg.metrics_port)
            except OSError as e:
                raise ConfigError(cfg.path, "agent.metrics_port",
                                  f"cannot serve metrics on {cfg.metrics_address}:"
                                  f"{cfg.metrics_port}: {e.strerror}") from None
        datapath = loader.attach(
            cfg.pin_dir, cfg.cgroup, cfg.capacities, cfg.build_dir,
            clang=cfg.clang, bpftool=Bpftool(cfg.bpftool), lock=lock,
            enrolment=records.ENROL_CNI if cfg.enrolment == "cni" else records.ENROL_ALL,
        )
    except BaseException:
        if metrics is not None:
            metrics.close()
        lock.release()
        raise
    state = ClusterState(cfg.locality, cfg.node_name)
    agent = Agent(
        node_name=cfg.node_name,
        state=state,
        plugins=plugins,
        settings=StrategySettings(cfg.prefer_close_scopes),
        source=source,
        datapath=datapath,
        cgroup=cfg.cgroup,
        status=StatusFile(cfg.status_file),
        **_cni_parts(cfg, plugins, datapath, state),
    )

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        agent.stop()

    if metrics is not None:
        metrics.attach(agent)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run()
    finally:
        if metrics is not None:
            metrics.close()
        datapath.close()
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from kmesh_plugin.ops.explain import explain, render

    cfg = _located_config(args, seat=True)
    result = explain(cfg, _load_plugins(cfg), args.namespace, args.service, args.node)
    print(json.dumps(result.to_json(), indent=1) if args.output == "json" else render(result))
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from kmesh_plugin.ops.status import dump, enrolled_pods, render_dump

    cfg = _located_config(args)
    view = dump(cfg)
    pods = enrolled_pods(cfg, view)
    if args.output == "json":
        print(json.dumps({**view.to_json(), "enrolled": pods}, indent=1))
    else:
        print(render_dump(view, pods))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the agent is alive (heartbeat) and the datapath attached, 1 otherwise;
    with --ready also 1 until the agent has synced. Source or reconcile errors are warnings:
    restarting the agent cannot fix them, and the maps keep their last good state."""
    from kmesh_plugin.ops.status import render_status, status

    result = status(_located_config(args))
    print(json.dumps(result, indent=1) if args.output == "json" else render_status(result))
    healthy = result["agent"].get("healthy") and result["datapath"].get("attached")
    if args.ready:
        healthy = healthy and result["agent"].get("synced")
    return 0 if healthy else EXIT_FAILURE


def cmd_datapath_build(args: argparse.Namespace) -> int:
    from kmesh_plugin.datapath.build import compile_object

    cfg = _load_config(args.config)
    print(compile_object(cfg.capacities, cfg.build_dir, cfg.clang))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Leave the node as it was before this installation: no program attached, no pin, no
    compiled object of ours, no status file. Run twice, the second finds nothing to do."""
    from kmesh_plugin.datapath import loader
    from kmesh_plugin.datapath.mounts import check_trusted
    from kmesh_plugin.errors import DatapathError

    cfg = _load_config(args.config)
    # Refuse before removing anything, not half-way.
    loader.check_pins_trusted(cfg.pin_dir)
    check_trusted(cfg.build_dir, "build dir")
    lock = None
    if cfg.pin_dir.is_dir():
        try:
            lock = loader.PinLock.acquire(cfg.pin_dir)
        except DatapathError as e:
            if not args.force:
                raise DatapathError(f"{e}; `uninstall --force` removes it anyway") from None
            log.warning("uninstalling under a running agent (--force): %s", e)
    done: list[str] = []
    try:
        for step in (_uninstall_cni, _uninstall_datapath, _uninstall_objects,
                     _uninstall_cni_state, _uninstall_status):
            done += step(cfg)
    finally:
        if lock is not None:
            lock.release()
    for line in done or [f"nothing to uninstall for {cfg.path}"]:
        print(line)
    return 0


def _uninstall_cni(cfg: config_mod.Config) -> list[str]:
    """The chained CNI plugin's entry in the node's conflist goes first (no new pod enrols
    once uninstall has begun), then its launcher: a runtime reads the conflist again for every
    pod, so none execs kmesh-cni once the entry is gone. A conflist that mentions kmesh-cni but
    cannot be parsed stops uninstall here, before anything is removed."""
    from kmesh_plugin.cni import conflist

    return conflist.remove_installed(cfg)


def cmd_cni_install(args: argparse.Namespace) -> int:
    """Prints which conflist was chosen and why, then one line per file: what was done.
    Warnings (a runtime loads another file first) go to stderr; they do not fail."""
    from kmesh_plugin.cni import conflist

    report = conflist.install(_load_config(args.config))
    for line in report.lines:
        print(line)
    for warning in report.warnings:
        print(f"kmesh-plugin: warning: {warning}", file=sys.stderr)
    return 0


def cmd_cni_uninstall(args: argparse.Namespace) -> int:
    from kmesh_plugin.cni import conflist

    cfg = _load_config(args.config)
    where = cfg.cni_conf_dir / (cfg.cni_conflist or "*.conflist")
    for line in conflist.remove_installed(cfg) or [
            f"nothing to uninstall: no kmesh-cni entry in {where}, no "
            f"{conflist.launcher_path(cfg)} of ours"]:
        print(line)
    return 0


def _uninstall_datapath(cfg: config_mod.Config) -> list[str]:
    from kmesh_plugin.datapath import loader

    return loader.remove(cfg.pin_dir)


def _uninstall_objects(cfg: config_mod.Config) -> list[str]:
    from kmesh_plugin.datapath import build

    return build.remove_objects(cfg.build_dir)


def _uninstall_cni_state(cfg: config_mod.Config) -> list[str]:
    """kmesh-cni's pod records (their cookies went with the maps), its lock file, and the
    directories if nothing else is in them. Only names kmesh-cni writes are removed."""
    from kmesh_plugin.cni import spool

    state = cfg.cni_state_dir
    pods = Path(spool.pods_dir(state))
    done = []
    if not state.is_dir():
        return done
    try:
        # Under kmesh-cni's lock: a DEL still running finishes first, or starts after.
        with spool.StateLock(state):
            if pods.is_dir():
                for path in sorted(pods.iterdir()):
                    if path.suffix == spool.SUFFIX or ".tmp." in path.name:
                        path.unlink(missing_ok=True)
                        done.append(f"removed {path}")
    except OSError as e:
        raise KmeshError(f"cannot remove kmesh-cni's state in {state}: {e}") from None
    lock = state / spool.LOCK
    if lock.is_file():  # the conflist entry is gone: no new kmesh-cni takes it
        lock.unlink(missing_ok=True)
        done.append(f"removed {lock}")
    for directory in (pods, state):
        try:
            directory.rmdir()
        except OSError:
            pass  # absent, or not empty: the rest is not ours
        else:
            done.append(f"removed {directory}")
    return done


def _uninstall_status(cfg: config_mod.Config) -> list[str]:
    """The status file, a temporary one a crash left (StatusFile writes ``.<name>.*``), and
    its directory if nothing else is in it."""
    path = cfg.status_file
    done = []
    for leftover in (path, *path.parent.glob(f".{path.name}.*")):
        if leftover.is_file() or leftover.is_symlink():
            leftover.unlink()
            done.append(f"removed {leftover}")
    if done:
        try:
            path.parent.rmdir()
        except OSError:
            pass  # not empty: the rest is not ours
        else:
            done.append(f"removed {path.parent}")
    return done


def cmd_datapath_remove(args: argparse.Namespace) -> int:
    from kmesh_plugin.datapath import loader

    cfg = _load_config(args.config)
    for line in loader.remove(cfg.pin_dir) or [f"nothing pinned at {cfg.pin_dir}"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
