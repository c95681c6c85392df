"""The seed document's kubectl commands, read out of the document itself.

The seed (Kmesh's "Locality Load Balancing" page, as the user gave it) is prose with shell
commands. From "Assign locality information to nodes" on, every command is a ``kubectl`` line
(the ``kind create cluster`` step before it, and installing Istio and Kmesh, are what the lab
replaces). Its ``kubectl apply -n sample -f - <<EOF`` lines feed heredoc YAML whose indentation
the page lost, so the manifest of each heredoc is taken from the seed scenario
(``scenarios/seed.yaml``), matched by the kind and name the flattened text still shows; the
command line itself stays the document's.

After each ``kubectl exec`` the document shows example answers (``Hello version: ...``):
:attr:`SeedCommand.examples` keeps them, so a test can hold the lab to what the document says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kmesh_lab import scenario
from kmesh_lab.kube import LabError

START = "Assign locality information to nodes"
HEREDOC = " <<EOF"


@dataclass
class SeedCommand:
    line: str  # the document's command line, verbatim
    manifest: str | None = None  # the heredoc's YAML (from the seed scenario)
    examples: list[str] = field(default_factory=list)  # "Hello version: ..." lines after it

    @property
    def script(self) -> str:
        """What a shell runs: the line, with its heredoc when it has one."""
        if self.manifest is None:
            return self.line
        return f"{self.line}\n{self.manifest.rstrip()}\nEOF\n"

    @property
    def example_versions(self) -> list[str]:
        """The SERVICE_VERSION of each example answer."""
        return [m.group(1) for e in self.examples
                if (m := re.match(r"Hello version: ([^,]+),", e))]


def _scenario_manifests() -> dict[tuple[str, str], str]:
    """(kind, name) -> YAML of every object the seed scenario applies."""
    found: dict[tuple[str, str], str] = {}
    for step in scenario.load(scenario.seed_path(False)).steps:
        if step.kind != "apply":
            continue
        text = step.body["text"]
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict):
                found[(doc["kind"], doc["metadata"]["name"])] = text
    return found


def _identify(body: Iterable[str]) -> tuple[str, str]:
    """The kind and metadata.name of a flattened manifest: its first ``kind:`` and the first
    ``name:`` after ``metadata:``."""
    kind = name = None
    in_metadata = False
    for line in body:
        if kind is None and line.startswith("kind:"):
            kind = line.partition(":")[2].strip()
        elif line == "metadata:":
            in_metadata = True
        elif in_metadata and name is None and line.startswith("name:"):
            name = line.partition(":")[2].strip()
    if kind is None or name is None:
        raise LabError(f"a heredoc of the seed document shows no kind or name: {list(body)!r}")
    return kind, name


def commands(text: str) -> list[SeedCommand]:
    """Every kubectl command of the document from "Assign locality information to nodes" on."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        first = next(i for i, line in enumerate(lines) if line.endswith(START))
    except StopIteration:
        raise LabError(f"the seed document has no heading {START!r}") from None
    manifests = _scenario_manifests()
    found: list[SeedCommand] = []
    i = first + 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("kubectl "):
            command = SeedCommand(line)
            if line.endswith(HEREDOC):
                end = lines.index("EOF", i)
                key = _identify(lines[i:end])
                if key not in manifests:
                    raise LabError(f"the seed scenario applies no {key[0]} {key[1]!r}, which the "
                                   "seed document's heredoc creates")
                command.manifest = manifests[key]
                i = end + 1
            found.append(command)
        elif line.startswith("Hello version:") and found:
            found[-1].examples.append(line)
    return found


def read(path: Path) -> list[SeedCommand]:
    try:
        text = path.read_text()
    except OSError as e:
        raise LabError(f"{path}: cannot read the seed document: {e.strerror}") from None
    return commands(text)


def summary(cmds: list[SeedCommand]) -> list[dict[str, Any]]:
    return [{"line": c.line, "heredoc": c.manifest is not None, "examples": c.examples}
            for c in cmds]
