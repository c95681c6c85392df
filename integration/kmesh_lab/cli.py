"""`kmesh-plugin lab ...`: the lab's commands, added to the product's CLI through the
entry-point group ``kmesh_plugin.commands`` (the product does not import the lab)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser("lab", help="the multi-node lab on this machine (root)")
    lab_sub = lab.add_subparsers(metavar="ACTION")
    seed = lab_sub.add_parser("seed", help="run the seed document's experiment")
    seed.add_argument("--local", action="store_true",
                      help="the internalTrafficPolicy: Local variant")
    seed.set_defaults(func=cmd_lab_seed)
    lrun = lab_sub.add_parser("run", help="run a scenario file")
    lrun.add_argument("scenario", type=Path)
    lrun.set_defaults(func=cmd_lab_run)
    up = lab_sub.add_parser(
        "up", help="start a lab in the background, driven with kubectl (default nodes: the "
        "seed's kind workers ambient-worker, ambient-worker2, ambient-worker3, unlabelled)")
    up.add_argument("--nodes", type=Path, metavar="FILE",
                    help="YAML mapping node names to their labels (bare or under 'nodes:', so "
                    "a scenario file works)")
    up.add_argument("-v", "--verbose", action="store_true", help="show the lab starting")
    up.set_defaults(func=cmd_lab_up)
    status = lab_sub.add_parser("status", help="which lab `lab up` runs, its nodes and agents "
                                "(exit 1 when none is up or an agent is down)")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.set_defaults(func=cmd_lab_status)
    down = lab_sub.add_parser("down", help="stop `lab up`'s lab and remove everything any lab "
                              "left behind")
    down.set_defaults(func=cmd_lab_down)
    for sp in (seed, lrun, up):
        sp.add_argument("--source", choices=("kubernetes", "manifests"), default="kubernetes",
                        help="how the agents read the cluster: watching the lab's API server "
                        "(default), or a manifest directory the lab mirrors from it")
        sp.add_argument("--enrolment", choices=("cni", "all"), default="cni",
                        help="which sockets the agents take: the pods kmesh-cni enrolled in the "
                        "lab's CNI chain (default), or every process in the node's cgroup")
    for sp in (seed, lrun):
        sp.add_argument("--keep-going", action="store_true",
                        help="run every step even after an unmet expectation")
        sp.add_argument("--json", type=Path, metavar="PATH",
                        help="write every step's tallies as JSON to PATH ('-': stdout)")
        sp.add_argument("-v", "--verbose", action="store_true", help="show agent logs")


def cmd_lab_seed(args: argparse.Namespace) -> int:
    from kmesh_lab.scenario import run_seed

    return run_seed(local=args.local, keep_going=args.keep_going, verbose=args.verbose,
                    json_path=args.json, source=args.source,
                    enrolment=args.enrolment)


def cmd_lab_run(args: argparse.Namespace) -> int:
    from kmesh_lab.scenario import run_file

    return run_file(args.scenario, keep_going=args.keep_going, verbose=args.verbose,
                    json_path=args.json, source=args.source,
                    enrolment=args.enrolment)


def cmd_lab_up(args: argparse.Namespace) -> int:
    from kmesh_lab.labd import cmd_up

    return cmd_up(args.nodes, source=args.source, enrolment=args.enrolment,
                  verbose=args.verbose)


def cmd_lab_status(args: argparse.Namespace) -> int:
    from kmesh_lab.labd import cmd_status

    return cmd_status(args.output)


def cmd_lab_down(args: argparse.Namespace) -> int:
    from kmesh_lab.labd import cmd_down

    return cmd_down()
